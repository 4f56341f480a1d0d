//! Crash consistency: a failpoint "crashes" each step of snapshot, clone, delete
//! and flatten; the store is then dropped and reopened (recovery pass), and the
//! catalog and the layer files must agree, with the disks' contents intact.
//!
//! Needs `--features failpoints` (scripts/test.sh runs it); without the feature
//! the test says it was skipped.

// An integration-test crate: every item in it is test-only.
#![allow(clippy::tests_outside_test_module)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use grove_storage::block::layered::LayeredStore;
use grove_storage::block::{BlockDevice, BlockError, BlockIo, BlockStore, LayerId, SECTOR_SIZE};
use grove_storage::catalog::LayerKind;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Clone,
    Snapshot,
    Delete,
    Flatten,
}

const POINTS: &[(&str, Op)] = &[
    ("layered::clone::after_files", Op::Clone),
    ("layered::clone::after_catalog", Op::Clone),
    ("layered::snapshot::after_flush", Op::Snapshot),
    ("layered::snapshot::after_files", Op::Snapshot),
    ("layered::snapshot::after_catalog", Op::Snapshot),
    ("layered::delete::after_catalog", Op::Delete),
    ("layered::delete::mid_unlink", Op::Delete),
    ("layered::flatten::after_files", Op::Flatten),
    ("layered::flatten::after_catalog", Op::Flatten),
];

const SIZE: u64 = 1 << 20;

fn same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!("{what}: contents differ at byte {at:?} (len {} vs {})", got.len(), want.len());
    }
}

fn read(d: &impl BlockDevice, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.read(0, &mut b).unwrap();
    b
}

fn fill(d: &impl BlockDevice, m: &mut [u8], sector: u64, byte: u8, len: usize) {
    let data = vec![byte; len];
    d.write(sector, &data).unwrap();
    let o = usize::try_from(sector * SECTOR_SIZE).unwrap();
    m[o..o + len].copy_from_slice(&data);
}

/// The catalog and the directory agree: every named file exists, every file is
/// named, and each layer's child count matches the records.
fn check_consistent(s: &LayeredStore, dir: &Path) {
    let layers = s.catalog().layers().unwrap();
    let mut named = BTreeSet::new();
    let mut children: BTreeMap<LayerId, u32> = BTreeMap::new();
    for r in &layers {
        for f in &r.files {
            assert!(dir.join(f).exists(), "layer {} names missing {f}", r.id);
            named.insert(f.clone());
        }
        if let Some(p) = r.parent {
            *children.entry(p).or_default() += 1;
            assert!(layers.iter().any(|x| x.id == p), "parent {p} of {} missing", r.id);
        }
        assert!(r.holds + r.children > 0, "layer {} is unreferenced", r.id);
    }
    for r in &layers {
        assert_eq!(r.children, children.get(&r.id).copied().unwrap_or(0), "children of {}", r.id);
    }
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(on_disk, named, "files on disk vs files named");
}

