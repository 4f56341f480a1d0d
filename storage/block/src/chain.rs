//! A disk as a chain of layer files.
//!
//! A chain is an optional writable **top** layer over **frozen** layers over a **base**:
//! - a base is a raw image (any file); it owns every chunk, and reads past its end are
//!   zeroes;
//! - a layer is a sparse data file at the disk's own offsets plus its chunk [`index`]
//!   (`GRVBLIDX`): the chunks it owns.
//!
//! Reads fall through the chain chunk by chunk to the nearest owner (top, then the frozen
//! layers, then the base), coalescing runs with the same owner into one `preadv`; chunks
//! nobody owns read as zeroes. A first write to a chunk copies it up: whole chunks are just
//! written; a partial one is merged with the chunk's contents from below. Chunk size is per
//! layer file (default 4 KiB: an aligned 4 KiB guest write never reads before writing).
//!
//! Durability: [`Writable::flush`] fdatasyncs the data file, then commits the index; a bit
//! is set only once its chunk's data write completed, so a committed index never names a
//! chunk whose data is not on disk.
//!
//! Freezing: [`ChainDisk::switch_top`] flushes the top and continues on a new one, under the
//! chain's write lock (requests in flight finish first, new ones wait for the switch). Who
//! names the new layer is the caller's business: grove-storage's layered store records it in
//! its catalog; the VMM moves the frozen files into a snapshot directory.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use crate::file::{copy_range, punch_hole, sync_dir, write_full};
use crate::index::{self, Bitmap, Header, IndexError, IndexFile};
use crate::iov::{read_only_slice, Bufs};
use crate::{check_range, check_sectors, BlockError, BlockIo, LayerId};

/// Default chunk size.
pub const DEFAULT_CHUNK: u32 = 4096;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An index error as a [`BlockError`] naming the layer and the file (plain I/O errors stay
/// I/O errors, so ENOSPC is still [`BlockError::NoSpace`]).
pub fn index_err(id: LayerId, path: &Path, source: IndexError) -> BlockError {
    if let IndexError::Io(e) = source {
        return BlockError::io("read index", e);
    }
    BlockError::Index { layer: id, path: path.display().to_string(), source }
}

fn open_ro(path: &Path) -> Result<File, BlockError> {
    File::open(path).map_err(|e| BlockError::io("open layer", e))
}

fn open_rw(path: &Path) -> Result<File, BlockError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| BlockError::io("open layer", e))
}

fn create_new(path: &Path) -> Result<File, BlockError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| BlockError::io("create layer", e))
}

/// A frozen layer (or the base), shared by every disk whose chain contains it.
#[derive(Debug)]
pub struct Frozen {
    data: Arc<File>,
    /// `None` for the base, which owns every chunk.
    bitmap: Option<Arc<Bitmap>>,
}

impl Frozen {
    /// A base image: owns every chunk.
    pub fn base(data: File) -> Self {
        Self { data: Arc::new(data), bitmap: None }
    }

    /// Opens a base image read-only.
    pub fn open_base(path: &Path) -> Result<Self, BlockError> {
        Ok(Self::base(open_ro(path)?))
    }

    /// Opens a frozen layer read-only: its index is read and checked (header, slots,
    /// checksums, that it is layer `id`). Returns the layer and the index header (disk size,
    /// chunk size), which the caller checks against the chain.
    pub fn open(data: &Path, idx: &Path, id: LayerId) -> Result<(Self, Header), BlockError> {
        let d = open_ro(data)?;
        let f = File::open(idx).map_err(|e| BlockError::io("open index", e))?;
        let (i, bm, _) = IndexFile::open(f, id).map_err(|e| index_err(id, idx, e))?;
        Ok((Self { data: Arc::new(d), bitmap: Some(Arc::new(bm)) }, *i.header()))
    }

    /// Whether the layer owns chunk `c`.
    pub fn owns(&self, c: u64) -> bool {
        self.bitmap.as_ref().is_none_or(|b| b.get(c))
    }

    /// Whether this is a base image (owns every chunk).
    pub fn is_base(&self) -> bool {
        self.bitmap.is_none()
    }

    /// The data file.
    pub fn data(&self) -> &File {
        &self.data
    }
}

/// Pages of the bitmap changed since each index slot was last written.
#[derive(Debug)]
struct Dirty {
    pages: [Vec<bool>; 2],
    changes: u64,
}

