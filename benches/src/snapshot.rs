//! `grove-bench snapshot|restore|fork`.
//!
//! Two parts, kept apart:
//!
//! 1. **Storage level** (this file's first half, no VMM, host memory only), run by
//!    `grove-bench snapshot [--json] [--runs N] [--sizes 256,1024,4096]
//!    [--touch-mib T] [--dir PATH] [--no-fsync]`:
//!    - layer write time: a full layer of guest memory of each size with T MiB
//!      touched (non-zero; the rest zero, i.e. holes), and diff layers of 16 pages,
//!      4 MiB and T MiB dirty;
//!    - restore to first touch of the working set (the T MiB): `mmap` mode
//!      (restore call, then touching one byte per working-set page) and `uffd`
//!      mode without prefetch, with the recorded working set prefetched before
//!      start, and prefetched in the background.
//!
//!    `grove-bench restore --storage-only` runs only the restore part.
//! 2. **VMM level** ([`run_restore`] and [`run_fork`] without `--storage-only`):
//!    restore to the guest's next `T`, fork into N children. They need the VMM
//!    integration (control socket, `grove-vmm restore`) and are left to it.
//!
//! Layer files go to `--dir` (default: the temp dir) and are removed afterwards.
//! The page cache is warm (files just written): cold-cache restores would need
//! dropping the host's caches, which this bench does not do.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use grove_storage::memory::{
    restore_mmap, write_diff, write_full, Chain, LayerInfo, MmapOptions, Prefetch, RegionMemory,
    RestoredRegion, UffdMemory, UffdOptions, WorkingSet, WriteOptions,
};
use serde::Serialize;

use crate::stats::{flag, wants_json, Summary};

const PAGE: usize = 4096;

// ───────────────────────── storage level ─────────────────────────

#[derive(Serialize)]
struct Conditions {
    runs: usize,
    sizes_mib: Vec<u64>,
    touch_mib: u64,
    fsync: bool,
    dir: String,
    filesystem: String,
    kernel: String,
    cpu: String,
    host_cpus: usize,
    page_cache: &'static str,
}

#[derive(Serialize)]
struct Row {
    what: String,
    mem_mib: u64,
    pages: u64,
    summary: Summary,
}

struct Opts {
    runs: usize,
    sizes: Vec<u64>,
    touch_mib: u64,
    dir: PathBuf,
    fsync: bool,
    json: bool,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let sizes = match flag::<String>(args, "--sizes")? {
        Some(s) => s
            .split(',')
            .map(|v| v.trim().parse::<u64>().map_err(|_| format!("--sizes: bad size '{v}'")))
            .collect::<Result<Vec<_>, _>>()?,
        None => vec![256, 1024, 4096],
    };
    let touch_mib = flag(args, "--touch-mib")?.unwrap_or(64u64);
    if sizes.iter().any(|&s| s < touch_mib || s == 0) {
        return Err("every --sizes entry must be at least --touch-mib".into());
    }
    Ok(Opts {
        runs: flag(args, "--runs")?.unwrap_or(5usize).max(1),
        sizes,
        touch_mib,
        dir: flag::<String>(args, "--dir")?.map_or_else(std::env::temp_dir, PathBuf::from),
        fsync: !args.iter().any(|a| a == "--no-fsync"),
        json: wants_json(args),
    })
}

fn first_line(path: &str, key: &str) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .map(|l| l.split_once(':').map_or(l, |(_, v)| v).trim().to_string())
        })
        .unwrap_or_default()
}

fn filesystem_of(dir: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && dir.starts_with(f[1])).then(|| (f[1].len(), f[2].to_string()))
        })
        .max()
        .map_or_else(|| "unknown".into(), |(_, t)| t)
}

fn conditions(o: &Opts) -> Conditions {
    Conditions {
        runs: o.runs,
        sizes_mib: o.sizes.clone(),
        touch_mib: o.touch_mib,
        fsync: o.fsync,
        dir: o.dir.display().to_string(),
        filesystem: filesystem_of(&o.dir),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .into(),
        cpu: first_line("/proc/cpuinfo", "model name"),
        host_cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        page_cache: "warm (layers just written)",
    }
}

/// Host memory standing in for guest memory: two regions split at 3 GiB like the
/// VMM's when larger than 3 GiB. Untouched pages stay the shared zero page.
struct Mem {
    regions: Vec<(u64, Anon)>,
}

/// Private anonymous memory, page aligned, lazily allocated (like the VMM's RAM).
struct Anon {
    ptr: *mut u8,
    len: usize,
}

