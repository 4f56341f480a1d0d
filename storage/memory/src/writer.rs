//! Writing full and diff layers from guest memory.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::format::{self, LayerHeader, LayerKind, Run, HEADER_SIZE};
use super::layer::LayerInfo;
use super::{LayerError, LayerId, MemoryLayout, Region};

/// The memory of one guest region, as the VMM holds it.
///
/// The bytes are read through a vm-memory [`VolatileSlice`]: volatile loads for the zero
/// checks and `pwrite(2)` straight from the mapping for the data, never a Rust reference.
/// So the guest may keep running while a layer is written (a fork's pre-copy): a page it
/// writes meanwhile may be saved torn, and the caller must write it again from the next
/// dirty log (the VMM's fork does, in the diff it takes paused).
#[derive(Debug, Clone, Copy)]
pub struct RegionMemory<'a, B = ()> {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// The region's bytes.
    pub mem: VolatileSlice<'a, B>,
    /// For diff layers: the dirty bitmap of this region, bit `i % 64` of word
    /// `i / 64` set when page `i` of the region was written (KVM_GET_DIRTY_LOG's
    /// layout). Ignored by [`write_full`].
    pub dirty: Option<&'a [u64]>,
}

impl<'a> RegionMemory<'a> {
    /// A region over plain memory the caller holds (a buffer, a paused guest's mapping).
    pub fn from_slice(gpa: u64, mem: &'a [u8], dirty: Option<&'a [u64]>) -> Self {
        // SAFETY: `mem` is live and readable for 'a; the writer only reads through the slice
        // (volatile loads and pwrite(2)), so the const-to-mut cast is never written through.
        let mem = unsafe { VolatileSlice::new(mem.as_ptr().cast_mut(), mem.len()) };
        Self { gpa, mem, dirty }
    }
}

/// How to write a layer.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// fsync the file and its directory before returning (default true). Forks that
    /// only need the page cache may turn it off.
    pub fsync: bool,
    /// The new layer's id (default: random).
    pub id: Option<LayerId>,
    /// Page size (default: the host's).
    pub page_size: Option<u32>,
    /// Full layers: skip, without reading them, the pages that `/proc/self/pagemap`
    /// reports neither present nor swapped (default false). Reading never-touched
    /// memory faults every page in (slow, ~1.4 µs per page in the nested VMs here).
    /// Set it only when every region is private anonymous memory (`MAP_PRIVATE |
    /// MAP_ANONYMOUS`, THP included) that is not registered with a userfaultfd: there,
    /// an unpopulated page reads as zero. Wrong for file-backed, memfd/shmem or
    /// uffd-served memory (a restored guest's), where it would drop data. Ignored
    /// when the layer's page size is not the host's.
    pub skip_unpopulated: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self { fsync: true, id: None, page_size: None, skip_unpopulated: false }
    }
}

/// Host pages read from /proc/self/pagemap per step.
const PAGEMAP_CHUNK: usize = 1 << 16;

/// Pushes (via `push`) the non-zero pages of `mem`, whose first page is memory page
/// `first`, skipping unpopulated pages when `pagemap` is given (see
/// [`WriteOptions::skip_unpopulated`]).
fn scan_full<B: BitmapSlice>(
    mem: &VolatileSlice<'_, B>,
    ps: usize,
    first: u64,
    pagemap: Option<&File>,
    push: &mut dyn FnMut(u64),
) -> Result<(), LayerError> {
    let addr = mem.ptr_guard().as_ptr() as usize;
    let Some(pm) = pagemap.filter(|_| addr.is_multiple_of(ps)) else {
        for i in 0..mem.len() / ps {
            if !page_is_zero(mem, i * ps, ps) {
                push(first + i as u64);
            }
        }
        return Ok(());
    };
    let pages = mem.len() / ps;
    let mut entries = vec![0u8; PAGEMAP_CHUNK * 8];
    let mut i = 0;
    while i < pages {
        let n = (pages - i).min(PAGEMAP_CHUNK);
        let off = ((addr / ps + i) * 8) as u64;
        pm.read_exact_at(&mut entries[..n * 8], off)
            .map_err(|e| LayerError::io("read", "/proc/self/pagemap", e))?;
        for (j, e) in entries[..n * 8].chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(e);
            // Bit 63: present, bit 62: swapped.
            if u64::from_le_bytes(b) >> 62 == 0 {
                continue;
            }
            let p = i + j;
            if !page_is_zero(mem, p * ps, ps) {
                push(first + p as u64);
            }
        }
        i += n;
    }
    Ok(())
}

/// Largest single pwrite.
const MAX_WRITE: usize = 8 << 20;

