//! Unit tests of the pure parts: header and index codec, overlay, working-set codec.

use super::chain::{overlay, Segment};
use super::format::{self, LayerHeader, LayerKind, Run, HEADER_SIZE};
use super::*;
use proptest::prelude::*;
use std::path::Path;

fn layout() -> MemoryLayout {
    MemoryLayout::new(
        4096,
        vec![Region { gpa: 0, len: 64 * 4096 }, Region { gpa: 1 << 32, len: 32 * 4096 }],
    )
    .unwrap()
}

/// A complete in-memory layer image (header, index, zero data).
fn image(kind: LayerKind, parent: Option<LayerId>, runs: &[Run]) -> Vec<u8> {
    let idx = format::encode_index(runs);
    let h = LayerHeader::new(kind, LayerId(7), parent, layout(), runs, &idx).unwrap();
    let mut b = vec![0u8; usize::try_from(h.file_len).unwrap()];
    b[..HEADER_SIZE].copy_from_slice(&h.encode());
    b[HEADER_SIZE..HEADER_SIZE + idx.len()].copy_from_slice(&idx);
    b
}

fn runs() -> Vec<Run> {
    vec![Run { start: 0, count: 3 }, Run { start: 10, count: 1 }, Run { start: 60, count: 10 }]
}

#[test]
fn header_and_index_round_trip() {
    let img = image(LayerKind::Diff, Some(LayerId(3)), &runs());
    let (h, r) = format::parse_image(&img).unwrap();
    assert_eq!(h.kind, LayerKind::Diff);
    assert_eq!(h.id, LayerId(7));
    assert_eq!(h.parent, Some(LayerId(3)));
    assert_eq!(h.layout, layout());
    assert_eq!(h.present_pages, 14);
    assert_eq!(h.data_offset % 4096, 0);
    assert_eq!(r, runs());
}

#[test]
fn corrupt_images_give_clear_errors() {
    let good = image(LayerKind::Full, None, &runs());
    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(matches!(format::parse_image(&bad), Err(LayerError::BadMagic)));

    let mut bad = good.clone();
    bad[8] = 9;
    assert!(matches!(format::parse_image(&bad), Err(LayerError::UnsupportedVersion(9))));

    let mut bad = good.clone();
    bad[60] ^= 1;
    assert!(matches!(format::parse_image(&bad), Err(LayerError::HeaderChecksum { .. })));

    let mut bad = good.clone();
    bad[HEADER_SIZE + 3] ^= 1;
    assert!(matches!(format::parse_image(&bad), Err(LayerError::IndexChecksum { .. })));

    for cut in [0, 100, HEADER_SIZE - 1, HEADER_SIZE + 5, good.len() - 1] {
        let e = format::parse_image(&good[..cut]).unwrap_err();
        assert!(matches!(e, LayerError::Truncated { .. }), "cut {cut}: {e}");
    }
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(format::parse_image(&long), Err(LayerError::TrailingData { .. })));
    assert!(format::parse_image(&good).is_ok());
}

#[test]
fn invalid_indexes_are_rejected() {
    for bad in [
        vec![Run { start: 5, count: 0 }],
        vec![Run { start: 5, count: 3 }, Run { start: 6, count: 1 }],
        vec![Run { start: 90, count: 7 }],
        vec![Run { start: u64::MAX, count: 2 }],
    ] {
        // Hand-build the header with a correct crc over a bad index.
        let idx = format::encode_index(&bad);
        let mut h =
            LayerHeader::new(LayerKind::Full, LayerId(1), None, layout(), &bad, &idx).unwrap();
        h.present_pages = bad.iter().fold(0u64, |a, r| a.wrapping_add(r.count)).min(96);
        assert!(matches!(format::decode_index(&h, &idx), Err(LayerError::Invalid(_))), "{bad:?}");
    }
}

#[test]
fn layouts_are_validated() {
    assert!(MemoryLayout::new(4096, vec![]).is_err());
    assert!(MemoryLayout::new(4000, vec![Region { gpa: 0, len: 4096 }]).is_err());
    assert!(MemoryLayout::new(4096, vec![Region { gpa: 1, len: 4096 }]).is_err());
    assert!(MemoryLayout::new(4096, vec![Region { gpa: 0, len: 0 }]).is_err());
    let overlap = vec![Region { gpa: 0, len: 8192 }, Region { gpa: 4096, len: 4096 }];
    assert!(MemoryLayout::new(4096, overlap).is_err());
    let huge = vec![Region { gpa: 0, len: 1 << 40 }, Region { gpa: 1 << 41, len: 4096 }];
    assert!(MemoryLayout::new(4096, huge).is_err());
    assert!(MemoryLayout::new(4096, vec![Region { gpa: 0, len: MAX_GUEST_MEMORY }]).is_ok());
    let l = layout();
    assert_eq!(l.mem_pages(), 96);
    assert_eq!(l.region_first_pages(), vec![0, 64]);
}

