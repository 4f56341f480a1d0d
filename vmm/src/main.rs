//! `grove-vmm`: run a guest, restore a snapshot, or check the host.

use std::process::ExitCode;

use grove_vmm::cli;
use grove_vmm::vcpu::VmExit;
use grove_vmm::vm::Vm;

/// One line: the error and its sources joined with ": ".
fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s.replace('\n', " ")
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("grove-vmm: error: {msg}");
    ExitCode::from(1)
}

fn run(args: &[String]) -> ExitCode {
    let a = match cli::parse_run(args) {
        Ok(a) => a,
        Err(e) => return fail(&one_line(&e)),
    };
    if a.api_sock.is_some() {
        return fail("--api-sock is not available in this build");
    }
    let vm = match Vm::boot(&a.vm) {
        Ok(vm) => vm,
        Err(e) => return fail(&one_line(&e)),
    };
    finish(vm.wait_exit())
}

fn finish(exit: VmExit) -> ExitCode {
    match exit {
        VmExit::Reset => ExitCode::SUCCESS,
        VmExit::Error(msg) => fail(&msg),
    }
}

fn main() -> ExitCode {
    grove_vmm::timing::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("check-host") => {
            let code = grove_vmm::hostcheck::main(&args[1..]);
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Some("-h" | "--help" | "help") => {
            println!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Some(other) => {
            fail(&format!("unknown command {other:?}\n{}", cli::USAGE).replace('\n', "; "))
        }
        None => {
            eprintln!("{}", cli::USAGE);
            ExitCode::from(2)
        }
    }
}
