//! Memory layers end to end with plain host memory (no KVM): write full and diff
//! layers, open chains, restore in `mmap` and `uffd` modes, compare bytes.

// An integration-test crate: every item in it is test-only.
#![allow(clippy::tests_outside_test_module)]

#[path = "../../testsupport/skip.rs"]
mod skip;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use grove_storage::memory::*;
use proptest::prelude::*;

const PS: usize = 4096;

/// Guest memory held by the test: two regions split around a gap, like the VMM's.
#[derive(Clone)]
struct Guest {
    regions: Vec<(u64, Vec<u8>)>,
    dirty: Vec<Vec<u64>>,
}

impl Guest {
    fn new(pages: &[usize]) -> Self {
        let mut gpa = 0u64;
        let regions = pages
            .iter()
            .map(|&n| {
                let r = (gpa, vec![0u8; n * PS]);
                gpa += (n * PS) as u64 + (1 << 30);
                r
            })
            .collect();
        let dirty = pages.iter().map(|&n| vec![0u64; n.div_ceil(64)]).collect();
        Self { regions, dirty }
    }

    fn pages(&self) -> usize {
        self.regions.iter().map(|r| r.1.len() / PS).sum()
    }

    fn locate(&self, page: usize) -> (usize, usize) {
        let mut p = page;
        for (i, r) in self.regions.iter().enumerate() {
            let n = r.1.len() / PS;
            if p < n {
                return (i, p);
            }
            p -= n;
        }
        panic!("page {page} out of range");
    }

    /// Fills memory page `page` with `v` (a zero `v` makes it a zero page) and marks it dirty.
    fn write(&mut self, page: usize, v: u8) {
        let (r, p) = self.locate(page);
        let bytes = &mut self.regions[r].1[p * PS..(p + 1) * PS];
        bytes.fill(v);
        if v != 0 {
            bytes[..8].copy_from_slice(&(page as u64).to_le_bytes());
        }
        self.dirty[r][p / 64] |= 1 << (p % 64);
    }

    fn full(&mut self, path: &Path) -> LayerInfo {
        let regions: Vec<RegionMemory<'_>> =
            self.regions.iter().map(|(g, m)| RegionMemory::from_slice(*g, m, None)).collect();
        let info = write_full(path, &regions, &WriteOptions { fsync: false, ..Default::default() })
            .unwrap();
        self.clear_dirty();
        info
    }

    fn diff(&mut self, path: &Path, parent: &LayerInfo) -> LayerInfo {
        let regions: Vec<RegionMemory<'_>> = self
            .regions
            .iter()
            .zip(&self.dirty)
            .map(|((g, m), d)| RegionMemory::from_slice(*g, m, Some(d)))
            .collect();
        let info = write_diff(
            path,
            parent,
            &regions,
            &WriteOptions { fsync: false, ..Default::default() },
        )
        .unwrap();
        self.clear_dirty();
        info
    }

    fn clear_dirty(&mut self) {
        for d in &mut self.dirty {
            d.fill(0);
        }
    }

    /// Checks restored regions against this memory, byte for byte.
    fn assert_same(&self, restored: &[RestoredRegion]) {
        assert_eq!(restored.len(), self.regions.len());
        for (r, (gpa, mem)) in restored.iter().zip(&self.regions) {
            assert_eq!(r.gpa, *gpa);
            assert_eq!(r.len, mem.len());
            // SAFETY: the restored region is mapped, readable and `len` bytes long while
            // its owner (held by the caller) lives; nobody writes it during the check.
            let got = unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len) };
            for p in 0..mem.len() / PS {
                assert!(
                    got[p * PS..(p + 1) * PS] == mem[p * PS..(p + 1) * PS],
                    "region {gpa:#x} page {p} differs"
                );
            }
        }
    }
}

fn uffd_available() -> bool {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&[1]);
    let l = g.full(&dir.path().join("probe.mlayer"));
    let chain = Arc::new(Chain::open(&[&l.path]).unwrap());
    match UffdMemory::start(chain, &UffdOptions::default()) {
        Ok(_) => true,
        // Only a missing permission or kernel feature skips; anything else is a bug.
        Err(PageServerError::Uffd { op: "create", source: e })
            if matches!(
                e.raw_os_error(),
                Some(libc::EPERM | libc::EACCES | libc::ENOSYS | libc::ENOENT)
            ) =>
        {
            skip::missing("uffd", &format!("userfaultfd unavailable: {e:?}"));
            false
        }
        Err(e) => panic!("uffd restore failed: {e} ({:?})", std::error::Error::source(&e)),
    }
}