impl Anon {
    fn new(len: usize) -> Result<Self, String> {
        // SAFETY: a fresh mapping at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap {len} bytes: {}", std::io::Error::last_os_error()));
        }
        Ok(Self { ptr: p.cast(), len })
    }

    fn len(&self) -> usize {
        self.len
    }
}

impl std::ops::Deref for Anon {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for Anon {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this object owns; no slice outlives it.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl Mem {
    fn new(mib: u64) -> Result<Self, String> {
        let bytes = usize::try_from(mib << 20).map_err(|_| "size too large")?;
        let low = bytes.min(3 << 30);
        let mut regions = vec![(0u64, Anon::new(low)?)];
        if bytes > low {
            regions.push((4 << 30, Anon::new(bytes - low)?));
        }
        Ok(Self { regions })
    }

    fn page_mut(&mut self, page: usize) -> &mut [u8] {
        let mut p = page;
        for (_, m) in &mut self.regions {
            let n = m.len() / PAGE;
            if p < n {
                return &mut m[p * PAGE..(p + 1) * PAGE];
            }
            p -= n;
        }
        unreachable!("page in range")
    }

    /// Writes `count` pages spread evenly over the first `span` pages, stamped
    /// with `gen`; returns the per-region dirty bitmaps.
    fn dirty(&mut self, count: usize, span: usize, gen: u64) -> Vec<Vec<u64>> {
        let mut maps: Vec<Vec<u64>> =
            self.regions.iter().map(|(_, m)| vec![0u64; (m.len() / PAGE).div_ceil(64)]).collect();
        let step = (span / count.max(1)).max(1);
        for i in 0..count.min(span) {
            let page = i * step;
            let b = self.page_mut(page);
            b[..8].copy_from_slice(&gen.to_le_bytes());
            b[8..16].copy_from_slice(&(page as u64).to_le_bytes());
            b[4000] = 1;
            let (mut r, mut p) = (0, page);
            while p >= self.regions[r].1.len() / PAGE {
                p -= self.regions[r].1.len() / PAGE;
                r += 1;
            }
            maps[r][p / 64] |= 1 << (p % 64);
        }
        maps
    }

    fn regions<'a>(&'a self, maps: Option<&'a [Vec<u64>]>) -> Vec<RegionMemory<'a>> {
        self.regions
            .iter()
            .enumerate()
            .map(|(i, (gpa, m))| RegionMemory {
                gpa: *gpa,
                mem: m,
                dirty: maps.map(|ms| ms[i].as_slice()),
            })
            .collect()
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn touch(regions: &[RestoredRegion], pages: usize) -> u64 {
    let mut sum = 0u64;
    let mut left = pages;
    for r in regions {
        let n = (r.len / PAGE).min(left);
        for p in 0..n {
            // SAFETY: the page is inside a restored region that the caller keeps
            // mapped for the duration of this call.
            sum += u64::from(unsafe { r.as_ptr().add(p * PAGE + 4000).read_volatile() });
        }
        left -= n;
    }
    sum
}

/// Resident and anonymous (private copies, not page cache) KiB of the mappings
/// inside `regions`, from /proc/self/smaps: the anonymous part is what a restored
/// guest costs beyond the page cache it shares with its siblings.
fn resident_kib(regions: &[RestoredRegion]) -> (u64, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let (mut rss, mut private, mut inside) = (0u64, 0u64, false);
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let (a, b) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16));
            inside = match (a, b) {
                (Ok(a), Ok(b)) => {
                    regions.iter().any(|r| a >= r.host_addr && b <= r.host_addr + r.len)
                }
                _ => false,
            };
            continue;
        }
        if !inside {
            continue;
        }
        let kb = f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        match first {
            "Rss:" => rss += kb,
            "Anonymous:" => private += kb,
            _ => {}
        }
    }
    (rss, private)
}

/// Removes the bench's files even on error.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn summary(rows: &mut Vec<Row>, what: &str, mib: u64, pages: u64, s: &[f64]) {
    if let Some(summary) = Summary::of("ms", s) {
        rows.push(Row { what: what.into(), mem_mib: mib, pages, summary });
    }
}

