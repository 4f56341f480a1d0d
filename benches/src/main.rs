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

const USAGE: &str = "usage: grove-bench <boot|snapshot|restore|fork|disk> [--json] [options]
  boot     [--runs N] [--mem-mib M] [--touch-mib T] [--vcpus V]
  snapshot [--runs N] [--sizes 256,1024,4096] [--busy-gaps-ms ...] [--storage-only]
  restore  [--runs N] [--mem-mib M] [--touch-mib T] [--storage-only]
  fork     [--runs N] [--children 1,4,16,64] [--mem-mode mmap|uffd] [--no-standby]
           [--stop-children] [--spin]
  disk     [--runs N] [--mib M]
env: GROVE_VMM (grove-vmm binary), GROVE_TESTGUEST (test guest ELF), FIRECRACKER_BIN";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    if rest.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
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