/// A guest with recognisable content and some zero pages, plus a full layer and
/// `diffs` diff layers, each dirtying a different pseudo-random set of pages.
fn build_chain(dir: &Path, diffs: usize) -> (Guest, Vec<PathBuf>) {
    let mut g = Guest::new(&[96, 40]);
    let n = g.pages();
    for p in 0..n {
        if p % 5 != 0 {
            g.write(p, (p % 251) as u8 + 1);
        }
    }
    let mut paths = vec![dir.join("0000.mlayer")];
    let mut info = g.full(&paths[0]);
    let mut x = 12345u64;
    for d in 1..=diffs {
        for _ in 0..(d * 7 % 23 + 1) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let p = usize::try_from(x >> 33).unwrap() % n;
            // Every fourth write zeroes a page: a dirty zero page must override.
            let v = if x.is_multiple_of(4) { 0 } else { (d % 250) as u8 + 1 };
            g.write(p, v);
        }
        let path = dir.join(format!("{d:04}.mlayer"));
        info = g.diff(&path, &info);
        paths.push(path);
    }
    (g, paths)
}

#[test]
fn full_then_diff_restores_in_both_modes() {
    let dir = tempfile::tempdir().unwrap();
    let (g, paths) = build_chain(dir.path(), 2);
    let chain = Chain::open(&paths).unwrap();
    assert_eq!(chain.layers().len(), 3);
    // Zero pages are holes in a full layer: never listed, never written.
    let base = &chain.layers()[0];
    assert_eq!(base.header().kind, LayerKind::Full);
    assert!(base.header().present_pages < g.pages() as u64);
    assert!(!base.contains(0));

    let m = restore_mmap(&chain, &MmapOptions::default()).unwrap();
    g.assert_same(m.regions());
    assert!(m.plan().mapped_segments > 0);
    assert_eq!(m.plan().copied_pages, 0);
    drop(m);

    if uffd_available() {
        let u = UffdMemory::start(Arc::new(chain), &UffdOptions::default()).unwrap();
        g.assert_same(u.regions());
        let s = u.stats();
        assert!(s.faults > 0 && s.pages_copied > 0 && s.pages_zeroed > 0, "{s:?}");
        assert!(u.failure().is_none());
    }
}

/// `UffdOptions::thread_start` runs on the page-server thread before it serves a page
/// (grove-vmm installs its seccomp filter there).
#[test]
fn thread_start_runs_on_the_page_server_thread_first() {
    static SEEN: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    fn record() {
        let name = std::thread::current().name().map(String::from);
        *SEEN.lock().unwrap() = name;
    }
    let dir = tempfile::tempdir().unwrap();
    let (g, paths) = build_chain(dir.path(), 1);
    if !uffd_available() {
        return;
    }
    let chain = Arc::new(Chain::open(&paths).unwrap());
    let opts = UffdOptions { thread_start: Some(record), ..UffdOptions::default() };
    let u = UffdMemory::start(chain, &opts).unwrap();
    g.assert_same(u.regions());
    assert_eq!(SEEN.lock().unwrap().as_deref(), Some("grove-pagesrv"));
}

#[test]
fn chain_of_depth_twelve_restores_merges_and_opens_by_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (g, paths) = build_chain(dir.path(), 12);
    let chain = Chain::open(&paths).unwrap();
    assert_eq!(chain.layers().len(), 13);
    assert_eq!(chain.head().id, Layer::open(paths.last().unwrap()).unwrap().header().id);

    let m = restore_mmap(&chain, &MmapOptions::default()).unwrap();
    g.assert_same(m.regions());
    drop(m);

    // Same chain found from the directory, whatever the file names' order.
    let d2 = tempfile::tempdir().unwrap();
    for (i, p) in paths.iter().enumerate() {
        std::fs::copy(p, d2.path().join(format!("{:02}.mlayer", (i * 7) % 13))).unwrap();
    }
    let by_dir = Chain::open_dir(d2.path()).unwrap();
    assert_eq!(by_dir.head().id, chain.head().id);
    g.assert_same(restore_mmap(&by_dir, &MmapOptions::default()).unwrap().regions());

    // Flatten into one full layer; merge the top 7 layers into one diff.
    let nosync = WriteOptions { fsync: false, ..WriteOptions::default() };
    let flat = chain.flatten(dir.path().join("flat.mlayer"), &nosync).unwrap();
    sync_layer(&flat.path).unwrap();
    assert_eq!(flat.kind, LayerKind::Full);
    let fc = Chain::open(&[&flat.path]).unwrap();
    g.assert_same(restore_mmap(&fc, &MmapOptions::default()).unwrap().regions());

    let top = chain.merge(6, dir.path().join("top.mlayer"), &WriteOptions::default()).unwrap();
    let mut short: Vec<PathBuf> = paths[..6].to_vec();
    short.push(top.path.clone());
    let sc = Chain::open(&short).unwrap();
    g.assert_same(restore_mmap(&sc, &MmapOptions::default()).unwrap().regions());

    if uffd_available() {
        let u = UffdMemory::start(Arc::new(chain), &UffdOptions::default()).unwrap();
        g.assert_same(u.regions());
    }
}

