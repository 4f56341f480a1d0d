//! `grove-bench disk [--json] [--runs N] [--dir PATH] [--mib N] [--dmthin]`: the layered block
//! store against a raw file on the same filesystem.
//!
//! - snapshot and clone latency of 1 GiB and 20 GiB sparse disks (a few dirty
//!   chunks before each snapshot);
//! - sequential and random 4 KiB read and write throughput through a depth-1 layer
//!   (a fresh writable layer over a base image) vs the raw file, measured in the
//!   same run, as a ratio; every pass ends with a flush (fdatasync for the raw file);
//! - random 4 KiB read latency through chains of depth 1, 10 and 50 (reads that
//!   fall through every layer to the base).
//!
//! Files go through the page cache (no O_DIRECT), as a virtio-blk backend using the
//! store would; the base image is read once before timing.
//!
//! `--dmthin` (root, a kernel with device-mapper and dm-thin-pool: the test host's
//! `diskdm` scenario): the snapshot and clone latencies of the dm-thin backend too, the same
//! sizes and the same writes before each snapshot, in one pool over two loop devices on
//! sparse files in the same directory, in the same run, beside the layered store's; the
//! throughput and chain parts are then skipped.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use grove_storage::block::dmthin::{attach_loop, detach_loop, dm_available, DmThinStore};
use grove_storage::block::layered::LayeredStore;
use grove_storage::block::{BlockDevice, BlockIo, BlockStore};
use grove_storage::catalog::Catalog;
use serde::Serialize;

use crate::stats::{flag, wants_json, Summary};

const GIB: u64 = 1 << 30;
const BLOCK: usize = 4096;

#[derive(Serialize)]
struct Conditions {
    dir: String,
    filesystem: String,
    kernel: String,
    cpus: usize,
    chunk_size: u32,
    working_set_mib: u64,
    runs: usize,
    io: &'static str,
    /// 4 KiB pwrite + fdatasync on the same filesystem, measured in this run.
    fdatasync_4k: Summary,
    /// /proc/loadavg before and after (the host is shared).
    loadavg_before: String,
    loadavg_after: String,
}

#[derive(Serialize)]
struct SizeLatency {
    disk_gib: u64,
    /// With a spare layer prepared beforehand (`prepare_spares`, untimed): the
    /// critical path is the flush of the frozen layer plus one catalog commit.
    snapshot: Summary,
    clone: Summary,
    /// Without a spare: the new layer's files are created and fsynced inline.
    snapshot_no_spare: Summary,
    clone_no_spare: Summary,
}

#[derive(Serialize)]
struct Throughput {
    pattern: &'static str,
    raw: Summary,
    layered: Summary,
    /// layered / raw, medians.
    ratio: f64,
}

#[derive(Serialize)]
struct ChainLatency {
    depth: usize,
    read_4k: Summary,
}

#[derive(Serialize)]
struct Report {
    conditions: Conditions,
    snapshot_clone: Vec<SizeLatency>,
    /// `--dmthin`: the dm-thin backend's figures, same sizes, same run (then the layered
    /// store's throughput and chain figures are not taken).
    #[serde(skip_serializing_if = "Option::is_none")]
    dmthin_snapshot_clone: Option<Vec<DmThinLatency>>,
    throughput_depth1: Vec<Throughput>,
    chain_read_latency: Vec<ChainLatency>,
}

/// A scratch directory removed on drop.
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    pub(crate) fn new(parent: &Path) -> Result<Self, String> {
        let p = parent.join(format!("grove-bench-disk-{}", std::process::id()));
        std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(Self(p))
    }

    /// The scratch directory (removed on drop).
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn e2s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// A small deterministic generator (no dependency needed for offsets).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

pub(crate) fn fs_type(dir: &Path) -> String {
    let out = std::process::Command::new("stat").args(["-f", "-c", "%T"]).arg(dir).output();
    out.ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.trim().to_string()).unwrap_or_default()
}

