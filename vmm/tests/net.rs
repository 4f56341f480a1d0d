//! `--net` end to end on /dev/kvm with the test guest (which has no network driver: the Linux
//! guest's side is the test host's `net` scenario): the VMM opens a tap inside a network
//! namespace, places the device, saves it in snapshots, and a restore needs a tap for it
//! (its own: a fork child in another namespace), checks the options that must match the
//! snapshot, and waits for the tap to run before the guest goes on. Standby VMMs open their
//! tap ahead.
//!
//! Needs root (namespaces, taps) and /dev/kvm; without /dev/kvm every test prints
//! `skipped: /dev/kvm not available`; without root or `ip` they fail unless
//! `GROVE_ALLOW_SKIP` names `net`. No timing assertions.

#![allow(clippy::tests_outside_test_module)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use common::{guest, id_line, kvm_available, tmp, Vmm};

/// A network namespace made with `ip netns add`, deleted (with the taps in it) on drop.
struct Netns(String);

impl Netns {
    fn new(n: u32) -> Option<Self> {
        let name = format!("gvt{}x{n}", std::process::id() & 0xfffff);
        let ok =
            Command::new("ip").args(["netns", "add", &name]).status().is_ok_and(|s| s.success());
        ok.then_some(Self(name))
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.0)
    }

    fn has_link(&self, name: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.0, "link", "show", name])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn netns_or_reason(n: u32) -> Option<Netns> {
    if let Some(ns) = Netns::new(n) {
        return Some(ns);
    }
    let allowed = std::env::var("GROVE_ALLOW_SKIP").unwrap_or_default();
    if allowed.split(',').any(|s| s == "net" || s == "all") {
        eprintln!("skipped (GROVE_ALLOW_SKIP): `ip netns add` failed (needs root and iproute2)");
        return None;
    }
    panic!("`ip netns add` failed (needs root and iproute2; GROVE_ALLOW_SKIP=net to skip)");
}

fn net(tap: &str, ns: &Netns, extra: &str) -> String {
    format!("tap={tap},netns={}{extra}", ns.path().display())
}

fn restore(f: &Path, identity: u32, net: Option<&str>) -> Vmm {
    let mut args: Vec<String> =
        ["restore", "--snapshot", f.to_str().unwrap(), "--identity", &identity.to_string()]
            .map(String::from)
            .to_vec();
    if let Some(n) = net {
        args.extend(["--net".to_string(), n.to_string()]);
    }
    Vmm::spawn(&args, None)
}

#[test]
fn the_tap_is_opened_in_its_namespace_saved_and_a_restore_needs_its_own() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = netns_or_reason(0) else { return };
    let d = tmp();
    let sock = d.path().join("p.sock");
    let args: Vec<String> = [
        "run",
        "--kernel",
        guest(),
        "--cmdline",
        "tg.mode=fork tg.touch_mib=1",
        "--mem-mib",
        "64",
        "--net",
        &net("gvt0", &ns, ",mac=02:67:72:00:00:02,rx-rate=10M,tx-pps=5k"),
        "--api-sock",
        sock.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let mut parent = Vmm::spawn(&args, Some(sock));
    parent.wait_for("READY", |s| s.contains("READY"));
    assert!(ns.has_link("gvt0"), "the VMM made its tap inside the namespace\n{}", parent.dump());
    let f = d.path().join("f");
    parent.api().fork(&f);

    // No tap for the snapshot's device: refused with a clear reason.
    let mut v = restore(&f, 1, None);
    let (ok, err) = v.wait_exit();
    assert!(!ok && err.contains("virtio-net device: give --net"), "{err}");
    // A MAC other than the snapshot's: refused, naming both.
    let mut v = restore(&f, 1, Some(&net("gvt1", &ns, ",mac=02:00:00:00:00:09")));
    let (ok, err) = v.wait_exit();
    assert!(
        !ok && err.contains("mac=02:00:00:00:00:09 differs") && err.contains("02:67:72:00:00:02"),
        "{err}"
    );
    // A namespace that does not exist.
    let mut v = restore(&f, 1, Some("tap=gvt1,netns=/run/netns/grove-none-such"));
    let (ok, err) = v.wait_exit();
    assert!(!ok && err.contains("grove-none-such"), "{err}");

    // Its own tap: the child runs. This tap is down (nothing brings a transient tap up):
    // the restore waits for it, says so, and goes on.
    let mut child = restore(&f, 2, Some(&net("gvt1", &ns, "")));
    child.wait_for("the child", |s| s.contains(&id_line(2, 1)));
    assert!(ns.has_link("gvt1"));
    assert!(
        child.stderr().contains("tap gvt1 in") && child.stderr().contains("not running"),
        "{}",
        child.dump()
    );
    drop(child);
    drop(parent);

    // A standby VMM opens its tap at start, and refuses (and survives) a snapshot that has
    // no virtio-net device; a standby without a tap refuses one that has.
    let sb_sock = d.path().join("sb.sock");
    let sb_args =
        ["standby", "--api-sock", sb_sock.to_str().unwrap(), "--mem-mib", "64"].map(String::from);
    let bare = Vmm::spawn(&sb_args, Some(sb_sock.clone()));
    bare.api().refused(
        &json!({"cmd": "restore", "snapshot": f, "identity": 3}).to_string(),
        "invalid-argument",
    );
    assert_eq!(bare.api().call(&json!({"cmd": "status"}))["state"], json!("standby"));
    drop(bare);
    let sb_sock = d.path().join("sb2.sock");
    let mut sb_args = ["standby", "--api-sock", sb_sock.to_str().unwrap(), "--mem-mib", "64"]
        .map(String::from)
        .to_vec();
    sb_args.extend(["--net".to_string(), net("gvt2", &ns, "")]);
    let mut sb = Vmm::spawn(&sb_args, Some(sb_sock));
    sb.wait_for("standby", |_| ns.has_link("gvt2"));
    let v = sb.api().call(&json!({"cmd": "restore", "snapshot": f, "identity": 3}));
    assert!(v["restore_ms"].as_f64().is_some(), "{v}");
    sb.wait_for("the standby's child", |s| s.contains(&id_line(3, 1)));
    // The restored device is saved again in the child's own snapshot.
    let snap = d.path().join("c-diff");
    sb.api().snapshot("diff", &snap);
    let st = grove_vmm::state::read_state(&snap).unwrap();
    let kinds = serde_json::to_string(&st.devices).unwrap();
    assert!(kinds.contains("\"type\":\"net\""), "{kinds}");
}
