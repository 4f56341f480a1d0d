//! seccomp per thread kind (issue 14 part 4), end to end on /dev/kvm:
//! - every thread of a running, a uffd-restored and a standby-restored grove-vmm has exactly
//!   one filter (`/proc/PID/task/*/status`: `Seccomp: 2`, `Seccomp_filters: 1`), the VMM
//!   thread included; `--seccomp off` installs none;
//! - a forbidden syscall (`GROVE_SECCOMP_SELFTEST=KIND`: `personality(2)`, on no list) on each
//!   thread kind ends the VMM with status 159 and the line
//!   `grove-vmm: seccomp: thread KIND made forbidden syscall 135; exiting`; in `log` mode the
//!   same call is let through and the guest runs on;
//! - the post-restore refresh thread runs its exchange (connects to the VM's vsock socket,
//!   handshakes, retries until its deadline: the test guest has no vsock driver) under its
//!   filter, and the VMM serves on.
//!
//! The rest of the suite (boot.rs, snapshot.rs, virtio.rs, blk.rs, net.rs, idle.rs,
//! closed_pipe.rs) runs with the default filters (`kill`): boot, devices, snapshot, restore
//! (mmap, uffd, standby), fork and the page server are covered there. No timing assertions.

#![allow(clippy::tests_outside_test_module)]

mod common;

use std::path::Path;
use std::process::Stdio;

use serde_json::json;

use common::{guest, id_line, kvm_available, tmp, Vmm};

/// `personality` on x86_64.
const FORBIDDEN_NR: u32 = 135;

/// (name, seccomp mode, filter count) of every thread of process `pid`.
fn threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task") {
        let Ok(status) = std::fs::read_to_string(e.unwrap().path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {name} in {status}"))
        };
        // KVM's own worker (`kvm-nx-lpage-recovery`) is listed among the process's tasks
        // but runs kernel code only.
        if field("Name:").starts_with("kvm-") {
            continue;
        }
        out.push((
            field("Name:"),
            field("Seccomp:").parse().unwrap(),
            field("Seccomp_filters:").parse().unwrap(),
        ));
    }
    out.sort();
    out
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_string()).collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A fork-mode guest with a vsock device, READY, its control socket at `dir/p.sock`.
fn parent(dir: &Path, extra: &[&str]) -> Vmm {
    let sock = dir.join("p.sock");
    let vsock = dir.join("p.vsock");
    let mut a = args(&[
        "run",
        "--kernel",
        guest(),
        "--cmdline",
        "tg.mode=fork tg.touch_mib=4",
        "--mem-mib",
        "64",
        "--vcpus",
        "2",
        "--vsock-uds",
        s(&vsock),
        "--api-sock",
        s(&sock),
    ]);
    a.extend(args(extra));
    let mut p = Vmm::spawn(&a, Some(sock));
    p.wait_for("READY", |o| o.contains("READY"));
    p
}

/// `grove-vmm restore` of `snap` with a vsock socket of its own, and `env`.
fn restore(snap: &Path, mode: &str, id: u32, extra: &[&str], env: &[(&str, &str)]) -> Vmm {
    let dir = snap.parent().unwrap();
    let sock = dir.join(format!("r{id}.sock"));
    let vsock = dir.join(format!("r{id}.vsock"));
    let mut a = args(&[
        "restore",
        "--snapshot",
        s(snap),
        "--mem-mode",
        mode,
        "--identity",
        &id.to_string(),
        "--vsock-uds",
        s(&vsock),
        "--api-sock",
        s(&sock),
    ]);
    a.extend(args(extra));
    Vmm::spawn_env(&a, Some(sock), Stdio::piped(), env)
}

fn forbidden_line(kind: &str) -> String {
    format!("grove-vmm: seccomp: thread {kind} made forbidden syscall {FORBIDDEN_NR}; exiting")
}

/// Waits for the VMM's end: status 159 and the line naming `kind`, once.
fn assert_killed_by_filter(mut vmm: Vmm, kind: &str) {
    let (_, err) = vmm.wait_exit();
    let st = vmm.wait_status();
    assert_eq!(st.code(), Some(159), "{kind}: {st}\n{err}");
    assert_eq!(err.matches(&forbidden_line(kind)).count(), 1, "{kind}: {err}");
}

