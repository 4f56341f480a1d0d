//! The dm-thin backend: the conformance suite on a thin pool over two loop
//! devices (files in a temporary directory). Needs device-mapper with dm-thin and
//! root; elsewhere it prints why it skipped.

// An integration-test crate: every item in it is test-only.
#![allow(clippy::tests_outside_test_module)]

#[path = "../../testsupport/skip.rs"]
mod skip;

use std::path::PathBuf;
use std::sync::Arc;

use grove_storage::block::dmthin::{attach_loop, detach_loop, dm_available, DmThinStore};
use grove_storage::block::{conformance, BlockDevice, BlockIo, BlockStore};
use grove_storage::catalog::Catalog;

/// Loop devices detached on drop.
struct Loops(Vec<PathBuf>);

impl Drop for Loops {
    fn drop(&mut self) {
        for l in &self.0 {
            let _ = detach_loop(l);
        }
    }
}

fn pool(name: &str) -> Option<(tempfile::TempDir, Loops, DmThinStore)> {
    if let Err(reason) = dm_available() {
        skip::missing("dm", &reason);
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("meta");
    let data = dir.path().join("data");
    std::fs::File::create(&meta).unwrap().set_len(16 << 20).unwrap();
    std::fs::File::create(&data).unwrap().set_len(256 << 20).unwrap();
    let mut loops = Loops(Vec::new());
    for f in [&meta, &data] {
        match attach_loop(f) {
            Ok(l) => loops.0.push(l),
            Err(e) => {
                skip::missing("dm", &format!("cannot attach a loop device: {e}"));
                return None;
            }
        }
    }
    let catalog = Arc::new(Catalog::open(&dir.path().join("catalog")).unwrap());
    let prefix = format!("grove-test-{name}-{}", std::process::id());
    match DmThinStore::create(&prefix, &loops.0[0], &loops.0[1], catalog) {
        Ok(s) => Some((dir, loops, s)),
        Err(e) => {
            skip::missing("dm", &format!("cannot create a thin pool here: {e}"));
            None
        }
    }
}

#[test]
fn dmthin_conformance_suite() {
    let Some((_dir, _loops, store)) = pool("conf") else { return };
    conformance::run_all(&store);
    let u = store.usage().unwrap();
    assert!(u.total_bytes > 0);
    store.teardown().unwrap();
}

#[test]
fn dmthin_snapshot_keeps_the_device_open() {
    let Some((_dir, _loops, store)) = pool("snap") else { return };
    let base = store.create_base(conformance::DISK, None).unwrap();
    let d = store.clone_disk(base).unwrap();
    d.write(0, &[7; 4096]).unwrap();
    let before = d.layer();
    let frozen = d.snapshot().unwrap();
    assert_eq!(frozen, before);
    d.write(0, &[8; 4096]).unwrap();
    let c = store.clone_disk(frozen).unwrap();
    let mut b = vec![0u8; 4096];
    c.read(0, &mut b).unwrap();
    assert_eq!(b, vec![7; 4096]);
    drop((c, d));
    store.teardown().unwrap();
}

#[test]
fn dm_detection_reports_a_reason() {
    match dm_available() {
        Ok(()) => println!("device-mapper present"),
        Err(reason) => {
            assert_eq!(reason, "no device-mapper in this kernel");
            println!("skipped: {reason}");
        }
    }
}

/// Active device-mapper devices whose name starts with `prefix` (from sysfs).
fn dm_devices(prefix: &str) -> usize {
    std::fs::read_dir("/sys/block")
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("dm/name"))
                        .is_ok_and(|n| n.trim().starts_with(prefix))
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn dmthin_release_while_open_deletes_the_thin_when_the_disk_drops() {
    let Some((_dir, _loops, store)) = pool("rel") else { return };
    let prefix = format!("grove-test-rel-{}-thin-", std::process::id());
    let base = store.create_base(conformance::DISK, None).unwrap();
    let d = store.clone_disk(base).unwrap();
    d.write(0, &[5; 4096]).unwrap();
    let active = dm_devices(&prefix);
    assert!(active >= 1, "the disk's thin device is active");
    // Released while the disk holds its device open: no EBUSY, the disk keeps working.
    store.release(d.layer()).unwrap();
    let mut b = vec![0u8; 4096];
    d.read(0, &mut b).unwrap();
    assert_eq!(b, vec![5; 4096]);
    assert_eq!(dm_devices(&prefix), active, "still active while open");
    drop(d);
    assert_eq!(dm_devices(&prefix), active - 1, "removed once the disk is dropped");
    store.release(base).unwrap();
    store.teardown().unwrap();
}
