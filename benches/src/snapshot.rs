//! `grove-bench snapshot|restore|fork`.
//!
//! Two parts, kept apart:
//!
//! 1. **Storage level** (no VMM, host memory only), run by
//!    `grove-bench snapshot --storage-only [--json] [--runs N] [--sizes 256,1024,4096]
//!    [--touch-mib T] [--dir PATH] [--no-fsync]`:
//!    - layer write time: a full layer of guest memory of each size with T MiB
//!      touched (non-zero; the rest zero, i.e. holes), and diff layers of 16 pages,
//!      4 MiB and T MiB dirty;
//!    - restore to first touch of the working set (the T MiB): `mmap` mode
//!      (restore call, then touching one byte per working-set page) and `uffd`
//!      mode without prefetch, with the recorded working set prefetched before
//!      start, and prefetched in the background.
//!
//!    `grove-bench restore --storage-only` runs only the restore part. Layer files go
//!    to `--dir` (default: the temp dir) and are removed afterwards; the page cache is
//!    warm (files just written).
//! 2. **VMM level** (the default), driving the real `grove-vmm` (see `vmm_driver`) with
//!    the test guest over its control socket:
//!    - `grove-bench snapshot [--json] [--runs N] [--sizes 256,1024,4096] [--touch-mib T]
//!      [--busy-gaps-ms 1,10,100,1000]`: full and diff snapshot times (the reply's
//!      `pause_ms` / `total_ms` and the client's round trip) per memory size (sizes
//!      that MemAvailable cannot hold with 1 GiB to spare are skipped), for an idle
//!      ready-mode guest and a busy-mode guest whose dirty set grows with the gap;
//!    - `grove-bench restore [--json] [--runs N] [--mem-mib M] [--touch-mib T]`: from the
//!      restore call (spawn of `grove-vmm restore`; the `restore` request to a
//!      pre-started `grove-vmm standby`) to the guest's first `T` read from the VMM's
//!      stdout, for mmap, uffd without a working set, uffd with the recorded working set
//!      and standby (mmap), plus the VMM's own `GROVE_VMM_TIMING` marks;
//!    - `grove-bench fork [--json] [--runs N] [--children 1,4,16,64] [--mem-mode mmap|uffd]
//!      [--no-standby] [--stop-children]`: a ready-mode parent forked into N children
//!      (cold restores and pre-started standby VMMs): parent pause, fork call, time until
//!      every child printed `T`, Pss per idle child against the parent's.
//!
//! Every VMM is killed by PID when its guard drops; snapshot directories are removed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use grove_storage::memory::{
    restore_mmap, write_diff, write_full, Chain, LayerInfo, Mapping, MmapOptions, Prefetch,
    RegionMemory, RestoredRegion, UffdMemory, UffdOptions, WorkingSet, WriteOptions,
};
use serde::Serialize;

use crate::stats::{flag, wants_json, Summary};
use crate::vmm_driver as drv;

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

/// Private anonymous memory, page aligned, lazily allocated (like the VMM's RAM): the
/// storage crate's own reservation, seen as bytes.
struct Anon(Mapping);

impl Anon {
    fn new(len: usize) -> Result<Self, String> {
        Mapping::anonymous(len).map(Self).map_err(|e| format!("mmap {len} bytes: {e}"))
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

impl std::ops::Deref for Anon {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the mapping holds `len` readable bytes for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.0.addr() as *const u8, self.0.len()) }
    }
}

