//! The idle port (0x44c) with the real test guest on /dev/kvm: a ready-mode guest that
//! sleeps through it keeps printing `T`s and costs much less host CPU than one that spins
//! (a CPU-use comparison within one run, not a timing assertion); a guest sleeping in the
//! port still pauses, snapshots and forks, and its children run.
//!
//! Prints `skipped: ...` and returns where /dev/kvm is missing. Every VMM is killed by PID
//! from a drop guard.

#![allow(clippy::tests_outside_test_module)]

mod common;

use std::path::Path;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use common::{id_line, kvm_available, tmp, Vmm};

/// The tests here run one at a time: the CPU comparison must not share the cores with the
/// other test's guests.
static SERIAL: Mutex<()> = Mutex::new(());

/// Boots a ready-mode guest with `tg.idle=<idle>`, waits until it streams, and returns
/// (CPU seconds the VMM used over ~1 s, `T`s printed meanwhile).
fn ready_guest_cpu(idle: &str, dir: &Path) -> (f64, usize) {
    let sock = dir.join(format!("{idle}.sock"));
    let mut vm = Vmm::boot(
        &format!("tg.mode=ready tg.touch_mib=4 tg.verbose=1 tg.idle={idle} tg.idle_us=1000"),
        64,
        &sock,
    );
    vm.wait_for("READY", |s| s.contains("READY"));
    let want = format!("idle={idle}");
    assert!(vm.stdout().contains(&want), "verbose line lacks {want}\n{}", vm.dump());
    vm.wait_ts(50);
    let (c0, t0, n0) = (vm.cpu_time(), Instant::now(), vm.stdout().matches('T').count());
    thread::sleep(Duration::from_secs(1));
    let (c1, t1, n1) = (vm.cpu_time(), Instant::now(), vm.stdout().matches('T').count());
    let cpu = (c1 - c0).as_secs_f64() / (t1 - t0).as_secs_f64();
    // The stream goes on after the measurement (the guest did not stop in the port).
    vm.wait_ts(100);
    (cpu, n1.saturating_sub(n0))
}

#[test]
fn idle_port_guest_streams_and_uses_less_cpu_than_a_spinning_one() {
    if !kvm_available() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let d = tmp();
    let (spin, spin_ts) = ready_guest_cpu("spin", d.path());
    let (port, port_ts) = ready_guest_cpu("port", d.path());
    println!(
        "VMM CPU use over ~1 s: spin {:.0} % of a core ({spin_ts} T), port {:.0} % ({port_ts} T)",
        spin * 100.0,
        port * 100.0
    );
    assert!(port_ts > 0, "the port-idling guest printed no T while measured");
    if spin < 0.3 {
        common::skip::missing(
            "load",
            &format!("host too loaded to compare CPU use (spin guest got {spin:.2} core)"),
        );
        return;
    }
    assert!(port < spin / 2.0, "idling through the port used {port:.2} core vs spin {spin:.2}");
}

#[test]
fn a_guest_sleeping_in_the_port_pauses_forks_and_its_children_run() {
    if !kvm_available() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let d = tmp();
    let touch = 4;
    // Default tg.idle=auto: the guest finds the port's magic and sleeps through it.
    let mut parent = Vmm::boot(
        &format!("tg.mode=fork tg.touch_mib={touch} tg.verbose=1"),
        64,
        &d.path().join("p"),
    );
    parent.wait_for("READY", |s| s.contains("READY"));
    assert!(parent.stdout().contains("idle=port"), "auto did not pick the port\n{}", parent.dump());
    parent.wait_ts(20);
    let mut api = parent.api();
    for _ in 0..20 {
        assert_eq!(api.call(&json!({"cmd": "pause"})), json!("paused"));
        assert_eq!(api.call(&json!({"cmd": "status"}))["state"], json!("paused"));
        assert_eq!(api.call(&json!({"cmd": "resume"})), json!("running"));
        // Let it go back to sleeping in the port.
        thread::sleep(Duration::from_millis(3));
    }
    parent.wait_ts(20);
    let mut forks = Vec::new();
    for i in 0..3 {
        let dir = d.path().join(format!("fork{i}"));
        let v = api.call(&json!({"cmd": "fork", "dir": dir}));
        let pause = v["pause_ms"].as_f64().expect("pause_ms");
        println!("fork {i}: pause {pause:.2} ms, total {} ms", v["total_ms"]);
        parent.wait_ts(20);
        forks.push(dir);
    }
    assert!(!parent.stdout().contains("ID="), "the parent never sees a child's identity");
    let mut children = Vec::new();
    for (id, mode) in [(1u32, "mmap"), (2, "uffd")] {
        let sock = d.path().join(format!("c{id}"));
        children.push((id, Vmm::restore(forks.last().unwrap(), mode, id, Some(&sock))));
    }
    for (id, c) in &mut children {
        let want = id_line(u64::from(*id), touch);
        c.wait_for(&want, |s| s.contains(&want));
        c.wait_ts(50);
        // The child idles through the port too, and pauses like its parent.
        let mut capi = c.api();
        assert_eq!(capi.call(&json!({"cmd": "pause"})), json!("paused"));
        assert_eq!(capi.call(&json!({"cmd": "resume"})), json!("running"));
        c.wait_ts(20);
    }
}
