//! The default backend: a chain of sparse files.
//!
//! Directory layout under the store root:
//! - `catalog/`: the sled [`Catalog`] (layer records, lineage, refcounts);
//! - `layers/L<id>.data`: a layer's data, a sparse file at the disk's own offsets
//!   (a base layer is a raw image and owns every chunk);
//! - `layers/L<id>.idx`: the chunk index of a non-base layer ([`index`]).
//!
//! Reads fall through the chain: each chunk is read from the nearest layer that
//! owns it (the top writable layer, then the frozen layers below, then the base).
//! A first write to a chunk copies it up: a write that covers whole chunks just
//! writes them; a partial one merges the chunk's contents from below. Chunk size is
//! per store (default 4 KiB: a 4 KiB guest write never reads before writing).
//!
//! Durability: `flush` fdatasyncs the data file, then commits the index; a bit is
//! only set once its chunk's data write completed, so a committed index never
//! names a chunk whose data is not on disk.
//!
//! Reflink: base images are imported with `FICLONE` where the filesystem has it
//! (xfs, btrfs) and copied sparsely otherwise; flatten copies chunk runs with
//! `copy_file_range`, which the kernel turns into a reflink on those filesystems.

pub mod index;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use self::index::{Bitmap, Header, IndexFile};
use super::{check_range, BlockDevice, BlockError, BlockStore, LayerId, Usage, SECTOR_SIZE};
use crate::catalog::{Catalog, LayerKind, LayerRecord, RecoveryReport};

/// Default chunk size.
pub const DEFAULT_CHUNK: u32 = 4096;

macro_rules! failpoint {
    ($name:expr) => {
        fail::fail_point!($name, |_| Err(BlockError::Failpoint($name.to_string())));
    };
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A frozen layer (or the base), shared by every disk whose chain contains it.
#[derive(Debug)]
struct Frozen {
    data: Arc<File>,
    /// `None` for the base, which owns every chunk.
    bitmap: Option<Arc<Bitmap>>,
}

impl Frozen {
    fn owns(&self, c: u64) -> bool {
        self.bitmap.as_ref().is_none_or(|b| b.get(c))
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
struct Writable {
    id: LayerId,
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

struct Chain {
    top: Arc<Writable>,
    /// Frozen layers, nearest first; the last one is the root.
    below: Vec<Arc<Frozen>>,
}

struct Inner {
    /// Spare layers (files ready, record of kind `Spare`) by disk size.
    spares: Mutex<HashMap<u64, Vec<LayerId>>>,
    dir: PathBuf,
    catalog: Arc<Catalog>,
    chunk: u32,
    cache: Mutex<HashMap<LayerId, Weak<Frozen>>>,
}

/// The layered store. Cheap to clone (shared inner state).
#[derive(Clone)]
pub struct LayeredStore {
    inner: Arc<Inner>,
    recovery: RecoveryReport,
}

/// A writable disk of the layered store.
pub struct LayeredDisk {
    store: Arc<Inner>,
    size: u64,
    chain: RwLock<Chain>,
}

fn data_name(id: LayerId) -> String {
    format!("L{id}.data")
}
fn index_name(id: LayerId) -> String {
    format!("L{id}.idx")
}

fn sync_dir(dir: &Path) -> Result<(), BlockError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| BlockError::io("fsync dir", e))
}

/// Reads `buf.len()` bytes at `off`, zero-filling past the end of the file.
fn read_full(f: &File, buf: &mut [u8], off: u64) -> Result<(), BlockError> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BlockError::io("read layer", e)),
        }
    }
    Ok(())
}

fn write_full(f: &File, buf: &[u8], off: u64) -> Result<(), BlockError> {
    f.write_all_at(buf, off).map_err(|e| BlockError::io("write layer", e))
}

fn punch_hole(f: &File, off: u64, len: u64) -> Result<bool, BlockError> {
    let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(BlockError::Invalid("range".into()));
    };
    // SAFETY: fallocate on a valid open fd with plain integer arguments; no memory
    // is passed to the kernel.
    let r = unsafe {
        libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, o, l)
    };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => Ok(false),
        _ => Err(BlockError::io("punch hole", e)),
    }
}

