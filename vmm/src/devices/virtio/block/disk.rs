//! A virtio-blk disk's files: a chain of grove-block layers, how it is opened from the command
//! line, frozen at a snapshot, saved in the state file and rebuilt by a restore.
//!
//! A disk is a base image (any raw file, never written) under zero or more frozen layers,
//! plus, unless the disk is read-only, a writable top layer (`STEM.data` + `STEM.idx`, the
//! layered store's format: sparse data at the disk's own offsets and a crash-safe chunk
//! index). Writes only ever go to the top.
//!
//! **Snapshot** into `DIR` ([`Disk::prepare_snapshot`] before the pause, [`Disk::freeze`]
//! while paused): the top is flushed (fdatasync of its data, then its index commit), its two
//! files are renamed into the snapshot directory as `DIR/disk-<id>.data` and
//! `DIR/disk-<id>.idx`, and the VM continues on a new, empty top at the same `STEM`, created
//! (and fsynced) before the pause. Renames keep the open files, so the running disk reads the
//! frozen layer through the descriptors it already holds; the snapshot directory must be on
//! the same filesystem as the top (checked before the pause).
//!
//! **State**: the frozen chain, nearest first, the base last, each file named relative to the
//! snapshot directory (`disk-root.data`, `../s1/disk-root.data`, `../../images/root.ext4`),
//! with each layer's id (checked against its index header) and the disk's size and chunk
//! size. A saved disk never includes a top that holds data: saving one is an error (only a
//! freeze makes a disk savable).
//!
//! **Restore**: the frozen chain is opened read-only (every index checked); a writable disk
//! gets a new, empty top of its own at `DISK_DIR/<id>` (`--disk-dir`): each fork child writes
//! its own layer, siblings share the frozen ones through the page cache.

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use grove_block::chain::{ChainDisk, Frozen, Writable, DEFAULT_CHUNK};
use grove_block::index::{self, Header};
use grove_block::{BlockError, SECTOR_SIZE};
use serde::{Deserialize, Serialize};

/// Longest disk id (virtio-blk's serial number, `VIRTIO_BLK_ID_BYTES`).
pub const MAX_ID_LEN: usize = 20;
/// Most disks one VM takes (each takes a virtio-mmio slot and an interrupt line).
pub const MAX_DISKS: usize = 8;

