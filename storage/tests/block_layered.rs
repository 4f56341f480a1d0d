//! Tests of the layered block store: the conformance suite, deep chains,
//! concurrent readers during snapshots, a property test against an in-memory model,
//! corrupt index files, a full disk, reopen and recovery.

// An integration-test crate: every item in it is test-only.
#![allow(clippy::tests_outside_test_module)]

#[path = "../../testsupport/skip.rs"]
mod skip;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use grove_storage::block::layered::index::{Header, IndexError};
use grove_storage::block::layered::LayeredStore;
use grove_storage::block::{
    conformance, BlockDevice, BlockError, BlockIo, BlockStore, SECTOR_SIZE,
};

fn store() -> (tempfile::TempDir, LayeredStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = LayeredStore::open(dir.path()).unwrap();
    (dir, s)
}

fn read(d: &impl BlockDevice, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.read(off / SECTOR_SIZE, &mut b).unwrap();
    b
}

#[test]
fn conformance_suite() {
    let (_dir, s) = store();
    conformance::run_all(&s);
}

#[test]
fn conformance_suite_with_64k_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let s = LayeredStore::open_with_chunk(dir.path(), 64 * 1024).unwrap();
    conformance::run_all(&s);
}

#[test]
fn conformance_suite_with_spares() {
    let (_dir, s) = store();
    s.prepare_spares(conformance::DISK, 4).unwrap();
    conformance::run_all(&s);
}

#[test]
fn spares_are_used_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 << 20;
    let (snap, layer) = {
        let s = LayeredStore::open(dir.path()).unwrap();
        let base = s.create_base(size, None).unwrap();
        s.prepare_spares(size, 3).unwrap();
        assert_eq!(s.spares(size), 3);
        assert_eq!(s.spares(size * 2), 0);
        let d = s.clone_disk(base).unwrap();
        assert_eq!(s.spares(size), 2);
        d.write(0, &[3; 4096]).unwrap();
        let snap = d.snapshot().unwrap();
        assert_eq!(s.spares(size), 1);
        d.write(8, &[4; 4096]).unwrap();
        d.flush().unwrap();
        (snap, d.layer())
    };
    let s = LayeredStore::open(dir.path()).unwrap();
    assert!(s.recovery().removed_orphans.is_empty());
    assert_eq!(s.spares(size), 1, "the unused spare is still there");
    let d = s.open_disk(layer).unwrap();
    assert_eq!(read(&d, 0, 8192), [vec![3; 4096], vec![4; 4096]].concat());
    let c = s.clone_disk(snap).unwrap();
    assert_eq!(s.spares(size), 0);
    assert_eq!(read(&c, 0, 8192), [vec![3; 4096], vec![0; 4096]].concat());
    // A released spare leaves the pool.
    s.prepare_spares(size, 1).unwrap();
    let spare = s
        .catalog()
        .layers()
        .unwrap()
        .into_iter()
        .find(|r| r.kind == grove_storage::catalog::LayerKind::Spare)
        .unwrap();
    s.release(spare.id).unwrap();
    assert_eq!(s.spares(size), 0);
    assert!(!dir.path().join(format!("layers/L{}.idx", spare.id)).exists());
    drop(s.clone_disk(snap).unwrap());
    // Layers made from spares are ordinary layers after a restart.
    let cl = c.layer();
    drop((c, d, s));
    let s = LayeredStore::open(dir.path()).unwrap();
    let c = s.open_disk(cl).unwrap();
    assert_eq!(read(&c, 0, 4096), vec![3; 4096]);
}

#[test]
fn base_image_is_imported_and_shared_read_only() {
    let (dir, s) = store();
    let img = dir.path().join("img.raw");
    let mut content = vec![0u8; 1 << 20];
    for (i, b) in content.iter_mut().enumerate() {
        *b = (i / 4096) as u8;
    }
    std::fs::write(&img, &content).unwrap();
    let base = s.create_base(4 << 20, Some(&img)).unwrap();
    let a = s.clone_disk(base).unwrap();
    let b = s.clone_disk(base).unwrap();
    assert_eq!(read(&a, 0, 1 << 20), content);
    assert_eq!(read(&a, 1 << 20, 4096), vec![0; 4096], "past the image reads zeroes");
    a.write(8, &[0xee; 512]).unwrap();
    assert_eq!(read(&b, 0, 1 << 20), content);
    assert!(s.create_base(4096, Some(&img)).is_err(), "image larger than disk");
}

