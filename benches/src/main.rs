//! `grove-bench`: Grove's benchmark harness.
//!
//! Every subcommand repeats its measurement, reports the median and p99 with the
//! conditions it ran under (memory size, dirty set, KVM kind, kernel), as text or
//! as one JSON document with `--json`. Timings live here and in the docs, never in
//! test assertions.

mod api;
mod boot;
mod boot_linux;
mod disk;
mod diskvirtio;
mod exec;
mod explore;
mod net;
mod net_guest;
mod snapshot;
mod stats;
mod vmm_driver;

use std::process::ExitCode;

const USAGE: &str =
    "usage: grove-bench <boot|snapshot|restore|fork|disk|net|net-guest|exec|api|explore> [--json] [options]
  boot     [--runs N] [--mem-mib M] [--touch-mib T] [--vcpus V] [--jail]   (--jail: each run also
           boots through grove-jailer, root; jailed over plain in the same run)
  boot --linux [--runs N] [--vcpus V] [--mem-mib M] [--kernel K] [--initrd I] [--qemu BIN]
           [--no-qemu]   (VMM start to guest-init ready beside QEMU -M microvm on the same KVM;
           where KVM runs Linux: scripts/testhost.sh bootbench)
  snapshot [--runs N] [--sizes 256,1024,4096] [--busy-gaps-ms ...] [--storage-only]
  restore  [--runs N] [--mem-mib M] [--touch-mib T] [--storage-only] [--jail]   (--jail: cold
           mmap and standby restores also through grove-jailer, alternating; root)
  fork     [--runs N] [--children 1,4,16,64] [--mem-mode mmap|uffd] [--no-standby]
           [--stop-children] [--spin] [--jail]   (--jail: each series again with the parent
           and every child through grove-jailer; root)
  disk     [--runs N] [--mib M] [--dir D] [--dmthin]   (--dmthin: snapshot/clone of dm-thin beside the
           layered store; root, device-mapper: scripts/testhost.sh diskdm)
  disk --virtio [--mib M] [--ops N] [--kernel K] [--initrd I] [--qemu BIN]   (guest-side, on
           grove-vmm's virtio-blk and QEMU's, where KVM runs Linux: scripts/testhost.sh diskbench)
  net      [--runs N] [--seconds S]   (root; slots, policy updates, program cost, tap throughput)
  net-guest [--runs N] [--mib M]      (in the test host: scripts/testhost.sh netbench; Linux guest
           to server throughput, grove-vmm virtio-net vs QEMU's, both on netd slots)
  exec     [--boots N] [--restores N] [--execs N] [--files N] [--file-mib M] [--mem-mib M]
           [--kernel PATH] [--initrd PATH]   (a Linux guest: the test host)
  api      [--runs N] [--mem-mib M] [--fork N] [--fork-runs N] [--seconds S] [--workers W] [--pool P]
  explore  [--endpoint unix:PATH|http(s)://ADDR] [--token-file F] [--template linux] [--children 1,4,16]
           [--runs N] [--cmd 'echo $GROVE_CHILD_INDEX'] [--json-out FILE]   (a running agentd whose template runs
           guest-init's agent: ForkRun(N) vs Snapshot + N Creates + Start, alternating; to each
           child's first output byte; scripts/testhost.sh agentd-explore)
env: GROVE_VMM (grove-vmm binary), GROVE_TESTGUEST (test guest ELF), GROVE_AGENTD, FIRECRACKER_BIN,
  GUEST_KERNEL / GUEST_INITRD (exec's and net-guest's Linux guest); net-guest: QEMU, GROVE_OUT";

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
        "boot" if rest.iter().any(|a| a == "--linux") => boot_linux::run(rest),
        "boot" => boot::run(rest),
        "snapshot" => snapshot::run_snapshot(rest),
        "restore" => snapshot::run_restore(rest),
        "fork" => snapshot::run_fork(rest),
        "disk" => disk::run(rest),
        "net" => net::run(rest),
        "exec" => exec::run(rest),
        "net-guest" => net_guest::run(rest),
        "api" => api::run(rest),
        "explore" => explore::run(rest),
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