#[test]
fn mapping_budget_falls_back_to_copies() {
    let dir = tempfile::tempdir().unwrap();
    let (g, paths) = build_chain(dir.path(), 10);
    let chain = Chain::open(&paths).unwrap();
    let full = plan_mmap(&chain, &MmapOptions::default());
    assert_eq!(full.copied_pages, 0);
    let opts = MmapOptions { max_mappings: 8 };
    let plan = plan_mmap(&chain, &opts);
    assert!(plan.mappings <= 8, "{plan:?}");
    assert!(plan.copied_pages > 0);
    let m = restore_mmap(&chain, &opts).unwrap();
    g.assert_same(m.regions());
}

fn read_mem(r: &RestoredRegion, off: usize) -> u8 {
    // SAFETY: `off` is inside the mapped region, which outlives this call.
    unsafe { r.as_ptr().add(off).read_volatile() }
}

#[test]
fn private_restores_do_not_see_each_others_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (g, paths) = build_chain(dir.path(), 3);
    let chain = Chain::open(&paths).unwrap();
    let a = restore_mmap(&chain, &MmapOptions::default()).unwrap();
    let b = restore_mmap(&chain, &MmapOptions::default()).unwrap();
    let (ra, rb) = (a.regions()[0], b.regions()[0]);
    let before = read_mem(&rb, 3 * PS + 100);
    assert_ne!(before, 0xAB);
    // SAFETY: inside the region; no other reference to this byte is live.
    unsafe { ra.as_ptr().add(3 * PS + 100).write_volatile(0xAB) };
    assert_eq!(read_mem(&ra, 3 * PS + 100), 0xAB);
    assert_eq!(read_mem(&rb, 3 * PS + 100), before);
    // The files are unchanged: a fresh open and a third restore see the old bytes.
    let again = Chain::open(&paths).unwrap();
    let mut page = vec![0u8; PS];
    again.read_pages(3, &mut page).unwrap();
    assert_eq!(page[100], before);
    let c = restore_mmap(&again, &MmapOptions::default()).unwrap();
    assert_eq!(read_mem(&c.regions()[0], 3 * PS + 100), before);
    // b still matches the snapshot everywhere.
    g.assert_same(b.regions());
}