fn bench_size(o: &Opts, mib: u64, rows: &mut Vec<Row>, files: &mut Cleanup) -> Result<(), String> {
    let mut mem = Mem::new(mib)?;
    let touched = usize::try_from(o.touch_mib << 20).map_err(|_| "touch")? / PAGE;
    mem.dirty(touched, touched, 1);
    let wo = WriteOptions { fsync: o.fsync, ..WriteOptions::default() };
    let tag = format!("grove-bench-{}-{mib}", std::process::id());
    // Every write goes to a new file name, as snapshots do (replacing an existing
    // file by rename makes ext4 flush the new file's data: auto_da_alloc).
    let mut seq = 0usize;
    let mut fresh = |files: &mut Cleanup, kind: &str| {
        seq += 1;
        let p = o.dir.join(format!("{tag}-{kind}-{seq}.mlayer"));
        files.0.push(p.clone());
        p
    };
    // First full layer of freshly written memory (as after a boot): the untouched
    // pages are not populated yet. Scanning them all faults each in; skipping them
    // by pagemap (`skip_unpopulated`) does not.
    let (mut scan_all, mut skip) = (Vec::new(), Vec::new());
    for _ in 0..o.runs {
        for skip_unpopulated in [false, true] {
            let mut fresh_mem = Mem::new(mib)?;
            fresh_mem.dirty(touched, touched, 1);
            let path = fresh(files, "base");
            let opts = WriteOptions { skip_unpopulated, ..wo.clone() };
            let t = Instant::now();
            write_full(&path, &fresh_mem.regions(None), &opts).map_err(|e| e.to_string())?;
            if skip_unpopulated { &mut skip } else { &mut scan_all }.push(ms(t));
            let _ = std::fs::remove_file(&path);
        }
    }
    let tp = touched as u64;
    summary(rows, "write full layer, fresh memory, scan every page", mib, tp, &scan_all);
    summary(rows, "write full layer, fresh memory, skip unpopulated pages", mib, tp, &skip);
    // Again on memory that was scanned before (every page populated, zero or not):
    // one untimed warm-up write populates it.
    let warm = fresh(files, "base");
    write_full(&warm, &mem.regions(None), &wo).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&warm);
    let mut full = Vec::new();
    let mut base: Option<LayerInfo> = None;
    for _ in 0..o.runs {
        let path = fresh(files, "base");
        let t = Instant::now();
        let info = write_full(&path, &mem.regions(None), &wo).map_err(|e| e.to_string())?;
        full.push(ms(t));
        if let Some(old) = base.replace(info) {
            let _ = std::fs::remove_file(old.path);
        }
    }
    let base = base.ok_or("no runs")?;
    summary(rows, "write full layer, memory scanned before", mib, base.present_pages, &full);

    for (gen, dirty) in [(2u64, 16usize), (3, 1024), (4, touched)] {
        let mut s = Vec::new();
        for _ in 0..o.runs {
            let maps = mem.dirty(dirty, touched, gen);
            let path = fresh(files, "diff");
            let t = Instant::now();
            write_diff(&path, &base, &mem.regions(Some(&maps)), &wo).map_err(|e| e.to_string())?;
            s.push(ms(t));
            let _ = std::fs::remove_file(&path);
        }
        summary(rows, "write diff layer", mib, dirty as u64, &s);
    }
    // Restore chains: base + a diff of 16 pages, and base + a diff of 1024 pages
    // spread over the working set (1024 separate runs to map).
    let mut chains = Vec::new();
    for (gen, dirty) in [(9u64, 16usize), (10, 1024)] {
        let maps = mem.dirty(dirty, touched, gen);
        let path = fresh(files, "diff");
        write_diff(&path, &base, &mem.regions(Some(&maps)), &wo).map_err(|e| e.to_string())?;
        chains.push((dirty, path));
    }
    drop(mem);
    for (dirty, diff_path) in chains {
        let paths = [base.path.clone(), diff_path.clone()];
        let ws_path = WorkingSet::default_path(&diff_path);
        files.0.push(ws_path.clone());
        bench_restore(o, mib, rows, &paths, &ws_path, dirty, touched)?;
    }
    Ok(())
}