pub(crate) fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Times `runs` snapshots of `disk` (8 random 4 KiB writes before each) and `runs` clones
/// of the last frozen layer (each clone released again); `prep` runs untimed before each.
fn time_snapshot_clone<S: BlockStore>(
    store: &S,
    disk: &S::Disk,
    size: u64,
    runs: usize,
    rng: &mut Lcg,
    prep: &mut dyn FnMut() -> Result<(), String>,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let blocks = size / BLOCK as u64;
    let buf = vec![0x5a; BLOCK];
    let (mut snapshot, mut clone) = (Vec::new(), Vec::new());
    let mut frozen = None;
    for _ in 0..runs {
        prep()?;
        for _ in 0..8 {
            disk.write(rng.next() % blocks * 8, &buf).map_err(e2s)?;
        }
        let t = Instant::now();
        frozen = Some(disk.snapshot().map_err(e2s)?);
        snapshot.push(ms(t));
    }
    let frozen = frozen.ok_or("no snapshot")?;
    for _ in 0..runs {
        prep()?;
        let t = Instant::now();
        let c = store.clone_disk(frozen).map_err(e2s)?;
        clone.push(ms(t));
        let l = c.layer();
        drop(c);
        store.release(l).map_err(e2s)?;
    }
    Ok((snapshot, clone))
}

fn snapshot_clone(dir: &Path, gib: u64, runs: usize) -> Result<SizeLatency, String> {
    let root = dir.join(format!("sc-{gib}"));
    let store = LayeredStore::open(&root).map_err(e2s)?;
    let size = gib * GIB;
    let base = store.create_base(size, None).map_err(e2s)?;
    let disk = store.clone_disk(base).map_err(e2s)?;
    let mut rng = Lcg(gib);
    let (snapshot_cold, clone_cold) =
        time_snapshot_clone(&store, &disk, size, runs, &mut rng, &mut || Ok(()))?;
    let (snapshot, clone) = time_snapshot_clone(&store, &disk, size, runs, &mut rng, &mut || {
        store.prepare_spares(size, 1).map_err(e2s)
    })?;
    drop(disk);
    drop(store);
    let _ = std::fs::remove_dir_all(&root);
    let sum = |v: &[f64]| Summary::of("ms", v).ok_or("no samples");
    Ok(SizeLatency {
        disk_gib: gib,
        snapshot: sum(&snapshot)?,
        clone: sum(&clone)?,
        snapshot_no_spare: sum(&snapshot_cold)?,
        clone_no_spare: sum(&clone_cold)?,
    })
}

#[derive(Serialize)]
struct DmThinLatency {
    disk_gib: u64,
    snapshot: Summary,
    clone: Summary,
}

/// A thin pool over two loop devices on sparse files in `dir`: torn down (dm devices, then
/// the loops) on drop, also on an error path.
struct Pool {
    store: Option<DmThinStore>,
    loops: Vec<PathBuf>,
}

impl Pool {
    fn create(dir: &Path, data_gib: u64) -> Result<Self, String> {
        dm_available()?;
        let (meta, data) = (dir.join("dm-meta"), dir.join("dm-data"));
        File::create(&meta).and_then(|f| f.set_len(64 << 20)).map_err(e2s)?;
        File::create(&data).and_then(|f| f.set_len(data_gib * GIB)).map_err(e2s)?;
        let mut pool = Pool { store: None, loops: Vec::new() };
        for f in [&meta, &data] {
            pool.loops.push(attach_loop(f).map_err(|e| format!("attach a loop device: {e}"))?);
        }
        let catalog = Arc::new(Catalog::open(&dir.join("dm-catalog")).map_err(e2s)?);
        let prefix = format!("grove-bench-{}", std::process::id());
        pool.store = Some(
            DmThinStore::create(&prefix, &pool.loops[0], &pool.loops[1], catalog)
                .map_err(|e| format!("create a thin pool: {e}"))?,
        );
        Ok(pool)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Some(s) = self.store.take() {
            if let Err(e) = s.teardown() {
                eprintln!("grove-bench disk: thin pool teardown: {e}");
            }
        }
        for l in &self.loops {
            if let Err(e) = detach_loop(l) {
                eprintln!("grove-bench disk: {e}");
            }
        }
    }
}