#[test]
fn chain_of_depth_100() {
    let (_dir, s) = store();
    let base = s.create_base(1 << 20, None).unwrap();
    let d = s.clone_disk(base).unwrap();
    let mut snaps = Vec::new();
    for i in 0..100u64 {
        // Each level writes its own 4 KiB block and overwrites block 0.
        d.write(i * 8, &[i as u8 + 1; 4096]).unwrap();
        d.write(800, &[i as u8 + 1; 512]).unwrap();
        snaps.push(d.snapshot().unwrap());
    }
    assert_eq!(s.chain(d.layer()).unwrap().len(), 102);
    for i in 0..100u64 {
        assert_eq!(read(&d, i * 4096, 4096), vec![i as u8 + 1; 4096], "level {i}");
    }
    assert_eq!(read(&d, 800 * 512, 512), vec![100; 512]);
    let mid = s.clone_disk(snaps[49]).unwrap();
    assert_eq!(read(&mid, 49 * 4096, 4096), vec![50; 4096]);
    assert_eq!(read(&mid, 50 * 4096, 4096), vec![0; 4096]);
    assert_eq!(read(&mid, 800 * 512, 512), vec![50; 512]);
    // Flatten the whole chain: same contents, depth 2.
    let flat = s.flatten(snaps[99]).unwrap();
    assert_eq!(s.chain(flat).unwrap().len(), 2);
    let f = s.clone_disk(flat).unwrap();
    assert_eq!(read(&f, 0, 1 << 20), read(&d, 0, 1 << 20));
}

#[test]
fn concurrent_readers_during_snapshots() {
    let (_dir, s) = store();
    let base = s.create_base(8 << 20, None).unwrap();
    let d = Arc::new(s.clone_disk(base).unwrap());
    let pattern: Vec<u8> = (0..(2 << 20)).map(|i: u32| (i % 253) as u8).collect();
    d.write(0, &pattern).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|t| {
            let (d, stop, pattern) = (d.clone(), stop.clone(), pattern.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut x = 12345u64 + t;
                while !stop.load(Ordering::Relaxed) || n < 100 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let sector = (x >> 33) % ((2 << 20) / 512 - 64);
                    let mut b = vec![0u8; 32 * 1024];
                    d.read(sector, &mut b).unwrap();
                    let o = usize::try_from(sector * 512).unwrap();
                    assert_eq!(b, pattern[o..o + b.len()], "read at sector {sector}");
                    n += 1;
                }
                n
            })
        })
        .collect();
    for i in 0..40u64 {
        // Writes land above the region the readers check.
        d.write((4 << 20) / 512 + i * 8, &[i as u8; 4096]).unwrap();
        d.snapshot().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() >= 100);
    }
    for i in 0..40u64 {
        assert_eq!(read(&*d, (4 << 20) + i * 4096, 4096), vec![i as u8; 4096]);
    }
}

#[test]
fn reopen_keeps_flushed_data_and_recovery_removes_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let (layer, snap) = {
        let s = LayeredStore::open(dir.path()).unwrap();
        let base = s.create_base(1 << 20, None).unwrap();
        let d = s.clone_disk(base).unwrap();
        d.write(0, &[1; 8192]).unwrap();
        let snap = d.snapshot().unwrap();
        d.write(1, &[2; 512]).unwrap();
        d.flush().unwrap();
        (d.layer(), snap)
    };
    std::fs::write(dir.path().join("layers/L999999.data"), b"orphan").unwrap();
    let s = LayeredStore::open(dir.path()).unwrap();
    assert_eq!(s.recovery().removed_orphans, vec!["L999999.data".to_string()]);
    assert!(s.recovery().missing_files.is_empty());
    let d = s.open_disk(layer).unwrap();
    let mut expect = vec![1u8; 8192];
    expect[512..1024].fill(2);
    assert_eq!(read(&d, 0, 8192), expect);
    let c = s.clone_disk(snap).unwrap();
    assert_eq!(read(&c, 0, 8192), vec![1; 8192]);
    assert!(s.open_disk(snap).is_err(), "a frozen layer is not writable");
}