fn bench_restore(
    o: &Opts,
    mib: u64,
    rows: &mut Vec<Row>,
    paths: &[PathBuf],
    ws_path: &Path,
    diff_pages: usize,
    touched: usize,
) -> Result<(), String> {
    let sfx = format!("[base + {diff_pages}-page diff]");
    let (mut open, mut call, mut first) = (Vec::new(), Vec::new(), Vec::new());
    let (mut rss, mut private) = (Vec::new(), Vec::new());
    let mut mappings = 0;
    for _ in 0..o.runs {
        let t0 = Instant::now();
        let chain = Chain::open(paths).map_err(|e| e.to_string())?;
        open.push(ms(t0));
        let t = Instant::now();
        let m = restore_mmap(&chain, &MmapOptions::default()).map_err(|e| e.to_string())?;
        call.push(ms(t));
        touch(m.regions(), touched);
        first.push(ms(t0));
        mappings = m.plan().mappings;
        let (r, p) = resident_kib(m.regions());
        rss.push(r as f64);
        private.push(p as f64);
    }
    let wp = touched as u64;
    summary(rows, &format!("open chain {sfx}"), mib, 0, &open);
    summary(rows, &format!("mmap restore call ({mappings} VMAs) {sfx}"), mib, 0, &call);
    summary(rows, &format!("mmap open+restore+touch working set {sfx}"), mib, wp, &first);
    let mut kib = |what: &str, v: &[f64]| {
        if let Some(summary) = Summary::of("KiB", v) {
            rows.push(Row { what: format!("{what} {sfx}"), mem_mib: mib, pages: wp, summary });
        }
    };
    kib("mmap restore after reading the working set: resident", &rss);
    kib("mmap restore after reading the working set: anonymous (not page cache)", &private);

    let modes: [(&str, u8); 3] = [
        ("uffd open+restore+touch working set (no prefetch)", 0),
        ("uffd open+restore+touch working set (prefetch before start)", 1),
        ("uffd open+restore+touch working set (background prefetch)", 2),
    ];
    let mut uffd_anon = Vec::new();
    for (what, mode) in modes {
        let what = format!("{what} {sfx}");
        let (mut start, mut total) = (Vec::new(), Vec::new());
        for _ in 0..o.runs {
            // Timed from opening the chain: loading the working set is part of it.
            let t = Instant::now();
            let chain = Arc::new(Chain::open(paths).map_err(|e| e.to_string())?);
            let prefetch = match mode {
                0 => Prefetch::None,
                1 => Prefetch::BeforeStart(WorkingSet::load(ws_path).map_err(|e| e.to_string())?),
                _ => Prefetch::Background(WorkingSet::load(ws_path).map_err(|e| e.to_string())?),
            };
            let u = UffdMemory::start(chain, &UffdOptions { prefetch, ..UffdOptions::default() })
                .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
            start.push(ms(t));
            touch(u.regions(), touched);
            total.push(ms(t));
            if mode == 0 {
                u.save_working_set(ws_path).map_err(|e| e.to_string())?;
                uffd_anon.push(resident_kib(u.regions()).1 as f64);
            }
            if let Some(f) = u.failure() {
                return Err(format!("page server failed: {f}"));
            }
        }
        summary(rows, &format!("{what}: open+start"), mib, wp, &start);
        summary(rows, &what, mib, wp, &total);
    }
    if let Some(summary) = Summary::of("KiB", &uffd_anon) {
        let what = format!("uffd restore after reading the working set: anonymous {sfx}");
        rows.push(Row { what, mem_mib: mib, pages: wp, summary });
    }
    Ok(())
}

/// `grove-bench snapshot`: storage-level layer writes and restores.
pub fn run_snapshot(args: &[String]) -> Result<(), String> {
    run_storage(args, true)
}

fn run_storage(args: &[String], print_all: bool) -> Result<(), String> {
    let o = parse(args)?;
    let cond = conditions(&o);
    let mut rows = Vec::new();
    let mut files = Cleanup(Vec::new());
    for &mib in &o.sizes {
        bench_size(&o, mib, &mut rows, &mut files)?;
    }
    if !print_all {
        rows.retain(|r| r.what.contains("restore") || r.what.contains("open"));
    }
    if o.json {
        let doc =
            serde_json::json!({ "bench": "snapshot-storage", "conditions": cond, "results": rows });
        println!("{}", serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?);
    } else {
        println!(
            "storage-level snapshot bench: runs={} touched={} MiB fsync={} dir={} ({}) kernel={} cpu={} x{} page cache {}",
            cond.runs,
            cond.touch_mib,
            cond.fsync,
            cond.dir,
            cond.filesystem,
            cond.kernel,
            cond.cpu,
            cond.host_cpus,
            cond.page_cache
        );
        for r in &rows {
            println!("{:>5} MiB  {:<88} pages={:<6} {}", r.mem_mib, r.what, r.pages, r.summary);
        }
    }
    Ok(())
}

// ───────────────────────── VMM level ─────────────────────────

/// `grove-bench restore`: restore to the guest's next `T` in both memory modes.
/// `--storage-only` runs the storage-level restore measurements instead.
pub fn run_restore(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "--storage-only") {
        return run_storage(args, false);
    }
    Err("restore to running needs the VMM integration (grove-vmm restore); \
         use --storage-only for the storage-level restore figures"
        .into())
}

/// `grove-bench fork`: fork a running guest into N children.
pub fn run_fork(_args: &[String]) -> Result<(), String> {
    Err("fork needs the VMM integration (control socket fork command, grove-vmm restore)".into())
}