fn write_layer_for_errors(dir: &Path) -> (Guest, LayerInfo, LayerInfo) {
    let mut g = Guest::new(&[16]);
    for p in 0..16 {
        g.write(p, p as u8 + 1);
    }
    let base = g.full(&dir.join("0000.mlayer"));
    g.write(3, 99);
    let d = g.diff(&dir.join("0001.mlayer"), &base);
    (g, base, d)
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn corrupted_truncated_and_mismatched_files_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (_g, base, d) = write_layer_for_errors(dir.path());
    let copy = |name: &str| {
        let p = dir.path().join(name);
        std::fs::copy(&d.path, &p).unwrap();
        p
    };
    let p = copy("magic");
    patch(&p, 0, b"NOTGROVE");
    assert!(matches!(Layer::open(&p), Err(LayerError::BadMagic)));

    let p = copy("version");
    patch(&p, 8, &2u32.to_le_bytes());
    assert!(matches!(Layer::open(&p), Err(LayerError::UnsupportedVersion(2))));

    let p = copy("hcrc");
    patch(&p, 64, &[0xff]);
    let e = Layer::open(&p).unwrap_err();
    assert!(matches!(e, LayerError::HeaderChecksum { .. }), "{e}");
    assert!(e.to_string().contains("header checksum"));

    let p = copy("icrc");
    patch(&p, 4096 + 8, &[0xff]);
    assert!(matches!(Layer::open(&p), Err(LayerError::IndexChecksum { .. })));

    for cut in [0u64, 10, 4095, 4100, 8191, 4096 * 3] {
        let p = copy(&format!("cut{cut}"));
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(cut).unwrap();
        let e = Layer::open(&p).unwrap_err();
        assert!(matches!(e, LayerError::Truncated { .. }), "cut at {cut}: {e}");
    }
    let p = copy("long");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len + 1).unwrap();
    assert!(matches!(Layer::open(&p), Err(LayerError::TrailingData { .. })));

    // Chains: wrong order, missing parent, diff as base, foreign layers.
    assert!(matches!(Chain::open(&[&d.path, &base.path]), Err(LayerError::BadChain(_))));
    assert!(matches!(Chain::open(&[&d.path]), Err(LayerError::BadChain(_))));
    let other = tempfile::tempdir().unwrap();
    let (_g2, base2, _d2) = write_layer_for_errors(other.path());
    let e = Chain::open(&[&base2.path, &d.path]).unwrap_err();
    assert!(matches!(e, LayerError::ParentMismatch { index: 1, .. }), "{e}");
    assert!(matches!(Chain::open::<&Path>(&[]), Err(LayerError::BadChain(_))));

    // Layout mismatch: a diff claiming the parent but over other regions.
    let mut g3 = Guest::new(&[8]);
    g3.write(1, 1);
    let regions: Vec<RegionMemory<'_>> = g3
        .regions
        .iter()
        .zip(&g3.dirty)
        .map(|((gpa, m), dm)| RegionMemory::from_slice(*gpa, m, Some(dm)))
        .collect();
    let mut fake_parent = base.clone();
    fake_parent.layout = MemoryLayout::new(4096, vec![Region { gpa: 0, len: 8 * 4096 }]).unwrap();
    let odd =
        write_diff(dir.path().join("odd.mlayer"), &fake_parent, &regions, &WriteOptions::default())
            .unwrap();
    assert!(matches!(
        Chain::open(&[&base.path, &odd.path]),
        Err(LayerError::LayoutMismatch { index: 1 })
    ));
    // The writer itself refuses regions that differ from the parent's.
    assert!(matches!(
        write_diff(dir.path().join("x.mlayer"), &base, &regions, &WriteOptions::default()),
        Err(LayerError::Input(_))
    ));

    // Page size: a layer written with 8 KiB pages opens, but cannot be restored here
    // and cannot join a 4 KiB chain.
    let mut g4 = Guest::new(&[16]);
    g4.write(2, 5);
    let regions: Vec<RegionMemory<'_>> =
        g4.regions.iter().map(|(gpa, m)| RegionMemory::from_slice(*gpa, m, None)).collect();
    let big = write_full(
        dir.path().join("big.mlayer"),
        &regions,
        &WriteOptions { page_size: Some(8192), ..Default::default() },
    )
    .unwrap();
    let bc = Chain::open(&[&big.path]).unwrap();
    let e = restore_mmap(&bc, &MmapOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            RestoreError::Layer(LayerError::PageSizeMismatch { layer: 8192, expected: 4096 })
        ),
        "{e}"
    );
    assert!(matches!(
        Layer::open_with_page_size(&big.path, 4096),
        Err(LayerError::PageSizeMismatch { .. })
    ));

    // A diff layer without bitmaps, or with a short one, is refused.
    let regions: Vec<RegionMemory<'_>> =
        g4.regions.iter().map(|(gpa, m)| RegionMemory::from_slice(*gpa, m, None)).collect();
    assert!(matches!(
        write_diff(dir.path().join("y.mlayer"), &base, &regions, &WriteOptions::default()),
        Err(LayerError::Input(_))
    ));
    // No temporary files are left behind by failed writes.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Copies `len` bytes from `addr` into a pipe: a kernel-mode access to the memory,
/// like KVM's. Returns the errno on failure.
fn kernel_read(addr: usize, len: usize) -> Result<usize, i32> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a live array of two ints for pipe2 to fill.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0);
    // SAFETY: both descriptors are fresh and owned here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: write(2) only reads `len` bytes at `addr`; a bad address gives EFAULT.
    let n = unsafe { libc::write(wr.as_raw_fd(), addr as *const libc::c_void, len) };
    drop(rd);
    if n < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(usize::try_from(n).unwrap())
    }
}