impl std::ops::DerefMut for Anon {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { self.0.slice_mut(0, self.0.len()) }
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
            .map(|(i, (gpa, m))| RegionMemory::from_slice(*gpa, m, maps.map(|ms| ms[i].as_slice())))
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

/// `T`s read from a freshly booted guest before it is used.
const BOOT_TS: usize = 20;
/// Children above this count get a single run by default (each run starts that many
/// spinning guests on the host's cores).
const MANY_CHILDREN: usize = 32;

/// One VMM-level series.
#[derive(Serialize)]
struct Step {
    step: String,
    #[serde(flatten)]
    ms: Summary,
}

fn steps_of(samples: &[Vec<(String, f64)>]) -> Vec<Step> {
    let mut acc: Vec<(String, Vec<f64>)> = Vec::new();
    for s in samples {
        for (what, v) in s {
            match acc.iter_mut().find(|(k, _)| k == what) {
                Some((_, vs)) => vs.push(*v),
                None => acc.push((what.clone(), vec![*v])),
            }
        }
    }
    let mut out: Vec<Step> = acc
        .into_iter()
        .filter_map(|(step, v)| Some(Step { step, ms: Summary::of("ms", &v)? }))
        .collect();
    out.sort_by(|a, b| a.ms.median.total_cmp(&b.ms.median));
    out
}

fn ms_of(s: &[f64]) -> Option<Summary> {
    Summary::of("ms", s)
}

fn show(name: &str, s: Option<&Summary>) {
    match s {
        Some(s) => println!("    {name:<44} {s}"),
        None => println!("    {name:<44} (not reported)"),
    }
}

/// Boots the test guest with a control socket and waits for `READY` and some `T`s.
fn boot_guest(
    vmm: &Path,
    guest: &Path,
    cmdline: &str,
    mem_mib: u64,
    sock: PathBuf,
) -> Result<drv::Vmm, String> {
    boot_guest_in(vmm, guest, cmdline, mem_mib, sock, None)
}

fn boot_guest_in(
    vmm: &Path,
    guest: &Path,
    cmdline: &str,
    mem_mib: u64,
    sock: PathBuf,
    jail: Option<&drv::Jail>,
) -> Result<drv::Vmm, String> {
    let mem = mem_mib.to_string();
    let args =
        ["run", "--kernel", drv::s(guest)?, "--cmdline", cmdline, "--mem-mib", &mem, "--api-sock"];
    let mut args = args.to_vec();
    let sock_s = drv::s(&sock)?.to_string();
    args.push(&sock_s);
    let mut v = drv::Vmm::spawn_in(vmm, &args, Some(sock), BOOT_TS, jail)?;
    v.wait_ready(BOOT_TS)?;
    Ok(v)
}

fn check_fit(mem_mib: u64, touch_mib: u64) -> Result<(), String> {
    if touch_mib + 16 > mem_mib {
        return Err(format!(
            "touch {touch_mib} MiB does not fit: the region starts at 16 MiB of {mem_mib} MiB"
        ));
    }
    Ok(())
}

// ── snapshot ──

#[derive(Serialize)]
struct SnapRow {
    what: String,
    mem_mib: u64,
    guest: String,
    /// Pages written into the snapshot's layer(s) (reply's `pages`).
    pages: Option<Summary>,
    /// vCPUs paused (reply's `pause_ms`).
    pause_ms: Option<Summary>,
    /// The VMM's whole operation (reply's `total_ms`).
    vmm_total_ms: Option<Summary>,
    /// Request sent → reply read, client side.
    client_ms: Option<Summary>,
}

#[derive(Default)]
struct SnapSamples {
    pages: Vec<f64>,
    pause: Vec<f64>,
    total: Vec<f64>,
    client: Vec<f64>,
}

impl SnapSamples {
    fn take(&mut self, api: &mut drv::Api, kind: &str, dir: &Path) -> Result<(), String> {
        let t = Instant::now();
        let r = api.call(&serde_json::json!({"cmd": "snapshot", "kind": kind, "dir": dir}))?;
        self.client.push(ms(t));
        self.pause.push(drv::reply_f64(&r, "/snapshot/pause_ms")?);
        self.total.push(drv::reply_f64(&r, "/snapshot/total_ms")?);
        self.pages.push(drv::reply_f64(&r, "/snapshot/pages")?);
        Ok(())
    }

    fn row(&self, what: String, mem_mib: u64, guest: &str) -> SnapRow {
        SnapRow {
            what,
            mem_mib,
            guest: guest.into(),
            pages: Summary::of("pages", &self.pages),
            pause_ms: ms_of(&self.pause),
            vmm_total_ms: ms_of(&self.total),
            client_ms: ms_of(&self.client),
        }
    }
}

/// `grove-bench snapshot`: full and diff snapshots of the running test guest through the
/// control socket, per memory size and dirty set. `--storage-only`: the storage-level
/// layer benchmarks instead.
pub fn run_snapshot(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "--storage-only") {
        return run_storage(args, true);
    }
    let json = wants_json(args);
    let runs: usize = flag(args, "--runs")?.unwrap_or(5).max(1);
    let touch_mib: u64 = flag(args, "--touch-mib")?.unwrap_or(64);
    let sizes: Vec<u64> = match flag::<String>(args, "--sizes")? {
        Some(v) => drv::parse_list(&v, "--sizes")?,
        None => vec![256, 1024, 4096],
    };
    let gaps_ms: Vec<u64> = match flag::<String>(args, "--busy-gaps-ms")? {
        Some(v) => drv::parse_list(&v, "--busy-gaps-ms")?,
        None => vec![1, 10, 100, 1000],
    };
    for &m in &sizes {
        check_fit(m, touch_mib)?;
    }
    let (vmm, guest) = drv::binaries()?;
    let mut cond = drv::Conditions::now(&vmm, &guest);
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for &mib in &sizes {
        // Guest memory is reserved, not committed; still leave room for its touched part,
        // the page cache of the layers and the other users of this host.
        let avail = drv::mem_available_mib();
        if avail < mib + 1024 {
            skipped.push(format!("{mib} MiB: MemAvailable {avail} MiB < size + 1 GiB"));
            continue;
        }
        if !json {
            eprintln!("snapshot: {mib} MiB guest ...");
        }
        snapshot_size(&vmm, &guest, mib, touch_mib, runs, &gaps_ms, &mut rows)?;
    }
    cond.loadavg_end = drv::loadavg();
    if json {
        let doc = serde_json::json!({
            "bench": "snapshot",
            "conditions": cond,
            "runs": runs,
            "touch_mib": touch_mib,
            "skipped": skipped,
            "results": rows,
        });
        println!("{}", serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?);
    } else {
        println!("grove-bench snapshot: control-socket snapshots of the running test guest, {runs} runs, {touch_mib} MiB touched");
        cond.print();
        for s in &skipped {
            println!("  skipped {s}");
        }
        for r in &rows {
            println!("  {} MiB, {}: {}", r.mem_mib, r.guest, r.what);
            show("pages written", r.pages.as_ref());
            show("vCPUs paused (VMM)", r.pause_ms.as_ref());
            show("whole snapshot (VMM)", r.vmm_total_ms.as_ref());
            show("request -> reply (client)", r.client_ms.as_ref());
        }
        println!("  (the first full snapshot also turns dirty logging on; busy guests write successive pages of their region between Ts, round robin)");
    }
    Ok(())
}

