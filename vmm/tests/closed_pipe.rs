//! grove-vmm keeps working when the reader of its output goes away (`grove-vmm … | head`):
//! guest output and log lines are dropped, the VMM neither aborts nor dies of SIGPIPE.

// Integration tests: every function here is a test of the built binary.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use common::{guest, kvm_available, VMM};

/// Runs grove-vmm with stdout and stderr on pipes whose read ends are closed before it starts.
fn run_with_closed_pipes(args: &[&str]) -> std::process::ExitStatus {
    let (out_r, out_w) = std::io::pipe().expect("pipe");
    let (err_r, err_w) = std::io::pipe().expect("pipe");
    drop(out_r);
    drop(err_r);
    let mut child = Command::new(VMM)
        .args(args)
        .env("GROVE_VMM_TIMING", "1")
        .stdin(Stdio::null())
        .stdout(out_w)
        .stderr(err_w)
        .spawn()
        .expect("spawn grove-vmm");
    let status = child.wait().expect("wait grove-vmm");
    assert_eq!(status.signal(), None, "{args:?} died of a signal: {status}");
    status
}

#[test]
fn guest_output_to_a_closed_pipe_is_dropped() {
    if !kvm_available() {
        return;
    }
    // hello prints a line and resets: exit 0 even though no byte could be written (the
    // serial line, the boot-timer line and every timing mark hit EPIPE).
    let status = run_with_closed_pipes(&["run", "--kernel", guest(), "--cmdline", "tg.mode=hello"]);
    assert!(status.success(), "{status}");
}

#[test]
fn errors_and_reports_to_a_closed_pipe_do_not_abort() {
    // A bad flag: the one-line error cannot be written; the status still says so.
    let status = run_with_closed_pipes(&["run", "--bogus"]);
    assert_eq!(status.code(), Some(1));
    // check-host prints a report of ~25 lines; its status is 0 or 1 (host able to run VMs).
    let status = run_with_closed_pipes(&["check-host"]);
    assert!(matches!(status.code(), Some(0 | 1)), "{status}");
    let status = run_with_closed_pipes(&["check-host", "--json"]);
    assert!(matches!(status.code(), Some(0 | 1)), "{status}");
    let status = run_with_closed_pipes(&["--help"]);
    assert_eq!(status.code(), Some(0));
}

/// Where a test sends grove-vmm's stderr: the two ways a log sink fails.
#[derive(Clone, Copy, Debug)]
enum BrokenSink {
    /// `/dev/full`: every write fails with ENOSPC.
    Full,
    /// A pipe whose read end is closed: every write fails with EPIPE.
    ClosedPipe,
}

const SINKS: [BrokenSink; 2] = [BrokenSink::Full, BrokenSink::ClosedPipe];

impl BrokenSink {
    fn stdio(self) -> Stdio {
        match self {
            Self::Full => {
                let f = std::fs::OpenOptions::new().write(true).open("/dev/full");
                f.expect("open /dev/full").into()
            }
            Self::ClosedPipe => {
                let (r, w) = std::io::pipe().expect("pipe");
                drop(r);
                w.into()
            }
        }
    }
}

/// A guest that boots with stderr failing keeps running: the boot-timer line, the timing
/// marks and the post-restore line are lost, the guest is not. (On the old `eprintln!` the
/// VMM aborted with SIGABRT at the boot-timer line.)
#[test]
fn a_failing_stderr_does_not_stop_a_running_or_restored_guest() {
    if !kvm_available() {
        return;
    }
    let d = common::tmp();
    for sink in SINKS {
        let sock = d.path().join(format!("{sink:?}.sock"));
        let args = [
            "run",
            "--kernel",
            guest(),
            "--cmdline",
            "tg.mode=fork tg.touch_mib=1",
            "--mem-mib",
            "32",
            "--api-sock",
            sock.to_str().unwrap(),
        ]
        .map(String::from);
        let mut vm = common::Vmm::spawn_with_stderr(&args, Some(sock.clone()), sink.stdio());
        vm.wait_for("READY", |s| s.contains("READY"));
        vm.wait_ts(20);
        let snap = d.path().join(format!("{sink:?}-snap"));
        vm.api().snapshot("full", &snap);
        vm.wait_ts(20);
        assert_eq!(vm.api().call(&serde_json::json!({"cmd": "status"}))["state"], "running");
        drop(vm);

        let rsock = d.path().join(format!("{sink:?}-r.sock"));
        let rargs = [
            "restore",
            "--snapshot",
            snap.to_str().unwrap(),
            "--identity",
            "7",
            "--api-sock",
            rsock.to_str().unwrap(),
        ]
        .map(String::from);
        let mut r = common::Vmm::spawn_with_stderr(&rargs, Some(rsock), sink.stdio());
        let want = common::id_line(7, 1);
        r.wait_for(&want, |s| s.contains(&want));
        r.wait_ts(20);
    }
}

/// Guest serial output to a sink that refuses it is dropped, the guest runs to its end (exit
/// 0 after its reset), and the loss is reported on stderr once, with a count at exit.
#[test]
fn refused_serial_output_is_counted_and_reported_once() {
    if !kvm_available() {
        return;
    }
    let out = Command::new(VMM)
        .args(["run", "--kernel", guest(), "--cmdline", "tg.mode=hello", "--serial", "/dev/full"])
        .stdin(Stdio::null())
        .output()
        .expect("run grove-vmm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {err}", out.status);
    assert_eq!(err.matches("serial output failed").count(), 1, "{err}");
    assert!(err.contains("bytes of guest serial output were dropped"), "{err}");
}

/// Error paths exit 1 (not 134) when their one-line error cannot be written.
#[test]
fn error_paths_exit_1_when_stderr_fails() {
    let d = common::tmp();
    let missing = d.path().join("nonexistent");
    let m = missing.to_str().unwrap();
    for sink in SINKS {
        for args in [
            vec!["run", "--kernel", m],
            vec!["restore", "--snapshot", m],
            vec!["run", "--bogus"],
            vec!["frobnicate"],
        ] {
            let status = Command::new(VMM)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(sink.stdio())
                .status()
                .expect("run grove-vmm");
            assert_eq!(status.signal(), None, "{args:?} {sink:?}: {status}");
            assert_eq!(status.code(), Some(1), "{args:?} {sink:?}: {status}");
        }
    }
}