impl Dirty {
    fn mark(&mut self, chunk: u64) {
        let page = usize::try_from(chunk / 64 * 8 / index::PAGE).unwrap_or(0);
        for p in &mut self.pages {
            if let Some(d) = p.get_mut(page) {
                *d = true;
            }
        }
        self.changes += 1;
    }
}

/// The writable top layer of a disk.
#[derive(Debug)]
pub struct Writable {
    id: LayerId,
    header: Header,
    data: Arc<File>,
    bitmap: Arc<Bitmap>,
    /// Serialises copy-ups and guards the dirty-page sets.
    copy: Mutex<Dirty>,
    /// Serialises flushes; (index file, changes at the last commit).
    index: Mutex<(IndexFile, u64)>,
    /// Data writes started, and the count at the last data fdatasync.
    writes: AtomicU64,
    synced: AtomicU64,
}

impl Writable {
    /// Creates the data and index files of a new, empty layer `id` of `size` bytes in
    /// `chunk`-byte chunks: both fsynced, their directories too. Fails if either exists.
    pub fn create_files(
        data: &Path,
        idx: &Path,
        id: LayerId,
        size: u64,
        chunk: u32,
    ) -> Result<(File, File), BlockError> {
        let h = Header::new(id, size, chunk).map_err(|e| index_err(id, idx, e))?;
        let d = create_new(data)?;
        d.set_len(size).map_err(|e| BlockError::io("size layer", e))?;
        let i = create_new(idx)?;
        index::create(&i, &h).map_err(|e| index_err(id, idx, e))?;
        d.sync_all().map_err(|e| BlockError::io("fsync layer", e))?;
        i.sync_all().map_err(|e| BlockError::io("fsync index", e))?;
        for dir in [data.parent(), idx.parent()].into_iter().flatten() {
            let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
            sync_dir(dir)?;
        }
        Ok((d, i))
    }

    /// Creates a new, empty layer ([`create_files`](Self::create_files)) and opens it.
    pub fn create(
        data: &Path,
        idx: &Path,
        id: LayerId,
        size: u64,
        chunk: u32,
    ) -> Result<Self, BlockError> {
        let (d, i) = Self::create_files(data, idx, id, size, chunk)?;
        let h = Header::new(id, size, chunk).map_err(|e| index_err(id, idx, e))?;
        Self::from_fresh(d, i, &h, idx)
    }

    /// Opens an existing layer for writing: its index is read and checked.
    pub fn open(data: &Path, idx: &Path, id: LayerId) -> Result<Self, BlockError> {
        let (d, i) = (open_rw(data)?, open_rw(idx)?);
        let (i, bm, dirty_target) = IndexFile::open(i, id).map_err(|e| index_err(id, idx, e))?;
        Ok(Self::assemble(id, d, i, bm, dirty_target))
    }

    /// Opens a layer known to be as [`create_files`](Self::create_files) left it (a new
    /// layer or a spare: never written before): checks the header against `expect`, skips
    /// reading the empty bitmaps. O(1) in the disk size.
    pub fn open_fresh(data: &Path, idx: &Path, expect: &Header) -> Result<Self, BlockError> {
        Self::from_fresh(open_rw(data)?, open_rw(idx)?, expect, idx)
    }

    fn from_fresh(d: File, i: File, expect: &Header, path: &Path) -> Result<Self, BlockError> {
        let (i, bm, dirty_target) =
            IndexFile::open_fresh(i, expect).map_err(|e| index_err(expect.layer, path, e))?;
        Ok(Self::assemble(expect.layer, d, i, bm, dirty_target))
    }

    fn assemble(id: LayerId, d: File, i: IndexFile, bm: Bitmap, dirty_target: Vec<bool>) -> Self {
        let mut pages = [vec![false; dirty_target.len()], vec![false; dirty_target.len()]];
        let header = *i.header();
        pages[i.target()] = dirty_target;
        Self {
            id,
            header,
            data: Arc::new(d),
            bitmap: Arc::new(bm),
            copy: Mutex::new(Dirty { pages, changes: 0 }),
            index: Mutex::new((i, 0)),
            writes: AtomicU64::new(0),
            synced: AtomicU64::new(0),
        }
    }

    /// The layer id (in the index header).
    pub fn id(&self) -> LayerId {
        self.id
    }