#[test]
fn working_set_round_trip_and_corruption() {
    let ws = WorkingSet { head: LayerId(5), page_size: 4096, pages: vec![3, 1, 2, 90] };
    let b = ws.encode();
    assert_eq!(WorkingSet::decode(&b).unwrap(), ws);
    let mut bad = b.clone();
    bad[0] = 0;
    assert!(matches!(WorkingSet::decode(&bad), Err(LayerError::BadMagic)));
    let mut bad = b.clone();
    bad[40] ^= 1;
    assert!(matches!(WorkingSet::decode(&bad), Err(LayerError::IndexChecksum { .. })));
    assert!(matches!(WorkingSet::decode(&b[..b.len() - 1]), Err(LayerError::Truncated { .. })));
    assert!(ws.check(LayerId(5), 4096, 96).is_ok());
    assert!(matches!(ws.check(LayerId(6), 4096, 96), Err(LayerError::WorkingSetMismatch { .. })));
    assert!(ws.check(LayerId(5), 4096, 50).is_err());
}

#[test]
fn special_files_are_refused_as_layers_without_blocking() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("0000.mlayer");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // A FIFO with no writer blocked `open` forever; a device was read without end.
    for p in [fifo.as_path(), d.path(), Path::new("/dev/zero")] {
        let e = Layer::open(p).unwrap_err();
        assert!(matches!(e, LayerError::NotRegular { .. }), "{}: {e}", p.display());
        let e = WorkingSet::load(p).unwrap_err();
        assert!(matches!(e, LayerError::NotRegular { .. }), "{}: {e}", p.display());
    }
}

#[test]
fn stale_temporary_layers_are_swept() {
    let d = tempfile::tempdir().unwrap();
    let me = std::process::id();
    // PID 0 is never a process: a killed writer's leftover.
    let dead = d.path().join(".0001.mlayer.tmp-0-1f");
    let mine = d.path().join(format!(".0002.mlayer.tmp-{me}-2e"));
    let keep = [d.path().join("0001.mlayer"), d.path().join(".x.tmp-1-zz"), d.path().join("a.tmp")];
    for p in keep.iter().chain([&dead, &mine]) {
        std::fs::write(p, b"x").unwrap();
    }
    assert_eq!(sweep_stale_tmp(d.path(), false), vec![dead.clone()]);
    assert!(mine.exists(), "a live writer's file is kept");
    assert_eq!(sweep_stale_tmp(d.path(), true), vec![mine]);
    assert!(keep.iter().all(|p| p.exists()), "other files are kept");
}

fn to_runs(pages: &[bool]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (i, &p) in pages.iter().enumerate() {
        if p {
            match out.last_mut() {
                Some(r) if r.end() == i as u64 => r.count += 1,
                _ => out.push(Run { start: i as u64, count: 1 }),
            }
        }
    }
    out
}

proptest! {
    /// Overlaying layers gives, for every page, the latest layer that has it.
    #[test]
    fn overlay_matches_per_page_model(layers in prop::collection::vec(prop::collection::vec(any::<bool>(), 80), 1..8)) {
        let mut segs: Vec<Segment> = Vec::new();
        let mut model: Vec<Option<usize>> = vec![None; 80];
        for (i, l) in layers.iter().enumerate() {
            segs = overlay(&segs, &to_runs(l), i);
            for (p, &present) in l.iter().enumerate() {
                if present { model[p] = Some(i); }
            }
        }
        let mut got: Vec<Option<usize>> = vec![None; 80];
        let mut prev_end = 0;
        for s in &segs {
            prop_assert!(s.count > 0 && s.start >= prev_end);
            prev_end = s.end();
            for p in s.start..s.end() { got[usize::try_from(p).unwrap()] = Some(s.layer); }
        }
        // Adjacent segments of one layer are merged.
        for w in segs.windows(2) {
            prop_assert!(!(w[0].end() == w[1].start && w[0].layer == w[1].layer));
        }
        prop_assert_eq!(got, model);
    }

    /// The parser never panics on arbitrary bytes or on a mutated valid image.
    #[test]
    fn parser_survives_garbage(bytes in prop::collection::vec(any::<u8>(), 0..9000),
                               flips in prop::collection::vec((0usize..5000, any::<u8>()), 0..8)) {
        let _ = format::parse_image(&bytes);
        let mut img = image(LayerKind::Full, None, &runs());
        for (at, v) in flips { let n = img.len(); img[at % n] ^= v; }
        let _ = format::parse_image(&img);
        let _ = WorkingSet::decode(&bytes);
    }
}