/// Tries a whole-file reflink (`FICLONE`); false where the filesystem cannot.
fn reflink(src: &File, dst: &File) -> bool {
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source fd as its integer argument; both fds are
    // open for the duration of the call and no memory is shared.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    r == 0
}

/// Copies `len` bytes at `off` from `src` to `dst` (same offset) with
/// copy_file_range (a reflink on xfs/btrfs), falling back to read/write.
fn copy_range(src: &File, dst: &File, off: u64, len: u64) -> Result<(), BlockError> {
    let mut done = 0u64;
    while done < len {
        let (Ok(mut so), Ok(mut dof)) = (i64::try_from(off + done), i64::try_from(off + done))
        else {
            return Err(BlockError::Invalid("range".into()));
        };
        let n = usize::try_from(len - done).unwrap_or(usize::MAX).min(1 << 30);
        // SAFETY: both fds are valid; the offset pointers point to live locals
        // that the kernel updates.
        let r = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut so, dst.as_raw_fd(), &mut dof, n, 0)
        };
        if r > 0 {
            done += r.unsigned_abs() as u64;
            continue;
        }
        if r == 0 {
            // Past the end of the source: the rest reads as zeroes (a hole).
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if matches!(
            e.raw_os_error(),
            Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
        ) {
            let mut buf = vec![0u8; 1 << 20];
            while done < len {
                let n = usize::try_from((len - done).min(1 << 20)).unwrap_or(1 << 20);
                read_full(src, &mut buf[..n], off + done)?;
                write_full(dst, &buf[..n], off + done)?;
                done += n as u64;
            }
            return Ok(());
        }
        return Err(BlockError::io("copy_file_range", e));
    }
    Ok(())
}