    /// The index header (disk size, chunk size).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The data file.
    pub fn data(&self) -> &File {
        &self.data
    }

    /// Chunks this layer owns.
    pub fn owned_chunks(&self) -> u64 {
        self.bitmap.count()
    }

    /// Whether anything was written to it since it was opened.
    pub fn written(&self) -> bool {
        self.writes.load(Ordering::Acquire) > 0
    }

    /// The same files and bitmap, as a frozen layer (after the layer stopped being written).
    pub fn to_frozen(&self) -> Frozen {
        Frozen { data: self.data.clone(), bitmap: Some(self.bitmap.clone()) }
    }

    fn sync_data(&self) -> Result<(), BlockError> {
        let w = self.writes.load(Ordering::Acquire);
        if w != self.synced.load(Ordering::Acquire) {
            self.data.sync_data().map_err(|e| BlockError::io("fdatasync layer", e))?;
            self.synced.store(w, Ordering::Release);
        }
        Ok(())
    }

    /// Makes every completed write durable: data first (fdatasync, skipped if nothing was
    /// written since the last one), then the index commit (only chunks whose data write
    /// completed before the bitmap snapshot are in it, and the data fdatasync comes after
    /// that snapshot).
    pub fn flush(&self) -> Result<(), BlockError> {
        let mut idx = lock(&self.index);
        let target = idx.0.target();
        let (page_data, pages, changes) = {
            let mut d = lock(&self.copy);
            if d.changes == idx.1 {
                drop(d);
                return self.sync_data();
            }
            let pages: Vec<u64> = d.pages[target]
                .iter()
                .enumerate()
                .filter(|(_, &dirty)| dirty)
                .map(|(i, _)| i as u64)
                .collect();
            d.pages[target].fill(false);
            // Only the changed pages are copied (under the lock, so consistent).
            let data: Vec<(u64, Vec<u8>)> =
                pages.iter().map(|&p| (p, self.bitmap.page_bytes(p))).collect();
            (data, pages, d.changes)
        };
        let restore = |pages: &[u64]| {
            let mut d = lock(&self.copy);
            for &p in pages {
                if let Some(x) = usize::try_from(p).ok().and_then(|p| d.pages[target].get_mut(p)) {
                    *x = true;
                }
            }
        };
        if let Err(e) = self.sync_data() {
            restore(&pages);
            return Err(e);
        }
        if let Err(e) = idx.0.commit(&page_data) {
            restore(&pages);
            return Err(match e {
                IndexError::Io(e) => BlockError::io("commit index", e),
                other => BlockError::Index { layer: self.id, path: String::new(), source: other },
            });
        }
        idx.1 = changes;
        Ok(())
    }

    /// Copies every chunk owned by one of `upper` (nearest first) into this layer (with
    /// `copy_file_range`, a reflink on xfs/btrfs), marks them owned and flushes: the layer
    /// then reads like `upper` over their common base. Used to flatten a chain.
    pub fn absorb(&self, upper: &[Arc<Frozen>]) -> Result<(), BlockError> {
        let chunk = u64::from(self.header.chunk_size);
        let size = self.header.disk_size;
        let chunks = self.bitmap.chunks();
        let mut c = 0;
        while c < chunks {
            let Some(owner) = upper.iter().position(|l| l.owns(c)) else {
                c += 1;
                continue;
            };
            let mut end = c + 1;
            while end < chunks && upper.iter().position(|l| l.owns(end)) == Some(owner) {
                end += 1;
            }
            let off = c * chunk;
            let len = (end * chunk).min(size) - off;
            copy_range(&upper[owner].data, &self.data, off, len)?;
            let mut dirty = lock(&self.copy);
            for k in c..end {
                self.bitmap.set(k);
                dirty.mark(k);
            }
            c = end;
        }
        self.writes.fetch_add(1, Ordering::AcqRel);
        self.flush()
    }
}

struct Chain {
    top: Option<Arc<Writable>>,
    /// Frozen layers, nearest first; the last one is the root.
    below: Vec<Arc<Frozen>>,
}

enum Owner {
    Top,
    Below(usize),
    Zero,
}

fn same(a: &Owner, b: &Owner) -> bool {
    match (a, b) {
        (Owner::Top, Owner::Top) | (Owner::Zero, Owner::Zero) => true,
        (Owner::Below(x), Owner::Below(y)) => x == y,
        _ => false,
    }
}