#[test]
fn every_thread_has_exactly_its_filter_and_off_installs_none() {
    // The VMMs these tests start take their filters from the environment (off by default).
    std::env::set_var("GROVE_SECCOMP", "kill");
    if !kvm_available() {
        return;
    }
    let d = tmp();
    let p = parent(d.path(), &[]);
    // Answered by the VMM thread from inside its loop: its filter is in place.
    p.api().call(&json!({"cmd": "status"}));
    let t = threads(p.pid());
    let names: Vec<&str> = t.iter().map(|x| x.0.as_str()).collect();
    assert!(names.contains(&"vcpu0") && names.contains(&"vcpu1"), "{t:?}");
    assert!(names.contains(&"grove-vmm"), "{t:?}");
    assert!(t.iter().all(|(_, mode, n)| (*mode, *n) == (2, 1)), "one filter each: {t:?}");
    let snap = d.path().join("s");
    p.api().snapshot("full", &snap);
    drop(p);

    let mut r = restore(&snap, "uffd", 7, &[], &[]);
    let want = id_line(7, 4);
    r.wait_for(&want, |o| o.contains(&want));
    r.api().call(&json!({"cmd": "status"}));
    let t = threads(r.pid());
    assert!(t.iter().any(|x| x.0 == "grove-pagesrv"), "{t:?}");
    assert!(t.iter().all(|(_, mode, n)| (*mode, *n) == (2, 1)), "one filter each: {t:?}");
    drop(r);

    // A standby VMM: vCPU threads made (paused) at start, the VM restored through the socket.
    let sb_sock = d.path().join("sb.sock");
    let a = args(&["standby", "--api-sock", s(&sb_sock), "--mem-mib", "64", "--vcpus", "2"]);
    let mut sb = Vmm::spawn(&a, Some(sb_sock));
    let vsock = d.path().join("sb.vsock");
    let v = sb.api().call(&json!({"cmd": "restore", "snapshot": snap, "identity": 9,
        "vsock_uds": vsock, "guest": {"timeout_ms": 100}}));
    assert!(v["restore_ms"].as_f64().is_some(), "{v}");
    let want = id_line(9, 4);
    sb.wait_for(&want, |o| o.contains(&want));
    let t = threads(sb.pid());
    assert!(t.iter().filter(|x| x.0.starts_with("vcpu")).count() == 2, "{t:?}");
    assert!(t.iter().all(|(_, mode, n)| (*mode, *n) == (2, 1)), "one filter each: {t:?}");
    drop(sb);

    let mut off = restore(&snap, "mmap", 8, &["--seccomp", "off"], &[]);
    let want = id_line(8, 4);
    off.wait_for(&want, |o| o.contains(&want));
    off.api().call(&json!({"cmd": "status"}));
    let t = threads(off.pid());
    assert!(t.iter().all(|(_, mode, n)| (*mode, *n) == (0, 0)), "no filter: {t:?}");
}

#[test]
fn a_forbidden_syscall_on_each_thread_kind_ends_the_vmm_with_one_line() {
    // The VMMs these tests start take their filters from the environment (off by default).
    std::env::set_var("GROVE_SECCOMP", "kill");
    if !kvm_available() {
        return;
    }
    let d = tmp();
    for kind in ["vmm", "vcpu"] {
        let a = args(&["run", "--kernel", guest(), "--cmdline", "tg.mode=ready tg.touch_mib=1"]);
        let env = [("GROVE_SECCOMP_SELFTEST", kind)];
        assert_killed_by_filter(Vmm::spawn_env(&a, None, Stdio::piped(), &env), kind);
    }
    let p = parent(d.path(), &[]);
    let snap = d.path().join("s");
    p.api().snapshot("full", &snap);
    drop(p);
    for (i, (kind, mode)) in
        [("page-server", "uffd"), ("refresh", "mmap"), ("vmm", "mmap")].into_iter().enumerate()
    {
        let id = 10 + u32::try_from(i).unwrap();
        let env = [("GROVE_SECCOMP_SELFTEST", kind)];
        assert_killed_by_filter(restore(&snap, mode, id, &[], &env), kind);
    }
    // Log mode lets the call through: the guest runs on.
    let mut logged =
        restore(&snap, "mmap", 20, &["--seccomp", "log"], &[("GROVE_SECCOMP_SELFTEST", "vcpu")]);
    let want = id_line(20, 4);
    logged.wait_for(&want, |o| o.contains(&want));
    logged.wait_ts(20);
    let st = logged.api().call(&json!({"cmd": "status"}));
    assert_eq!(st["state"], json!("running"), "{st}");
    let err = logged.stderr();
    assert!(err.contains("seccomp self-test: thread vcpu"), "{err}");
    assert!(!err.contains("forbidden syscall"), "{err}");
}

#[test]
fn the_refresh_thread_runs_its_exchange_under_its_filter() {
    // The VMMs these tests start take their filters from the environment (off by default).
    std::env::set_var("GROVE_SECCOMP", "kill");
    if !kvm_available() {
        return;
    }
    let d = tmp();
    let p = parent(d.path(), &[]);
    let snap = d.path().join("s");
    p.api().snapshot("full", &snap);
    drop(p);
    // The test guest has no vsock driver: the helper connects, handshakes and retries until
    // the deadline, then the refresh is reported failed and the VM serves on.
    let mut r = restore(&snap, "mmap", 5, &["--guest-timeout-ms", "300"], &[]);
    let st = r.api().call(&json!({"cmd": "status"}));
    assert_eq!(st["state"], json!("running"), "{st}");
    assert_eq!(st["post_restore"]["outcome"], json!("failed"), "{st}");
    // Its attempts were answered by the VMM's vsock device (refused: nothing listens).
    let reason = st["post_restore"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("attempts") && reason.contains("refused"), "{st}");
    let want = id_line(5, 4);
    r.wait_for(&want, |o| o.contains(&want));
    r.api().snapshot("diff", &d.path().join("after"));
    assert!(!r.stderr().contains("forbidden syscall"), "{}", r.stderr());
}
