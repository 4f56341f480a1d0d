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

pub use grove_block::index;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use grove_block::chain::{ChainDisk, Frozen, Writable};
use grove_block::file::{copy_range, sync_dir};
use grove_block::{BitmapSlice, VolatileSlice};

use self::index::Header;
use super::{BlockDevice, BlockError, BlockIo, BlockStore, LayerId, Usage, SECTOR_SIZE};
use crate::catalog::{Catalog, LayerKind, LayerRecord, RecoveryReport};

pub use grove_block::chain::DEFAULT_CHUNK;

macro_rules! failpoint {
    ($name:expr) => {
        fail::fail_point!($name, |_| Err(BlockError::Failpoint($name.to_string())));
    };
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// A writable disk of the layered store: a [`ChainDisk`] whose layers the catalog records.
pub struct LayeredDisk {
    store: Arc<Inner>,
    size: u64,
    disk: ChainDisk,
}

fn data_name(id: LayerId) -> String {
    format!("L{id}.data")
}
fn index_name(id: LayerId) -> String {
    format!("L{id}.idx")
}

/// Tries a whole-file reflink (`FICLONE`); false where the filesystem cannot.
fn reflink(src: &File, dst: &File) -> bool {
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source fd as its integer argument; both fds are
    // open for the duration of the call and no memory is shared.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    r == 0
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

    fn create_file(&self, name: &str) -> Result<File, BlockError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.path(name))
            .map_err(|e| BlockError::io("create layer", e))
    }

    fn index_err(&self, id: LayerId, source: index::IndexError) -> BlockError {
        grove_block::chain::index_err(id, &self.path(&index_name(id)), source)
    }

    /// Creates the data and index files of a new empty layer, fsynced, directory
    /// included. Nothing names them yet.
    fn create_layer_files(&self, id: LayerId, size: u64) -> Result<(), BlockError> {
        Writable::create_files(
            &self.path(&data_name(id)),
            &self.path(&index_name(id)),
            id,
            size,
            self.chunk,
        )
        .map(drop)
    }

    /// The id of a new empty layer of `size` bytes whose files are ready: a spare if one
    /// is ready (no I/O), else created here (three fsyncs).
    fn new_layer_files(&self, size: u64) -> Result<LayerId, BlockError> {
        let spare = lock(&self.spares).get_mut(&size).and_then(Vec::pop);
        if let Some(id) = spare {
            return Ok(id);
        }
        let id = self.catalog.alloc_id()?;
        self.create_layer_files(id, size)?;
        Ok(id)
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
        let data = self.path(&data_name(rec.id));
        let f = match rec.kind {
            LayerKind::Base => Frozen::open_base(&data)?,
            LayerKind::Disk => {
                let (f, h) = Frozen::open(&data, &self.path(&index_name(rec.id)), rec.id)?;
                self.check_geometry(rec, &h)?;
                f
            }
            _ => return Err(BlockError::WrongState(rec.id, "not a disk layer")),
        };
        let f = Arc::new(f);
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

    /// Opens the writable layer `rec`; `fresh`: its index is known to be empty (a new
    /// layer or a spare).
    fn writable(&self, rec: &LayerRecord, fresh: bool) -> Result<Writable, BlockError> {
        let (data, idx) = (self.path(&data_name(rec.id)), self.path(&index_name(rec.id)));
        let w = if fresh {
            let h =
                Header::new(rec.id, rec.size, self.chunk).map_err(|e| self.index_err(rec.id, e))?;
            Writable::open_fresh(&data, &idx, &h)?
        } else {
            Writable::open(&data, &idx, rec.id)?
        };
        self.check_geometry(rec, w.header())?;
        Ok(w)
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
            disk: ChainDisk::new(size, self.inner.chunk, Some(top), below),
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
        let id = inner.new_layer_files(parent.size)?;
        failpoint!("layered::clone::after_files");
        let mut rec = LayerRecord::new(id, LayerKind::Disk, Some(layer), parent.size);
        rec.files = vec![data_name(id), index_name(id)];
        inner.catalog.insert_layer(&rec)?;
        failpoint!("layered::clone::after_catalog");
        let top = inner.writable(&rec, true)?;
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
        let top = inner.writable(&rec, false)?;
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
        inner.create_layer_files(id, size)?;
        let mut rec = LayerRecord::new(id, LayerKind::Disk, Some(root), size);
        rec.files = vec![data_name(id), index_name(id)];
        rec.frozen = true;
        inner.writable(&rec, true)?.absorb(upper)?;
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

impl BlockIo for LayeredDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_vectored<B: BitmapSlice>(
        &self,
        sector: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> Result<(), BlockError> {
        self.disk.read_vectored(sector, bufs)
    }

    fn write_vectored<B: BitmapSlice>(
        &self,
        sector: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> Result<(), BlockError> {
        self.disk.write_vectored(sector, bufs)
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.disk.flush()
    }

    fn discard(&self, sector: u64, sectors: u64) -> Result<(), BlockError> {
        self.disk.discard(sector, sectors)
    }

    fn write_zeroes(&self, sector: u64, sectors: u64) -> Result<(), BlockError> {
        self.disk.write_zeroes(sector, sectors)
    }
}

impl BlockDevice for LayeredDisk {
    fn layer(&self) -> LayerId {
        self.disk.top_id().unwrap_or_default()
    }

    fn snapshot(&self) -> Result<LayerId, BlockError> {
        let store = &self.store;
        let size = self.size;
        let (old, frozen) = self.disk.switch_top(|old| -> Result<Writable, BlockError> {
            old.flush()?;
            failpoint!("layered::snapshot::after_flush");
            let id = store.new_layer_files(size)?;
            failpoint!("layered::snapshot::after_files");
            let mut rec = LayerRecord::new(id, LayerKind::Disk, Some(old.id()), size);
            rec.files = vec![data_name(id), index_name(id)];
            store.catalog.freeze_and_push(old.id(), None, &rec)?;
            failpoint!("layered::snapshot::after_catalog");
            store.writable(&rec, true)
        })?;
        lock(&store.cache).insert(old, Arc::downgrade(&frozen));
        Ok(old)
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