fn snapshot_size(
    vmm: &Path,
    guest: &Path,
    mib: u64,
    touch_mib: u64,
    runs: usize,
    gaps_ms: &[u64],
    rows: &mut Vec<SnapRow>,
) -> Result<(), String> {
    let tmp = drv::TempDir::new("snapshot")?;
    // Ready guest: after READY it writes only its few loop pages between snapshots.
    let ready = format!("tg.mode=ready tg.touch_mib={touch_mib}");
    {
        let mut v = boot_guest(vmm, guest, &ready, mib, tmp.join("ready.sock"))?;
        let mut api = v.api()?;
        let mut first = SnapSamples::default();
        first.take(&mut api, "full", &tmp.join("full-0"))?;
        rows.push(first.row("first full snapshot (dirty logging turned on)".into(), mib, &ready));
        let mut full = SnapSamples::default();
        for i in 1..=runs {
            full.take(&mut api, "full", &tmp.join(&format!("full-{i}")))?;
            // The VM's chain now starts at full-i: the older one is unused.
            let _ = std::fs::remove_dir_all(tmp.join(&format!("full-{}", i - 1)));
        }
        rows.push(full.row("full snapshot, again".into(), mib, &ready));
        let mut diff = SnapSamples::default();
        for i in 0..runs {
            thread::sleep(Duration::from_millis(20));
            diff.take(&mut api, "diff", &tmp.join(&format!("diff-{i}")))?;
        }
        rows.push(diff.row(
            "diff snapshot 20 ms after the previous one (idle guest)".into(),
            mib,
            &ready,
        ));
    }
    // Busy guest: one page written per T, so the dirty set grows with the gap.
    let busy = format!("tg.mode=busy tg.touch_mib={touch_mib}");
    let mut v = boot_guest(vmm, guest, &busy, mib, tmp.join("busy.sock"))?;
    let mut api = v.api()?;
    let mut base = SnapSamples::default();
    base.take(&mut api, "full", &tmp.join("busy-full"))?;
    rows.push(base.row("first full snapshot (dirty logging turned on)".into(), mib, &busy));
    for &gap in gaps_ms {
        let mut diff = SnapSamples::default();
        for i in 0..runs {
            thread::sleep(Duration::from_millis(gap));
            diff.take(&mut api, "diff", &tmp.join(&format!("busy-{gap}-{i}")))?;
        }
        rows.push(diff.row(format!("diff snapshot {gap} ms after the previous one"), mib, &busy));
    }
    Ok(())
}

// ── restore ──

#[derive(Serialize)]
struct RestoreRow {
    path: String,
    mem_mode: &'static str,
    /// From the restore call (process spawn / `restore` request sent) to the guest's first
    /// `T` read by this process.
    client_ms: Option<Summary>,
    /// The VMM's own figure: `vmm_from` → its first guest serial byte (timing marks).
    vmm_ms: Option<Summary>,
    vmm_from: &'static str,
    /// Standby only: the reply's `restore_ms` (request received → vCPUs started).
    reply_restore_ms: Option<Summary>,
    /// Every `timing:` mark of the VMM (ms since its `main`).
    vmm_marks_ms: Vec<Step>,
}

#[derive(Default)]
struct RestoreSamples {
    client: Vec<f64>,
    vmm: Vec<f64>,
    reply: Vec<f64>,
    marks: Vec<Vec<(String, f64)>>,
}