/// Snapshot and clone latency of thin volumes of each size, in one pool in `dir`.
fn dmthin_snapshot_clone(
    dir: &Path,
    sizes: &[u64],
    runs: usize,
) -> Result<Vec<DmThinLatency>, String> {
    let pool = Pool::create(dir, 4)?;
    let store = pool.store.as_ref().ok_or("no pool")?;
    let mut out = Vec::new();
    for &gib in sizes {
        let size = gib * GIB;
        let base = store.create_base(size, None).map_err(e2s)?;
        let disk = store.clone_disk(base).map_err(e2s)?;
        let mut rng = Lcg(gib);
        let (snapshot, clone) =
            time_snapshot_clone(store, &disk, size, runs, &mut rng, &mut || Ok(()))?;
        drop(disk);
        let sum = |v: &[f64]| Summary::of("ms", v).ok_or("no samples");
        out.push(DmThinLatency { disk_gib: gib, snapshot: sum(&snapshot)?, clone: sum(&clone)? });
    }
    Ok(out)
}

fn fdatasync_latency(dir: &Path, runs: usize) -> Result<Summary, String> {
    let path = dir.join("fsync-probe");
    let f = File::create(&path).map_err(e2s)?;
    let buf = vec![1u8; BLOCK];
    let mut v = Vec::new();
    for i in 0..runs as u64 {
        f.write_all_at(&buf, i * BLOCK as u64).map_err(e2s)?;
        let t = Instant::now();
        f.sync_data().map_err(e2s)?;
        v.push(ms(t));
    }
    let _ = std::fs::remove_file(&path);
    Summary::of("ms", &v).ok_or_else(|| "no samples".to_string())
}

/// The I/O target of a throughput pass.
trait Target {
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), String>;
    fn write(&self, off: u64, buf: &[u8]) -> Result<(), String>;
    fn flush(&self) -> Result<(), String>;
}

struct Raw(File);

impl Target for Raw {
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.read_exact_at(buf, off).map_err(e2s)
    }
    fn write(&self, off: u64, buf: &[u8]) -> Result<(), String> {
        self.0.write_all_at(buf, off).map_err(e2s)
    }
    fn flush(&self) -> Result<(), String> {
        self.0.sync_data().map_err(e2s)
    }
}

struct Layered<D: BlockDevice>(D);

impl<D: BlockDevice> Target for Layered<D> {
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.read(off / 512, buf).map_err(e2s)
    }
    fn write(&self, off: u64, buf: &[u8]) -> Result<(), String> {
        self.0.write(off / 512, buf).map_err(e2s)
    }
    fn flush(&self) -> Result<(), String> {
        self.0.flush().map_err(e2s)
    }
}

/// One pass over `size` bytes in 4 KiB blocks; returns MiB/s.
fn pass(t: &dyn Target, size: u64, write: bool, random: bool, seed: u64) -> Result<f64, String> {
    let blocks = size / BLOCK as u64;
    let mut rng = Lcg(seed);
    let mut buf = vec![0xa5u8; BLOCK];
    let start = Instant::now();
    for i in 0..blocks {
        let b = if random { rng.next() % blocks } else { i };
        if write {
            buf[0] = i as u8;
            t.write(b * BLOCK as u64, &buf)?;
        } else {
            t.read(b * BLOCK as u64, &mut buf)?;
        }
    }
    t.flush()?;
    let secs = start.elapsed().as_secs_f64();
    Ok(size as f64 / f64::from(1u32 << 20) / secs)
}

