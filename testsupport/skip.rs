//! Shared by the workspace's integration tests (each includes this file with `#[path]`): a
//! test that needs something the host lacks FAILS with the reason, unless the environment
//! variable `GROVE_ALLOW_SKIP` names that capability (comma separated, or `all`), so a host
//! without KVM cannot go green by skipping everything. Capabilities: `kvm` (/dev/kvm), `uffd`
//! (userfaultfd), `dm` (device-mapper thin pools and loop devices), `root` (mounts, other
//! users), `mem` (free memory for big guests), `load` (a CPU-use comparison needs a host
//! that is not saturated). docs/testing.md lists which tier runs what.

/// Whether `GROVE_ALLOW_SKIP` (a comma-separated list) allows skipping `cap`.
#[allow(dead_code, reason = "each test crate uses some of these helpers")]
pub fn skip_allowed_by(list: Option<&str>, cap: &str) -> bool {
    list.is_some_and(|l| l.split(',').map(str::trim).any(|c| c == cap || c == "all"))
}

/// A missing capability: prints `skipped: REASON` and returns when `GROVE_ALLOW_SKIP` allows
/// it (the caller then returns from the test); panics with the reason otherwise.
#[allow(dead_code, reason = "each test crate uses some of these helpers")]
pub fn missing(cap: &str, reason: &str) {
    let list = std::env::var("GROVE_ALLOW_SKIP").ok();
    assert!(
        skip_allowed_by(list.as_deref(), cap),
        "{reason}: this test needs `{cap}`; set GROVE_ALLOW_SKIP={cap} to let it skip on this host"
    );
    println!("skipped: {reason} (GROVE_ALLOW_SKIP allows {cap})");
}