/// Errors of a disk's files.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A `--disk` argument that does not parse.
    #[error("--disk {spec:?}: {why}")]
    Spec {
        /// The argument.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// The base image cannot be used.
    #[error("disk {id}: base image {path}")]
    Base {
        /// Disk id.
        id: String,
        /// The image.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The base image is not a regular file (a FIFO, a directory, a device).
    #[error("disk {id}: base image {path}")]
    BaseInput {
        /// Disk id.
        id: String,
        /// The image.
        path: String,
        /// Why it was refused.
        #[source]
        source: crate::input::InputError,
    },
    /// The base image's size is not a whole number of sectors, is zero or too large.
    #[error("disk {id}: base image {path} has {size} bytes: a disk is 512..=16 TiB, in 512-byte sectors")]
    BaseSize {
        /// Disk id.
        id: String,
        /// The image.
        path: String,
        /// Its size.
        size: u64,
    },
    /// A writable layer given on the command line already holds data.
    #[error("disk {id}: layer {path} already holds data; grove-vmm starts disks on an empty layer (restart a VM from a snapshot instead)")]
    LayerInUse {
        /// Disk id.
        id: String,
        /// The layer's data file.
        path: String,
    },
    /// Only one of a layer's two files exists, or its index does not match the disk.
    #[error("disk {id}: layer {path}: {why}")]
    Layer {
        /// Disk id.
        id: String,
        /// The layer's index file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A layer operation failed.
    #[error("disk {id}")]
    Block {
        /// Disk id.
        id: String,
        /// Why.
        #[source]
        source: BlockError,
    },
    /// The snapshot directory is on another filesystem than the disk's writable layer.
    #[error("disk {id}: snapshot directory {dir} is not on the filesystem of the disk's layer {layer} (frozen layers are moved, not copied)")]
    OtherFilesystem {
        /// Disk id.
        id: String,
        /// The snapshot directory.
        dir: String,
        /// The layer.
        layer: String,
    },
    /// The snapshot directory already holds this disk's layer files.
    #[error("disk {id}: {path} exists (a snapshot directory takes one snapshot)")]
    Exists {
        /// Disk id.
        id: String,
        /// The file.
        path: String,
    },
    /// Moving a frozen layer into the snapshot directory failed.
    #[error("disk {id}: cannot move {from} to {to}")]
    Rename {
        /// Disk id.
        id: String,
        /// Source.
        from: String,
        /// Target.
        to: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another open disk (in this process or another) writes this layer.
    #[error("disk {id}: layer {path} is in use by another disk")]
    Locked {
        /// Disk id.
        id: String,
        /// The layer's data file.
        path: String,
    },
    /// Saving a writable disk whose top holds data that no freeze put into a layer.
    #[error("disk {0}: its writable layer holds data not frozen into a snapshot")]
    NotFrozen(String),
    /// A restore of a writable disk needs a directory for its new layer.
    #[error("disk {0} is writable: give --disk-dir DIR for this VM's disk layers")]
    NoDiskDir(String),
    /// A saved disk that cannot be what it says.
    #[error("disk {id}: bad saved state: {why}")]
    BadState {
        /// Disk id.
        id: String,
        /// What is wrong.
        why: String,
    },
    /// A file or directory operation.
    #[error("disk {id}: {op} {path}")]
    Io {
        /// Disk id.
        id: String,
        /// What was being done.
        op: &'static str,
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A `--disk` argument: `PATH[,ro][,id=NAME][,layer=STEM]`.
///
/// `PATH` is the base image (a raw file, never written). A writable disk (the default) writes
/// into the layer `STEM.data` + `STEM.idx`, created empty if neither exists, reused if it is
/// empty; `ro` disks have no layer. `id` (default `disk<N>`, N = position) is the disk's
/// serial number in the guest (`/sys/block/vdX/serial`) and names its frozen layers in
/// snapshot directories: letters, digits, `-` and `_`, at most 20.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// Disk id.
    pub id: String,
    /// Base image.
    pub path: PathBuf,
    /// Writable layer (`None` for a read-only disk).
    pub layer: Option<PathBuf>,
    /// Read-only.
    pub read_only: bool,
}

/// Whether `id` is a valid disk id.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl DiskSpec {
    /// Parses one `--disk` argument; `index` is its position (for the default id).
    pub fn parse(spec: &str, index: usize) -> Result<Self, DiskError> {
        let bad = |why: &str| DiskError::Spec { spec: spec.to_string(), why: why.to_string() };
        let mut parts = spec.split(',');
        let path = parts.next().unwrap_or_default();
        let path = path.strip_prefix("path=").unwrap_or(path);
        if path.is_empty() {
            return Err(bad("no image path"));
        }
        let mut d = DiskSpec {
            id: format!("disk{index}"),
            path: PathBuf::from(path),
            layer: None,
            read_only: false,
        };
        let (mut id_set, mut ro_set) = (false, false);
        for p in parts {
            match p.split_once('=') {
                None if p == "ro" && !ro_set => (d.read_only, ro_set) = (true, true),
                Some(("id", v)) if !id_set => {
                    if !valid_id(v) {
                        return Err(bad("id: 1 to 20 letters, digits, '-' or '_'"));
                    }
                    (d.id, id_set) = (v.to_string(), true);
                }
                Some(("layer", v)) if d.layer.is_none() => {
                    if v.is_empty() {
                        return Err(bad("empty layer path"));
                    }
                    d.layer = Some(PathBuf::from(v));
                }
                _ => {
                    return Err(bad(&format!("unknown or repeated option {p:?} (ro, id=, layer=)")))
                }
            }
        }
        match (d.read_only, &d.layer) {
            (true, Some(_)) => Err(bad("a read-only disk takes no layer")),
            (false, None) => Err(bad(
                "a writable disk needs layer=STEM (where its writes go: STEM.data, STEM.idx; the image is never written), or ro",
            )),
            _ => Ok(d),
        }
    }
}

/// Checks a VM's disks together: at most [`MAX_DISKS`], distinct ids, distinct layers.
pub fn check_specs(specs: &[DiskSpec]) -> Result<(), DiskError> {
    let bad = |d: &DiskSpec, why: String| DiskError::Spec { spec: d.id.clone(), why };
    if let Some(d) = specs.get(MAX_DISKS) {
        return Err(bad(d, format!("at most {MAX_DISKS} disks")));
    }
    for (i, a) in specs.iter().enumerate() {
        for b in &specs[..i] {
            if a.id == b.id {
                return Err(bad(a, "two disks with this id".into()));
            }
            if a.layer.is_some() && a.layer == b.layer {
                return Err(bad(a, "two disks writing the same layer".into()));
            }
        }
    }
    Ok(())
}

/// A layer's two files: `STEM.data`, `STEM.idx`.
pub fn layer_files(stem: &Path) -> (PathBuf, PathBuf) {
    let with = |ext: &str| {
        let mut s = stem.as_os_str().to_owned();
        s.push(ext);
        PathBuf::from(s)
    };
    (with(".data"), with(".idx"))
}

/// The frozen layer files of disk `id` in snapshot directory `dir`.
pub fn snapshot_files(dir: &Path, id: &str) -> (PathBuf, PathBuf) {
    layer_files(&dir.join(format!("disk-{id}")))
}

/// A random layer id with the top bit set (ids the catalog hands out are small counters).
fn new_layer_id() -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b) | 1 << 63)
}

