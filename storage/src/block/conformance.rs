//! One conformance suite for every [`BlockStore`] backend (style.md §5).
//!
//! Each check takes a store and panics with a message on a violation; tests call
//! [`run_all`] against each backend the host can run.

use super::iov::read_only_slice;
use super::{BlockDevice, BlockIo, BlockStore, VolatileSlice, SECTOR_SIZE};

/// Disk size used by the suite (small enough for a loop-backed thin pool).
pub const DISK: u64 = 8 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8)).collect()
}

fn read<D: BlockDevice>(d: &D, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.read(off / SECTOR_SIZE, &mut b).expect("read");
    b
}

/// Runs every check.
pub fn run_all<S: BlockStore>(store: &S) {
    basic_io(store);
    vectored_io(store);
    bounds_are_checked(store);
    clones_are_isolated(store);
    snapshot_freezes(store);
    zeroes_and_discard(store);
    release_collects(store);
    flatten_keeps_contents(store);
}

/// Reads what was written, zeroes elsewhere, unaligned-to-chunk runs included.
pub fn basic_io<S: BlockStore>(store: &S) {
    let base = store.create_base(DISK, None).expect("base");
    let d = store.clone_disk(base).expect("clone");
    assert_eq!(d.size(), DISK);
    assert_eq!(read(&d, 0, 4096), vec![0; 4096]);
    let data = pattern(1, 3 * 4096 + 512);
    d.write(7, &data).expect("write");
    assert_eq!(read(&d, 7 * 512, data.len()), data);
    assert_eq!(read(&d, 0, 512), vec![0; 512]);
    d.flush().expect("flush");
    assert_eq!(read(&d, 7 * 512, data.len()), data);
    let last = DISK / SECTOR_SIZE - 1;
    d.write(last, &[9; 512]).expect("write last sector");
    assert_eq!(read(&d, last * 512, 512), vec![9; 512]);
    drop(d);
    let layer = store.clone_disk(base).expect("clone2");
    store.release(layer.layer()).expect("release clone2");
    store.release(base).expect("release base");
}

/// Scatter-gather requests: segments of any length (summing to whole sectors) across
/// chunk boundaries read and write what the plain calls do, partial first writes included;
/// out-of-range and unaligned vectored requests fail and change nothing.
pub fn vectored_io<S: BlockStore>(store: &S) {
    let base = store.create_base(DISK, None).expect("base");
    let d = store.clone_disk(base).expect("clone");
    d.write(0, &pattern(20, 64 * 1024)).expect("write");
    let s = d.snapshot().expect("snapshot");
    // 3 sectors + 3 chunks + 5 sectors, starting mid-chunk, in segments of 1, 511, 4000,
    // 7000, ... bytes: every first write here is partial in its first and last chunk.
    let data = pattern(21, 3 * 512 + 3 * 4096 + 5 * 512);
    let cuts = [0, 1, 512, 4512, 11_512, 12_800, data.len()];
    let segs: Vec<_> = cuts.windows(2).map(|w| read_only_slice(&data[w[0]..w[1]])).collect();
    d.write_vectored(5, &segs).expect("write_vectored");
    let mut expect = pattern(20, 64 * 1024);
    expect[5 * 512..5 * 512 + data.len()].copy_from_slice(&data);
    assert_eq!(read(&d, 0, expect.len()), expect, "vectored write, plain read");
    // Read back in other segments (sizes not multiples of anything), across owners: the
    // top (written now), the snapshot below, and never-written zeroes past 64 KiB.
    let total = 96 * 1024;
    let sizes = [3usize, 509, 4096, 1, 20_000, 8191];
    let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0xEE; n]).collect();
    let rest = total - sizes.iter().sum::<usize>();
    bufs.push(vec![0xEE; rest]);
    {
        let slices: Vec<VolatileSlice<'_, ()>> =
            bufs.iter_mut().map(|b| VolatileSlice::from(&mut b[..])).collect();
        d.read_vectored(0, &slices).expect("read_vectored");
    }
    let got = bufs.concat();
    assert_eq!(&got[..expect.len()], &expect[..], "plain write, vectored read");
    assert!(got[expect.len()..].iter().all(|&b| b == 0), "unwritten chunks read as zeroes");
    // Bad vectored requests change nothing.
    let odd = [read_only_slice(&data[..700])];
    assert!(d.write_vectored(0, &odd).is_err(), "not whole sectors");
    let last = DISK / SECTOR_SIZE - 1;
    let two = [read_only_slice(&data[..512]), read_only_slice(&data[..512])];
    assert!(d.write_vectored(last, &two).is_err(), "past the end");
    let mut b = vec![0u8; 1024];
    assert!(d.read_vectored(last, &[VolatileSlice::from(&mut b[..])]).is_err());
    assert_eq!(read(&d, 0, expect.len()), expect);
    assert_eq!(read(&d, last * 512, 512), vec![0; 512]);
    // The snapshot below kept its contents.
    let c = store.clone_disk(s).expect("clone snapshot");
    assert_eq!(read(&c, 0, 64 * 1024), pattern(20, 64 * 1024));
    for x in [d, c] {
        let l = x.layer();
        drop(x);
        store.release(l).expect("release");
    }
    store.release(s).expect("release s");
    store.release(base).expect("release base");
}