fn write_image(path: &Path, size: u64) -> Result<(), String> {
    let f = File::create(path).map_err(e2s)?;
    let mut buf = vec![0u8; 1 << 20];
    for mib in 0..size >> 20 {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (mib as usize + i / 4096) as u8 | 1;
        }
        f.write_all_at(&buf, mib << 20).map_err(e2s)?;
    }
    f.sync_all().map_err(e2s)
}

fn warm(path: &Path) -> Result<(), String> {
    let f = File::open(path).map_err(e2s)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while f.read_at(&mut buf, off).map_err(e2s)? > 0 {
        off += 1 << 20;
    }
    Ok(())
}

fn throughput(dir: &Path, size: u64, runs: usize) -> Result<Vec<Throughput>, String> {
    let image = dir.join("image.raw");
    write_image(&image, size)?;
    let root = dir.join("tp");
    let store = LayeredStore::open(&root).map_err(e2s)?;
    let base = store.create_base(size, Some(&image)).map_err(e2s)?;
    let base_file = root.join(format!("layers/L{base}.data"));
    let mut out = Vec::new();
    for (pattern, write, random) in [
        ("seq-read-4k", false, false),
        ("rand-read-4k", false, true),
        ("seq-write-4k", true, false),
        ("rand-write-4k", true, true),
    ] {
        let (mut raw, mut lay) = (Vec::new(), Vec::new());
        for run in 0..runs {
            // Raw: reads from a copy of the image, writes to a fresh sparse file.
            let raw_path = dir.join("raw.img");
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&raw_path)
                .map_err(e2s)?;
            if write {
                f.set_len(size).map_err(e2s)?;
            } else {
                std::fs::copy(&image, &raw_path).map_err(e2s)?;
                warm(&raw_path)?;
            }
            let seed = run as u64 + 1;
            raw.push(pass(&Raw(f), size, write, random, seed)?);
            std::fs::remove_file(&raw_path).map_err(e2s)?;
            // Layered: a fresh depth-1 layer over the base image.
            warm(&base_file)?;
            let d = store.clone_disk(base).map_err(e2s)?;
            let l = d.layer();
            let t = Layered(d);
            lay.push(pass(&t, size, write, random, seed)?);
            drop(t);
            store.release(l).map_err(e2s)?;
        }
        let raw = Summary::of("MiB/s", &raw).ok_or("no samples")?;
        let layered = Summary::of("MiB/s", &lay).ok_or("no samples")?;
        out.push(Throughput { pattern, ratio: layered.median / raw.median, raw, layered });
    }
    drop(store);
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_file(&image);
    Ok(out)
}

