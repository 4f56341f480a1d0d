//! `grove-vmm`: run a guest, restore a snapshot, or check the host.

use std::path::PathBuf;
use std::process::ExitCode;

use grove_vmm::snapshot::{self, RestoreConfig, Standby};
use grove_vmm::vcpu::VcpuEvent;
use grove_vmm::vcpu::VmExit;
use grove_vmm::vm::Vm;
use grove_vmm::{api, cli, one_line};
use serde_json::json;

fn fail(msg: &str) -> ExitCode {
    eprintln!("grove-vmm: error: {msg}");
    ExitCode::from(1)
}

fn serve(mut vm: Vm, api_sock: Option<&str>) -> ExitCode {
    if let Some(path) = api_sock {
        if let Err(e) = api::start(path, vm.event_sender()) {
            return fail(&one_line(&e));
        }
    }
    match vm.run_until_exit() {
        VmExit::Reset => ExitCode::SUCCESS,
        VmExit::Error(msg) => match vm.page_server_failure() {
            Some(pf) => fail(&format!("{msg}; page server failed: {pf}")),
            None => fail(&msg),
        },
    }
}

fn run(args: &[String]) -> ExitCode {
    let a = match cli::parse_run(args) {
        Ok(a) => a,
        Err(e) => return fail(&one_line(&e)),
    };
    match Vm::boot(&a.vm) {
        Ok(vm) => serve(vm, a.api_sock.as_deref()),
        Err(e) => fail(&one_line(&e)),
    }
}

fn restore(args: &[String]) -> ExitCode {
    let a = match cli::parse_restore(args) {
        Ok(a) => a,
        Err(e) => return fail(&one_line(&e)),
    };
    let cfg = RestoreConfig {
        dir: PathBuf::from(&a.snapshot),
        mem_mode: a.mem_mode,
        identity: a.identity,
        serial: a.serial.clone(),
        dirty_logging: a.api_sock.is_some(),
    };
    match snapshot::restore(&cfg) {
        Ok(vm) => serve(vm, a.api_sock.as_deref()),
        Err(e) => fail(&one_line(&e)),
    }
}

fn standby(args: &[String]) -> ExitCode {
    let a = match cli::parse_standby(args) {
        Ok(a) => a,
        Err(e) => return fail(&one_line(&e)),
    };
    let sb = match Standby::new(a.vcpus, a.mem_mib) {
        Ok(s) => s,
        Err(e) => return fail(&one_line(&e)),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    if let Err(e) = api::start(&a.api_sock, tx.clone()) {
        return fail(&one_line(&e));
    }
    loop {
        let Ok(VcpuEvent::Api(call)) = rx.recv() else {
            return fail("control channel closed");
        };
        let (snapshot, identity) = match call.req {
            api::Request::Restore { snapshot, identity } => (snapshot, identity),
            api::Request::Status {} => {
                let _ = call.reply.send(json!({"ok": true, "state": "standby"}));
                continue;
            }
            _ => {
                let _ =
                    call.reply.send(json!({"ok": false, "error": "no VM yet: send restore first"}));
                continue;
            }
        };
        let t = std::time::Instant::now();
        grove_vmm::timing::mark("restore request");
        let cfg = RestoreConfig {
            dir: snapshot,
            mem_mode: cli::MemMode::Mmap,
            identity,
            serial: a.serial.clone(),
            dirty_logging: true,
        };
        let prepared = match sb.check(&cfg) {
            Ok(p) => p,
            Err(e) => {
                let _ = call.reply.send(json!({"ok": false, "error": one_line(&e)}));
                continue;
            }
        };
        return match sb.finish(&cfg, prepared, (tx, rx)) {
            Ok(vm) => {
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                let _ = call.reply.send(json!({"ok": true, "restore_ms": ms}));
                serve(vm, None)
            }
            Err(e) => {
                let msg = one_line(&e);
                let _ = call.reply.send(json!({"ok": false, "error": msg}));
                fail(&msg)
            }
        };
    }
}

/// `grove-vmm api --api-sock PATH JSON`: one control request, its reply on stdout;
/// status 0 when the reply says `"ok":true`.
fn api_client(args: &[String]) -> ExitCode {
    let (sock, req) = match args {
        [flag, sock, req] if flag == "--api-sock" => (sock, req),
        _ => return fail("usage: grove-vmm api --api-sock PATH '{\"cmd\":\"status\"}'"),
    };
    match api::call(sock, req) {
        Ok(reply) => {
            println!("{reply}");
            if reply["ok"] == true {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => fail(&one_line(&e)),
    }
}

fn main() -> ExitCode {
    grove_vmm::timing::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("restore") => restore(&args[1..]),
        Some("standby") => standby(&args[1..]),
        Some("api") => api_client(&args[1..]),
        Some("check-host") => {
            let code = grove_vmm::hostcheck::main(&args[1..]);
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Some("-h" | "--help" | "help") => {
            println!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Some(other) => fail(&format!(
            "unknown command {other:?} (commands: run, restore, standby, api, check-host)"
        )),
        None => {
            eprintln!("{}", cli::USAGE);
            ExitCode::from(2)
        }
    }
}
