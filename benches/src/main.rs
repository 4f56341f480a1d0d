//! `grove-bench`: Grove's benchmark harness.
//!
//! Every subcommand repeats its measurement, reports the median and p99 with the
//! conditions it ran under (memory size, dirty set, KVM kind, kernel), as text or
//! as one JSON document with `--json`. Timings live here and in the docs, never in
//! test assertions.

mod boot;
mod disk;
mod snapshot;
mod stats;
mod vmm_driver;

use std::process::ExitCode;

const USAGE: &str = "usage: grove-bench <boot|snapshot|restore|fork|disk> [--json] [options]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    let result = match cmd.as_str() {
        "boot" => boot::run(rest),
        "snapshot" => snapshot::run_snapshot(rest),
        "restore" => snapshot::run_restore(rest),
        "fork" => snapshot::run_fork(rest),
        "disk" => disk::run(rest),
        "-h" | "--help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => Err(format!("unknown benchmark '{other}'\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("grove-bench {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}
