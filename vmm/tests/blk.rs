//! virtio-blk end to end on /dev/kvm: the test guest drives grove-vmm's virtio-blk (`--disk`,
//! `tg.blk=1`, polling driver in vmm/testguest/src/blk.rs): at boot and at every identity
//! change it writes its identity's 4 KiB block at sector 8, flushes, reads it back and reads
//! sector 0 (from the base image), printing checksums. The parent is forked; children restored
//! cold (mmap, uffd) and by a standby VMM each get their own layer (`--disk-dir`) over the
//! frozen one: their writes stay their own, checked by the guests' read-backs and on the host
//! by reading each child's layer chain with grove-block. The frozen layer is not changed by
//! anyone once frozen.
//!
//! Without /dev/kvm every test prints `skipped: /dev/kvm not available`. No timing
//! assertions.

#![allow(clippy::tests_outside_test_module)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use grove_block::chain::{ChainDisk, Frozen, Writable};
use grove_block::index::Header;
use grove_block::BlockIo;
use grove_vmm::devices::manager::{DeviceState, VirtioDeviceState};
use grove_vmm::devices::virtio::block::disk::DiskState;
use grove_vmm::state;
use serde_json::json;

use common::{guest, kvm_available, tmp, Vmm};

const MIB: usize = 1 << 20;
/// The sector the guest writes (grove_testguest::virtio::BLK_SECTOR).
const SECTOR: u64 = 8;

fn base_byte(i: usize) -> u8 {
    (i.wrapping_mul(7) % 251) as u8
}

/// The block identity `id` writes (grove_testguest::virtio::blk_pattern).
fn pattern(id: u32) -> Vec<u8> {
    (0..4096u32)
        .map(|i| i.wrapping_mul(31).wrapping_add(id.wrapping_mul(97)).wrapping_add(1) as u8)
        .collect()
}

fn fnv(b: &[u8]) -> u64 {
    b.iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &x| (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3))
}

/// The `BLK id=..` line the guest prints for identity `id`.
fn blk_line(id: u32) -> String {
    let w = fnv(&pattern(id));
    let base: Vec<u8> = (0..4096).map(base_byte).collect();
    format!("BLK id={id} wrote=0x{w:016x} read=0x{w:016x} base=0x{:016x}", fnv(&base))
}

fn setup(d: &Path) -> (PathBuf, PathBuf) {
    let base = d.join("base.img");
    std::fs::write(&base, (0..MIB).map(base_byte).collect::<Vec<u8>>()).unwrap();
    std::fs::create_dir(d.join("vm")).unwrap();
    (base, d.join("vm/root"))
}

fn boot(base: &Path, stem: &Path, sock: &Path) -> Vmm {
    let disk = format!("{},layer={},id=root", base.display(), stem.display());
    let args = [
        "run",
        "--kernel",
        guest(),
        "--cmdline",
        "tg.mode=fork tg.touch_mib=1 tg.blk=1",
        "--mem-mib",
        "64",
        "--disk",
        &disk,
        "--api-sock",
        sock.to_str().unwrap(),
    ]
    .map(String::from);
    Vmm::spawn(&args, Some(sock.to_path_buf()))
}

fn restore(snap: &Path, mode: &str, id: u32, disk_dir: &Path) -> Vmm {
    std::fs::create_dir_all(disk_dir).unwrap();
    let args = [
        "restore",
        "--snapshot",
        snap.to_str().unwrap(),
        "--mem-mode",
        mode,
        "--identity",
        &id.to_string(),
        "--disk-dir",
        disk_dir.to_str().unwrap(),
    ]
    .map(String::from);
    Vmm::spawn(&args, None)
}

/// The disk entry of a snapshot's state file.
fn disk_state(snap: &Path) -> DiskState {
    let s = state::read_state(snap).expect("state file");
    s.devices
        .iter()
        .find_map(|d| match d {
            DeviceState::VirtioMmio(v) => match &v.device {
                VirtioDeviceState::Block(b) => Some(b.disk.clone()),
                _ => None,
            },
            _ => None,
        })
        .expect("a virtio-blk entry")
}

/// The frozen chain a snapshot names, opened read-only.
fn frozen_chain(snap: &Path) -> Vec<Arc<Frozen>> {
    disk_state(snap)
        .layers
        .iter()
        .map(|l| {
            let data = snap.join(&l.data);
            Arc::new(match &l.index {
                Some((idx, id)) => Frozen::open(&data, &snap.join(idx), *id).unwrap().0,
                None => Frozen::open_base(&data).unwrap(),
            })
        })
        .collect()
}

/// Sector 8's block as the chain (a writable top's files, if given, over a snapshot's frozen
/// layers) reads it.
fn block_at(snap: &Path, top: Option<&Path>) -> Vec<u8> {
    let top = top.map(|stem| {
        let (data, idx) = (stem.with_extension("data"), stem.with_extension("idx"));
        let mut hb = [0u8; 52];
        std::io::Read::read_exact(&mut std::fs::File::open(&idx).unwrap(), &mut hb).unwrap();
        let h = Header::parse(&hb).unwrap();
        Writable::open(&data, &idx, h.layer).unwrap()
    });
    let d = ChainDisk::new(MIB as u64, 4096, top, frozen_chain(snap));
    let mut b = vec![0u8; 4096];
    d.read(SECTOR, &mut b).unwrap();
    b
}