impl Chain {
    fn owner(&self, c: u64, skip_top: bool) -> Owner {
        if !skip_top && self.top.as_ref().is_some_and(|t| t.bitmap.get(c)) {
            return Owner::Top;
        }
        match self.below.iter().position(|l| l.owns(c)) {
            Some(i) => Owner::Below(i),
            None => Owner::Zero,
        }
    }

    fn file(&self, o: &Owner) -> Option<&File> {
        match o {
            Owner::Top => self.top.as_deref().map(|t| &*t.data),
            Owner::Below(i) => Some(&self.below[*i].data),
            Owner::Zero => None,
        }
    }

    /// Reads disk bytes `off..off + (hi - lo)` into request bytes `lo..hi` through the chain
    /// (or only below the top).
    fn read_at<B: BitmapSlice>(
        &self,
        bufs: Bufs<'_, '_, B>,
        lo: u64,
        hi: u64,
        off: u64,
        chunk: u64,
        skip_top: bool,
    ) -> Result<(), BlockError> {
        let end = off + (hi - lo);
        let mut pos = off;
        while pos < end {
            let c = pos / chunk;
            let owner = self.owner(c, skip_top);
            let mut run_end = ((c + 1) * chunk).min(end);
            while run_end < end {
                let nc = run_end / chunk;
                if !same(&self.owner(nc, skip_top), &owner) {
                    break;
                }
                run_end = ((nc + 1) * chunk).min(end);
            }
            let (a, b) = (lo + (pos - off), lo + (run_end - off));
            match self.file(&owner) {
                Some(f) => bufs.read_from(f, pos, a, b),
                None => bufs.zero(a, b),
            }
            .map_err(|e| BlockError::io("read layer", e))?;
            pos = run_end;
        }
        Ok(())
    }
}

/// A disk over a chain of layer files: writable when it has a top layer, read-only
/// otherwise.
pub struct ChainDisk {
    size: u64,
    chunk: u64,
    chain: RwLock<Chain>,
}

impl std::fmt::Debug for ChainDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainDisk")
            .field("size", &self.size)
            .field("top", &self.top_id())
            .finish_non_exhaustive()
    }
}

impl ChainDisk {
    /// A disk of `size` bytes in `chunk`-byte chunks over `below` (frozen layers, nearest
    /// first, the root last), writing into `top` if given. The caller has checked that the
    /// layers' headers agree on size and chunk size.
    pub fn new(size: u64, chunk: u32, top: Option<Writable>, below: Vec<Arc<Frozen>>) -> Self {
        Self {
            size,
            chunk: u64::from(chunk),
            chain: RwLock::new(Chain { top: top.map(Arc::new), below }),
        }
    }

    fn chain(&self) -> std::sync::RwLockReadGuard<'_, Chain> {
        self.chain.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The writable top layer's id (`None` for a read-only disk).
    pub fn top_id(&self) -> Option<LayerId> {
        self.chain().top.as_ref().map(|t| t.id)
    }

    /// Chunks the writable top owns (0 for a read-only disk).
    pub fn top_owned_chunks(&self) -> u64 {
        self.chain().top.as_ref().map_or(0, |t| t.owned_chunks())
    }

    /// Whether the top was written since it was opened or created.
    pub fn top_written(&self) -> bool {
        self.chain().top.as_ref().is_some_and(|t| t.written())
    }