/// Runs `f` on a thread and waits at most 20 s for it: a hang fails the test.
fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20)).expect("access hung instead of failing")
}

#[test]
fn page_server_read_error_fails_the_access_instead_of_hanging() {
    if !uffd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_g, base, d) = write_layer_for_errors(dir.path());
    let chain = Arc::new(Chain::open(&[&base.path, &d.path]).unwrap());
    let u = UffdMemory::start(chain, &UffdOptions::default()).unwrap();
    let r = u.regions()[0];
    // A page owned by the base works.
    assert_eq!(bounded(move || kernel_read(r.host_addr, PS)), Ok(PS));
    // The diff layer's data vanishes under the open chain (truncated file).
    std::fs::OpenOptions::new().write(true).open(&d.path).unwrap().set_len(4096).unwrap();
    let addr = r.host_addr + 3 * PS; // page 3 is owned by the diff
    assert_eq!(bounded(move || kernel_read(addr, PS)), Err(libc::EFAULT));
    let f = u.failure().expect("failure recorded");
    assert!(matches!(*f, PageServerError::Layer(LayerError::Io { .. })), "{f}");
    // The failure eventfd is readable.
    let mut pfd = libc::pollfd { fd: u.failure_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one live pollfd.
    assert_eq!(unsafe { libc::poll(&raw mut pfd, 1, 1000) }, 1);
    // Every other page fails too (no silent zeros), also pages never touched.
    let addr = r.host_addr + 9 * PS;
    assert_eq!(bounded(move || kernel_read(addr, PS)), Err(libc::EFAULT));
}

#[test]
fn stopped_page_server_fails_waiting_and_later_accesses() {
    if !uffd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_g, base, d) = write_layer_for_errors(dir.path());
    let chain = Arc::new(Chain::open(&[&base.path, &d.path]).unwrap());
    let mut u = UffdMemory::start(chain.clone(), &UffdOptions::default()).unwrap();
    u.stop_server();
    let r = u.regions()[0];
    assert_eq!(bounded(move || kernel_read(r.host_addr + 5 * PS, 64)), Err(libc::EFAULT));
    assert!(matches!(u.failure().as_deref(), Some(PageServerError::Stopped)));

    // Injected failure while a thread may be waiting on a fault.
    let u = UffdMemory::start(chain, &UffdOptions::default()).unwrap();
    u.inject_failure();
    let r = u.regions()[0];
    assert_eq!(bounded(move || kernel_read(r.host_addr, PS)), Err(libc::EFAULT));
}

#[test]
fn working_set_is_recorded_and_prefetched() {
    if !uffd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (g, paths) = build_chain(dir.path(), 4);
    let chain = Arc::new(Chain::open(&paths).unwrap());
    let touch = [70usize, 3, 4, 100, 131, 20];
    let opts = UffdOptions { cluster_pages: 1, ..Default::default() };
    let u = UffdMemory::start(chain.clone(), &opts).unwrap();
    for &p in &touch {
        let (ri, off) = g.locate(p);
        let _ = read_mem(&u.regions()[ri], off * PS);
    }
    let ws = u.working_set();
    assert_eq!(ws.pages, touch.iter().map(|&p| p as u64).collect::<Vec<_>>());
    let ws_path = WorkingSet::default_path(paths.last().unwrap());
    u.save_working_set(&ws_path).unwrap();
    drop(u);

    let ws = WorkingSet::load(&ws_path).unwrap();
    for prefetch in [Prefetch::BeforeStart(ws.clone()), Prefetch::Background(ws.clone())] {
        let before = matches!(prefetch, Prefetch::BeforeStart(_));
        let u = UffdMemory::start(
            chain.clone(),
            &UffdOptions { prefetch, cluster_pages: 1, ..UffdOptions::default() },
        )
        .unwrap();
        if before {
            let s = u.stats();
            assert_eq!(s.pages_prefetched, touch.len() as u64);
            assert_eq!(s.faults, 0);
            for &p in &touch {
                let (ri, off) = g.locate(p);
                let _ = read_mem(&u.regions()[ri], off * PS);
            }
            assert_eq!(u.stats().faults, 0, "prefetched pages must not fault");
        }
        g.assert_same(u.regions());
    }
    // A working set recorded for another snapshot is refused.
    let other = WorkingSet { head: LayerId(42), ..ws };
    let e = UffdMemory::start(
        chain,
        &UffdOptions {
            prefetch: Prefetch::BeforeStart(other),
            cluster_pages: 1,
            ..UffdOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, PageServerError::Layer(LayerError::WorkingSetMismatch { .. })), "{e}");
}