/// Copies a raw image sparsely (only its data extents).
fn copy_sparse(src: &File, dst: &File) -> Result<(), BlockError> {
    let len = src.metadata().map_err(|e| BlockError::io("stat image", e))?.len();
    let mut pos = 0u64;
    while pos < len {
        let Ok(p) = i64::try_from(pos) else { break };
        // SAFETY: lseek on a valid fd with integer arguments.
        let data = unsafe { libc::lseek(src.as_raw_fd(), p, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no more data
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        let (Ok(d), Ok(h)) = (u64::try_from(data), u64::try_from(hole)) else {
            return Err(BlockError::io("seek image", std::io::Error::last_os_error()));
        };
        let h = h.min(len);
        copy_range(src, dst, d, h - d)?;
        pos = h;
    }
    Ok(())
}

impl Inner {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn open_rw(&self, name: &str) -> Result<File, BlockError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path(name))
            .map_err(|e| BlockError::io("open layer", e))
    }

    fn create_file(&self, name: &str) -> Result<File, BlockError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.path(name))
            .map_err(|e| BlockError::io("create layer", e))
    }

    fn index_err(&self, id: LayerId, source: index::IndexError) -> BlockError {
        if let index::IndexError::Io(e) = source {
            return BlockError::io("read index", e);
        }
        BlockError::Index {
            layer: id,
            path: self.path(&index_name(id)).display().to_string(),
            source,
        }
    }

    /// Creates the data and index files of a new empty layer, fsynced, directory
    /// included. Nothing names them yet.
    fn create_layer_files(&self, id: LayerId, size: u64) -> Result<(File, File), BlockError> {
        let h = Header::new(id, size, self.chunk).map_err(|e| self.index_err(id, e))?;
        let data = self.create_file(&data_name(id))?;
        data.set_len(size).map_err(|e| BlockError::io("size layer", e))?;
        let idx = self.create_file(&index_name(id))?;
        index::create(&idx, &h).map_err(|e| self.index_err(id, e))?;
        data.sync_all().map_err(|e| BlockError::io("fsync layer", e))?;
        idx.sync_all().map_err(|e| BlockError::io("fsync index", e))?;
        sync_dir(&self.dir)?;
        Ok((data, idx))
    }

    /// The id and files of a new empty layer of `size` bytes: a spare if one is
    /// ready (no I/O), else created here (three fsyncs).
    fn new_layer_files(&self, size: u64) -> Result<(LayerId, File, File), BlockError> {
        let spare = lock(&self.spares).get_mut(&size).and_then(Vec::pop);
        if let Some(id) = spare {
            let data = self.open_rw(&data_name(id))?;
            let idx = self.open_rw(&index_name(id))?;
            return Ok((id, data, idx));
        }
        let id = self.catalog.alloc_id()?;
        let (data, idx) = self.create_layer_files(id, size)?;
        Ok((id, data, idx))
    }

    fn remove_files(&self, recs: &[LayerRecord]) -> Result<(), BlockError> {
        let mut first = true;
        for r in recs {
            lock(&self.cache).remove(&r.id);
            if r.kind == LayerKind::Spare {
                if let Some(v) = lock(&self.spares).get_mut(&r.size) {
                    v.retain(|&id| id != r.id);
                }
            }
            for f in &r.files {
                match std::fs::remove_file(self.path(f)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(BlockError::io("unlink layer", e)),
                }
                if first {
                    first = false;
                    failpoint!("layered::delete::mid_unlink");
                }
            }
        }
        if !recs.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// A frozen layer, from the cache or loaded.
    fn frozen(&self, rec: &LayerRecord) -> Result<Arc<Frozen>, BlockError> {
        if let Some(f) = lock(&self.cache).get(&rec.id).and_then(Weak::upgrade) {
            return Ok(f);
        }
        if !rec.frozen {
            return Err(BlockError::WrongState(rec.id, "not frozen"));
        }
        let data = OpenOptions::new()
            .read(true)
            .open(self.path(&data_name(rec.id)))
            .map_err(|e| BlockError::io("open layer", e))?;
        let bitmap = match rec.kind {
            LayerKind::Base => None,
            LayerKind::Disk => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(self.path(&index_name(rec.id)))
                    .map_err(|e| BlockError::io("open index", e))?;
                let (idx, bm, _) =
                    IndexFile::open(f, rec.id).map_err(|e| self.index_err(rec.id, e))?;
                self.check_geometry(rec, idx.header())?;
                Some(Arc::new(bm))
            }
            _ => return Err(BlockError::WrongState(rec.id, "not a disk layer")),
        };
        let f = Arc::new(Frozen { data: Arc::new(data), bitmap });
        lock(&self.cache).insert(rec.id, Arc::downgrade(&f));
        Ok(f)
    }

    fn check_geometry(&self, rec: &LayerRecord, h: &Header) -> Result<(), BlockError> {
        if h.disk_size != rec.size || h.chunk_size != self.chunk {
            return Err(self.index_err(
                rec.id,
                index::IndexError::BadGeometry(format!(
                    "index says {} bytes in {} byte chunks, catalog {} bytes in {}",
                    h.disk_size, h.chunk_size, rec.size, self.chunk
                )),
            ));
        }
        Ok(())
    }

    fn writable(&self, rec: &LayerRecord, data: File, idx: File) -> Result<Writable, BlockError> {
        self.writable_from(rec, data, idx, false)
    }

    /// `fresh`: the index is known to be empty (a new layer or a spare).
    fn writable_from(
        &self,
        rec: &LayerRecord,
        data: File,
        idx: File,
        fresh: bool,
    ) -> Result<Writable, BlockError> {
        let (idx, bm, dirty_target) = if fresh {
            let h =
                Header::new(rec.id, rec.size, self.chunk).map_err(|e| self.index_err(rec.id, e))?;
            IndexFile::open_fresh(idx, &h)
        } else {
            IndexFile::open(idx, rec.id)
        }
        .map_err(|e| self.index_err(rec.id, e))?;
        self.check_geometry(rec, idx.header())?;
        let mut pages = [vec![false; dirty_target.len()], vec![false; dirty_target.len()]];
        pages[idx.target()] = dirty_target;
        Ok(Writable {
            id: rec.id,
            data: Arc::new(data),
            bitmap: Arc::new(bm),
            copy: Mutex::new(Dirty { pages, changes: 0 }),
            index: Mutex::new((idx, 0)),
            writes: AtomicU64::new(0),
            synced: AtomicU64::new(0),
        })
    }

    fn chain_for(&self, parent: LayerId) -> Result<Vec<Arc<Frozen>>, BlockError> {
        self.catalog.chain(parent)?.iter().map(|r| self.frozen(r)).collect()
    }
}