impl RestoreSamples {
    fn row(&self, path: &str, mem_mode: &'static str, vmm_from: &'static str) -> RestoreRow {
        RestoreRow {
            path: path.into(),
            mem_mode,
            client_ms: ms_of(&self.client),
            vmm_ms: ms_of(&self.vmm),
            vmm_from,
            reply_restore_ms: ms_of(&self.reply),
            vmm_marks_ms: steps_of(&self.marks),
        }
    }
}

fn marks(v: &drv::Vmm) -> Vec<(String, f64)> {
    v.stderr().iter().filter_map(|l| drv::parse_timing(l)).collect()
}

/// `grove-vmm restore` from a spawn to the first `T`. Returns the VMM for callers that
/// keep it running.
fn cold_restore(
    vmm: &Path,
    dir: &Path,
    mode: &str,
    identity: u32,
    out: &mut RestoreSamples,
    jail: Option<&drv::Jail>,
) -> Result<drv::Vmm, String> {
    let id = identity.to_string();
    let args = ["restore", "--snapshot", drv::s(dir)?, "--mem-mode", mode, "--identity", &id];
    let t0 = Instant::now();
    let mut v = drv::Vmm::spawn_in(vmm, &args, None, 1, jail)?;
    let at = v.wait_first_t()?;
    out.client.push(drv::ms_since(t0, at));
    if let Some(m) = v.timing_mark("first guest serial output") {
        out.vmm.push(m);
    }
    out.marks.push(marks(&v));
    Ok(v)
}

/// A pre-started `grove-vmm standby` (its KVM work done), connected.
struct Standby {
    vmm: drv::Vmm,
    api: drv::Api,
}

fn start_standby(
    vmm: &Path,
    mem_mib: u64,
    sock: PathBuf,
    jail: Option<&drv::Jail>,
) -> Result<Standby, String> {
    let mem = mem_mib.to_string();
    let sock_s = drv::s(&sock)?.to_string();
    let mut v = drv::Vmm::spawn_in(
        vmm,
        &["standby", "--api-sock", &sock_s, "--mem-mib", &mem],
        Some(sock),
        1,
        jail,
    )?;
    let mut api = v.api()?;
    let st = api.call(&serde_json::json!({"cmd": "status"}))?;
    if st.pointer("/status/state").and_then(serde_json::Value::as_str) != Some("standby") {
        return Err(format!("standby VMM status: {st}"));
    }
    Ok(Standby { vmm: v, api })
}

fn restore_request(dir: &Path, identity: u32) -> serde_json::Value {
    serde_json::json!({"cmd": "restore", "snapshot": dir, "identity": identity})
}

/// After the standby's first `T`: its reply and its own figure.
fn standby_finish(sb: &mut Standby, out: &mut RestoreSamples) -> Result<(), String> {
    let reply = sb.api.recv()?;
    out.reply.push(drv::reply_f64(&reply, "/restored/restore_ms")?);
    if let (Some(req), Some(first)) =
        (sb.vmm.timing_mark("restore request"), sb.vmm.timing_mark("first guest serial output"))
    {
        out.vmm.push(first - req);
    }
    out.marks.push(marks(&sb.vmm));
    Ok(())
}

