//! `grove-jailer`: runs grove-vmm (or any program) in a jail (see `grove_vmm::jail`): a
//! cgroup with limits, its own mount and PID namespaces with a root holding only the paths
//! given, device nodes made for it, a dropped uid and gid and no capabilities. Root only.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--help" || a == "-h") {
        println!("{}", grove_vmm::jail::USAGE);
        return ExitCode::SUCCESS;
    }
    let (spec, pid_file) = match grove_vmm::jail::parse_args(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!(
                "grove-jailer: error: {}\n{}",
                grove_vmm::one_line(&e),
                grove_vmm::jail::USAGE
            );
            return ExitCode::from(2);
        }
    };
    match grove_vmm::jail::run(&spec, pid_file.as_deref()) {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(1)),
        Err(e) => {
            eprintln!("grove-jailer: error: {}", grove_vmm::one_line(&e));
            ExitCode::from(1)
        }
    }
}