pub use crate::paths::relative_to;

/// One frozen layer of a saved disk, nearest first; the base last.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerState {
    /// Data file (relative to the snapshot directory, or absolute).
    pub data: String,
    /// Index file and layer id; `None` for the base image.
    pub index: Option<(String, u64)>,
}

/// A disk's saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskState {
    /// Disk id.
    pub id: String,
    /// Read-only (no writable layer).
    pub read_only: bool,
    /// Size in bytes.
    pub size: u64,
    /// Chunk size of its layers.
    pub chunk: u32,
    /// The frozen chain, nearest first, the base last.
    pub layers: Vec<LayerState>,
}

/// Where a frozen layer's files are (absolute).
#[derive(Clone, Debug)]
struct FrozenFiles {
    data: PathBuf,
    index: Option<(PathBuf, u64)>,
}

/// A disk: its I/O chain and the files behind it.
pub struct Disk {
    id: String,
    read_only: bool,
    size: u64,
    chunk: u32,
    io: ChainDisk,
    /// The frozen chain's files, nearest first, the base last.
    frozen: Vec<FrozenFiles>,
    /// The writable top's stem (absolute).
    top: Option<PathBuf>,
    /// A new top made ahead of a snapshot (files at `STEM.next.*`).
    spare: Option<Writable>,
    /// The directory saved paths are relative to (the last snapshot's or the restored one's).
    snapshot_dir: Option<PathBuf>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("id", &self.id)
            .field("read_only", &self.read_only)
            .field("size", &self.size)
            .field("top", &self.top)
            .finish_non_exhaustive()
    }
}

/// `p` made absolute, with `.` and `..` resolved lexically (`/s/2/../base` is `/s/base`).
fn absolute(id: &str, p: &Path) -> Result<PathBuf, DiskError> {
    let abs = std::path::absolute(p).map_err(|source| DiskError::Io {
        id: id.to_string(),
        op: "resolve",
        path: p.display().to_string(),
        source,
    })?;
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    Ok(out)
}

/// `stem`'s directory, canonical, joined with its file name.
fn canonical_stem(id: &str, stem: &Path) -> Result<PathBuf, DiskError> {
    let stem = absolute(id, stem)?;
    let (Some(dir), Some(name)) = (stem.parent(), stem.file_name()) else {
        return Err(DiskError::Spec { spec: id.to_string(), why: "bad layer path".into() });
    };
    let dir = dir.canonicalize().map_err(|source| DiskError::Io {
        id: id.to_string(),
        op: "open directory",
        path: dir.display().to_string(),
        source,
    })?;
    Ok(dir.join(name))
}

fn exists(p: &Path) -> bool {
    p.symlink_metadata().is_ok()
}

/// Takes an exclusive lock on a writable layer's data file (`flock`, held as long as the file
/// is open, across renames): one writer per layer, whatever process opens it.
fn lock_layer(id: &str, w: &Writable, path: &Path) -> Result<(), DiskError> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a valid open fd with integer flags; no memory is passed.
    let r = unsafe { libc::flock(w.data().as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(DiskError::Locked { id: id.to_string(), path: path.display().to_string() });
    }
    Err(DiskError::Io {
        id: id.to_string(),
        op: "lock",
        path: path.display().to_string(),
        source: e,
    })
}