fn crash_at(point: &str, op: Op, spares: bool) {
    let root = tempfile::tempdir().unwrap();
    let layers_dir = root.path().join("layers");
    let mut m = vec![0u8; SIZE as usize];
    let (d_layer, s1, s2, d2_layer, m2, m_s2) = {
        let s = LayeredStore::open(root.path()).unwrap();
        let base = s.create_base(SIZE, None).unwrap();
        let d = s.clone_disk(base).unwrap();
        fill(&d, &mut m, 0, 1, 64 * 1024);
        let s1 = d.snapshot().unwrap();
        fill(&d, &mut m, 16, 2, 8192);
        let s2 = d.snapshot().unwrap();
        let m_s2 = m.clone();
        let mut m2 = m.clone();
        fill(&d, &mut m, 40, 3, 4096);
        d.flush().unwrap();
        let d2 = s.clone_disk(s2).unwrap();
        fill(&d2, &mut m2, 100, 9, 4096);
        d2.flush().unwrap();
        if spares {
            s.prepare_spares(SIZE, 2).unwrap();
        }
        (d.layer(), s1, s2, d2.layer(), m2, m_s2)
    };
    let count = |s: &LayeredStore| {
        s.catalog().layers().unwrap().iter().filter(|r| r.kind != LayerKind::Spare).count()
    };
    let before = count(&LayeredStore::open(root.path()).unwrap());

    // The crash.
    {
        let s = LayeredStore::open(root.path()).unwrap();
        fail::cfg(point, "return").unwrap();
        let result = match op {
            Op::Clone => s.clone_disk(s1).map(|_| ()),
            Op::Snapshot => {
                let d = s.open_disk(d_layer).unwrap();
                d.snapshot().map(|_| ())
            }
            Op::Delete => s.release(d2_layer),
            Op::Flatten => s.flatten(s2).map(|_| ()),
        };
        fail::remove(point);
        assert!(
            matches!(&result, Err(BlockError::Failpoint(p)) if p == point),
            "{point}: {result:?}"
        );
    }

    // Restart: recovery, then the invariants.
    let s = LayeredStore::open(root.path()).unwrap();
    let rep = s.recovery().clone();
    assert!(rep.missing_files.is_empty(), "{point}: {rep:?}");
    let inline_files = !spares || point.starts_with("layered::flatten");
    if (point.ends_with("after_files") && inline_files) || point.starts_with("layered::delete") {
        assert!(!rep.removed_orphans.is_empty(), "{point}: expected orphans, {rep:?}");
    }
    if point == "layered::flatten::after_catalog" {
        assert!(!rep.removed_orphans.is_empty(), "{point}: the old layer's files");
    }
    check_consistent(&s, &layers_dir);
    let after = count(&s);
    match point {
        "layered::clone::after_catalog" | "layered::snapshot::after_catalog" => {
            assert_eq!(after, before + 1, "{point}: committed");
        }
        "layered::delete::after_catalog" | "layered::delete::mid_unlink" => {
            assert_eq!(after, before - 1, "{point}: committed");
        }
        _ => assert_eq!(after, before, "{point}: layer count"),
    }

    // The disk's current writable layer: itself, or the one pushed on it.
    let writable: Vec<LayerId> =
        s.catalog().layers().unwrap().iter().filter(|r| !r.frozen).map(|r| r.id).collect();
    let d_now = if point == "layered::snapshot::after_catalog" {
        let r = s
            .catalog()
            .layers()
            .unwrap()
            .into_iter()
            .find(|r| r.parent == Some(d_layer) && !r.frozen)
            .expect("new top over the old one");
        assert!(!r.frozen);
        r.id
    } else {
        d_layer
    };
    assert!(writable.contains(&d_now), "{point}: {writable:?}");
    let d = s.open_disk(d_now).unwrap();
    same(&read(&d, SIZE as usize), &m, &format!("{point}: disk contents"));
    if !point.starts_with("layered::delete") {
        let d2 = s.open_disk(d2_layer).unwrap();
        same(&read(&d2, SIZE as usize), &m2, &format!("{point}: second disk contents"));
    } else {
        assert!(s.open_disk(d2_layer).is_err(), "{point}: deleted disk");
    }
    // The operation works after recovery.
    match op {
        Op::Clone => drop(s.clone_disk(s1).unwrap()),
        Op::Snapshot => drop(d.snapshot().unwrap()),
        Op::Delete => {
            if s.catalog().layer(d2_layer).is_ok() {
                s.release(d2_layer).unwrap();
            }
        }
        Op::Flatten => {
            let cur = if s.catalog().layer(s2).is_ok() { s2 } else { d_now };
            if cur == s2 {
                let f = s.flatten(s2).unwrap();
                let c = s.clone_disk(f).unwrap();
                same(&read(&c, SIZE as usize), &m_s2, point);
            }
        }
    }
    drop(d);
    check_consistent(&s, &layers_dir);
}

#[test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs --features failpoints (scripts/test.sh runs it so)"
)]
fn crash_at_every_failpoint_then_recover() {
    assert!(fail::has_failpoints(), "the failpoints feature is on but fail has none compiled in");
    let _scenario = fail::FailScenario::setup();
    for spares in [false, true] {
        for (point, op) in POINTS {
            crash_at(point, *op, spares);
        }
    }
}