#[test]
fn concurrent_faults_from_many_threads_are_all_served() {
    if !uffd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (g, paths) = build_chain(dir.path(), 3);
    let chain = Arc::new(Chain::open(&paths).unwrap());
    let u = UffdMemory::start(chain, &UffdOptions::default()).unwrap();
    let regions = u.regions().to_vec();
    let sums = bounded(move || {
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let regions = regions.clone();
                std::thread::spawn(move || {
                    let mut s = 0u64;
                    for r in &regions {
                        for p in (0..r.len / PS).rev() {
                            s += u64::from(read_mem(r, p * PS + t * 8 + 1));
                        }
                    }
                    s
                })
            })
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>();
        hs
    });
    assert_eq!(sums.len(), 4);
    g.assert_same(u.regions());
    assert!(u.failure().is_none());
}

thread_local! {
    static UFFD: bool = uffd_available();
}

#[test]
fn zero_pages_are_holes_and_layers_are_sparse() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&[16384]); // 64 MiB
    g.write(100, 1);
    g.write(9000, 2);
    let full = g.full(&dir.path().join("0000.mlayer"));
    assert_eq!(full.present_pages, 2);
    assert_eq!(full.data_bytes, 2 * PS as u64);
    let md = std::fs::metadata(&full.path).unwrap();
    assert!(md.len() >= 64 << 20, "apparent size covers guest memory");
    assert!(md.blocks() * 512 < 1 << 20, "allocated {} bytes", md.blocks() * 512);
    // A dirty page that became zero is listed (it overrides the parent) but not written.
    g.write(100, 0);
    g.write(5, 3);
    let d = g.diff(&dir.path().join("0001.mlayer"), &full);
    assert_eq!(d.present_pages, 2);
    assert_eq!(d.data_bytes, PS as u64);
    let chain = Chain::open(&[&full.path, &d.path]).unwrap();
    assert_eq!(chain.owner_of(100), Some(1));
    assert_eq!(chain.owner_of(9000), Some(0));
    assert_eq!(chain.owner_of(7), None);
    g.assert_same(restore_mmap(&chain, &MmapOptions::default()).unwrap().regions());
}

/// Whether the host page at `addr` is present or swapped, per /proc/self/pagemap.
fn populated(addr: usize) -> bool {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, (addr / PS * 8) as u64).unwrap();
    u64::from_le_bytes(b) >> 62 != 0
}

#[test]
fn full_layers_of_anonymous_memory_skip_unpopulated_pages_without_reading_them() {
    const PAGES: usize = 4096; // 16 MiB
                               // SAFETY: a fresh private anonymous mapping; unmapped at the end of the test.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGES * PS,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // No huge pages: a huge page would populate neighbours of a written page.
    // SAFETY: advice on our own mapping.
    unsafe { libc::madvise(p, PAGES * PS, libc::MADV_NOHUGEPAGE) };
    // SAFETY: the mapping is PAGES * PS bytes, readable and writable, and only this
    // test uses it.
    let mem = unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), PAGES * PS) };
    for page in [1usize, 2, 700, 4095] {
        mem[page * PS + 17] = page as u8 | 1;
    }
    // Written, then discarded: reads as zero again.
    mem[900 * PS] = 9;
    // SAFETY: drops one page of our own private mapping; no reference into it is used
    // across the call except `mem`, whose content there is then zero, as expected.
    let r = unsafe { libc::madvise(p.cast::<u8>().add(900 * PS).cast(), PS, libc::MADV_DONTNEED) };
    assert_eq!(r, 0);
    let dir = tempfile::tempdir().unwrap();
    let regions = [RegionMemory::from_slice(0, mem, None)];
    let skip = WriteOptions { fsync: false, skip_unpopulated: true, ..WriteOptions::default() };
    let a = write_full(dir.path().join("a.mlayer"), &regions, &skip).unwrap();
    assert_eq!(a.present_pages, 4);
    assert!(!populated(p as usize + 3000 * PS), "skipped pages were not read");
    let all = WriteOptions { fsync: false, ..WriteOptions::default() };
    let b = write_full(dir.path().join("b.mlayer"), &regions, &all).unwrap();
    assert_eq!(b.present_pages, 4);
    let (ca, cb) = (Chain::open(&[&a.path]).unwrap(), Chain::open(&[&b.path]).unwrap());
    assert_eq!(ca.segments(), cb.segments());
    let ma = restore_mmap(&ca, &MmapOptions::default()).unwrap();
    let ra = ma.regions()[0];
    // SAFETY: the restored region is mapped and `len` bytes long while `ma` lives.
    let got = unsafe { std::slice::from_raw_parts(ra.as_ptr(), ra.len) };
    assert!(got == &mem[..], "restored memory differs");
    // SAFETY: unmaps the test's own mapping; `mem` and `regions` are not used after.
    unsafe { libc::munmap(p, PAGES * PS) };
}