impl Disk {
    fn block_err(&self) -> impl Fn(BlockError) -> DiskError + '_ {
        |source| DiskError::Block { id: self.id.clone(), source }
    }

    /// Opens a disk from its `--disk` spec: the base image read-only, and unless the disk is
    /// read-only its writable layer (created empty, or reused if it exists and is empty).
    pub fn open(spec: &DiskSpec) -> Result<Self, DiskError> {
        let id = spec.id.clone();
        let base_err = |source| DiskError::Base {
            id: id.clone(),
            path: spec.path.display().to_string(),
            source,
        };
        let base_path = spec.path.canonicalize().map_err(base_err)?;
        // Not blocking on a FIFO; a regular file only (a block device would need its size
        // from an ioctl, and the layer files beside it assume a file).
        let (base, size) =
            crate::input::open(&base_path, crate::input::Accept::Regular).map_err(|source| {
                DiskError::BaseInput {
                    id: id.clone(),
                    path: base_path.display().to_string(),
                    source,
                }
            })?;
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) || size > index::MAX_DISK {
            return Err(DiskError::BaseSize { id, path: base_path.display().to_string(), size });
        }
        let chunk = DEFAULT_CHUNK;
        let (top, stem) = match &spec.layer {
            None => (None, None),
            Some(stem) => {
                let stem = canonical_stem(&id, stem)?;
                (Some(Self::open_top(&id, &stem, size, chunk)?), Some(stem))
            }
        };
        let frozen = vec![FrozenFiles { data: base_path, index: None }];
        Ok(Self {
            io: ChainDisk::new(size, chunk, top, vec![Arc::new(Frozen::base(base))]),
            id,
            read_only: spec.read_only,
            size,
            chunk,
            frozen,
            top: stem,
            spare: None,
            snapshot_dir: None,
        })
    }

    /// The writable layer at `stem`: created if neither file exists; reused if both exist,
    /// match the disk and hold nothing.
    fn open_top(id: &str, stem: &Path, size: u64, chunk: u32) -> Result<Writable, DiskError> {
        let (data, idx) = layer_files(stem);
        let block = |source| DiskError::Block { id: id.to_string(), source };
        let layer = |why: String| DiskError::Layer {
            id: id.to_string(),
            path: idx.display().to_string(),
            why,
        };
        match (exists(&data), exists(&idx)) {
            (false, false) => {
                let lid = new_layer_id().map_err(|source| DiskError::Io {
                    id: id.to_string(),
                    op: "read",
                    path: "/dev/urandom".into(),
                    source,
                })?;
                let w = Writable::create(&data, &idx, lid, size, chunk).map_err(block)?;
                lock_layer(id, &w, &data)?;
                Ok(w)
            }
            (true, true) => {
                let mut hb = [0u8; 52];
                File::open(&idx)
                    .and_then(|mut f| f.read_exact(&mut hb))
                    .map_err(|e| layer(format!("cannot read its header: {e}")))?;
                let h = Header::parse(&hb).map_err(|e| layer(e.to_string()))?;
                if h.disk_size != size || h.chunk_size != chunk {
                    return Err(layer(format!(
                        "made for a disk of {} bytes in {} byte chunks, not {size} in {chunk}",
                        h.disk_size, h.chunk_size
                    )));
                }
                let w = Writable::open(&data, &idx, h.layer).map_err(block)?;
                lock_layer(id, &w, &data)?;
                if w.owned_chunks() > 0 {
                    return Err(DiskError::LayerInUse {
                        id: id.to_string(),
                        path: data.display().to_string(),
                    });
                }
                Ok(w)
            }
            _ => Err(layer("one of its two files (.data, .idx) is missing".into())),
        }
    }

    /// Disk id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size (the discard alignment the device reports).
    pub fn chunk(&self) -> u32 {
        self.chunk
    }

    /// The I/O.
    pub fn io(&self) -> &ChainDisk {
        &self.io
    }

    /// Frozen layers under the top, the base included.
    pub fn depth(&self) -> usize {
        self.frozen.len()
    }

    /// The writable layer's stem.
    pub fn top(&self) -> Option<&Path> {
        self.top.as_deref()
    }

    /// Before pausing for a snapshot into `dir` (absolute, canonical): checks that the
    /// frozen top can be moved there, and creates the next top (`STEM.next.*`, fsynced) so
    /// the pause does no file creation.
    pub fn prepare_snapshot(&mut self, dir: &Path) -> Result<(), DiskError> {
        let Some(stem) = self.top.clone() else { return Ok(()) };
        let (to_data, to_idx) = snapshot_files(dir, &self.id);
        for p in [&to_data, &to_idx] {
            if exists(p) {
                return Err(DiskError::Exists {
                    id: self.id.clone(),
                    path: p.display().to_string(),
                });
            }
        }
        let dev = |p: &Path| {
            std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::dev(&m)).map_err(
                |source| DiskError::Io {
                    id: self.id.clone(),
                    op: "stat",
                    path: p.display().to_string(),
                    source,
                },
            )
        };
        let (data, _) = layer_files(&stem);
        if dev(dir)? != dev(&data)? {
            return Err(DiskError::OtherFilesystem {
                id: self.id.clone(),
                dir: dir.display().to_string(),
                layer: data.display().to_string(),
            });
        }
        if self.spare.is_none() {
            let next = stem.with_file_name(format!(
                "{}.next",
                stem.file_name().unwrap_or_default().to_string_lossy()
            ));
            let (nd, ni) = layer_files(&next);
            // A spare left by a failed attempt before a restart is not trusted: made again.
            for p in [&nd, &ni] {
                if exists(p) {
                    std::fs::remove_file(p).map_err(|source| DiskError::Io {
                        id: self.id.clone(),
                        op: "remove",
                        path: p.display().to_string(),
                        source,
                    })?;
                }
            }
            let lid = new_layer_id().map_err(|source| DiskError::Io {
                id: self.id.clone(),
                op: "read",
                path: "/dev/urandom".into(),
                source,
            })?;
            let w =
                Writable::create(&nd, &ni, lid, self.size, self.chunk).map_err(self.block_err())?;
            lock_layer(&self.id, &w, &nd)?;
            self.spare = Some(w);
        }
        Ok(())
    }

    /// With the vCPUs paused and the device's requests finished: flushes the top, moves its
    /// files into `dir` as this disk's frozen layer and continues on the spare made by
    /// [`prepare_snapshot`](Self::prepare_snapshot). `durable` fsyncs the directories too.
    /// Read-only disks only remember `dir` (their saved paths are relative to it).
    pub fn freeze(&mut self, dir: &Path, durable: bool) -> Result<(), DiskError> {
        let Some(stem) = self.top.clone() else {
            self.snapshot_dir = Some(dir.to_path_buf());
            return Ok(());
        };
        let id = self.id.clone();
        let spare = self.spare.take().ok_or_else(|| DiskError::BadState {
            id: id.clone(),
            why: "freeze without prepare_snapshot".into(),
        })?;
        let (data, idx) = layer_files(&stem);
        let next_stem = stem.with_file_name(format!(
            "{}.next",
            stem.file_name().unwrap_or_default().to_string_lossy()
        ));
        let (nd, ni) = layer_files(&next_stem);
        let (to_data, to_idx) = snapshot_files(dir, &id);
        let moves = [(&idx, &to_idx), (&data, &to_data), (&ni, &idx), (&nd, &data)];
        let mut spare = Some(spare);
        let r = self.io.switch_top(|old| -> Result<Writable, Switch> {
            old.flush()?;
            renames(&id, &moves).map_err(Switch::Disk)?;
            spare.take().ok_or(Switch::Block(BlockError::ReadOnly))
        });
        let (old_id, _) = match r {
            Ok(x) => x,
            Err(e) => {
                // Not switched: keep the spare for the next attempt.
                self.spare = spare;
                return Err(match e {
                    Switch::Block(source) => DiskError::Block { id, source },
                    Switch::Disk(d) => d,
                });
            }
        };
        if durable {
            for d in [dir, stem.parent().unwrap_or(Path::new("/"))] {
                grove_block::file::sync_dir(d).map_err(self.block_err())?;
            }
        }
        self.frozen.insert(0, FrozenFiles { data: to_data, index: Some((to_idx, old_id)) });
        self.snapshot_dir = Some(dir.to_path_buf());
        Ok(())
    }

    /// The disk's saved state, paths relative to the last snapshot directory. Refused while
    /// the writable top holds data no freeze moved into a layer.
    pub fn save(&self) -> Result<DiskState, DiskError> {
        if self.io.top_owned_chunks() > 0 {
            return Err(DiskError::NotFrozen(self.id.clone()));
        }
        let name = |p: &Path| match &self.snapshot_dir {
            Some(d) => relative_to(p, d).display().to_string(),
            None => p.display().to_string(),
        };
        Ok(DiskState {
            id: self.id.clone(),
            read_only: self.read_only,
            size: self.size,
            chunk: self.chunk,
            layers: self
                .frozen
                .iter()
                .map(|f| LayerState {
                    data: name(&f.data),
                    index: f.index.as_ref().map(|(p, id)| (name(p), *id)),
                })
                .collect(),
        })
    }

    /// Rebuilds a disk from its saved state: the frozen chain read-only (paths relative to
    /// `snapshot_dir`), and for a writable disk a new, empty top at `disk_dir/<id>`.
    pub fn restore(
        s: &DiskState,
        snapshot_dir: &Path,
        disk_dir: Option<&Path>,
    ) -> Result<Self, DiskError> {
        let id = s.id.clone();
        let bad = |why: String| DiskError::BadState { id: id.clone(), why };
        if !valid_id(&s.id) {
            return Err(DiskError::BadState { id: "?".into(), why: "bad id".into() });
        }
        if s.size == 0 || !s.size.is_multiple_of(SECTOR_SIZE) || s.size > index::MAX_DISK {
            return Err(bad(format!("size {}", s.size)));
        }
        if !s.chunk.is_power_of_two() || !(index::MIN_CHUNK..=index::MAX_CHUNK).contains(&s.chunk) {
            return Err(bad(format!("chunk size {}", s.chunk)));
        }
        let n = s.layers.len();
        if n == 0 || n > 4096 || s.layers[..n - 1].iter().any(|l| l.index.is_none()) {
            return Err(bad("the chain must be layers over one base image".into()));
        }
        if s.layers[n - 1].index.is_some() {
            return Err(bad("the chain must end with a base image".into()));
        }
        let path = |p: &str| snapshot_dir.join(p);
        let block = |source| DiskError::Block { id: id.clone(), source };
        let mut below = Vec::with_capacity(n);
        let mut frozen = Vec::with_capacity(n);
        for l in &s.layers {
            let data = absolute(&id, &path(&l.data))?;
            match &l.index {
                Some((idx, lid)) => {
                    let idx = absolute(&id, &path(idx))?;
                    let (f, h) = Frozen::open(&data, &idx, *lid).map_err(block)?;
                    if h.disk_size != s.size || h.chunk_size != s.chunk {
                        return Err(bad(format!(
                            "layer {} is for {} bytes in {} byte chunks",
                            idx.display(),
                            h.disk_size,
                            h.chunk_size
                        )));
                    }
                    below.push(Arc::new(f));
                    frozen.push(FrozenFiles { data, index: Some((idx, *lid)) });
                }
                None => {
                    let (f, len) = crate::input::open(&data, crate::input::Accept::Regular)
                        .map_err(|source| DiskError::BaseInput {
                            id: id.clone(),
                            path: data.display().to_string(),
                            source,
                        })?;
                    if len != s.size {
                        return Err(bad(format!(
                            "base image {} has {len} bytes, the disk {}",
                            data.display(),
                            s.size
                        )));
                    }
                    below.push(Arc::new(Frozen::base(f)));
                    frozen.push(FrozenFiles { data, index: None });
                }
            }
        }
        let (top, stem) = if s.read_only {
            (None, None)
        } else {
            let dir = disk_dir.ok_or_else(|| DiskError::NoDiskDir(id.clone()))?;
            let stem = canonical_stem(&id, &dir.join(&s.id))?;
            let (data, idx) = layer_files(&stem);
            for p in [&data, &idx] {
                if exists(p) {
                    return Err(DiskError::Exists {
                        id: id.clone(),
                        path: p.display().to_string(),
                    });
                }
            }
            let lid = new_layer_id().map_err(|source| DiskError::Io {
                id: id.clone(),
                op: "read",
                path: "/dev/urandom".into(),
                source,
            })?;
            let w = Writable::create(&data, &idx, lid, s.size, s.chunk).map_err(block)?;
            lock_layer(&id, &w, &data)?;
            (Some(w), Some(stem))
        };
        Ok(Self {
            io: ChainDisk::new(s.size, s.chunk, top, below),
            id,
            read_only: s.read_only,
            size: s.size,
            chunk: s.chunk,
            frozen,
            top: stem,
            spare: None,
            snapshot_dir: Some(snapshot_dir.to_path_buf()),
        })
    }
}