fn digest(p: &Path) -> u64 {
    fnv(&std::fs::read(p).unwrap())
}

#[test]
fn fork_children_write_their_own_layers_over_the_frozen_one() {
    if !kvm_available() {
        return;
    }
    let t = tmp();
    let d = t.path().canonicalize().unwrap();
    let (base, stem) = setup(&d);
    let mut parent = boot(&base, &stem, &d.join("p.sock"));
    parent.wait_for("the parent's block", |s| s.contains(&blk_line(0)));
    let f = d.join("f");
    parent.api().fork(&f);
    // The parent's layer moved into the snapshot; the parent goes on in a new one at the stem.
    for ext in ["data", "idx"] {
        assert!(f.join(format!("disk-root.{ext}")).exists(), "{}", parent.dump());
        assert!(stem.with_extension(ext).exists());
    }
    let st = disk_state(&f);
    let names: Vec<&str> = st.layers.iter().map(|l| l.data.as_str()).collect();
    assert_eq!(names, ["disk-root.data", "../base.img"], "named relative to the snapshot");
    assert_eq!(block_at(&f, None), pattern(0), "the frozen layer holds the parent's block");
    let frozen = [f.join("disk-root.data"), f.join("disk-root.idx")].map(|p| digest(&p));

    // Children: cold mmap, cold uffd, and a standby VMM; each its own --disk-dir.
    let mut kids = vec![
        (1, d.join("c1"), restore(&f, "mmap", 1, &d.join("c1"))),
        (2, d.join("c2"), restore(&f, "uffd", 2, &d.join("c2"))),
    ];
    let sock = d.join("sb.sock");
    std::fs::create_dir(d.join("c3")).unwrap();
    let args = [
        "standby",
        "--api-sock",
        sock.to_str().unwrap(),
        "--mem-mib",
        "64",
        "--disk-dir",
        d.join("c3").to_str().unwrap(),
    ]
    .map(String::from);
    let sb = Vmm::spawn(&args, Some(sock.clone()));
    let v = sb.api().call(&json!({"cmd": "restore", "snapshot": f, "identity": 3}));
    assert!(v["restore_ms"].as_f64().is_some(), "{v}");
    kids.push((3, d.join("c3"), sb));
    for (id, dir, vmm) in &mut kids {
        // The guest read back its own block after a flush, and sector 0 from the image.
        vmm.wait_for("the child's block", |s| s.contains(&blk_line(*id)));
        assert!(!vmm.stdout().contains("tg: error"), "{}", vmm.dump());
        // On the host: the child's own layer over the frozen chain reads the child's block.
        assert_eq!(block_at(&f, Some(&dir.join("root"))), pattern(*id), "child {id}");
    }
    assert_eq!(block_at(&f, None), pattern(0), "no child wrote into the frozen layer");
    let after = [f.join("disk-root.data"), f.join("disk-root.idx")].map(|p| digest(&p));
    assert_eq!(after, frozen, "the frozen layer's files are unchanged");

    // The parent snapshots again: its chain is two frozen layers over the image, named
    // relative to the new directory; the children's blocks are in none of them.
    let g = d.join("g");
    parent.api().snapshot("diff", &g);
    let names: Vec<String> = disk_state(&g).layers.into_iter().map(|l| l.data).collect();
    assert_eq!(names, ["disk-root.data", "../f/disk-root.data", "../base.img"]);
    assert_eq!(block_at(&g, None), pattern(0));
    assert!(!parent.stdout().contains("BLK id=1"), "the parent saw no identity change");

    // A restore of a snapshot with a writable disk needs somewhere to put its layer.
    let mut v = Vmm::spawn(&["restore", "--snapshot", g.to_str().unwrap()].map(String::from), None);
    let (ok, err) = v.wait_exit();
    assert!(!ok && err.contains("--disk-dir"), "{err}");
}

#[test]
fn bad_disks_are_refused_with_clear_errors() {
    if !kvm_available() {
        return;
    }
    let t = tmp();
    let d = t.path().canonicalize().unwrap();
    let (base, stem) = setup(&d);
    let run = |disk: &str| {
        let mut v = Vmm::spawn(
            &["run", "--kernel", guest(), "--cmdline", "tg.mode=hello", "--disk", disk]
                .map(String::from),
            None,
        );
        let (ok, err) = v.wait_exit();
        assert!(!ok, "{disk}: {}", v.dump());
        err
    };
    let e = run(base.to_str().unwrap());
    assert!(e.contains("layer=STEM"), "{e}");
    let e = run(&format!("{},ro,id=x y", base.display()));
    assert!(e.contains("id"), "{e}");
    std::fs::write(d.join("odd.img"), [0u8; 1000]).unwrap();
    let e = run(&format!("{},ro", d.join("odd.img").display()));
    assert!(e.contains("512"), "{e}");
    let e = run(&format!("{},ro", d.join("missing.img").display()));
    assert!(e.contains("missing.img"), "{e}");
    // A layer another running VMM writes is refused.
    let mut parent = boot(&base, &stem, &d.join("p.sock"));
    parent.wait_for("the parent's block", |s| s.contains(&blk_line(0)));
    let e = run(&format!("{},layer={}", base.display(), stem.display()));
    assert!(e.contains("in use"), "{e}");
}