/// Whether `len` bytes of `mem` from `off` are all zero (volatile loads; the range is inside
/// `mem`, which the callers' page arithmetic guarantees).
fn page_is_zero<B: BitmapSlice>(mem: &VolatileSlice<'_, B>, off: usize, len: usize) -> bool {
    match mem.subslice(off, len) {
        Ok(s) => super::sys::is_zero_volatile(s.ptr_guard().as_ptr(), len),
        // Out of range cannot happen; reporting "not zero" keeps the page.
        Err(_) => false,
    }
}

/// Whether a page is all zeros (vectorises well: OR-folds 64-byte chunks).
pub(crate) fn is_zero(page: &[u8]) -> bool {
    let mut chunks = page.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Writes a full layer: every non-zero page of `regions`.
pub fn write_full<B: BitmapSlice>(
    path: impl AsRef<Path>,
    regions: &[RegionMemory<'_, B>],
    opts: &WriteOptions,
) -> Result<LayerInfo, LayerError> {
    write_layer(path.as_ref(), LayerKind::Full, None, regions, opts)
}

/// Writes a diff layer on top of `parent`: the pages set in each region's dirty bitmap.
pub fn write_diff<B: BitmapSlice>(
    path: impl AsRef<Path>,
    parent: &LayerInfo,
    regions: &[RegionMemory<'_, B>],
    opts: &WriteOptions,
) -> Result<LayerInfo, LayerError> {
    write_layer(path.as_ref(), LayerKind::Diff, Some(parent), regions, opts)
}

fn layout_of<B: BitmapSlice>(
    page_size: u32,
    regions: &[RegionMemory<'_, B>],
) -> Result<MemoryLayout, LayerError> {
    MemoryLayout::new(
        page_size,
        regions.iter().map(|r| Region { gpa: r.gpa, len: r.mem.len() as u64 }).collect(),
    )
    .map_err(|e| LayerError::Input(format!("guest regions: {e}")))
}

/// Removes the temporary file unless disarmed.
struct TmpGuard(Option<PathBuf>);

impl Drop for TmpGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The writer of a temporary layer file `.NAME.tmp-PID-RAND`, if `name` is one.
fn tmp_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, tail) = rest.rsplit_once(".tmp-")?;
    let (pid, rand) = tail.split_once('-')?;
    if rand.is_empty() || !rand.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    pid.parse().ok()
}

/// Removes the temporary layer files (`.NAME.tmp-PID-RAND`) in `dir` that a writer left
/// behind when it was killed: those whose writing process is gone, and this process's own
/// when `own` (after a failed write of ours). A live writer's files are kept. Returns what
/// was removed; a directory that cannot be read has nothing to sweep.
pub fn sweep_stale_tmp(dir: &Path, own: bool) -> Vec<PathBuf> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(tmp_owner) else { continue };
        let gone = if pid == me { own } else { !Path::new(&format!("/proc/{pid}")).exists() };
        let regular = e.file_type().is_ok_and(|t| t.is_file());
        if gone && regular && std::fs::remove_file(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

fn write_layer<B: BitmapSlice>(
    path: &Path,
    kind: LayerKind,
    parent: Option<&LayerInfo>,
    regions: &[RegionMemory<'_, B>],
    opts: &WriteOptions,
) -> Result<LayerInfo, LayerError> {
    let page_size = opts.page_size.unwrap_or_else(super::host_page_size);
    let layout = layout_of(page_size, regions)?;
    if let Some(p) = parent {
        if p.layout != layout {
            return Err(LayerError::Input("regions differ from the parent layer's".into()));
        }
    }
    let ps = page_size as usize;
    let pagemap =
        if opts.skip_unpopulated && kind == LayerKind::Full && page_size == super::host_page_size()
        {
            Some(
                File::open("/proc/self/pagemap")
                    .map_err(|e| LayerError::io("open", "/proc/self/pagemap", e))?,
            )
        } else {
            None
        };
    // Gather runs first (the data offset depends on the run count).
    let mut runs: Vec<Run> = Vec::new();
    let mut first = 0u64;
    for r in regions {
        let pages = r.mem.len() / ps;
        let mut push = |page: u64| match runs.last_mut() {
            Some(run) if run.end() == page => run.count += 1,
            _ => runs.push(Run { start: page, count: 1 }),
        };
        match kind {
            LayerKind::Full => scan_full(&r.mem, ps, first, pagemap.as_ref(), &mut push)?,
            LayerKind::Diff => {
                let bm = r.dirty.ok_or_else(|| {
                    LayerError::Input(format!("region at {:#x} has no dirty bitmap", r.gpa))
                })?;
                if bm.len() < pages.div_ceil(64) {
                    return Err(LayerError::Input(format!(
                        "dirty bitmap of region at {:#x} has {} words, needs {}",
                        r.gpa,
                        bm.len(),
                        pages.div_ceil(64)
                    )));
                }
                for (w, &word) in bm.iter().enumerate().take(pages.div_ceil(64)) {
                    let mut bits = word;
                    while bits != 0 {
                        let b = bits.trailing_zeros() as usize;
                        bits &= bits - 1;
                        let i = w * 64 + b;
                        if i < pages {
                            push(first + i as u64);
                        }
                    }
                }
            }
        }
        first += pages as u64;
    }

    let id = opts.id.unwrap_or_else(LayerId::random);
    let index = format::encode_index(&runs);
    let header = LayerHeader::new(kind, id, parent.map(|p| p.id), layout, &runs, &index)?;

    let out = NewLayer::create(path, header.file_len)?;
    let (file, tmp) = (&out.file, out.tmp.as_path());

    let first_pages = header.layout.region_first_pages();
    // Write the present non-zero pages, one pwrite per contiguous stretch inside a
    // region (zero pages stay holes).
    let mut data_bytes = 0u64;
    // Pending stretch: (region, byte offset in region, length, memory page of start).
    let mut pending: Option<(usize, usize, usize, u64)> = None;
    let mut flush = |p: Option<(usize, usize, usize, u64)>| -> Result<(), LayerError> {
        if let Some((ri, off, len, page)) = p {
            let at = header.page_offset(page);
            let src = regions[ri]
                .mem
                .subslice(off, len)
                .map_err(|_| LayerError::Input("page outside its region".into()))?;
            super::sys::pwrite_all_volatile(file, src.ptr_guard().as_ptr(), len, at)
                .map_err(|e| LayerError::io("write pages", tmp, e))?;
            data_bytes += len as u64;
        }
        Ok(())
    };
    let mut ri = 0usize;
    for run in &runs {
        for page in run.start..run.end() {
            while first_pages.get(ri + 1).is_some_and(|&f| f <= page) {
                ri += 1;
            }
            let off = usize::try_from(page - first_pages[ri])
                .map_err(|_| LayerError::Input("region too large".into()))?
                * ps;
            // Full layers only list non-zero pages already.
            if kind == LayerKind::Diff && page_is_zero(&regions[ri].mem, off, ps) {
                continue;
            }
            match &mut pending {
                Some((pri, poff, plen, _))
                    if *pri == ri && *poff + *plen == off && *plen < MAX_WRITE =>
                {
                    *plen += ps;
                }
                _ => {
                    flush(pending.take())?;
                    pending = Some((ri, off, ps, page));
                }
            }
        }
    }
    flush(pending.take())?;
    out.finish(path, &header, &index, opts.fsync)?;
    Ok(LayerInfo {
        path: path.to_path_buf(),
        id,
        parent: header.parent,
        kind,
        layout: header.layout,
        present_pages: header.present_pages,
        data_bytes,
    })
}

/// A layer file being written under a temporary name in the target's directory;
/// removed on drop unless [`NewLayer::finish`] renamed it into place.
pub(crate) struct NewLayer {
    pub(crate) file: File,
    pub(crate) tmp: PathBuf,
    dir: PathBuf,
    guard: TmpGuard,
}

impl NewLayer {
    /// Creates the temporary file for `path`, sparse, `file_len` bytes long.
    pub(crate) fn create(path: &Path, file_len: u64) -> Result<Self, LayerError> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| LayerError::Input(format!("{} has no file name", path.display())))?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{:x}",
            name.to_string_lossy(),
            std::process::id(),
            LayerId::random().0 as u32
        ));
        let guard = TmpGuard(Some(tmp.clone()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(|e| LayerError::io("create", &tmp, e))?;
        file.set_len(file_len).map_err(|e| LayerError::io("set length", &tmp, e))?;
        Ok(Self { file, tmp, dir: dir.to_path_buf(), guard })
    }

    /// Writes the index and the header, fsyncs if asked, renames into place.
    pub(crate) fn finish(
        mut self,
        path: &Path,
        header: &LayerHeader,
        index: &[u8],
        fsync: bool,
    ) -> Result<(), LayerError> {
        let tmp = &self.tmp;
        self.file
            .write_all_at(index, HEADER_SIZE as u64)
            .map_err(|e| LayerError::io("write index", tmp, e))?;
        self.file
            .write_all_at(&header.encode(), 0)
            .map_err(|e| LayerError::io("write header", tmp, e))?;
        if fsync {
            self.file.sync_all().map_err(|e| LayerError::io("fsync", tmp, e))?;
        }
        std::fs::rename(tmp, path).map_err(|e| LayerError::io("rename", path, e))?;
        self.guard.0 = None;
        if fsync {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| LayerError::io("fsync directory", &self.dir, e))?;
        }
        Ok(())
    }
}

/// Makes a layer written with `fsync: false` durable: fsyncs the file and its
/// directory. Lets a fork write its diff without fsync inside the parent's pause and
/// make it durable after resuming.
pub fn sync_layer(path: impl AsRef<Path>) -> Result<(), LayerError> {
    let path = path.as_ref();
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| LayerError::io("fsync", path, e))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| LayerError::io("fsync directory", dir, e))
}