impl LayeredStore {
    /// Opens (or creates) a store at `root` with the default chunk size, running
    /// the recovery pass.
    pub fn open(root: &Path) -> Result<Self, BlockError> {
        Self::open_with_chunk(root, DEFAULT_CHUNK)
    }

    /// Opens a store with a given chunk size (a power of two, 4 KiB ..= 1 MiB; it
    /// must match the one the store was created with).
    pub fn open_with_chunk(root: &Path, chunk: u32) -> Result<Self, BlockError> {
        if !chunk.is_power_of_two() || !(index::MIN_CHUNK..=index::MAX_CHUNK).contains(&chunk) {
            return Err(BlockError::Invalid(format!("chunk size {chunk}")));
        }
        let dir = root.join("layers");
        std::fs::create_dir_all(&dir).map_err(|e| BlockError::io("create store", e))?;
        let catalog = Arc::new(Catalog::open(&root.join("catalog"))?);
        Self::with_catalog(dir, catalog, chunk)
    }

    /// A store whose layer files live in `dir` and whose records live in `catalog`
    /// (shared with the rest of the node). Runs the recovery pass over `dir`.
    pub fn with_catalog(
        dir: PathBuf,
        catalog: Arc<Catalog>,
        chunk: u32,
    ) -> Result<Self, BlockError> {
        std::fs::create_dir_all(&dir).map_err(|e| BlockError::io("create store", e))?;
        let recovery =
            catalog.recover(&dir, &[LayerKind::Base, LayerKind::Disk, LayerKind::Spare])?;
        let mut spares: HashMap<u64, Vec<LayerId>> = HashMap::new();
        for r in catalog.layers()? {
            if r.kind == LayerKind::Spare {
                spares.entry(r.size).or_default().push(r.id);
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                spares: Mutex::new(spares),
                dir,
                catalog,
                chunk,
                cache: Mutex::new(HashMap::new()),
            }),
            recovery,
        })
    }

    /// Makes sure `count` spare layers of `size` bytes are ready, so that the next
    /// snapshots and clones of disks of that size do no file creation or fsync of
    /// their own (their critical path is then the flush of the frozen layer and
    /// one catalog commit). Call it off the critical path (after a snapshot or a
    /// clone, or at startup). Spares survive restarts; [`release`](BlockStore::release)
    /// drops one.
    pub fn prepare_spares(&self, size: u64, count: usize) -> Result<(), BlockError> {
        let inner = &self.inner;
        loop {
            let have = lock(&inner.spares).get(&size).map_or(0, Vec::len);
            if have >= count {
                return Ok(());
            }
            let id = inner.catalog.alloc_id()?;
            inner.create_layer_files(id, size)?;
            let mut rec = LayerRecord::new(id, LayerKind::Spare, None, size);
            rec.files = vec![data_name(id), index_name(id)];
            inner.catalog.insert_layer(&rec)?;
            lock(&inner.spares).entry(size).or_default().push(id);
        }
    }

    /// Spare layers ready for disks of `size` bytes.
    pub fn spares(&self, size: u64) -> usize {
        lock(&self.inner.spares).get(&size).map_or(0, Vec::len)
    }

    /// What the recovery pass at open did.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The catalog holding this store's records.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.inner.catalog
    }

    /// The directory holding the layer files.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.inner.chunk
    }

    fn disk(&self, top: Writable, parent: LayerId, size: u64) -> Result<LayeredDisk, BlockError> {
        let below = self.inner.chain_for(parent)?;
        Ok(LayeredDisk {
            store: self.inner.clone(),
            size,
            chain: RwLock::new(Chain { top: Arc::new(top), below }),
        })
    }
}

impl BlockStore for LayeredStore {
    type Disk = LayeredDisk;