    /// Whether the disk has a writable layer.
    pub fn is_writable(&self) -> bool {
        self.chain().top.is_some()
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// Number of frozen layers (the base included).
    pub fn depth(&self) -> usize {
        self.chain().below.len()
    }

    /// Freezes the top and continues on a new one: under the chain's write lock (requests
    /// in flight finish first; new ones wait), `next` gets the old top (flush it, name the
    /// new layer, make it) and returns the new top; the old one joins the frozen layers.
    /// Returns the old top's id and its frozen form. On error nothing changes.
    pub fn switch_top<E: From<BlockError>>(
        &self,
        next: impl FnOnce(&Writable) -> Result<Writable, E>,
    ) -> Result<(LayerId, Arc<Frozen>), E> {
        let mut chain = self.chain.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = chain.top.clone().ok_or(BlockError::ReadOnly)?;
        let new = next(&old)?;
        let frozen = Arc::new(old.to_frozen());
        chain.below.insert(0, frozen.clone());
        chain.top = Some(Arc::new(new));
        Ok((old.id, frozen))
    }

    fn top<'c>(&self, chain: &'c Chain) -> Result<&'c Writable, BlockError> {
        chain.top.as_deref().ok_or(BlockError::ReadOnly)
    }

    /// Writes request bytes `0..len` at disk byte `off`.
    fn write_bytes<B: BitmapSlice>(
        &self,
        chain: &Chain,
        bufs: Bufs<'_, '_, B>,
        off: u64,
    ) -> Result<(), BlockError> {
        let chunk = self.chunk;
        let top = self.top(chain)?;
        let end = off + bufs.len();
        let mut pos = off;
        while pos < end {
            let c = pos / chunk;
            let owned = top.bitmap.get(c);
            let mut run_end = ((c + 1) * chunk).min(end);
            while run_end < end && top.bitmap.get(run_end / chunk) == owned {
                run_end = ((run_end / chunk + 1) * chunk).min(end);
            }
            if owned {
                bufs.write_to(&top.data, pos, pos - off, run_end - off)
                    .map_err(|e| BlockError::io("write layer", e))?;
            } else {
                self.copy_up_write(chain, top, bufs, off, pos, run_end)?;
            }
            pos = run_end;
        }
        Ok(())
    }

    /// First write to disk bytes `from..to` (chunks the top did not own, as seen without the
    /// lock): under the copy-up lock, writes chunks that became owned and whole chunks
    /// directly, merges partial chunks with their contents from below, then marks them owned.
    /// `off` is the disk offset of request byte 0.
    #[allow(clippy::too_many_arguments)]
    fn copy_up_write<B: BitmapSlice>(
        &self,
        chain: &Chain,
        top: &Writable,
        bufs: Bufs<'_, '_, B>,
        off: u64,
        from: u64,
        to: u64,
    ) -> Result<(), BlockError> {
        let chunk = self.chunk;
        let mut dirty = lock(&top.copy);
        let write = |a: u64, b: u64| {
            bufs.write_to(&top.data, a, a - off, b - off)
                .map_err(|e| BlockError::io("write layer", e))
        };
        let mut p = from;
        while p < to {
            let c = p / chunk;
            let cstart = c * chunk;
            let cend = ((c + 1) * chunk).min(self.size);
            let piece_end = cend.min(to);
            if top.bitmap.get(c) || (p == cstart && piece_end == cend) {
                // Owned meanwhile, or a whole chunk: written as it is.
                write(p, piece_end)?;
            } else {
                // A partial first write: merge with the chunk's contents from below.
                let mut merged = vec![0u8; usize::try_from(cend - cstart).expect("chunk")];
                {
                    let m = [VolatileSlice::from(&mut merged[..])];
                    let m = Bufs::new(&m);
                    chain.read_at(m, 0, p - cstart, cstart, chunk, true)?;
                    chain.read_at(m, piece_end - cstart, cend - cstart, piece_end, chunk, true)?;
                }
                let (h, t) = (
                    usize::try_from(p - cstart).expect("in chunk"),
                    usize::try_from(piece_end - cstart).expect("in chunk"),
                );
                bufs.copy_out(p - off, &mut merged[h..t])
                    .map_err(|e| BlockError::io("copy request", e))?;
                write_full(&top.data, &merged, cstart)?;
            }
            if top.bitmap.set(c) {
                dirty.mark(c);
            }
            p = piece_end;
        }
        Ok(())
    }

    fn zero_range(&self, sector: u64, sectors: u64) -> Result<(), BlockError> {
        let (off, len) = check_sectors(sector, sectors, self.size)?;
        let chain = self.chain();
        let top = self.top(&chain)?;
        let chunk = self.chunk;
        let end = off + len;
        let first_full = off.div_ceil(chunk) * chunk;
        let last_full = (end / chunk) * chunk;
        let zeros = vec![0u8; 1 << 20];
        let zero_write = |from: u64, to: u64| -> Result<(), BlockError> {
            let mut p = from;
            while p < to {
                let n = usize::try_from((to - p).min(1 << 20)).expect("1 MiB");
                let z = [read_only_slice(&zeros[..n])];
                self.write_bytes(&chain, Bufs::new(&z), p)?;
                p += n as u64;
            }
            Ok(())
        };
        let r = if first_full >= last_full {
            zero_write(off, end)
        } else {
            zero_write(off, first_full)
                .and_then(|()| {
                    let mut dirty = lock(&top.copy);
                    if !punch_hole(&top.data, first_full, last_full - first_full)? {
                        drop(dirty);
                        zero_write(first_full, last_full)?;
                        dirty = lock(&top.copy);
                    }
                    for k in first_full / chunk..last_full / chunk {
                        if top.bitmap.set(k) {
                            dirty.mark(k);
                        }
                    }
                    Ok(())
                })
                .and_then(|()| zero_write(last_full, end))
        };
        top.writes.fetch_add(1, Ordering::AcqRel);
        r
    }
}

