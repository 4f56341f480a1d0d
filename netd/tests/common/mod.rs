//! Test helpers: the host requirement check; the network itself is
//! `grove_netd::testbed`, shared with `grove-bench net`.
#![allow(dead_code)]

pub use grove_netd::testbed::*;

/// Fails (or, when `GROVE_ALLOW_SKIP` names this test, "all" or "netd",
/// returns false after saying why) if the host cannot run netd's tests.
pub fn host_ready(test: &str) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun");
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push("BTF (/sys/kernel/btf/vmlinux)");
    }
    if !std::path::Path::new("/proc/self/ns/net").exists() {
        missing.push("network namespaces");
    }
    if missing.is_empty() {
        return true;
    }
    let allowed = std::env::var("GROVE_ALLOW_SKIP")
        .unwrap_or_default()
        .split(',')
        .any(|s| s == test || s == "all" || s == "netd");
    let reason = format!("{test}: needs {}", missing.join(", "));
    assert!(allowed, "{reason} (set GROVE_ALLOW_SKIP={test} to skip)");
    println!("skipped: {reason}");
    false
}