    fn create_base(&self, size: u64, image: Option<&Path>) -> Result<LayerId, BlockError> {
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) || size > index::MAX_DISK {
            return Err(BlockError::Invalid(format!("disk size {size}")));
        }
        let inner = &self.inner;
        let id = inner.catalog.alloc_id()?;
        let data = inner.create_file(&data_name(id))?;
        if let Some(img) = image {
            let src = File::open(img).map_err(|e| BlockError::io("open image", e))?;
            let len = src.metadata().map_err(|e| BlockError::io("stat image", e))?.len();
            if len > size {
                let _ = std::fs::remove_file(inner.path(&data_name(id)));
                return Err(BlockError::Invalid(format!(
                    "image of {len} bytes is larger than the disk ({size})"
                )));
            }
            if !reflink(&src, &data) {
                copy_sparse(&src, &data)?;
            }
        }
        data.set_len(size).map_err(|e| BlockError::io("size base", e))?;
        data.sync_all().map_err(|e| BlockError::io("fsync base", e))?;
        sync_dir(&inner.dir)?;
        let mut rec = LayerRecord::new(id, LayerKind::Base, None, size);
        rec.frozen = true;
        rec.files = vec![data_name(id)];
        inner.catalog.insert_layer(&rec)?;
        Ok(id)
    }

    fn clone_disk(&self, layer: LayerId) -> Result<LayeredDisk, BlockError> {
        let inner = &self.inner;
        let parent = inner.catalog.layer(layer)?;
        if !parent.frozen {
            return Err(BlockError::WrongState(layer, "clone needs a frozen layer"));
        }
        let (id, data, idx) = inner.new_layer_files(parent.size)?;
        failpoint!("layered::clone::after_files");
        let mut rec = LayerRecord::new(id, LayerKind::Disk, Some(layer), parent.size);
        rec.files = vec![data_name(id), index_name(id)];
        inner.catalog.insert_layer(&rec)?;
        failpoint!("layered::clone::after_catalog");
        let top = inner.writable_from(&rec, data, idx, true)?;
        self.disk(top, layer, parent.size)
    }

    fn open_disk(&self, layer: LayerId) -> Result<LayeredDisk, BlockError> {
        let inner = &self.inner;
        let rec = inner.catalog.layer(layer)?;
        if rec.frozen || rec.kind != LayerKind::Disk {
            return Err(BlockError::WrongState(layer, "not a writable disk layer"));
        }
        let parent =
            rec.parent.ok_or(BlockError::WrongState(layer, "writable layer without parent"))?;
        let data = inner.open_rw(&data_name(layer))?;
        let idx = inner.open_rw(&index_name(layer))?;
        let top = inner.writable(&rec, data, idx)?;
        self.disk(top, parent, rec.size)
    }

    fn hold(&self, layer: LayerId) -> Result<(), BlockError> {
        Ok(self.inner.catalog.hold_layer(layer)?)
    }

    fn release(&self, layer: LayerId) -> Result<(), BlockError> {
        let collected = self.inner.catalog.release_layer(layer)?;
        failpoint!("layered::delete::after_catalog");
        self.inner.remove_files(&collected)
    }

    fn flatten(&self, layer: LayerId) -> Result<LayerId, BlockError> {
        let inner = &self.inner;
        let recs = inner.catalog.chain(layer)?;
        if !recs[0].frozen {
            return Err(BlockError::WrongState(layer, "flatten needs a frozen layer"));
        }
        if recs.len() <= 2 {
            return Ok(layer);
        }
        let root = recs.last().expect("non-empty chain").id;
        let chain = inner.chain_for(layer)?;
        let upper = &chain[..chain.len() - 1];
        let size = recs[0].size;
        let id = inner.catalog.alloc_id()?;
        let (data, idx) = inner.create_layer_files(id, size)?;
        let mut rec = LayerRecord::new(id, LayerKind::Disk, Some(root), size);
        rec.files = vec![data_name(id), index_name(id)];
        rec.frozen = true;
        let top = inner.writable(&rec, data, idx)?;
        let chunk = u64::from(inner.chunk);
        let chunks = top.bitmap.chunks();
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
            copy_range(&upper[owner].data, &top.data, off, len)?;
            for k in c..end {
                top.bitmap.set(k);
                lock(&top.copy).mark(k);
            }
            c = end;
        }
        top.writes.fetch_add(1, Ordering::AcqRel);
        flush_writable(&top)?;
        failpoint!("layered::flatten::after_files");
        let collected = inner.catalog.replace_layer(layer, &rec)?;
        failpoint!("layered::flatten::after_catalog");
        inner.remove_files(&collected)?;
        Ok(id)
    }

    fn chain(&self, layer: LayerId) -> Result<Vec<LayerId>, BlockError> {
        Ok(self.inner.catalog.chain(layer)?.iter().map(|r| r.id).collect())
    }

    fn usage(&self) -> Result<Usage, BlockError> {
        use std::os::unix::fs::MetadataExt;
        let mut u = Usage::default();
        for rec in self.inner.catalog.layers()? {
            if !matches!(rec.kind, LayerKind::Base | LayerKind::Disk) {
                continue;
            }
            u.layers += 1;
            for f in &rec.files {
                if let Ok(m) = std::fs::metadata(self.inner.path(f)) {
                    u.used_bytes += m.blocks() * 512;
                }
            }
        }
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        let path = std::ffi::CString::new(self.inner.dir.as_os_str().as_encoded_bytes())
            .map_err(|_| BlockError::Invalid("store path".into()))?;
        // SAFETY: `path` is a NUL-terminated string and `st` points to writable
        // memory of the right type for the duration of the call.
        let r = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
        if r == 0 {
            // SAFETY: statvfs returned 0, so it initialised `st`.
            let st = unsafe { st.assume_init() };
            u.total_bytes = st.f_blocks * st.f_frsize;
        }
        Ok(u)
    }
}