#[test]
fn a_failed_write_leaves_neither_a_layer_nor_a_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new(&[16]);
    g.write(3, 1);
    // The target is a directory: everything succeeds up to the rename, which fails.
    let target = dir.path().join("0000.mlayer");
    std::fs::create_dir(&target).unwrap();
    let regions: Vec<RegionMemory<'_>> =
        g.regions.iter().map(|(gpa, m)| RegionMemory::from_slice(*gpa, m, None)).collect();
    let e = write_full(&target, &regions, &WriteOptions::default()).unwrap_err();
    assert!(matches!(e, LayerError::Io { op: "rename", .. }), "{e}");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["0000.mlayer".to_string()], "only the directory remains");
    assert!(target.is_dir());
}

#[test]
fn open_dir_refuses_branches_and_strays() {
    let dir = tempfile::tempdir().unwrap();
    let (_g, base, d) = write_layer_for_errors(dir.path());
    assert_eq!(Chain::open_dir(dir.path()).unwrap().head().id, d.id);
    // Two children of one parent: a fork tree, not a chain.
    let mut g2 = Guest::new(&[16]);
    for p in 0..16 {
        g2.write(p, p as u8 + 1);
    }
    g2.clear_dirty();
    g2.write(7, 42);
    g2.diff(&dir.path().join("0002.mlayer"), &base);
    let e = Chain::open_dir(dir.path()).unwrap_err();
    assert!(matches!(e, LayerError::BadChain(_)), "{e}");
    std::fs::remove_file(dir.path().join("0002.mlayer")).unwrap();
    // A second base.
    let mut g3 = Guest::new(&[16]);
    g3.write(1, 1);
    g3.full(&dir.path().join("0003.mlayer"));
    assert!(matches!(Chain::open_dir(dir.path()), Err(LayerError::BadChain(_))));
    // An empty directory.
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(Chain::open_dir(empty.path()), Err(LayerError::BadChain(_))));
}

#[derive(Debug, Clone)]
enum Op {
    Write { page: usize, v: u8 },
    Snapshot,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            8 => (0usize..72, any::<u8>()).prop_map(|(page, v)| Op::Write { page, v }),
            1 => Just(Op::Snapshot),
        ],
        1..120,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random writes with dirty tracking and snapshots; the restored memory always
    /// equals the model (the memory at the last snapshot).
    #[test]
    fn random_writes_and_snapshots_match_the_model(ops in ops()) {
        let dir = tempfile::tempdir().unwrap();
        let mut g = Guest::new(&[40, 32]);
        let mut paths = vec![dir.path().join("0000.mlayer")];
        let mut info = g.full(&paths[0]);
        let mut model = g.clone();
        for op in ops {
            match op {
                Op::Write { page, v } => g.write(page, v),
                Op::Snapshot => {
                    let p = dir.path().join(format!("{:04}.mlayer", paths.len()));
                    info = g.diff(&p, &info);
                    paths.push(p);
                    model = g.clone();
                }
            }
        }
        let chain = Chain::open(&paths).unwrap();
        let m = restore_mmap(&chain, &MmapOptions::default()).unwrap();
        model.assert_same(m.regions());
        let small = restore_mmap(&chain, &MmapOptions { max_mappings: 4 }).unwrap();
        model.assert_same(small.regions());
        if UFFD.with(|u| *u) {
            let u = UffdMemory::start(Arc::new(chain), &UffdOptions::default()).unwrap();
            model.assert_same(u.regions());
        }
    }
}