/// Why a freeze's switch failed.
enum Switch {
    Block(BlockError),
    Disk(DiskError),
}

impl From<BlockError> for Switch {
    fn from(e: BlockError) -> Self {
        Switch::Block(e)
    }
}

/// Renames `(from, to)` in order; on a failure, the renames done are undone.
fn renames(id: &str, moves: &[(&PathBuf, &PathBuf)]) -> Result<(), DiskError> {
    for (i, (from, to)) in moves.iter().enumerate() {
        if let Err(source) = std::fs::rename(from, to) {
            for (f, t) in moves[..i].iter().rev() {
                let _ = std::fs::rename(t, f);
            }
            return Err(DiskError::Rename {
                id: id.to_string(),
                from: from.display().to_string(),
                to: to.display().to_string(),
                source,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use grove_block::BlockIo;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn image(dir: &Path, fill: u8) -> PathBuf {
        let p = dir.join("base.img");
        std::fs::write(&p, vec![fill; 4 * MIB as usize]).unwrap();
        p
    }

    fn spec(s: &str) -> DiskSpec {
        DiskSpec::parse(s, 0).unwrap()
    }

    fn read(d: &Disk, sector: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        d.io().read(sector, &mut b).unwrap();
        b
    }

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        let d = DiskSpec::parse("/i.img,layer=/l/root,id=root", 3).unwrap();
        assert_eq!(d.id, "root");
        assert_eq!(d.layer.as_deref(), Some(Path::new("/l/root")));
        assert!(!d.read_only);
        let d = DiskSpec::parse("path=/i.img,ro", 2).unwrap();
        assert_eq!((d.id.as_str(), d.read_only, d.layer), ("disk2", true, None));
        for bad in [
            "",
            ",ro",
            "/i.img",
            "/i.img,ro,layer=/x",
            "/i.img,ro,ro",
            "/i.img,layer=",
            "/i.img,ro,id=",
            "/i.img,ro,id=has space",
            "/i.img,ro,id=abcdefghijklmnopqrstu",
            "/i.img,ro,bogus",
            "/i.img,ro,size=1",
        ] {
            assert!(DiskSpec::parse(bad, 0).is_err(), "{bad:?}");
        }
        let a = spec("/a,ro,id=x");
        assert!(check_specs(&[a.clone(), spec("/b,ro,id=y")]).is_ok());
        assert!(check_specs(&[a.clone(), spec("/b,ro,id=x")]).is_err(), "same id");
        let w = |id: &str| spec(&format!("/a,layer=/l,id={id}"));
        assert!(check_specs(&[w("p"), w("q")]).is_err(), "same layer");
        let many: Vec<_> = (0..=MAX_DISKS).map(|i| spec(&format!("/a,ro,id=d{i}"))).collect();
        assert!(check_specs(&many).is_err());
        assert!(check_specs(&many[..MAX_DISKS]).is_ok());
    }

    #[test]
    fn relative_paths() {
        let r = |p: &str, b: &str| relative_to(Path::new(p), Path::new(b)).display().to_string();
        assert_eq!(r("/x/a/b", "/x"), "a/b");
        assert_eq!(r("/y/c", "/x"), "../y/c");
        assert_eq!(r("/s/1/disk-r.data", "/s/2"), "../1/disk-r.data");
        assert_eq!(r("/img", "/a/b/c"), "../../../img");
    }

    #[test]
    fn open_write_snapshot_restore_and_fork() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        let base = image(&root, 1);
        let d = Disk::open(&spec(&format!(
            "{},layer={}/vm/root,id=root",
            base.display(),
            root.display()
        )))
        .unwrap_err()
        .to_string();
        assert!(d.contains("open directory"), "{d}");
        std::fs::create_dir(root.join("vm")).unwrap();
        let stem = root.join("vm/root");
        let s = spec(&format!("{},layer={},id=root", base.display(), stem.display()));
        let mut disk = Disk::open(&s).unwrap();
        assert_eq!((disk.size(), disk.depth()), (4 * MIB, 1));
        disk.io().write(8, &[2; 4096]).unwrap();
        assert!(matches!(disk.save(), Err(DiskError::NotFrozen(_))), "unfrozen data is refused");
        // A layer another disk writes is refused (whatever its index says).
        assert!(matches!(Disk::open(&s), Err(DiskError::Locked { .. })));
        disk.io().flush().unwrap();
        assert_eq!(std::fs::read(&base).unwrap(), vec![1; 4 * MIB as usize]);

        // Snapshot 1: the top moves into s1, the disk continues on a new top at the stem.
        let s1 = root.join("s1");
        std::fs::create_dir(&s1).unwrap();
        disk.prepare_snapshot(&s1).unwrap();
        disk.freeze(&s1, true).unwrap();
        assert!(snapshot_files(&s1, "root").0.exists() && layer_files(&stem).1.exists());
        assert_eq!(disk.depth(), 2);
        let st1 = disk.save().unwrap();
        assert_eq!(st1.layers[0].data, "disk-root.data");
        assert_eq!(st1.layers[1].data, "../base.img");
        // The frozen layer stays locked against writers; the image was never written.
        let old = spec(&format!("{},layer={}/disk-root", base.display(), s1.display()));
        assert!(matches!(Disk::open(&old), Err(DiskError::Locked { .. })));
        assert_eq!(std::fs::read(&base).unwrap(), vec![1; 4 * MIB as usize]);
        // The parent writes after the snapshot: not in s1.
        disk.io().write(16, &[3; 4096]).unwrap();
        assert_eq!(read(&disk, 8, 4096), vec![2; 4096]);
        // A directory holding this disk's files already is refused, and nothing changes.
        assert!(matches!(disk.prepare_snapshot(&s1), Err(DiskError::Exists { .. })));

        // Two children from s1: each writes its own layer, siblings and parent unseen.
        let restore = |name: &str| {
            let dd = root.join(name);
            std::fs::create_dir(&dd).unwrap();
            Disk::restore(&st1, &s1, Some(&dd)).unwrap()
        };
        let (a, b) = (restore("a"), restore("b"));
        for (c, v) in [(&a, 4u8), (&b, 5u8)] {
            assert_eq!(read(c, 8, 4096), vec![2; 4096], "the snapshot's data");
            assert_eq!(read(c, 16, 4096), vec![1; 4096], "not the parent's later write");
            c.io().write(16, &[v; 4096]).unwrap();
        }
        assert_eq!(read(&a, 16, 4096), vec![4; 4096]);
        assert_eq!(read(&b, 16, 4096), vec![5; 4096]);
        assert_eq!(read(&disk, 16, 4096), vec![3; 4096]);
        assert!(Disk::restore(&st1, &s1, None).is_err(), "a writable disk needs a disk dir");
        assert!(
            matches!(
                Disk::restore(&st1, &s1, Some(&root.join("a"))),
                Err(DiskError::Exists { .. })
            ),
            "never over an existing layer"
        );

        // Snapshot 2 of child a, in another directory: a chain of two frozen layers, named
        // relative to s2; restored, it reads a's data.
        let mut a = a;
        let s2 = root.join("s2");
        std::fs::create_dir(&s2).unwrap();
        a.prepare_snapshot(&s2).unwrap();
        a.freeze(&s2, false).unwrap();
        let st2 = a.save().unwrap();
        let names: Vec<_> = st2.layers.iter().map(|l| l.data.as_str()).collect();
        assert_eq!(names, ["disk-root.data", "../s1/disk-root.data", "../base.img"]);
        std::fs::create_dir(root.join("a2")).unwrap();
        let a2 = Disk::restore(&st2, &s2, Some(&root.join("a2"))).unwrap();
        assert_eq!(read(&a2, 8, 8192), [vec![2; 4096], vec![4; 4096]].concat());

        // Bad states are refused.
        let mut bad = st2.clone();
        bad.layers[0].index.as_mut().unwrap().1 ^= 1;
        assert!(Disk::restore(&bad, &s2, Some(&root.join("a2"))).is_err(), "wrong layer id");
        let mut bad = st2.clone();
        bad.layers.pop();
        assert!(Disk::restore(&bad, &s2, Some(&root)).is_err(), "no base");
        let mut bad = st2.clone();
        bad.size = 8 * MIB;
        assert!(Disk::restore(&bad, &s2, Some(&root)).is_err(), "size");
        let mut bad = st2;
        bad.id = "../x".into();
        assert!(Disk::restore(&bad, &s2, Some(&root)).is_err(), "id");
    }

    #[test]
    fn a_read_only_disk_saves_its_base_and_an_empty_layer_is_reused() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        let base = image(&root, 6);
        let mut ro = Disk::open(&spec(&format!("{},ro,id=img", base.display()))).unwrap();
        assert!(ro.io().write(0, &[0; 512]).is_err());
        ro.prepare_snapshot(&root).unwrap();
        ro.freeze(&root, false).unwrap();
        let st = ro.save().unwrap();
        assert_eq!(
            (st.read_only, st.layers.len(), st.layers[0].data.as_str()),
            (true, 1, "base.img")
        );
        let back = Disk::restore(&st, &root, None).unwrap();
        assert_eq!(read(&back, 0, 512), vec![6; 512]);
        // An empty layer made earlier (by agentd's clone, or a VM that wrote nothing) is
        // reused; a layer for another size is refused.
        let s = spec(&format!("{},layer={}/l", base.display(), root.display()));
        drop(Disk::open(&s).unwrap());
        let d = Disk::open(&s).unwrap();
        assert_eq!(read(&d, 0, 512), vec![6; 512]);
        d.io().write(0, &[1; 512]).unwrap();
        d.io().flush().unwrap();
        drop(d);
        assert!(matches!(Disk::open(&s), Err(DiskError::LayerInUse { .. })), "holds data");
        std::fs::write(&base, vec![0u8; 8 * MIB as usize]).unwrap();
        assert!(Disk::open(&s).unwrap_err().to_string().contains("made for a disk of"));
        std::fs::remove_file(layer_files(&root.join("l")).0).unwrap();
        assert!(Disk::open(&s).unwrap_err().to_string().contains("missing"));
        std::fs::remove_file(layer_files(&root.join("l")).1).unwrap();
        std::fs::write(&base, vec![0u8; 1000]).unwrap();
        assert!(matches!(Disk::open(&s), Err(DiskError::BaseSize { .. })));
        // A FIFO as the base image blocked `open` forever; a directory was opened.
        std::fs::remove_file(&base).unwrap();
        crate::input::mkfifo(&base);
        let e = Disk::open(&s).unwrap_err();
        assert!(matches!(e, DiskError::BaseInput { .. }), "{e}");
        assert!(crate::one_line(&e).contains("is a FIFO"), "{e}");
    }
}