impl BlockIo for ChainDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_vectored<B: BitmapSlice>(
        &self,
        sector: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> Result<(), BlockError> {
        let bufs = Bufs::new(bufs);
        let off = check_range(sector, bufs.len(), self.size)?;
        self.chain().read_at(bufs, 0, bufs.len(), off, self.chunk, false)
    }

    fn write_vectored<B: BitmapSlice>(
        &self,
        sector: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> Result<(), BlockError> {
        let bufs = Bufs::new(bufs);
        let off = check_range(sector, bufs.len(), self.size)?;
        let chain = self.chain();
        let top = self.top(&chain)?;
        let r = self.write_bytes(&chain, bufs, off);
        // Counted once complete (even partly failed), so the next flush syncs it.
        top.writes.fetch_add(1, Ordering::AcqRel);
        r
    }

    fn flush(&self) -> Result<(), BlockError> {
        match &self.chain().top {
            Some(t) => t.flush(),
            None => Ok(()),
        }
    }

    fn discard(&self, sector: u64, sectors: u64) -> Result<(), BlockError> {
        self.zero_range(sector, sectors)
    }

    fn write_zeroes(&self, sector: u64, sectors: u64) -> Result<(), BlockError> {
        self.zero_range(sector, sectors)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8)).collect()
    }

    fn read(d: &ChainDisk, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        d.read(off / 512, &mut b).unwrap();
        b
    }

    /// A base image with `pattern(1)` over its first MiB, then zeroes, 4 MiB in all.
    fn base(dir: &Path) -> std::path::PathBuf {
        let p = dir.join("base.img");
        let f = File::create(&p).unwrap();
        f.write_all_at(&pattern(1, MIB as usize), 0).unwrap();
        f.set_len(4 * MIB).unwrap();
        p
    }

    #[test]
    fn a_chain_reads_through_and_writes_copy_up() {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(Frozen::open_base(&base(dir.path())).unwrap());
        let (dp, ip) = (dir.path().join("t.data"), dir.path().join("t.idx"));
        let top = Writable::create(&dp, &ip, 5, 4 * MIB, 4096).unwrap();
        let d = ChainDisk::new(4 * MIB, 4096, Some(top), vec![b.clone()]);
        assert_eq!(read(&d, 0, 8192), pattern(1, 8192));
        // A partial first write (sectors 3..5 of chunk 0) keeps the rest of the chunk.
        d.write(3, &[9; 1024]).unwrap();
        let mut expect = pattern(1, 8192);
        expect[1536..2560].fill(9);
        assert_eq!(read(&d, 0, 8192), expect);
        // A write across three chunks, partial at both ends.
        d.write(14, &pattern(2, 17 * 512)).unwrap();
        expect = pattern(1, 16384);
        expect[1536..2560].fill(9);
        expect[14 * 512..31 * 512].copy_from_slice(&pattern(2, 17 * 512));
        assert_eq!(read(&d, 0, 16384), expect);
        assert_eq!(d.top_owned_chunks(), 4);
        d.flush().unwrap();
        // Reopened from its files over the same base: the same contents.
        let top = Writable::open(&dp, &ip, 5).unwrap();
        assert_eq!(top.owned_chunks(), 4);
        let d2 = ChainDisk::new(4 * MIB, 4096, Some(top), vec![b.clone()]);
        assert_eq!(read(&d2, 0, 16384), expect);
        // Read-only over the frozen layer: the same again, and writes are refused.
        drop(d2);
        let (f, h) = Frozen::open(&dp, &ip, 5).unwrap();
        assert_eq!((h.disk_size, h.chunk_size), (4 * MIB, 4096));
        let ro = ChainDisk::new(4 * MIB, 4096, None, vec![Arc::new(f), b]);
        assert_eq!(read(&ro, 0, 16384), expect);
        assert!(matches!(ro.write(0, &[0; 512]), Err(BlockError::ReadOnly)));
        assert!(matches!(ro.write_zeroes(0, 1), Err(BlockError::ReadOnly)));
        ro.flush().unwrap();
        assert!(Frozen::open(&dp, &ip, 6).is_err(), "another layer id is refused");
    }

    #[test]
    fn switch_top_freezes_and_continues() {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(Frozen::open_base(&base(dir.path())).unwrap());
        let path = |n: &str| dir.path().join(n);
        let top = Writable::create(&path("a.data"), &path("a.idx"), 1, 4 * MIB, 4096).unwrap();
        let d = ChainDisk::new(4 * MIB, 4096, Some(top), vec![b]);
        d.write(0, &[7; 4096]).unwrap();
        let (old, frozen) = d
            .switch_top(|old| -> Result<Writable, BlockError> {
                old.flush()?;
                Writable::create(&path("b.data"), &path("b.idx"), 2, 4 * MIB, 4096)
            })
            .unwrap();
        assert_eq!((old, d.top_id(), d.depth()), (1, Some(2), 2));
        assert!(frozen.owns(0) && !frozen.owns(1));
        d.write(8, &[8; 4096]).unwrap();
        assert_eq!(read(&d, 0, 8192), [vec![7; 4096], vec![8; 4096]].concat());
        // The frozen layer on disk holds what was written before the switch only.
        let (f, _) = Frozen::open(&path("a.data"), &path("a.idx"), 1).unwrap();
        let b2 = Arc::new(Frozen::open_base(&path("base.img")).unwrap());
        let ro = ChainDisk::new(4 * MIB, 4096, None, vec![Arc::new(f), b2]);
        assert_eq!(read(&ro, 0, 8192), [vec![7; 4096], pattern(1, 8192)[4096..].to_vec()].concat());
        // A failing `next` changes nothing.
        let e = d.switch_top(|_| -> Result<Writable, BlockError> { Err(BlockError::ReadOnly) });
        assert!(e.is_err());
        assert_eq!((d.top_id(), d.depth()), (Some(2), 2));
    }

    #[test]
    fn zeroes_punch_whole_chunks_and_write_partial_ones() {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(Frozen::open_base(&base(dir.path())).unwrap());
        let p = |n: &str| dir.path().join(n);
        let top = Writable::create(&p("t.data"), &p("t.idx"), 3, 4 * MIB, 4096).unwrap();
        let d = ChainDisk::new(4 * MIB, 4096, Some(top), vec![b]);
        d.write_zeroes(3, 40).unwrap();
        let mut expect = pattern(1, 32768);
        expect[3 * 512..43 * 512].fill(0);
        assert_eq!(read(&d, 0, 32768), expect);
        d.discard(100, 2).unwrap();
        expect = read(&d, 0, 65536);
        assert_eq!(&expect[100 * 512..102 * 512], &[0; 1024]);
        assert!(d.write_zeroes(4 * MIB / 512 - 1, 2).is_err(), "past the end");
    }

    #[test]
    fn vectored_requests_match_plain_ones() {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(Frozen::open_base(&base(dir.path())).unwrap());
        let p = |n: &str| dir.path().join(n);
        let top = Writable::create(&p("t.data"), &p("t.idx"), 3, 4 * MIB, 4096).unwrap();
        let d = ChainDisk::new(4 * MIB, 4096, Some(top), vec![b]);
        // Segments of odd sizes (summing to whole sectors) across chunk boundaries.
        let data = pattern(4, 6 * 512);
        let (x, y, z) = (&data[..100], &data[100..2100], &data[2100..]);
        let segs = [read_only_slice(x), read_only_slice(y), read_only_slice(z)];
        d.write_vectored(7, &segs).unwrap();
        assert_eq!(read(&d, 7 * 512, data.len()), data);
        let (mut a, mut bb) = (vec![0u8; 777], vec![0u8; 6 * 512 - 777]);
        let segs = [VolatileSlice::from(&mut a[..]), VolatileSlice::from(&mut bb[..])];
        d.read_vectored(7, &segs).unwrap();
        assert_eq!([a, bb].concat(), data);
        let odd = [read_only_slice(&data[..100])];
        assert!(d.write_vectored(0, &odd).is_err(), "not a whole sector");
    }
}