fn chain_latency(dir: &Path, depth: usize, reads: usize) -> Result<ChainLatency, String> {
    let size = 64u64 << 20;
    let image = dir.join(format!("chain-{depth}.raw"));
    write_image(&image, size)?;
    let root = dir.join(format!("chain-{depth}"));
    let store = LayeredStore::open(&root).map_err(e2s)?;
    let base = store.create_base(size, Some(&image)).map_err(e2s)?;
    let d = store.clone_disk(base).map_err(e2s)?;
    // Each level owns one chunk in the last MiB; the reads below avoid it, so
    // every read falls through all `depth` layers to the base.
    for i in 0..depth - 1 {
        d.write((size - (1 << 20)) / 512 + i as u64 * 8, &[i as u8; BLOCK]).map_err(e2s)?;
        d.snapshot().map_err(e2s)?;
    }
    assert_eq!(store.chain(d.layer()).map_err(e2s)?.len(), depth + 1);
    warm(&root.join(format!("layers/L{base}.data")))?;
    let blocks = (size - (1 << 20)) / BLOCK as u64;
    let mut rng = Lcg(depth as u64);
    let mut buf = vec![0u8; BLOCK];
    let mut lat = Vec::with_capacity(reads);
    for _ in 0..reads {
        let b = rng.next() % blocks;
        let t = Instant::now();
        d.read(b * 8, &mut buf).map_err(e2s)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(d);
    drop(store);
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_file(&image);
    Ok(ChainLatency { depth, read_4k: Summary::of("us", &lat).ok_or("no samples")? })
}

pub fn run(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "--virtio") {
        return crate::diskvirtio::run(args);
    }
    let runs: usize = flag(args, "--runs")?.unwrap_or(30);
    let mib: u64 = flag(args, "--mib")?.unwrap_or(256);
    let parent: PathBuf = flag::<String>(args, "--dir")?
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    if runs == 0 || mib == 0 {
        return Err("--runs and --mib must be positive".into());
    }
    let load_before = loadavg();
    let scratch = Scratch::new(&parent)?;
    let dir = &scratch.0;
    let fsync = fdatasync_latency(dir, runs)?;
    let dmthin = args.iter().any(|a| a == "--dmthin");
    let sizes = [1, 20];
    let mut snapshot_clone_v = Vec::new();
    for gib in sizes {
        snapshot_clone_v.push(snapshot_clone(dir, gib, runs)?);
    }
    let (mut throughput_v, mut chain_v, mut dmthin_v) = (Vec::new(), Vec::new(), None);
    if dmthin {
        dmthin_v = Some(dmthin_snapshot_clone(dir, &sizes, runs)?);
    } else {
        throughput_v = throughput(dir, mib << 20, runs.clamp(1, 7))?;
        for depth in [1, 10, 50] {
            chain_v.push(chain_latency(dir, depth, 20_000)?);
        }
    }
    let report = Report {
        conditions: Conditions {
            dir: parent.display().to_string(),
            filesystem: fs_type(&parent),
            kernel: kernel(),
            cpus: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            chunk_size: grove_storage::block::layered::DEFAULT_CHUNK,
            working_set_mib: mib,
            runs,
            io: "buffered (page cache), one thread, flush at the end of each pass",
            fdatasync_4k: fsync,
            loadavg_before: load_before,
            loadavg_after: loadavg(),
        },
        snapshot_clone: snapshot_clone_v,
        dmthin_snapshot_clone: dmthin_v,
        throughput_depth1: throughput_v,
        chain_read_latency: chain_v,
    };
    if wants_json(args) {
        println!("{}", serde_json::to_string_pretty(&report).map_err(e2s)?);
        return Ok(());
    }
    let c = &report.conditions;
    println!(
        "grove-bench disk: {} ({}), kernel {}, {} cpus, chunk {} B, working set {} MiB, {}",
        c.dir, c.filesystem, c.kernel, c.cpus, c.chunk_size, c.working_set_mib, c.io
    );
    println!("  fdatasync 4 KiB here:              {}", c.fdatasync_4k);
    println!("  loadavg before / after:            {} / {}", c.loadavg_before, c.loadavg_after);
    for s in &report.snapshot_clone {
        println!("  {:>2} GiB sparse  snapshot:          {}", s.disk_gib, s.snapshot);
        println!("  {:>2} GiB sparse  clone:             {}", s.disk_gib, s.clone);
        println!("  {:>2} GiB sparse  snapshot no spare: {}", s.disk_gib, s.snapshot_no_spare);
        println!("  {:>2} GiB sparse  clone no spare:    {}", s.disk_gib, s.clone_no_spare);
    }
    for s in report.dmthin_snapshot_clone.iter().flatten() {
        println!("  {:>2} GiB dm-thin snapshot:          {}", s.disk_gib, s.snapshot);
        println!("  {:>2} GiB dm-thin clone:             {}", s.disk_gib, s.clone);
    }
    for t in &report.throughput_depth1 {
        println!(
            "  {:<14} raw {:>8.1} MiB/s  depth-1 {:>8.1} MiB/s  ratio {:.2}",
            t.pattern, t.raw.median, t.layered.median, t.ratio
        );
    }
    for l in &report.chain_read_latency {
        println!("  chain depth {:>2}  4 KiB read: {}", l.depth, l.read_4k);
    }
    Ok(())
}
