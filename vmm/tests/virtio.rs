//! virtio over MMIO, end to end on /dev/kvm: the test guest drives grove-vmm's virtio-rng
//! (`--rng`) with a polling driver (vmm/testguest/src/rng.rs): it finds the device from the
//! `virtio_mmio.device=` entry grove-vmm appends to the command line, negotiates, sets up a
//! queue, notifies through the QueueNotify register (a KVM ioeventfd) and polls the used
//! ring. The device's buffer page is written by the device only, never by the guest's CPU:
//! that it reaches a diff snapshot proves the VMM's own writes are tracked.
//!
//! Without /dev/kvm every test prints `skipped: /dev/kvm not available`. No timing
//! assertions.

#![allow(clippy::tests_outside_test_module)]

mod common;

use std::path::Path;

use grove_memory::Chain;
use grove_vmm::state;
use serde_json::json;

use common::{guest, id_line, kvm_available, tmp, Vmm, PAGE};

/// The page the test guest's virtio-rng requests land in (grove_testguest::virtio::BUFFER).
const RNG_BUFFER: u64 = 0x80_3000;

/// The complete `RNG n=.. [<hex>]` lines printed so far: (length, bytes if read back).
fn rng_lines(out: &str) -> Vec<(u32, Vec<u8>)> {
    out.split_inclusive('\n')
        .filter_map(|l| {
            let rest = l.strip_suffix('\n')?.strip_prefix("RNG n=")?;
            let (n, hex) = rest.split_once(' ').unwrap_or((rest, ""));
            let bytes = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            Some((n.parse().unwrap(), bytes))
        })
        .collect()
}

/// The first `n` bytes of guest page `gpa` as the snapshot in `dir` resolves it.
fn page_bytes(dir: &Path, gpa: u64, n: usize) -> Vec<u8> {
    let s = state::read_state(dir).expect("state file");
    let chain = Chain::open(&s.layers).expect("layer chain");
    let mut buf = vec![0u8; PAGE as usize];
    chain.read_pages(gpa / PAGE, &mut buf).expect("read page");
    buf[..n].to_vec()
}

fn boot_rng(cmdline: &str, sock: Option<&Path>) -> Vmm {
    let mut args: Vec<String> =
        ["run", "--kernel", guest(), "--cmdline", cmdline, "--mem-mib", "64", "--rng"]
            .map(String::from)
            .to_vec();
    if let Some(s) = sock {
        args.push("--api-sock".into());
        args.push(s.to_str().unwrap().into());
    }
    Vmm::spawn(&args, sock.map(Path::to_path_buf))
}

#[test]
fn a_fresh_guest_gets_entropy_from_virtio_rng() {
    if !kvm_available() {
        return;
    }
    let mut seen = Vec::new();
    for _ in 0..2 {
        let mut v = boot_rng("tg.mode=hello tg.rng=1", None);
        let (ok, err) = v.wait_exit();
        let out = v.stdout();
        assert!(ok, "hello with --rng exits 0\n{}", v.dump());
        assert!(err.is_empty(), "{err}");
        let lines = rng_lines(&out);
        assert_eq!(lines.len(), 1, "{out}");
        let (n, bytes) = &lines[0];
        assert_eq!(*n, 32);
        assert!(bytes.iter().any(|&b| b != 0), "{out}");
        seen.push(bytes.clone());
    }
    assert_ne!(seen[0], seen[1], "two boots, two different draws");
    // Without the device the guest finds no virtio_mmio.device entry and says so.
    let mut v = Vmm::spawn(
        &["run", "--kernel", guest(), "--cmdline", "tg.mode=hello tg.rng=1"].map(String::from),
        None,
    );
    let (ok, _) = v.wait_exit();
    assert!(!ok);
    assert!(v.stdout().contains("needs a virtio_mmio.device"), "{}", v.dump());
}

/// A parent that set its virtio-rng up at boot is forked; each child's restored device
/// serves the child's request (identity change) on from the parent's queue state, and the
/// bytes the device wrote are in the child's next diff snapshot although the child's CPU
/// never touched that page (it does not read its draw back: on shadow-paging KVM a guest
/// read of a page in a dirty guest mapping would mark it in KVM's log too).
#[test]
fn device_state_survives_fork_and_device_writes_reach_the_diff() {
    if !kvm_available() {
        return;
    }
    let d = tmp();
    let touch = 2;
    let mut parent = boot_rng(
        &format!("tg.mode=fork tg.touch_mib={touch} tg.rng=1"),
        Some(&d.path().join("p.sock")),
    );
    parent.wait_for("READY", |s| s.contains("READY"));
    let parent_draw = rng_lines(&parent.stdout()).remove(0).1;
    let f = d.path().join("f");
    parent.api().fork(&f);
    assert_eq!(page_bytes(&f, RNG_BUFFER, 32), parent_draw, "the fork holds the parent's draw");
    let mut draws = Vec::new();
    for (i, mode) in ["mmap", "uffd"].iter().enumerate() {
        let id = 5 + u32::try_from(i).unwrap();
        let sock = d.path().join(format!("c{i}.sock"));
        let mut child = Vmm::restore(&f, mode, id, Some(&sock));
        let want = id_line(u64::from(id), touch);
        child.wait_for("the child's draw", |s| s.contains(&want) && rng_lines(s).len() == 1);
        let (n, read_back) = rng_lines(&child.stdout()).remove(0);
        assert_eq!((n, read_back.len()), (32, 0), "{mode}: served, not read back");
        child.wait_ts(5);
        let snap = d.path().join(format!("c{i}-diff"));
        child.api().snapshot("diff", &snap);
        let draw = page_bytes(&snap, RNG_BUFFER, 32);
        assert_ne!(
            draw, parent_draw,
            "{mode}: the page only the device wrote must be in the child's diff (else the \
             chain gives the parent's bytes)"
        );
        assert!(draw.iter().any(|&b| b != 0), "{mode}");
        assert!(!draws.contains(&draw), "{mode}: each child its own draw");
        draws.push(draw);
        let st = child.api().call(&json!({"cmd": "status"}));
        assert_eq!(st["generation"], json!(1), "{st}");
    }
    parent.wait_ts(5);
    assert_eq!(rng_lines(&parent.stdout()).len(), 1, "the parent made no other request");
}

/// A standby VMM restores a snapshot with a virtio-rng: the device is placed, wired and
/// serves the child.
#[test]
fn a_standby_vmm_restores_the_device() {
    if !kvm_available() {
        return;
    }
    let d = tmp();
    let mut parent =
        boot_rng("tg.mode=fork tg.touch_mib=1 tg.rng=1", Some(&d.path().join("p.sock")));
    parent.wait_for("READY", |s| s.contains("READY"));
    let f = d.path().join("f");
    parent.api().fork(&f);
    drop(parent);
    let sock = d.path().join("sb.sock");
    let args =
        ["standby", "--api-sock", sock.to_str().unwrap(), "--mem-mib", "64"].map(String::from);
    let mut sb = Vmm::spawn(&args, Some(sock.clone()));
    let v = sb.api().call(&json!({"cmd": "restore", "snapshot": f, "identity": 3}));
    assert!(v["restore_ms"].as_f64().is_some(), "{v}");
    let want = id_line(3, 1);
    sb.wait_for("the child's draw", |s| s.contains(&want) && rng_lines(s).len() == 1);
    assert_eq!(rng_lines(&sb.stdout())[0].0, 32);
}