#[test]
fn flushes_across_reopens_keep_every_bitmap_page() {
    // 512 MiB at 4 KiB chunks: 4 bitmap pages of 128 MiB each.
    let dir = tempfile::tempdir().unwrap();
    let mib = |m: u64| m * (1 << 20) / 512;
    let layer = {
        let s = LayeredStore::open(dir.path()).unwrap();
        let base = s.create_base(512 << 20, None).unwrap();
        let d = s.clone_disk(base).unwrap();
        d.write(mib(1), &[1; 4096]).unwrap();
        d.write(mib(400), &[2; 4096]).unwrap();
        d.flush().unwrap();
        d.layer()
    };
    for (round, at) in [(3u8, 200u64), (4, 300), (5, 10)] {
        let s = LayeredStore::open(dir.path()).unwrap();
        let d = s.open_disk(layer).unwrap();
        d.write(mib(at), &[round; 4096]).unwrap();
        d.flush().unwrap();
    }
    let s = LayeredStore::open(dir.path()).unwrap();
    let d = s.open_disk(layer).unwrap();
    for (at, v) in [(1u64, 1u8), (400, 2), (200, 3), (300, 4), (10, 5)] {
        assert_eq!(read(&d, mib(at) * 512, 4096), vec![v; 4096], "MiB {at}");
    }
}

fn index_path(dir: &Path, layer: u64) -> PathBuf {
    dir.join(format!("layers/L{layer}.idx"))
}

#[test]
fn corrupt_or_truncated_index_gives_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let snap = {
        let s = LayeredStore::open(dir.path()).unwrap();
        let base = s.create_base(1 << 20, None).unwrap();
        let d = s.clone_disk(base).unwrap();
        d.write(0, &[1; 4096]).unwrap();
        d.snapshot().unwrap()
    };
    let path = index_path(dir.path(), snap);
    let good = std::fs::read(&path).unwrap();
    let check = |bytes: &[u8], want: fn(&IndexError) -> bool| {
        std::fs::write(&path, bytes).unwrap();
        let s = LayeredStore::open(dir.path()).unwrap();
        match s.clone_disk(snap) {
            Err(BlockError::Index { source, path: p, .. }) => {
                assert!(want(&source), "unexpected {source:?}");
                assert!(p.contains(&format!("L{snap}.idx")));
                let msg = format!(
                    "{}: {source}",
                    BlockError::Index { layer: snap, path: p, source: IndexError::BadMagic }
                );
                assert!(msg.contains("index"), "{msg}");
            }
            other => panic!("expected an index error, got {other:?}"),
        }
    };
    let mut b = good.clone();
    b[3] ^= 0xff;
    check(&b, |e| matches!(e, IndexError::BadMagic));
    let mut b = good.clone();
    b[13] ^= 0x01;
    check(&b, |e| matches!(e, IndexError::BadHeaderChecksum));
    let mut b = good.clone();
    b[8] = 77;
    check(&b, |e| matches!(e, IndexError::UnknownVersion(77)));
    check(&good[..good.len() / 2], |e| matches!(e, IndexError::Truncated { .. }));
    check(&good[..20], |e| matches!(e, IndexError::Truncated { .. }));
    let mut b = good.clone();
    // Both slot headers destroyed.
    let h = Header::new(snap, 1 << 20, 4096).unwrap();
    for i in 0..2 {
        let o = usize::try_from(h.slot_offset(i)).unwrap();
        b[o..o + 24].fill(0x55);
    }
    check(&b, |e| matches!(e, IndexError::NoValidSlot));
    // The good file works again.
    std::fs::write(&path, &good).unwrap();
    let s = LayeredStore::open(dir.path()).unwrap();
    assert_eq!(read(&s.clone_disk(snap).unwrap(), 0, 4096), vec![1; 4096]);
}