/// Flushes a writable layer: data first, then the index (only chunks whose data
/// write completed before the bitmap snapshot are in it, and the data fdatasync
/// comes after that snapshot).
fn sync_data(top: &Writable) -> Result<(), BlockError> {
    let w = top.writes.load(Ordering::Acquire);
    if w != top.synced.load(Ordering::Acquire) {
        top.data.sync_data().map_err(|e| BlockError::io("fdatasync layer", e))?;
        top.synced.store(w, Ordering::Release);
    }
    Ok(())
}

fn flush_writable(top: &Writable) -> Result<(), BlockError> {
    let mut idx = lock(&top.index);
    let target = idx.0.target();
    let (page_data, pages, changes) = {
        let mut d = lock(&top.copy);
        if d.changes == idx.1 {
            drop(d);
            return sync_data(top);
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
            pages.iter().map(|&p| (p, top.bitmap.page_bytes(p))).collect();
        (data, pages, d.changes)
    };
    let restore = |pages: &[u64]| {
        let mut d = lock(&top.copy);
        for &p in pages {
            if let Some(x) = usize::try_from(p).ok().and_then(|p| d.pages[target].get_mut(p)) {
                *x = true;
            }
        }
    };
    if let Err(e) = sync_data(top) {
        restore(&pages);
        return Err(e);
    }
    if let Err(e) = idx.0.commit(&page_data) {
        restore(&pages);
        return Err(match e {
            index::IndexError::Io(e) => BlockError::io("commit index", e),
            other => BlockError::Index { layer: top.id, path: String::new(), source: other },
        });
    }
    idx.1 = changes;
    Ok(())
}

enum Owner {
    Top,
    Below(usize),
    Zero,
}

impl Chain {
    fn owner(&self, c: u64) -> Owner {
        if self.top.bitmap.get(c) {
            return Owner::Top;
        }
        self.below_owner(c)
    }

    fn below_owner(&self, c: u64) -> Owner {
        match self.below.iter().position(|l| l.owns(c)) {
            Some(i) => Owner::Below(i),
            None => Owner::Zero,
        }
    }

    fn file(&self, o: &Owner) -> Option<&File> {
        match o {
            Owner::Top => Some(&self.top.data),
            Owner::Below(i) => Some(&self.below[*i].data),
            Owner::Zero => None,
        }
    }

    /// Reads `buf` at byte `off` through the chain (or only below the top).
    fn read_at(
        &self,
        buf: &mut [u8],
        off: u64,
        chunk: u64,
        skip_top: bool,
    ) -> Result<(), BlockError> {
        let end = off + buf.len() as u64;
        let mut pos = off;
        while pos < end {
            let c = pos / chunk;
            let owner = if skip_top { self.below_owner(c) } else { self.owner(c) };
            let mut run_end = ((c + 1) * chunk).min(end);
            while run_end < end {
                let nc = run_end / chunk;
                let o = if skip_top { self.below_owner(nc) } else { self.owner(nc) };
                if !same(&o, &owner) {
                    break;
                }
                run_end = ((nc + 1) * chunk).min(end);
            }
            let lo = usize::try_from(pos - off).expect("in buffer");
            let hi = usize::try_from(run_end - off).expect("in buffer");
            match self.file(&owner) {
                Some(f) => read_full(f, &mut buf[lo..hi], pos)?,
                None => buf[lo..hi].fill(0),
            }
            pos = run_end;
        }
        Ok(())
    }
}

fn same(a: &Owner, b: &Owner) -> bool {
    match (a, b) {
        (Owner::Top, Owner::Top) | (Owner::Zero, Owner::Zero) => true,
        (Owner::Below(x), Owner::Below(y)) => x == y,
        _ => false,
    }
}

impl LayeredDisk {
    fn chunk(&self) -> u64 {
        u64::from(self.store.chunk)
    }

    /// Writes `buf` at byte `off`; `zero_full` punches whole unowned-or-owned
    /// chunks instead of writing (for write-zeroes).
    fn write_bytes(&self, chain: &Chain, buf: &[u8], off: u64) -> Result<(), BlockError> {
        let chunk = self.chunk();
        let top = &chain.top;
        let end = off + buf.len() as u64;
        let mut pos = off;
        while pos < end {
            let c = pos / chunk;
            let owned = top.bitmap.get(c);
            let mut run_end = ((c + 1) * chunk).min(end);
            while run_end < end && top.bitmap.get(run_end / chunk) == owned {
                run_end = ((run_end / chunk + 1) * chunk).min(end);
            }
            let piece = &buf[usize::try_from(pos - off).expect("in buffer")
                ..usize::try_from(run_end - off).expect("in buffer")];
            if owned {
                write_full(&top.data, piece, pos)?;
            } else {
                self.copy_up_write(chain, piece, pos)?;
            }
            pos = run_end;
        }
        Ok(())
    }

    /// First write to a run of chunks the top does not own (as seen without the
    /// lock): under the copy-up lock, writes chunks that became owned directly and
    /// merges partial chunks with their contents from below.
    fn copy_up_write(&self, chain: &Chain, piece: &[u8], pos: u64) -> Result<(), BlockError> {
        let chunk = self.chunk();
        let top = &chain.top;
        let mut dirty = lock(&top.copy);
        let end = pos + piece.len() as u64;
        let mut p = pos;
        while p < end {
            let c = p / chunk;
            let owned = top.bitmap.get(c);
            let mut run_end = ((c + 1) * chunk).min(end);
            while run_end < end && top.bitmap.get(run_end / chunk) == owned {
                run_end = ((run_end / chunk + 1) * chunk).min(end);
            }
            let sub = &piece[usize::try_from(p - pos).expect("in piece")
                ..usize::try_from(run_end - pos).expect("in piece")];
            if owned {
                write_full(&top.data, sub, p)?;
            } else {
                let first = p / chunk;
                let last = (run_end - 1) / chunk;
                let cstart = first * chunk;
                let cend = ((last + 1) * chunk).min(self.size);
                if cstart == p && cend == run_end {
                    write_full(&top.data, sub, p)?;
                } else {
                    let mut merged = vec![0u8; usize::try_from(cend - cstart).expect("run")];
                    let head = usize::try_from(p - cstart).expect("head");
                    if head > 0 {
                        chain.read_at(&mut merged[..head], cstart, chunk, true)?;
                    }
                    let tail = usize::try_from(run_end - cstart).expect("tail");
                    if tail < merged.len() {
                        chain.read_at(&mut merged[tail..], run_end, chunk, true)?;
                    }
                    merged[head..tail].copy_from_slice(sub);
                    write_full(&top.data, &merged, cstart)?;
                }
                for k in first..=last {
                    if top.bitmap.set(k) {
                        dirty.mark(k);
                    }
                }
            }
            p = run_end;
        }
        Ok(())
    }

    fn zero_range(&self, sector: u64, sectors: u64) -> Result<(), BlockError> {
        let len = sectors.checked_mul(SECTOR_SIZE).ok_or(BlockError::OutOfRange {
            sector,
            len: u64::MAX,
            size: self.size,
        })?;
        let off = check_range(sector, len, self.size)?;
        let chain = self.chain.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let chunk = self.chunk();
        let end = off + len;
        let first_full = off.div_ceil(chunk) * chunk;
        let last_full = (end / chunk) * chunk;
        let zero_write = |from: u64, to: u64| -> Result<(), BlockError> {
            let mut p = from;
            let zeros = vec![0u8; 1 << 20];
            while p < to {
                let n = (to - p).min(1 << 20);
                self.write_bytes(&chain, &zeros[..usize::try_from(n).expect("1 MiB")], p)?;
                p += n;
            }
            Ok(())
        };
        if first_full >= last_full {
            let r = zero_write(off, end);
            chain.top.writes.fetch_add(1, Ordering::AcqRel);
            return r;
        }
        let r = self.punch_range(&chain, off, end, first_full, last_full, &zero_write);
        chain.top.writes.fetch_add(1, Ordering::AcqRel);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn punch_range(
        &self,
        chain: &Chain,
        off: u64,
        end: u64,
        first_full: u64,
        last_full: u64,
        zero_write: &dyn Fn(u64, u64) -> Result<(), BlockError>,
    ) -> Result<(), BlockError> {
        let chunk = self.chunk();
        zero_write(off, first_full)?;
        {
            let top = &chain.top;
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
        }
        zero_write(last_full, end)
    }
}

impl BlockDevice for LayeredDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let off = check_range(sector, buf.len() as u64, self.size)?;
        let chain = self.chain.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        chain.read_at(buf, off, self.chunk(), false)
    }

    fn write(&self, sector: u64, buf: &[u8]) -> Result<(), BlockError> {
        let off = check_range(sector, buf.len() as u64, self.size)?;
        let chain = self.chain.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let r = self.write_bytes(&chain, buf, off);
        // Counted once complete (even partly failed), so the next flush syncs it.
        chain.top.writes.fetch_add(1, Ordering::AcqRel);
        r
    }

    fn flush(&self) -> Result<(), BlockError> {
        let chain = self.chain.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        flush_writable(&chain.top)
    }

    fn discard(&self, sector: u64, sectors: u64) -> Result<(), BlockError> {
        self.zero_range(sector, sectors)
    }

    fn write_zeroes(&self, sector: u64, sectors: u64) -> Result<(), BlockError> {
        self.zero_range(sector, sectors)
    }

    fn layer(&self) -> LayerId {
        self.chain.read().unwrap_or_else(std::sync::PoisonError::into_inner).top.id
    }

    fn snapshot(&self) -> Result<LayerId, BlockError> {
        let store = &self.store;
        let mut chain = self.chain.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = chain.top.clone();
        flush_writable(&old)?;
        failpoint!("layered::snapshot::after_flush");
        let (id, data, idx) = store.new_layer_files(self.size)?;
        failpoint!("layered::snapshot::after_files");
        let mut rec = LayerRecord::new(id, LayerKind::Disk, Some(old.id), self.size);
        rec.files = vec![data_name(id), index_name(id)];
        store.catalog.freeze_and_push(old.id, None, &rec)?;
        failpoint!("layered::snapshot::after_catalog");
        let top = store.writable_from(&rec, data, idx, true)?;
        let frozen = Arc::new(Frozen { data: old.data.clone(), bitmap: Some(old.bitmap.clone()) });
        lock(&store.cache).insert(old.id, Arc::downgrade(&frozen));
        chain.below.insert(0, frozen);
        chain.top = Arc::new(top);
        Ok(old.id)
    }
}

impl std::fmt::Debug for LayeredDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayeredDisk")
            .field("size", &self.size)
            .field("layer", &self.layer())
            .finish_non_exhaustive()
    }
}