/// `grove-bench restore`: restore to running (the guest's first `T`) from a full snapshot of
/// a ready-mode guest: cold `grove-vmm restore` in mmap and uffd mode (uffd: first restore,
/// and with the working set the first restore recorded) and pre-started standby VMMs.
/// `--storage-only`: the storage-level restore measurements instead.
pub fn run_restore(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "--storage-only") {
        return run_storage(args, false);
    }
    let json = wants_json(args);
    let runs: usize = flag(args, "--runs")?.unwrap_or(30).max(1);
    let mem_mib: u64 = flag(args, "--mem-mib")?.unwrap_or(256);
    let touch_mib: u64 = flag(args, "--touch-mib")?.unwrap_or(64);
    check_fit(mem_mib, touch_mib)?;
    let (vmm, guest) = drv::binaries()?;
    let jail_base = if args.iter().any(|a| a == "--jail") {
        Some(drv::Jail::beside(&vmm, mem_mib)?)
    } else {
        None
    };
    let mut cond = drv::Conditions::now(&vmm, &guest);
    let tmp = drv::TempDir::new("restore")?;
    let snap = tmp.join("snap");
    // Jailed VMMs (--jail) see the snapshot read-only and make their sockets in a directory
    // of their uid's.
    let jail_socks = tmp.join("jail-socks");
    let jail = match &jail_base {
        Some(j) => {
            drv::jail_writable_dir(&jail_socks)?;
            Some(j.with(&[&jail_socks], &[&snap]))
        }
        None => None,
    };
    let cmdline = format!("tg.mode=ready tg.touch_mib={touch_mib}");
    let (snap_pages, snap_ms) = {
        let mut parent = boot_guest(&vmm, &guest, &cmdline, mem_mib, tmp.join("parent.sock"))?;
        let r = parent
            .api()?
            .call(&serde_json::json!({"cmd": "snapshot", "kind": "full", "dir": snap}))?;
        (drv::reply_f64(&r, "/snapshot/pages")?, drv::reply_f64(&r, "/snapshot/total_ms")?)
        // The parent is killed here: its spinning vCPU would compete with the restores.
    };
    let head = snap.join("0000.mlayer");
    let ws = WorkingSet::default_path(&head);
    let mut rows = Vec::new();
    let progress = |what: &str| {
        if !json {
            eprintln!("restore: {what} ...");
        }
    };

    progress("cold, mmap");
    let mut s = RestoreSamples::default();
    let mut sj = RestoreSamples::default();
    for _ in 0..runs {
        cold_restore(&vmm, &snap, "mmap", 1, &mut s, None)?;
        if let Some(j) = &jail {
            // Alternating with the plain ones: the same conditions for both.
            cold_restore(&vmm, &snap, "mmap", 1, &mut sj, Some(j))?;
        }
    }
    rows.push(s.row("cold grove-vmm restore", "mmap", "VMM main"));
    let mut jailed_rows = Vec::new();
    if jail.is_some() {
        jailed_rows.push(sj.row(
            "cold grove-vmm restore, through grove-jailer",
            "mmap",
            "VMM main",
        ));
    }

    progress("cold, uffd, first restore");
    let mut s = RestoreSamples::default();
    for _ in 0..runs {
        let _ = std::fs::remove_file(&ws);
        cold_restore(&vmm, &snap, "uffd", 1, &mut s, None)?;
    }
    rows.push(s.row(
        "cold grove-vmm restore, first uffd restore (no working set)",
        "uffd",
        "VMM main",
    ));

    progress("cold, uffd, recording the working set");
    let _ = std::fs::remove_file(&ws);
    let recorder = cold_restore(&vmm, &snap, "uffd", 1, &mut RestoreSamples::default(), None)?;
    let t = Instant::now();
    while !ws.exists() {
        if t.elapsed() > drv::DEADLINE {
            return Err(format!(
                "the first uffd restore recorded no working set at {}",
                ws.display()
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
    // Saved by rename: once the name exists the file is complete.
    drop(recorder);
    let ws_pages = WorkingSet::load(&ws).map_err(|e| e.to_string())?.pages.len();

    progress("cold, uffd, recorded working set prefetched");
    let mut s = RestoreSamples::default();
    for _ in 0..runs {
        cold_restore(&vmm, &snap, "uffd", 1, &mut s, None)?;
    }
    rows.push(s.row(
        "cold grove-vmm restore, uffd, recorded working set prefetched",
        "uffd",
        "VMM main",
    ));

    progress("standby, mmap");
    let mut s = RestoreSamples::default();
    let mut sj = RestoreSamples::default();
    for i in 0..runs {
        let one = |sock: PathBuf, j: Option<&drv::Jail>, out: &mut RestoreSamples| {
            let mut sb = start_standby(&vmm, mem_mib, sock, j)?;
            let t0 = Instant::now();
            sb.api.send(&restore_request(&snap, 1))?;
            let at = sb.vmm.wait_first_t()?;
            out.client.push(drv::ms_since(t0, at));
            standby_finish(&mut sb, out)
        };
        one(tmp.join(&format!("sb-{i}.sock")), None, &mut s)?;
        if let Some(j) = &jail {
            one(jail_socks.join(format!("sb-{i}.sock")), Some(j), &mut sj)?;
        }
    }
    rows.push(s.row(
        "pre-started standby VMM, restore request",
        "mmap",
        "restore request received",
    ));
    if jail.is_some() {
        jailed_rows.push(sj.row(
            "pre-started standby VMM through grove-jailer, restore request",
            "mmap",
            "restore request received",
        ));
    }
    // Jailed over plain, restore call -> first T at the median: cold (the first row) and
    // standby (the last plain row).
    let ratios: Vec<(String, f64)> = jailed_rows
        .iter()
        .zip([&rows[0], &rows[rows.len() - 1]])
        .filter_map(|(j, p)| {
            let (jm, pm) = (j.client_ms.as_ref()?.median, p.client_ms.as_ref()?.median);
            Some((p.path.clone(), jm / pm))
        })
        .collect();
    rows.extend(jailed_rows);

    cond.loadavg_end = drv::loadavg();
    if json {
        let doc = serde_json::json!({
            "bench": "restore",
            "conditions": cond,
            "runs": runs,
            "guest": { "mem_mib": mem_mib, "touch_mib": touch_mib, "cmdline": cmdline, "vcpus": 1 },
            "snapshot": { "kind": "full", "pages": snap_pages, "snapshot_ms": snap_ms, "working_set_pages": ws_pages },
            "to": "the guest's first T read from the VMM's stdout",
            "results": rows,
            "jailed_over_plain_client_p50": ratios
                .iter()
                .map(|(k, v)| serde_json::json!({"path": k, "ratio": v}))
                .collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?);
    } else {
        println!(
            "grove-bench restore: {runs} runs, {mem_mib} MiB guest (1 vCPU, ready mode, {touch_mib} MiB touched), \
             full snapshot of {snap_pages} pages; recorded working set {ws_pages} pages"
        );
        cond.print();
        for r in &rows {
            println!("  {} [{}]", r.path, r.mem_mode);
            show("restore call -> first T (client)", r.client_ms.as_ref());
            show(&format!("{} -> first serial byte (VMM)", r.vmm_from), r.vmm_ms.as_ref());
            if r.reply_restore_ms.is_some() {
                show("reply restore_ms (VMM)", r.reply_restore_ms.as_ref());
            }
            for st in &r.vmm_marks_ms {
                println!("      mark {:<40} {}", st.step, st.ms);
            }
        }
        for (path, x) in &ratios {
            println!(
                "  through grove-jailer / plain, {path}, restore call -> first T median: {x:.2}"
            );
        }
    }
    Ok(())
}

// ── fork ──

#[derive(Serialize)]
struct ForkRow {
    children: usize,
    mem_mode: &'static str,
    start: &'static str,
    runs: usize,
    /// The parent's first fork (pre-copy of the full layer while running, then the diff).
    first_fork_pause_ms: f64,
    first_fork_total_ms: f64,
    /// Later forks (diff only): the reply's pause and the client's request → reply.
    parent_pause_ms: Option<Summary>,
    fork_call_ms: Option<Summary>,
    /// Fork request sent → every child's first `T` read.
    all_children_running_after_fork_call_ms: Option<Summary>,
    /// Fork reply read → every child's first `T` read.
    all_children_running_after_fork_reply_ms: Option<Summary>,
    /// Fork request sent → each child's first `T` (all children of all runs).
    each_child_running_after_fork_call_ms: Option<Summary>,
    child_pss_kib: Option<Summary>,
    child_pss_anon_kib: Option<Summary>,
    child_rss_kib: Option<Summary>,
    parent_pss_kib: Option<Summary>,
    child_pss_percent_of_parent: Option<Summary>,
}

#[derive(Default)]
struct ForkSamples {
    pause: Vec<f64>,
    call: Vec<f64>,
    from_call: Vec<f64>,
    from_reply: Vec<f64>,
    each: Vec<f64>,
    pss: Vec<f64>,
    pss_anon: Vec<f64>,
    rss: Vec<f64>,
    parent_pss: Vec<f64>,
    percent: Vec<f64>,
}

#[allow(clippy::cast_precision_loss)] // KiB counts are far below 2^52.
fn kib(v: u64) -> f64 {
    v as f64
}

struct ForkSetup<'a> {
    vmm: &'a Path,
    guest: &'a Path,
    cmdline: &'a str,
    mem_mib: u64,
    idle_ms: u64,
    /// SIGSTOP each child at its first `T` and the parent after the fork reply.
    stop_children: bool,
    /// `--jail`: the jail every VMM of a jailed series starts in.
    jail: Option<drv::Jail>,
}

fn fork_series(
    f: &ForkSetup<'_>,
    n: usize,
    mode: &'static str,
    standby: bool,
    runs: usize,
    jailed: bool,
) -> Result<ForkRow, String> {
    let tmp = drv::TempDir::new("fork")?;
    // Jailed: the parent writes its forks into `tmp` (its uid's), each child sees `tmp`
    // read-only and makes its socket in `socks`; every VMM in a jail of its own.
    let socks = drv::TempDir::new("fork-socks")?;
    let (parent_jail, child_jail) = match (&f.jail, jailed) {
        (Some(j), true) => {
            drv::jail_writable_dir(&tmp.0)?;
            drv::jail_writable_dir(&socks.0)?;
            (Some(j.with(&[&tmp.0], &[f.guest])), Some(j.with(&[&socks.0], &[&tmp.0])))
        }
        _ => (None, None),
    };
    let mut parent = boot_guest_in(
        f.vmm,
        f.guest,
        f.cmdline,
        f.mem_mib,
        tmp.join("parent.sock"),
        parent_jail.as_ref(),
    )?;
    let mut api = parent.api()?;
    let fork =
        |api: &mut drv::Api, dir: &Path| api.call(&serde_json::json!({"cmd": "fork", "dir": dir}));
    let first = fork(&mut api, &tmp.join("fork-0"))?;
    let mut s = ForkSamples::default();
    for run in 1..=runs {
        let dir = tmp.join(&format!("fork-{run}"));
        let mut standbys = Vec::new();
        if standby {
            for i in 0..n {
                standbys.push(start_standby(
                    f.vmm,
                    f.mem_mib,
                    socks.join(&format!("sb-{run}-{i}.sock")),
                    child_jail.as_ref(),
                )?);
            }
        }
        let t0 = Instant::now();
        let r = fork(&mut api, &dir)?;
        let t_reply = Instant::now();
        s.call.push(drv::ms_since(t0, t_reply));
        s.pause.push(drv::reply_f64(&r, "/snapshot/pause_ms")?);
        if f.stop_children {
            parent.stop();
        }
        let mut children = Vec::with_capacity(n);
        if standby {
            for (i, sb) in standbys.iter_mut().enumerate() {
                if f.stop_children {
                    sb.vmm.stop_at_first_t();
                }
                sb.api.send(&restore_request(&dir, u32::try_from(i + 1).unwrap_or(u32::MAX)))?;
            }
        } else {
            for i in 0..n {
                let id = (i + 1).to_string();
                let args =
                    ["restore", "--snapshot", drv::s(&dir)?, "--mem-mode", mode, "--identity", &id];
                let c = drv::Vmm::spawn_in(f.vmm, &args, None, 1, child_jail.as_ref())?;
                if f.stop_children {
                    c.stop_at_first_t();
                }
                children.push(c);
            }
        }
        let mut last = t_reply;
        for c in children.iter_mut().chain(standbys.iter_mut().map(|sb| &mut sb.vmm)) {
            let at = c.wait_first_t()?;
            s.each.push(drv::ms_since(t0, at));
            last = last.max(at);
        }
        s.from_call.push(drv::ms_since(t0, last));
        s.from_reply.push(drv::ms_since(t_reply, last));
        if f.stop_children {
            parent.cont();
            for c in children.iter().chain(standbys.iter().map(|sb| &sb.vmm)) {
                c.cont();
            }
        }
        for sb in &mut standbys {
            sb.api.recv()?;
        }
        // Idle a moment (no new memory touched), then read what each child holds.
        thread::sleep(Duration::from_millis(f.idle_ms));
        let p = drv::rollup(parent.pid)?;
        s.parent_pss.push(kib(p.pss_kib));
        for c in children.iter().chain(standbys.iter().map(|sb| &sb.vmm)) {
            let m = drv::rollup(c.pid)?;
            s.pss.push(kib(m.pss_kib));
            s.pss_anon.push(kib(m.pss_anon_kib));
            s.rss.push(kib(m.rss_kib));
            s.percent.push(100.0 * kib(m.pss_kib) / kib(p.pss_kib.max(1)));
        }
        // Children (and standbys) are killed here, before the next round.
    }
    Ok(ForkRow {
        children: n,
        mem_mode: mode,
        start: match (standby, child_jail.is_some()) {
            (true, false) => "pre-started standby VMMs",
            (false, false) => "cold grove-vmm restore",
            (true, true) => "pre-started standby VMMs, parent and children through grove-jailer",
            (false, true) => "cold grove-vmm restore, parent and children through grove-jailer",
        },
        runs,
        first_fork_pause_ms: drv::reply_f64(&first, "/snapshot/pause_ms")?,
        first_fork_total_ms: drv::reply_f64(&first, "/snapshot/total_ms")?,
        parent_pause_ms: ms_of(&s.pause),
        fork_call_ms: ms_of(&s.call),
        all_children_running_after_fork_call_ms: ms_of(&s.from_call),
        all_children_running_after_fork_reply_ms: ms_of(&s.from_reply),
        each_child_running_after_fork_call_ms: ms_of(&s.each),
        child_pss_kib: Summary::of("KiB", &s.pss),
        child_pss_anon_kib: Summary::of("KiB", &s.pss_anon),
        child_rss_kib: Summary::of("KiB", &s.rss),
        parent_pss_kib: Summary::of("KiB", &s.parent_pss),
        child_pss_percent_of_parent: Summary::of("%", &s.percent),
    })
}

/// `grove-bench fork`: a ready-mode parent forked through the control socket into N
/// children, started with `grove-vmm restore` (mmap and uffd) and with pre-started standby
/// VMMs (mmap).
pub fn run_fork(args: &[String]) -> Result<(), String> {
    let json = wants_json(args);
    let runs: usize = flag(args, "--runs")?.unwrap_or(5).max(1);
    let children: Vec<usize> = match flag::<String>(args, "--children")? {
        Some(v) => drv::parse_list(&v, "--children")?,
        None => vec![1, 4, 16, 64],
    };
    if children.iter().any(|&n| n == 0 || n > 256) {
        return Err("--children: each count must be 1..=256".into());
    }
    let modes: Vec<&'static str> = match flag::<String>(args, "--mem-mode")?.as_deref() {
        None => vec!["mmap", "uffd"],
        Some("mmap") => vec!["mmap"],
        Some("uffd") => vec!["uffd"],
        Some(other) => return Err(format!("--mem-mode: mmap or uffd, not '{other}'")),
    };
    let no_standby = args.iter().any(|a| a == "--no-standby");
    let stop_children = args.iter().any(|a| a == "--stop-children");
    let mem_mib: u64 = 256;
    let touch_mib: u64 = 64;
    let (vmm, guest) = drv::binaries()?;
    let jail = if args.iter().any(|a| a == "--jail") {
        Some(drv::Jail::beside(&vmm, mem_mib)?)
    } else {
        None
    };
    let mut cond = drv::Conditions::now(&vmm, &guest);
    // Idle children sleep through grove-vmm's idle port between Ts, as idle Linux guests
    // halt; `--spin` keeps the test guest busy-waiting instead (every child burns a core).
    let spin = args.iter().any(|a| a == "--spin");
    let idle = if spin { "tg.idle=spin" } else { "tg.idle=auto tg.idle_us=1000" };
    let cmdline = format!("tg.mode=ready tg.touch_mib={touch_mib} {idle}");
    let setup = ForkSetup {
        vmm: &vmm,
        guest: &guest,
        cmdline: &cmdline,
        mem_mib,
        idle_ms: 300,
        stop_children,
        jail,
    };
    let jail_modes: &[bool] = if setup.jail.is_some() { &[false, true] } else { &[false] };
    let mut rows = Vec::new();
    for &mode in &modes {
        let starts: &[bool] = if mode == "mmap" && !no_standby { &[false, true] } else { &[false] };
        for &standby in starts {
            for &n in &children {
                let r = if n > MANY_CHILDREN { runs.min(1) } else { runs };
                // --jail: each series plain, then through grove-jailer, in the same run.
                for &jailed in jail_modes {
                    if !json {
                        eprintln!(
                            "fork: {n} children, {mode}, {}{} ...",
                            if standby { "standby" } else { "cold" },
                            if jailed { ", jailed" } else { "" }
                        );
                    }
                    rows.push(fork_series(&setup, n, mode, standby, r, jailed)?);
                }
            }
        }
    }
    cond.loadavg_end = drv::loadavg();
    let note = if stop_children {
        format!(
            "--stop-children: each child is SIGSTOPped when its first T arrives and the parent \
             from the fork reply until every child ran (standing in for guests that idle), so \
             children do not compete with the ones still starting for the {} host CPUs; counts \
             above {MANY_CHILDREN} get 1 run",
            cond.host_cpus
        )
    } else if spin {
        format!(
            "--spin: every child of a ready-mode guest busy-waits between Ts: N children + the \
             parent share {} host CPUs; counts above {MANY_CHILDREN} get 1 run",
            cond.host_cpus
        )
    } else {
        format!(
            "guests idle through grove-vmm's idle port between Ts (a T per ~1 ms, about a tenth \
             of a core each here); N children + the parent share {} host CPUs; counts above \
             {MANY_CHILDREN} get 1 run",
            cond.host_cpus
        )
    };
    if json {
        let doc = serde_json::json!({
            "bench": "fork",
            "conditions": cond,
            "stop_children": stop_children,
            "parent": { "mem_mib": mem_mib, "touch_mib": touch_mib, "cmdline": cmdline, "vcpus": 1 },
            "note": note,
            "results": rows,
        });
        println!("{}", serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?);
    } else {
        println!(
            "grove-bench fork: parent {mem_mib} MiB, 1 vCPU, ready mode, {touch_mib} MiB touched; {runs} runs"
        );
        cond.print();
        println!("  note: {note}");
        for r in &rows {
            println!(
                "  {} children, {} [{}], {} runs; first fork: pause {:.3} ms, total {:.3} ms",
                r.children,
                r.start,
                r.mem_mode,
                r.runs,
                r.first_fork_pause_ms,
                r.first_fork_total_ms
            );
            show("parent pause (later forks)", r.parent_pause_ms.as_ref());
            show("fork call (client)", r.fork_call_ms.as_ref());
            show(
                "fork call -> every child's first T",
                r.all_children_running_after_fork_call_ms.as_ref(),
            );
            show(
                "fork reply -> every child's first T",
                r.all_children_running_after_fork_reply_ms.as_ref(),
            );
            show(
                "fork call -> each child's first T",
                r.each_child_running_after_fork_call_ms.as_ref(),
            );
            show("child Pss", r.child_pss_kib.as_ref());
            show("child Pss_Anon", r.child_pss_anon_kib.as_ref());
            show("child Rss", r.child_rss_kib.as_ref());
            show("parent Pss", r.parent_pss_kib.as_ref());
            show("child Pss / parent Pss", r.child_pss_percent_of_parent.as_ref());
        }
    }
    Ok(())
}