#[test]
fn a_torn_index_commit_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let layer = {
        let s = LayeredStore::open(dir.path()).unwrap();
        let base = s.create_base(1 << 20, None).unwrap();
        let d = s.clone_disk(base).unwrap();
        d.write(0, &[1; 4096]).unwrap();
        d.flush().unwrap(); // generation 4 in slot 1 (a new index has 1 and 2)
        d.write(8, &[2; 4096]).unwrap();
        d.flush().unwrap(); // generation 4 in slot 1
        d.layer()
    };
    // Tear the newest commit (slot 1): its header no longer checks out.
    let h = Header::new(layer, 1 << 20, 4096).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(index_path(dir.path(), layer)).unwrap();
    f.write_all_at(&[0xff; 8], h.slot_offset(1) + 8).unwrap();
    drop(f);
    let s = LayeredStore::open(dir.path()).unwrap();
    let d = s.open_disk(layer).unwrap();
    assert_eq!(read(&d, 0, 4096), vec![1; 4096]);
    // Chunk 1's bit was lost with the torn commit: it reads from below again.
    assert_eq!(read(&d, 4096, 4096), vec![0; 4096]);
}

/// A tmpfs mount that is unmounted on drop.
struct Tmpfs(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err("cannot mount a tmpfs (needs root)".into());
        }
        Ok(Self(dir.path().to_path_buf(), dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_returns_enospc_and_keeps_earlier_data() {
    let fs = match Tmpfs::mount("24m") {
        Ok(fs) => fs,
        Err(reason) => {
            skip::missing("root", &reason);
            return;
        }
    };
    let s = LayeredStore::open(&fs.0).unwrap();
    let base = s.create_base(64 << 20, None).unwrap();
    let d = s.clone_disk(base).unwrap();
    let mut written = 0u64;
    let err = loop {
        let block = vec![(written / (1 << 20)) as u8 + 1; 1 << 20];
        match d.write(written / 512, &block).and_then(|()| d.flush()) {
            Ok(()) => written += 1 << 20,
            Err(e) => break e,
        }
        assert!(written < 64 << 20, "the tmpfs never filled up");
    };
    assert!(matches!(err, BlockError::NoSpace(_)), "got {err:?}");
    assert!(written >= 4 << 20, "only {written} bytes fit");
    for mib in 0..written / (1 << 20) {
        assert_eq!(
            read(&d, mib << 20, 1 << 20),
            vec![mib as u8 + 1; 1 << 20],
            "MiB {mib} intact after ENOSPC"
        );
    }
    // Reads and overwrites of owned chunks still work.
    d.write(0, &[0xab; 4096]).unwrap();
    assert_eq!(read(&d, 0, 4096), vec![0xab; 4096]);
    drop(d);
    drop(s);
}

mod model {
    use super::*;
    use proptest::prelude::*;

    const SIZE: u64 = 128 * 1024;

    #[derive(Debug, Clone)]
    enum Op {
        Write { disk: usize, sector: u64, sectors: u64, seed: u8 },
        Zero { disk: usize, sector: u64, sectors: u64 },
        Read { disk: usize, sector: u64, sectors: u64 },
        Snapshot { disk: usize },
        Clone { frozen: usize },
        Flatten { frozen: usize },
        Flush { disk: usize },
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        let max = SIZE / 512;
        prop_oneof![
            5 => (0..8usize, 0..max, 1..40u64, any::<u8>()).prop_map(|(disk, sector, sectors, seed)| Op::Write { disk, sector, sectors, seed }),
            1 => (0..8usize, 0..max, 1..80u64).prop_map(|(disk, sector, sectors)| Op::Zero { disk, sector, sectors }),
            3 => (0..8usize, 0..max, 1..64u64).prop_map(|(disk, sector, sectors)| Op::Read { disk, sector, sectors }),
            2 => (0..8usize).prop_map(|disk| Op::Snapshot { disk }),
            2 => (0..16usize).prop_map(|frozen| Op::Clone { frozen }),
            1 => (0..16usize).prop_map(|frozen| Op::Flatten { frozen }),
            1 => (0..8usize).prop_map(|disk| Op::Flush { disk }),
            1 => Just(Op::Reopen),
        ]
    }

    fn run(ops: Vec<Op>, chunk: u32) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = LayeredStore::open_with_chunk(dir.path(), chunk).unwrap();
        let base = s.create_base(SIZE, None).unwrap();
        let mut disks = vec![(s.clone_disk(base).unwrap(), vec![0u8; SIZE as usize])];
        let mut frozen: Vec<(u64, Vec<u8>)> = vec![(base, vec![0u8; SIZE as usize])];
        let clamp = |sector: u64, sectors: u64| {
            let max = SIZE / 512;
            let sector = sector % max;
            (sector, sectors.min(max - sector))
        };
        for op in ops {
            match op {
                Op::Write { disk, sector, sectors, seed } => {
                    let n = disks.len();
                    let (d, m) = &mut disks[disk % n];
                    let (sector, sectors) = clamp(sector, sectors);
                    let data: Vec<u8> =
                        (0..sectors * 512).map(|i| seed.wrapping_add((i / 7) as u8)).collect();
                    d.write(sector, &data).unwrap();
                    let o = (sector * 512) as usize;
                    m[o..o + data.len()].copy_from_slice(&data);
                }
                Op::Zero { disk, sector, sectors } => {
                    let n = disks.len();
                    let (d, m) = &mut disks[disk % n];
                    let (sector, sectors) = clamp(sector, sectors);
                    d.write_zeroes(sector, sectors).unwrap();
                    let o = (sector * 512) as usize;
                    m[o..o + (sectors * 512) as usize].fill(0);
                }
                Op::Read { disk, sector, sectors } => {
                    let (d, m) = &disks[disk % disks.len()];
                    let (sector, sectors) = clamp(sector, sectors);
                    let o = (sector * 512) as usize;
                    let got = read(d, sector * 512, (sectors * 512) as usize);
                    prop_assert_eq_bytes(&got, &m[o..o + got.len()]);
                }
                Op::Snapshot { disk } => {
                    let (d, m) = &disks[disk % disks.len()];
                    if frozen.len() < 24 {
                        frozen.push((d.snapshot().unwrap(), m.clone()));
                    }
                }
                Op::Clone { frozen: f } => {
                    if disks.len() < 8 {
                        let (id, m) = &frozen[f % frozen.len()];
                        disks.push((s.clone_disk(*id).unwrap(), m.clone()));
                    }
                }
                Op::Flatten { frozen: f } => {
                    let i = f % frozen.len();
                    let new = s.flatten(frozen[i].0).unwrap();
                    frozen[i].0 = new;
                }
                Op::Flush { disk } => disks[disk % disks.len()].0.flush().unwrap(),
                Op::Reopen => {
                    let layers: Vec<u64> = disks.iter().map(|(d, _)| d.layer()).collect();
                    for (d, _) in &disks {
                        d.flush().unwrap();
                    }
                    let models: Vec<Vec<u8>> = disks.drain(..).map(|(_, m)| m).collect();
                    drop(s);
                    s = LayeredStore::open_with_chunk(dir.path(), chunk).unwrap();
                    assert!(s.recovery().removed_orphans.is_empty());
                    for (l, m) in layers.into_iter().zip(models) {
                        disks.push((s.open_disk(l).unwrap(), m));
                    }
                }
            }
        }
        // Everything matches at the end, and every frozen layer is intact.
        for (d, m) in &disks {
            prop_assert_eq_bytes(&read(d, 0, SIZE as usize), m);
        }
        for (id, m) in &frozen {
            let c = s.clone_disk(*id).unwrap();
            prop_assert_eq_bytes(&read(&c, 0, SIZE as usize), m);
        }
    }

    fn prop_assert_eq_bytes(got: &[u8], want: &[u8]) {
        if got != want {
            let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            panic!("contents differ from the model at byte {first} (len {})", got.len());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn layered_store_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
            run(ops, 4096);
        }

        #[test]
        fn layered_store_with_16k_chunks_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
            run(ops, 16384);
        }
    }
}