/// Out-of-range and malformed requests fail without side effects.
pub fn bounds_are_checked<S: BlockStore>(store: &S) {
    let base = store.create_base(DISK, None).expect("base");
    let d = store.clone_disk(base).expect("clone");
    let sectors = DISK / SECTOR_SIZE;
    assert!(d.write(sectors, &[1; 512]).is_err());
    assert!(d.write(sectors - 1, &[1; 1024]).is_err());
    assert!(d.write(0, &[1; 100]).is_err());
    let mut b = [0u8; 512];
    assert!(d.read(u64::MAX, &mut b).is_err());
    assert!(d.write_zeroes(sectors - 1, 2).is_err());
    assert!(d.discard(u64::MAX / 2, u64::MAX / 2).is_err());
    assert_eq!(read(&d, DISK - 512, 512), vec![0; 512]);
    let l = d.layer();
    drop(d);
    store.release(l).expect("release");
    store.release(base).expect("release base");
}

/// A write in one clone is invisible to its siblings and to the chain below.
pub fn clones_are_isolated<S: BlockStore>(store: &S) {
    let base = store.create_base(DISK, None).expect("base");
    let a = store.clone_disk(base).expect("a");
    a.write(0, &pattern(2, 8192)).expect("write a");
    let snap = a.snapshot().expect("snapshot a");
    let b = store.clone_disk(snap).expect("b");
    let c = store.clone_disk(snap).expect("c");
    b.write(8, &pattern(3, 4096)).expect("write b");
    c.write(1, &pattern(4, 512)).expect("write c");
    a.write(0, &pattern(5, 512)).expect("write a again");
    let mut expect_b = pattern(2, 8192);
    expect_b[4096..].copy_from_slice(&pattern(3, 4096));
    assert_eq!(read(&b, 0, 8192), expect_b, "b sees its own write over the snapshot");
    let mut expect_c = pattern(2, 8192);
    expect_c[512..1024].copy_from_slice(&pattern(4, 512));
    assert_eq!(read(&c, 0, 8192), expect_c, "c does not see b");
    let mut expect_a = pattern(2, 8192);
    expect_a[..512].copy_from_slice(&pattern(5, 512));
    assert_eq!(read(&a, 0, 8192), expect_a, "a does not see its children");
    let check = store.clone_disk(snap).expect("check");
    assert_eq!(read(&check, 0, 8192), pattern(2, 8192), "snapshot unchanged");
    for d in [a, b, c, check] {
        let l = d.layer();
        drop(d);
        store.release(l).expect("release disk");
    }
    store.release(snap).expect("release snap");
    store.release(base).expect("release base");
}

/// After a snapshot the disk keeps its contents and continues on a new layer.
pub fn snapshot_freezes<S: BlockStore>(store: &S) {
    let base = store.create_base(DISK, None).expect("base");
    let d = store.clone_disk(base).expect("clone");
    let before = d.layer();
    d.write(100, &pattern(6, 4096)).expect("write");
    let s1 = d.snapshot().expect("snapshot");
    assert_eq!(s1, before);
    assert_ne!(d.layer(), before);
    assert_eq!(read(&d, 100 * 512, 4096), pattern(6, 4096));
    d.write(100, &pattern(7, 4096)).expect("write after");
    let s2 = d.snapshot().expect("snapshot 2");
    let chain = store.chain(d.layer()).expect("chain");
    assert_eq!(chain[0], d.layer());
    // Backends with layer chains list the whole lineage; thin volumes stand alone.
    if chain.len() > 1 {
        assert_eq!(&chain[1..], &[s2, s1, base], "top, s2, s1, base");
    }
    let old = store.clone_disk(s1).expect("clone s1");
    assert_eq!(read(&old, 100 * 512, 4096), pattern(6, 4096));
    for x in [d, old] {
        let l = x.layer();
        drop(x);
        store.release(l).expect("release");
    }
    for l in [s2, s1, base] {
        store.release(l).expect("release snap");
    }
}

/// Write-zeroes and discard read back as zeroes, shadowing data below.
pub fn zeroes_and_discard<S: BlockStore>(store: &S) {
    let base = store.create_base(DISK, None).expect("base");
    let d = store.clone_disk(base).expect("clone");
    d.write(0, &pattern(8, 256 * 1024)).expect("write");
    let s = d.snapshot().expect("snap");
    d.write_zeroes(3, 200).expect("write zeroes");
    let mut expect = pattern(8, 256 * 1024);
    expect[3 * 512..203 * 512].fill(0);
    assert_eq!(read(&d, 0, expect.len()), expect);
    d.discard(256, 128).expect("discard");
    expect[256 * 512..384 * 512].fill(0);
    assert_eq!(read(&d, 0, expect.len()), expect);
    let other = store.clone_disk(s).expect("clone snap");
    assert_eq!(read(&other, 0, 256 * 1024), pattern(8, 256 * 1024));
    for x in [d, other] {
        let l = x.layer();
        drop(x);
        store.release(l).expect("release");
    }
    store.release(s).expect("release s");
    store.release(base).expect("release base");
}

/// Releasing every hold collects every layer.
pub fn release_collects<S: BlockStore>(store: &S) {
    let before = store.usage().expect("usage").layers;
    let base = store.create_base(DISK, None).expect("base");
    let d = store.clone_disk(base).expect("clone");
    d.write(0, &[1; 4096]).expect("write");
    let s = d.snapshot().expect("snap");
    store.release(base).expect("release base");
    store.release(s).expect("release snap");
    // The disk is alive (and, in a layered backend, keeps its chain alive).
    assert!(store.usage().expect("usage").layers > before);
    assert_eq!(read(&d, 0, 4096), vec![1; 4096]);
    let l = d.layer();
    drop(d);
    store.release(l).expect("release disk");
    assert_eq!(store.usage().expect("usage").layers, before);
    assert!(store.release(l).is_err(), "double release fails");
}

/// Flatten gives an equivalent layer over the base; clones of it read the same.
pub fn flatten_keeps_contents<S: BlockStore>(store: &S) {
    let base = store.create_base(DISK, None).expect("base");
    let d = store.clone_disk(base).expect("clone");
    let mut snaps = Vec::new();
    for i in 0..5u8 {
        d.write(u64::from(i) * 16, &pattern(i + 10, 8192)).expect("write");
        snaps.push(d.snapshot().expect("snap"));
    }
    let top = *snaps.last().expect("snaps");
    let before = {
        let c = store.clone_disk(top).expect("clone top");
        let v = read(&c, 0, 64 * 1024);
        let l = c.layer();
        drop(c);
        store.release(l).expect("release");
        v
    };
    let flat = store.flatten(top).expect("flatten");
    assert!(store.chain(flat).expect("chain").len() <= 2);
    let c = store.clone_disk(flat).expect("clone flat");
    assert_eq!(read(&c, 0, 64 * 1024), before);
    assert_eq!(read(&d, 0, 64 * 1024), before, "the disk above still reads the same");
    for x in [c, d] {
        let l = x.layer();
        drop(x);
        store.release(l).expect("release");
    }
    // `flat` took over `top`'s hold.
    store.release(flat).expect("release flat");
    for s in &snaps[..snaps.len() - 1] {
        store.release(*s).expect("release snap");
    }
    store.release(base).expect("release base");
}
