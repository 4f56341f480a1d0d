//! The catalog: Grove's crash-safe metadata in sled.
//!
//! It records templates (base image, kernel, boot config), disk and memory layers
//! (lineage and refcounts), snapshots with their lineage (parent, children,
//! ancestors) and sandboxes. Every record is stored in the envelope of
//! [`record`] (magic, version, checksum).
//!
//! # Crash safety
//! Multi-record changes run in one sled transaction (atomic across trees), and every
//! change that names or un-names a file is flushed before the call returns. The
//! callers order their file work around it:
//! - a file is written and fsynced (and its directory fsynced) **before** the record
//!   that names it is committed;
//! - a record is removed and the removal flushed **before** its files are unlinked.
//!
//! A crash can therefore leave only files that no record names, never a record that
//! names a missing file. [`Catalog::recover`] runs at startup and deletes those
//! orphans, so no file is left uncollected. Records that name a missing file can
//! only come from outside tampering; recovery reports them instead of guessing.
//!
//! # Refcounts
//! A layer lives while `holds + children > 0`: `holds` counts snapshots, templates,
//! sandboxes and API holds, `children` the layers built on it. Releasing the last
//! reference collects the layer and walks down its chain.

pub mod record;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sled::transaction::{
    abort, ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    Transactional, TransactionalTree,
};

use crate::block::LayerId;

/// A snapshot's id.
pub type SnapshotId = u64;

const KIND_LAYER: u16 = 1;
const KIND_SNAPSHOT: u16 = 2;
const KIND_TEMPLATE: u16 = 3;
const KIND_SANDBOX: u16 = 4;
const KIND_OP: u16 = 5;

/// Catalog errors.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("sled")]
    Sled(#[from] sled::Error),
    #[error("the id counter is used up")]
    IdsExhausted,
    #[error("corrupt record {key}")]
    Corrupt {
        key: String,
        #[source]
        source: record::RecordError,
    },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} is still referenced")]
    InUse(String),
    #[error("invalid change: {0}")]
    Invalid(String),
    #[error("recovery: cannot scan {path}")]
    Scan {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a layer holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerKind {
    /// A raw base image, read-only.
    Base,
    /// A layer of the layered block store (data + index file).
    Disk,
    /// A memory snapshot layer.
    Memory,
    /// A dm-thin volume or thin snapshot.
    Thin { thin_id: u32 },
    /// Files prepared ahead of time for a layer of the layered store (written and
    /// fsynced, held by the store's spare pool); a snapshot or clone turns the
    /// record into a `Disk` layer with the same id and files in one transaction.
    Spare,
}

/// One layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub id: LayerId,
    pub kind: LayerKind,
    pub parent: Option<LayerId>,
    /// File names (relative to the owner's directory) this layer owns.
    pub files: Vec<String>,
    /// Virtual size in bytes.
    pub size: u64,
    /// Frozen layers are read-only and may have children.
    pub frozen: bool,
    /// Holds by snapshots, templates, sandboxes and API users.
    pub holds: u32,
    /// Layers whose parent this is.
    pub children: u32,
    pub created_unix_ms: u64,
}

impl LayerRecord {
    /// A new record, held once, with no children.
    pub fn new(id: LayerId, kind: LayerKind, parent: Option<LayerId>, size: u64) -> Self {
        Self {
            id,
            kind,
            parent,
            files: Vec::new(),
            size,
            frozen: false,
            holds: 1,
            children: 0,
            created_unix_ms: now_ms(),
        }
    }
}

/// A snapshot: disk and memory layers plus the VM state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub parent: Option<SnapshotId>,
    pub disk_layers: Vec<LayerId>,
    pub memory_layer: Option<LayerId>,
    pub state_file: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Templates and sandboxes that refer to this snapshot (maintained here).
    pub refs: u32,
    pub created_unix_ms: u64,
    /// Kept until deleted explicitly (an API snapshot), as opposed to one made for a fork
    /// or a template, collected once nothing refers to it.
    #[serde(default)]
    pub pinned: bool,
    /// The sandbox it was taken from.
    #[serde(default)]
    pub sandbox: String,
    /// The VM shape it restores into.
    #[serde(default)]
    pub vcpus: u32,
    #[serde(default)]
    pub mem_mib: u32,
    /// Memory layers in the chain and pages of the newest, as the VMM reported them.
    #[serde(default)]
    pub depth: u32,
    #[serde(default)]
    pub pages: u64,
    #[serde(default)]
    pub pause_ms: f64,
}

/// A template: what a sandbox boots or restores from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TemplateRecord {
    pub name: String,
    pub base_layer: Option<LayerId>,
    pub kernel: String,
    pub cmdline: String,
    pub start_command: Vec<String>,
    pub snapshot: Option<SnapshotId>,
    /// Initial ramdisk file (relative to the owner's directory), if any.
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub vcpus: u32,
    #[serde(default)]
    pub mem_mib: u32,
    /// How the owner decides the guest is ready, and its argument (owner-defined).
    #[serde(default)]
    pub ready_check: String,
    #[serde(default)]
    pub ready_arg: String,
    #[serde(default)]
    pub ready_timeout_s: u32,
    /// Where the kernel came from (for people).
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub created_unix_ms: u64,
    /// The guest runs guest-init's agent: its VMs get a vsock device (owner-defined use).
    #[serde(default)]
    pub guest_agent: bool,
}

/// A sandbox and what it was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SandboxRecord {
    pub id: String,
    /// Its writable disk layer (held).
    pub disk_layer: Option<LayerId>,
    /// The snapshot it was restored from (referred to).
    pub from_snapshot: Option<SnapshotId>,
    pub state: String,
    pub labels: BTreeMap<String, String>,
    /// The head of the memory layer chain its VM maps and extends (held): its later
    /// snapshots name these layers.
    #[serde(default)]
    pub memory_layer: Option<LayerId>,
    /// Its newest snapshot (the lineage parent of its next one).
    #[serde(default)]
    pub last_snapshot: Option<SnapshotId>,
    #[serde(default)]
    pub template: String,
    /// The sandbox it was forked from.
    #[serde(default)]
    pub parent: String,
    #[serde(default)]
    pub vcpus: u32,
    #[serde(default)]
    pub mem_mib: u32,
    #[serde(default)]
    pub identity: u32,
    #[serde(default)]
    pub created_unix_ms: u64,
    /// 0: no expiry.
    #[serde(default)]
    pub expires_unix_ms: u64,
    /// Why it failed or stopped.
    #[serde(default)]
    pub reason: String,
    /// The owner's name for its VMM (a directory, relative to the owner's root).
    #[serde(default)]
    pub vmm: String,
    #[serde(default)]
    pub pid: u32,
    /// A delete has started: recovery finishes it.
    #[serde(default)]
    pub deleting: bool,
}

/// A multi-step operation in progress (a fork, a snapshot): written before its first
/// step, removed after its last, so that recovery can finish or roll back what a crash
/// interrupted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct OpRecord {
    pub id: String,
    pub kind: String,
    pub sandbox: String,
    pub snapshot: Option<SnapshotId>,
    /// Sandboxes the operation creates.
    pub children: Vec<String>,
    /// The directory the operation writes (relative to the owner's root).
    pub dir: String,
    pub started_unix_ms: u64,
}

/// What [`Catalog::recover`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Files no record names, deleted.
    pub removed_orphans: Vec<String>,
    /// Records that name a file that is missing: (layer, file). Left in place.
    pub missing_files: Vec<(LayerId, String)>,
}

/// The catalog database.
pub struct Catalog {
    /// Serialises the catalog's read-modify-write operations. sled transactions
    /// must not read outside their view (that deadlocks sled's global
    /// concurrency control), so scans happen before the transaction, under this
    /// lock, and the transaction re-reads what it changes.
    write: std::sync::Mutex<()>,
    db: sled::Db,
    layers: sled::Tree,
    snapshots: sled::Tree,
    snap_children: sled::Tree,
    templates: sled::Tree,
    sandboxes: sled::Tree,
    ops: sled::Tree,
    meta: sled::Tree,
    /// The id allocator: the next id and the durable limit below which ids may be handed
    /// out ([`Catalog::alloc_id`]).
    ids: std::sync::Mutex<IdBlock>,
}

/// Ids handed out from memory, below a limit made durable ahead ([`ID_BLOCK`] at a time).
#[derive(Debug, Clone, Copy)]
struct IdBlock {
    next: u64,
    limit: u64,
}

type TxResult<T> = ConflictableTransactionResult<T, CatalogError>;

fn key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

fn intent_key(tag: &str, id: u64) -> Vec<u8> {
    let mut k = format!("intent/{tag}/").into_bytes();
    k.extend_from_slice(&key(id));
    k
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn decode_at<T: serde::de::DeserializeOwned>(
    kind: u16,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, CatalogError> {
    record::decode(kind, bytes).map_err(|source| CatalogError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn tx_get<T: serde::de::DeserializeOwned>(
    tree: &TransactionalTree,
    kind: u16,
    k: &[u8],
    what: impl FnOnce() -> String,
) -> TxResult<T> {
    match tree.get(k)? {
        Some(v) => decode_at(kind, k, &v).map_err(ConflictableTransactionError::Abort),
        None => abort(CatalogError::NotFound(what())),
    }
}

fn tx_layer(tree: &TransactionalTree, id: LayerId) -> TxResult<LayerRecord> {
    tx_get(tree, KIND_LAYER, &key(id), || format!("layer {id}"))
}

/// Fails unless `id` is free or a spare whose files `rec` takes over.
fn tx_check_new(tree: &TransactionalTree, rec: &LayerRecord) -> TxResult<()> {
    if let Some(v) = tree.get(key(rec.id))? {
        let old: LayerRecord =
            decode_at(KIND_LAYER, &key(rec.id), &v).map_err(ConflictableTransactionError::Abort)?;
        if old.kind != LayerKind::Spare || old.files != rec.files || old.size != rec.size {
            return abort(CatalogError::Exists(format!("layer {}", rec.id)));
        }
    }
    Ok(())
}

fn tx_put_layer(tree: &TransactionalTree, rec: &LayerRecord) -> TxResult<()> {
    tree.insert(&key(rec.id), record::encode(KIND_LAYER, rec))?;
    Ok(())
}

/// Drops one reference (`hold` or `child`) from `id` and collects what is left
/// with none, walking down the chain.
fn tx_unref(
    layers: &TransactionalTree,
    id: LayerId,
    as_hold: bool,
    collected: &mut Vec<LayerRecord>,
) -> TxResult<()> {
    let mut rec = tx_layer(layers, id)?;
    if as_hold {
        if rec.holds == 0 {
            return abort(CatalogError::Invalid(format!("layer {id} is not held")));
        }
        rec.holds -= 1;
    } else {
        rec.children = rec.children.saturating_sub(1);
    }
    let mut cur = rec;
    loop {
        if cur.holds > 0 || cur.children > 0 {
            tx_put_layer(layers, &cur)?;
            return Ok(());
        }
        layers.remove(&key(cur.id))?;
        let parent = cur.parent;
        collected.push(cur);
        let Some(p) = parent else { return Ok(()) };
        let mut prec = tx_layer(layers, p)?;
        prec.children = prec.children.saturating_sub(1);
        cur = prec;
    }
}

fn unwrap_tx<T>(r: Result<T, TransactionError<CatalogError>>) -> Result<T, CatalogError> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => CatalogError::Sled(e),
    })
}

/// [`Catalog::alloc_id`] reserves ids durably this many at a time.
pub const ID_BLOCK: u64 = 1024;

impl Catalog {
    /// Opens (or creates) the catalog at `path`.
    ///
    /// sled locks the database file; a catalog dropped just before may still hold
    /// the lock for a moment (sled's I/O threads drop their references
    /// asynchronously), so a lock conflict is retried for up to 5 s before it is
    /// reported.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match sled::Config::new().path(path).open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let c = Self {
            layers: db.open_tree("layers")?,
            snapshots: db.open_tree("snapshots")?,
            snap_children: db.open_tree("snap_children")?,
            templates: db.open_tree("templates")?,
            sandboxes: db.open_tree("sandboxes")?,
            ops: db.open_tree("ops")?,
            meta: db.open_tree("meta")?,
            write: std::sync::Mutex::new(()),
            ids: std::sync::Mutex::new(IdBlock { next: 1, limit: 1 }),
            db,
        };
        let first = c.meta.get(b"next_id")?;
        let first = first.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok());
        let first = first.map_or(1, u64::from_le_bytes).max(1);
        // Every id handed out before was below the durable limit: the next starts there.
        *c.ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            IdBlock { next: first, limit: first };
        Ok(c)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn keys(tree: &sled::Tree) -> Result<Vec<sled::IVec>, CatalogError> {
        tree.iter().keys().map(|k| k.map_err(CatalogError::from)).collect()
    }

    /// Makes every committed change durable.
    pub fn flush(&self) -> Result<(), CatalogError> {
        self.db.flush()?;
        Ok(())
    }

    /// Allocates a new id (shared by layers, snapshots, sandboxes and VMMs). Ids start at 1
    /// and are never handed out twice, also across a crash: they come from memory below a
    /// limit that is made durable ([`ID_BLOCK`] ids ahead, one flush per block) before any id
    /// under it is handed out, and a reopened catalog starts at that limit. Most calls write
    /// nothing (each write would be one more sync in the next commit's flush); a crash
    /// skips the rest of a block.
    pub fn alloc_id(&self) -> Result<u64, CatalogError> {
        let mut b = self.ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if b.next >= b.limit {
            let limit = b.next.checked_add(ID_BLOCK).ok_or(CatalogError::IdsExhausted)?;
            self.meta.insert(b"next_id", &limit.to_le_bytes())?;
            self.db.flush()?;
            b.limit = limit;
        }
        let id = b.next;
        b.next += 1;
        Ok(id)
    }

    /// Raw access for tests of corruption handling.
    #[doc(hidden)]
    pub fn raw_put_layer_bytes(&self, id: LayerId, bytes: &[u8]) -> Result<(), CatalogError> {
        self.layers.insert(key(id), bytes)?;
        Ok(())
    }

    // ---- layers ----

    /// Adds a layer record. Its parent (if any) must exist and be frozen; it gains a
    /// child. Flushed before returning.
    pub fn insert_layer(&self, rec: &LayerRecord) -> Result<(), CatalogError> {
        let _g = self.lock();
        unwrap_tx(self.layers.transaction(|layers| {
            tx_check_new(layers, rec)?;
            if let Some(p) = rec.parent {
                let mut prec = tx_layer(layers, p)?;
                if !prec.frozen {
                    return abort(CatalogError::Invalid(format!("parent {p} is not frozen")));
                }
                prec.children += 1;
                tx_put_layer(layers, &prec)?;
            }
            tx_put_layer(layers, rec)
        }))?;
        self.flush()
    }

    /// Freezes the writable layer `old` and adds `new` (on top of it, or standing
    /// alone) in one transaction: the disk's hold moves to `new`, `old` keeps its
    /// hold for the caller of the snapshot. `old_kind` replaces `old`'s kind (a thin
    /// volume hands its thin id to the new writable layer). Flushed before returning.
    pub fn freeze_and_push(
        &self,
        old: LayerId,
        old_kind: Option<LayerKind>,
        new: &LayerRecord,
    ) -> Result<(), CatalogError> {
        let _g = self.lock();
        if new.parent.is_some_and(|p| p != old) {
            return Err(CatalogError::Invalid("new layer must sit on old".into()));
        }
        unwrap_tx(self.layers.transaction(|layers| {
            let mut orec = tx_layer(layers, old)?;
            if orec.frozen {
                return abort(CatalogError::Invalid(format!("layer {old} already frozen")));
            }
            orec.frozen = true;
            if new.parent.is_some() {
                orec.children += 1;
            }
            if let Some(k) = &old_kind {
                orec.kind = k.clone();
            }
            tx_check_new(layers, new)?;
            tx_put_layer(layers, &orec)?;
            tx_put_layer(layers, new)
        }))?;
        self.flush()
    }

    /// One layer.
    pub fn layer(&self, id: LayerId) -> Result<LayerRecord, CatalogError> {
        match self.layers.get(key(id))? {
            Some(v) => decode_at(KIND_LAYER, &key(id), &v),
            None => Err(CatalogError::NotFound(format!("layer {id}"))),
        }
    }

    /// Every layer.
    pub fn layers(&self) -> Result<Vec<LayerRecord>, CatalogError> {
        self.layers
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode_at(KIND_LAYER, &k, &v)
            })
            .collect()
    }

    /// The chain under `id`: `id` first, the root last.
    pub fn chain(&self, id: LayerId) -> Result<Vec<LayerRecord>, CatalogError> {
        let mut out = vec![self.layer(id)?];
        while let Some(p) = out.last().and_then(|r| r.parent) {
            if out.len() > 1_000_000 {
                return Err(CatalogError::Invalid("layer chain has a cycle".into()));
            }
            out.push(self.layer(p)?);
        }
        Ok(out)
    }

    /// Adds a hold on a layer.
    pub fn hold_layer(&self, id: LayerId) -> Result<(), CatalogError> {
        let _g = self.lock();
        unwrap_tx(self.layers.transaction(|layers| {
            let mut rec = tx_layer(layers, id)?;
            rec.holds += 1;
            tx_put_layer(layers, &rec)
        }))?;
        self.flush()
    }

    /// Drops a hold; returns the records collected (their files are the caller's to
    /// delete, after this returns: the removal is already flushed).
    pub fn release_layer(&self, id: LayerId) -> Result<Vec<LayerRecord>, CatalogError> {
        let _g = self.lock();
        let collected = unwrap_tx(self.layers.transaction(|layers| {
            let mut collected = Vec::new();
            tx_unref(layers, id, true, &mut collected)?;
            Ok(collected)
        }))?;
        self.flush()?;
        Ok(collected)
    }

    /// Adds `new` (frozen, with the same contents as the frozen `old`) and moves
    /// every reference to `old` to it (child layers, holds, snapshots, templates,
    /// sandboxes), in one transaction; `old` is then collected, and its chain down
    /// to `new`'s parent as far as nothing else refers to it. Returns the collected
    /// records.
    pub fn replace_layer(
        &self,
        old: LayerId,
        new_rec: &LayerRecord,
    ) -> Result<Vec<LayerRecord>, CatalogError> {
        let _g = self.lock();
        let new = new_rec.id;
        let (layer_keys, snap_keys, tmpl_keys, sandbox_keys) = (
            Self::keys(&self.layers)?,
            Self::keys(&self.snapshots)?,
            Self::keys(&self.templates)?,
            Self::keys(&self.sandboxes)?,
        );
        let collected = unwrap_tx(
            (&self.layers, &self.snapshots, &self.templates, &self.sandboxes).transaction(
                |(layers, snapshots, templates, sandboxes)| {
                    tx_check_new(layers, new_rec)?;
                    let mut nrec = new_rec.clone();
                    nrec.holds = 0;
                    nrec.children = 0;
                    if !nrec.frozen {
                        return abort(CatalogError::Invalid("replacement must be frozen".into()));
                    }
                    if let Some(p) = nrec.parent {
                        let mut prec = tx_layer(layers, p)?;
                        prec.children += 1;
                        tx_put_layer(layers, &prec)?;
                    }
                    let mut orec = tx_layer(layers, old)?;
                    if !orec.frozen {
                        return abort(CatalogError::Invalid(format!("layer {old} is not frozen")));
                    }
                    // Child layers: scan (layers are few; this is not a hot path).
                    let mut moved_children = 0;
                    for k in &layer_keys {
                        let id = u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8]));
                        if id == old || id == new {
                            continue;
                        }
                        let Ok(mut c) = tx_layer(layers, id) else { continue };
                        if c.parent == Some(old) {
                            c.parent = Some(new);
                            tx_put_layer(layers, &c)?;
                            moved_children += 1;
                        }
                    }
                    for k in &snap_keys {
                        let mut s: SnapshotRecord =
                            tx_get(snapshots, KIND_SNAPSHOT, k, || "snapshot".into())?;
                        let mut changed = false;
                        for l in s.disk_layers.iter_mut().chain(s.memory_layer.iter_mut()) {
                            if *l == old {
                                *l = new;
                                changed = true;
                            }
                        }
                        if changed {
                            snapshots.insert(k, record::encode(KIND_SNAPSHOT, &s))?;
                        }
                    }
                    for k in &tmpl_keys {
                        let mut t: TemplateRecord =
                            tx_get(templates, KIND_TEMPLATE, k, || "template".into())?;
                        if t.base_layer == Some(old) {
                            t.base_layer = Some(new);
                            templates.insert(k, record::encode(KIND_TEMPLATE, &t))?;
                        }
                    }
                    for k in &sandbox_keys {
                        let mut s: SandboxRecord =
                            tx_get(sandboxes, KIND_SANDBOX, k, || "sandbox".into())?;
                        if s.disk_layer == Some(old) {
                            s.disk_layer = Some(new);
                            sandboxes.insert(k, record::encode(KIND_SANDBOX, &s))?;
                        }
                    }
                    nrec.holds += orec.holds;
                    nrec.children += moved_children;
                    tx_put_layer(layers, &nrec)?;
                    orec.holds = 0;
                    orec.children = 0;
                    tx_put_layer(layers, &orec)?;
                    let mut collected = Vec::new();
                    // Collect `old` (it has no references left) and walk its chain.
                    layers.remove(&key(old))?;
                    if let Some(p) = orec.parent {
                        tx_unref(layers, p, false, &mut collected)?;
                    }
                    collected.insert(0, orec);
                    Ok(collected)
                },
            ),
        )?;
        self.flush()?;
        Ok(collected)
    }

    // ---- intents ----

    /// Records an intent (e.g. "a thin volume with this id is being created")
    /// before a step that creates something the catalog cannot see otherwise.
    /// Flushed before returning.
    pub fn add_intent(&self, tag: &str, id: u64) -> Result<(), CatalogError> {
        self.meta.insert(intent_key(tag, id), &[][..])?;
        self.flush()
    }

    /// Clears an intent once the record naming the object is committed (or the
    /// object is gone).
    pub fn clear_intent(&self, tag: &str, id: u64) -> Result<(), CatalogError> {
        self.meta.remove(intent_key(tag, id))?;
        self.flush()
    }

    /// Open intents of a tag.
    pub fn intents(&self, tag: &str) -> Result<Vec<u64>, CatalogError> {
        let prefix = intent_key(tag, 0);
        let prefix = &prefix[..prefix.len() - 8];
        self.meta
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, _) = kv?;
                let id: [u8; 8] = k[k.len() - 8..]
                    .try_into()
                    .map_err(|_| CatalogError::Invalid("bad intent key".into()))?;
                Ok(u64::from_be_bytes(id))
            })
            .collect()
    }

    // ---- snapshots ----

    fn tx_put_snapshot(
        layers: &TransactionalTree,
        snapshots: &TransactionalTree,
        children: &TransactionalTree,
        rec: &SnapshotRecord,
        taken: &[LayerId],
    ) -> TxResult<()> {
        if snapshots.get(key(rec.id))?.is_some() {
            return abort(CatalogError::Exists(format!("snapshot {}", rec.id)));
        }
        if let Some(p) = rec.parent {
            if snapshots.get(key(p))?.is_none() {
                return abort(CatalogError::NotFound(format!("snapshot {p}")));
            }
            let mut ck = key(p).to_vec();
            ck.extend_from_slice(&key(rec.id));
            children.insert(ck, &[][..])?;
        }
        for &l in rec.disk_layers.iter().chain(rec.memory_layer.iter()) {
            let mut lr = tx_layer(layers, l)?;
            if !taken.contains(&l) {
                lr.holds += 1;
            }
            tx_put_layer(layers, &lr)?;
        }
        let mut rec = rec.clone();
        rec.refs = 0;
        if rec.created_unix_ms == 0 {
            rec.created_unix_ms = now_ms();
        }
        snapshots.insert(&key(rec.id), record::encode(KIND_SNAPSHOT, &rec))?;
        Ok(())
    }

    /// Adds a snapshot; it holds its layers, and its parent gains a child.
    pub fn put_snapshot(&self, rec: &SnapshotRecord) -> Result<(), CatalogError> {
        let _g = self.lock();
        unwrap_tx((&self.layers, &self.snapshots, &self.snap_children).transaction(
            |(layers, snapshots, children)| {
                Self::tx_put_snapshot(layers, snapshots, children, rec, &[])
            },
        ))?;
        self.flush()
    }

    /// Every snapshot.
    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>, CatalogError> {
        self.snapshots
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode_at(KIND_SNAPSHOT, &k, &v)
            })
            .collect()
    }

    /// One snapshot.
    pub fn snapshot(&self, id: SnapshotId) -> Result<SnapshotRecord, CatalogError> {
        match self.snapshots.get(key(id))? {
            Some(v) => decode_at(KIND_SNAPSHOT, &key(id), &v),
            None => Err(CatalogError::NotFound(format!("snapshot {id}"))),
        }
    }

    /// The direct children of a snapshot.
    pub fn snapshot_children(&self, id: SnapshotId) -> Result<Vec<SnapshotId>, CatalogError> {
        self.snap_children
            .scan_prefix(key(id))
            .map(|kv| {
                let (k, _) = kv?;
                let c: [u8; 8] = k[8..16]
                    .try_into()
                    .map_err(|_| CatalogError::Invalid("bad child key".into()))?;
                Ok(u64::from_be_bytes(c))
            })
            .collect()
    }

    /// The ancestors of a snapshot, parent first.
    pub fn snapshot_ancestors(&self, id: SnapshotId) -> Result<Vec<SnapshotId>, CatalogError> {
        let mut out = Vec::new();
        let mut cur = self.snapshot(id)?.parent;
        while let Some(p) = cur {
            if out.len() > 1_000_000 {
                return Err(CatalogError::Invalid("snapshot lineage has a cycle".into()));
            }
            out.push(p);
            cur = self.snapshot(p)?.parent;
        }
        Ok(out)
    }

    /// Removes a snapshot that has no children and no referrers; releases its
    /// layers and returns the layer records collected.
    pub fn remove_snapshot(&self, id: SnapshotId) -> Result<Vec<LayerRecord>, CatalogError> {
        let _g = self.lock();
        let has_children = self.snap_children.scan_prefix(key(id)).next().is_some();
        let collected =
            unwrap_tx((&self.layers, &self.snapshots, &self.snap_children).transaction(
                |(layers, snapshots, children)| {
                    let rec: SnapshotRecord =
                        tx_get(snapshots, KIND_SNAPSHOT, &key(id), || format!("snapshot {id}"))?;
                    if rec.refs > 0 || has_children {
                        return abort(CatalogError::InUse(format!("snapshot {id}")));
                    }
                    if let Some(p) = rec.parent {
                        let mut ck = key(p).to_vec();
                        ck.extend_from_slice(&key(id));
                        children.remove(ck)?;
                    }
                    snapshots.remove(&key(id))?;
                    let mut collected = Vec::new();
                    for &l in rec.disk_layers.iter().chain(rec.memory_layer.iter()) {
                        tx_unref(layers, l, true, &mut collected)?;
                    }
                    Ok(collected)
                },
            ))?;
        self.flush()?;
        Ok(collected)
    }

    fn tx_snapshot_ref(snapshots: &TransactionalTree, id: SnapshotId, up: bool) -> TxResult<()> {
        let mut s: SnapshotRecord =
            tx_get(snapshots, KIND_SNAPSHOT, &key(id), || format!("snapshot {id}"))?;
        s.refs = if up { s.refs + 1 } else { s.refs.saturating_sub(1) };
        snapshots.insert(&key(id), record::encode(KIND_SNAPSHOT, &s))?;
        Ok(())
    }

    // ---- templates ----

    /// Adds a template; it holds its base layer and refers to its snapshot.
    pub fn put_template(&self, rec: &TemplateRecord) -> Result<(), CatalogError> {
        let _g = self.lock();
        unwrap_tx((&self.layers, &self.snapshots, &self.templates).transaction(
            |(layers, snapshots, templates)| {
                if templates.get(rec.name.as_bytes())?.is_some() {
                    return abort(CatalogError::Exists(format!("template {}", rec.name)));
                }
                if let Some(l) = rec.base_layer {
                    let mut lr = tx_layer(layers, l)?;
                    lr.holds += 1;
                    tx_put_layer(layers, &lr)?;
                }
                if let Some(s) = rec.snapshot {
                    Self::tx_snapshot_ref(snapshots, s, true)?;
                }
                templates.insert(rec.name.as_bytes(), record::encode(KIND_TEMPLATE, rec))?;
                Ok(())
            },
        ))?;
        self.flush()
    }

    /// One template.
    pub fn template(&self, name: &str) -> Result<TemplateRecord, CatalogError> {
        match self.templates.get(name.as_bytes())? {
            Some(v) => decode_at(KIND_TEMPLATE, name.as_bytes(), &v),
            None => Err(CatalogError::NotFound(format!("template {name}"))),
        }
    }

    /// Every template.
    pub fn templates(&self) -> Result<Vec<TemplateRecord>, CatalogError> {
        self.templates
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode_at(KIND_TEMPLATE, &k, &v)
            })
            .collect()
    }

    /// Replaces an existing template record, moving the hold on its base layer and the
    /// reference to its snapshot where they changed. Flushed before returning.
    pub fn update_template(&self, rec: &TemplateRecord) -> Result<Vec<LayerRecord>, CatalogError> {
        let _g = self.lock();
        let collected = unwrap_tx((&self.layers, &self.snapshots, &self.templates).transaction(
            |(layers, snapshots, templates)| {
                let old: TemplateRecord =
                    tx_get(templates, KIND_TEMPLATE, rec.name.as_bytes(), || {
                        format!("template {}", rec.name)
                    })?;
                let mut collected = Vec::new();
                if old.base_layer != rec.base_layer {
                    if let Some(l) = rec.base_layer {
                        let mut lr = tx_layer(layers, l)?;
                        lr.holds += 1;
                        tx_put_layer(layers, &lr)?;
                    }
                    if let Some(l) = old.base_layer {
                        tx_unref(layers, l, true, &mut collected)?;
                    }
                }
                if old.snapshot != rec.snapshot {
                    if let Some(s) = rec.snapshot {
                        Self::tx_snapshot_ref(snapshots, s, true)?;
                    }
                    if let Some(s) = old.snapshot {
                        Self::tx_snapshot_ref(snapshots, s, false)?;
                    }
                }
                templates.insert(rec.name.as_bytes(), record::encode(KIND_TEMPLATE, rec))?;
                Ok(collected)
            },
        ))?;
        self.flush()?;
        Ok(collected)
    }

    /// Removes a template; returns the layer records collected.
    pub fn remove_template(&self, name: &str) -> Result<Vec<LayerRecord>, CatalogError> {
        let _g = self.lock();
        let collected = unwrap_tx((&self.layers, &self.snapshots, &self.templates).transaction(
            |(layers, snapshots, templates)| {
                let rec: TemplateRecord =
                    tx_get(templates, KIND_TEMPLATE, name.as_bytes(), || {
                        format!("template {name}")
                    })?;
                templates.remove(name.as_bytes())?;
                let mut collected = Vec::new();
                if let Some(l) = rec.base_layer {
                    tx_unref(layers, l, true, &mut collected)?;
                }
                if let Some(s) = rec.snapshot {
                    Self::tx_snapshot_ref(snapshots, s, false)?;
                }
                Ok(collected)
            },
        ))?;
        self.flush()?;
        Ok(collected)
    }

    // ---- sandboxes ----

    /// Moves the holds and references of a sandbox record from `old` to `new` (either may be
    /// absent): its disk layer, memory layer head and source snapshot. New references are
    /// taken before old ones are dropped, so a layer that both name is never collected.
    ///
    /// `moved` lists holds that change owner without changing count: a layer in it that
    /// `new` names already carries a hold for it (a layer the caller made, held once), and
    /// one that `old` names keeps its hold for another owner (a disk layer frozen into a
    /// snapshot).
    fn tx_sandbox_refs(
        layers: &TransactionalTree,
        snapshots: &TransactionalTree,
        old: Option<&SandboxRecord>,
        new: Option<&SandboxRecord>,
        moved: &[LayerId],
        collected: &mut Vec<LayerRecord>,
    ) -> TxResult<()> {
        let held = |r: Option<&SandboxRecord>| -> Vec<LayerId> {
            r.map(|r| r.disk_layer.into_iter().chain(r.memory_layer).collect()).unwrap_or_default()
        };
        for l in held(new) {
            if moved.contains(&l) {
                continue;
            }
            let mut lr = tx_layer(layers, l)?;
            lr.holds += 1;
            tx_put_layer(layers, &lr)?;
        }
        if let Some(s) = new.and_then(|r| r.from_snapshot) {
            Self::tx_snapshot_ref(snapshots, s, true)?;
        }
        for l in held(old) {
            if moved.contains(&l) {
                continue;
            }
            tx_unref(layers, l, true, collected)?;
        }
        if let Some(s) = old.and_then(|r| r.from_snapshot) {
            Self::tx_snapshot_ref(snapshots, s, false)?;
        }
        Ok(())
    }

    /// Adds a sandbox; it holds its disk layer and memory layer head and refers to its
    /// snapshot.
    pub fn put_sandbox(&self, rec: &SandboxRecord) -> Result<(), CatalogError> {
        self.put_sandbox_taking(rec, &[])
    }

    /// [`put_sandbox`](Self::put_sandbox), where the layers in `taken` already carry the
    /// hold the sandbox needs (a disk the caller just cloned): the hold passes to the
    /// record instead of a new one being added.
    pub fn put_sandbox_taking(
        &self,
        rec: &SandboxRecord,
        taken: &[LayerId],
    ) -> Result<(), CatalogError> {
        let _g = self.lock();
        unwrap_tx((&self.layers, &self.snapshots, &self.sandboxes).transaction(
            |(layers, snapshots, sandboxes)| {
                if sandboxes.get(rec.id.as_bytes())?.is_some() {
                    return abort(CatalogError::Exists(format!("sandbox {}", rec.id)));
                }
                Self::tx_sandbox_refs(layers, snapshots, None, Some(rec), taken, &mut Vec::new())?;
                sandboxes.insert(rec.id.as_bytes(), record::encode(KIND_SANDBOX, rec))?;
                Ok(())
            },
        ))?;
        self.flush()
    }

    /// Replaces an existing sandbox record, moving holds and references where the layers
    /// or the snapshot it names changed; returns the layer records collected. Flushed
    /// before returning.
    pub fn update_sandbox(&self, rec: &SandboxRecord) -> Result<Vec<LayerRecord>, CatalogError> {
        let _g = self.lock();
        let collected = unwrap_tx((&self.layers, &self.snapshots, &self.sandboxes).transaction(
            |(layers, snapshots, sandboxes)| {
                let old: SandboxRecord =
                    tx_get(sandboxes, KIND_SANDBOX, rec.id.as_bytes(), || {
                        format!("sandbox {}", rec.id)
                    })?;
                let mut collected = Vec::new();
                if (old.disk_layer, old.memory_layer, old.from_snapshot)
                    != (rec.disk_layer, rec.memory_layer, rec.from_snapshot)
                {
                    Self::tx_sandbox_refs(
                        layers,
                        snapshots,
                        Some(&old),
                        Some(rec),
                        &[],
                        &mut collected,
                    )?;
                }
                sandboxes.insert(rec.id.as_bytes(), record::encode(KIND_SANDBOX, rec))?;
                Ok(collected)
            },
        ))?;
        self.flush()?;
        Ok(collected)
    }

    /// One sandbox.
    pub fn sandbox(&self, id: &str) -> Result<SandboxRecord, CatalogError> {
        match self.sandboxes.get(id.as_bytes())? {
            Some(v) => decode_at(KIND_SANDBOX, id.as_bytes(), &v),
            None => Err(CatalogError::NotFound(format!("sandbox {id}"))),
        }
    }

    /// Every sandbox.
    pub fn sandboxes(&self) -> Result<Vec<SandboxRecord>, CatalogError> {
        self.sandboxes
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode_at(KIND_SANDBOX, &k, &v)
            })
            .collect()
    }

    /// Removes a sandbox; returns the layer records collected.
    pub fn remove_sandbox(&self, id: &str) -> Result<Vec<LayerRecord>, CatalogError> {
        let _g = self.lock();
        let collected = unwrap_tx((&self.layers, &self.snapshots, &self.sandboxes).transaction(
            |(layers, snapshots, sandboxes)| {
                let rec: SandboxRecord =
                    tx_get(sandboxes, KIND_SANDBOX, id.as_bytes(), || format!("sandbox {id}"))?;
                sandboxes.remove(id.as_bytes())?;
                let mut collected = Vec::new();
                Self::tx_sandbox_refs(layers, snapshots, Some(&rec), None, &[], &mut collected)?;
                Ok(collected)
            },
        ))?;
        self.flush()?;
        Ok(collected)
    }

    /// Commits a snapshot and the memory layers written for it in one transaction: the
    /// `new_layers` (frozen, each on the previous one, the first on its recorded parent;
    /// unheld except by what names them), the snapshot record (holding its layers), and,
    /// if given, the updated record of the sandbox it was taken from (its memory head and
    /// disk layer moved). Returns the layer records collected.
    ///
    /// `disk` is a disk snapshot taken for it ([`BlockDevice::snapshot`]: the frozen layer,
    /// now held by the caller, and the new writable layer, holding the disk's hold): the
    /// snapshot takes over the frozen layer's hold and the sandbox's disk hold stays on the
    /// new writable layer, with no count changing.
    ///
    /// [`BlockDevice::snapshot`]: crate::block::BlockDevice::snapshot
    pub fn commit_snapshot(
        &self,
        snap: &SnapshotRecord,
        new_layers: &[LayerRecord],
        sandbox: Option<&SandboxRecord>,
        disk: Option<(LayerId, LayerId)>,
    ) -> Result<Vec<LayerRecord>, CatalogError> {
        let moved: Vec<LayerId> = disk.map(|(f, w)| vec![f, w]).unwrap_or_default();
        let snap_taken: Vec<LayerId> = disk.map(|(f, _)| vec![f]).unwrap_or_default();
        let _g = self.lock();
        let collected = unwrap_tx(
            (&self.layers, &self.snapshots, &self.snap_children, &self.sandboxes).transaction(
                |(layers, snapshots, children, sandboxes)| {
                    for l in new_layers {
                        tx_check_new(layers, l)?;
                        if !l.frozen {
                            return abort(CatalogError::Invalid(format!(
                                "layer {} not frozen",
                                l.id
                            )));
                        }
                        let mut l = l.clone();
                        l.holds = 0;
                        l.children = 0;
                        if let Some(p) = l.parent {
                            let mut prec = tx_layer(layers, p)?;
                            prec.children += 1;
                            tx_put_layer(layers, &prec)?;
                        }
                        tx_put_layer(layers, &l)?;
                    }
                    Self::tx_put_snapshot(layers, snapshots, children, snap, &snap_taken)?;
                    let mut collected = Vec::new();
                    if let Some(rec) = sandbox {
                        let old: SandboxRecord =
                            tx_get(sandboxes, KIND_SANDBOX, rec.id.as_bytes(), || {
                                format!("sandbox {}", rec.id)
                            })?;
                        Self::tx_sandbox_refs(
                            layers,
                            snapshots,
                            Some(&old),
                            Some(rec),
                            &moved,
                            &mut collected,
                        )?;
                        sandboxes.insert(rec.id.as_bytes(), record::encode(KIND_SANDBOX, rec))?;
                    }
                    Ok(collected)
                },
            ),
        )?;
        self.flush()?;
        Ok(collected)
    }

    // ---- operations in progress ----

    /// Records an operation in progress. Flushed before returning.
    pub fn put_op(&self, op: &OpRecord) -> Result<(), CatalogError> {
        self.ops.insert(op.id.as_bytes(), record::encode(KIND_OP, op))?;
        self.flush()
    }

    /// Removes a finished operation. Flushed before returning.
    pub fn remove_op(&self, id: &str) -> Result<(), CatalogError> {
        self.ops.remove(id.as_bytes())?;
        self.flush()
    }

    /// Every operation in progress.
    pub fn ops(&self) -> Result<Vec<OpRecord>, CatalogError> {
        self.ops
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode_at(KIND_OP, &k, &v)
            })
            .collect()
    }

    // ---- recovery ----

    /// The startup recovery pass over `dir`, the directory holding the files of
    /// layers of `kinds`: deletes every file that no record names (left by a crash
    /// between writing a file and committing its record, or between removing a
    /// record and unlinking its files) and reports records whose files are missing.
    pub fn recover(&self, dir: &Path, kinds: &[LayerKind]) -> Result<RecoveryReport, CatalogError> {
        let mut named = HashSet::new();
        let mut report = RecoveryReport::default();
        for rec in self.layers()? {
            if !kinds.contains(&rec.kind) {
                continue;
            }
            for f in &rec.files {
                if !dir.join(f).exists() {
                    report.missing_files.push((rec.id, f.clone()));
                }
                named.insert(f.clone());
            }
        }
        let scan = |source| CatalogError::Scan { path: dir.to_path_buf(), source };
        for entry in std::fs::read_dir(dir).map_err(scan)? {
            let entry = entry.map_err(scan)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !named.contains(&name) {
                std::fs::remove_file(entry.path()).map_err(scan)?;
                report.removed_orphans.push(name);
            }
        }
        if !report.removed_orphans.is_empty() {
            let d = std::fs::File::open(dir).map_err(scan)?;
            d.sync_all().map_err(scan)?;
        }
        report.removed_orphans.sort();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(c: &Catalog, parent: Option<LayerId>, frozen: bool) -> LayerId {
        let id = c.alloc_id().unwrap();
        let mut r = LayerRecord::new(id, LayerKind::Disk, parent, 4096);
        r.frozen = frozen;
        c.insert_layer(&r).unwrap();
        id
    }

    #[test]
    fn ids_are_not_handed_out_again_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let last = {
            let c = Catalog::open(dir.path()).unwrap();
            let ids: Vec<u64> = (0..3).map(|_| c.alloc_id().unwrap()).collect();
            assert_eq!(ids, vec![1, 2, 3]);
            ids[2]
            // Dropped without a flush: only the reserved block's limit is durable.
        };
        let c = Catalog::open(dir.path()).unwrap();
        let next = c.alloc_id().unwrap();
        assert_eq!(next, 1 + ID_BLOCK, "after {last}: the rest of the block is skipped");
        // A block used up reserves the next one, durably.
        for _ in 1..ID_BLOCK {
            c.alloc_id().unwrap();
        }
        let crossed = c.alloc_id().unwrap();
        assert_eq!(crossed, 1 + 2 * ID_BLOCK);
        drop(c);
        let c = Catalog::open(dir.path()).unwrap();
        assert_eq!(c.alloc_id().unwrap(), 1 + 3 * ID_BLOCK);
        // A fresh catalog starts at 1 (nothing to skip).
        let fresh = tempfile::tempdir().unwrap();
        assert_eq!(Catalog::open(fresh.path()).unwrap().alloc_id().unwrap(), 1);
    }

    #[test]
    fn refcounts_collect_down_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("db")).unwrap();
        let base = layer(&c, None, true);
        let mid = layer(&c, Some(base), true);
        let top = layer(&c, Some(mid), false);
        assert_eq!(c.chain(top).unwrap().len(), 3);
        // The base and mid are held by their creators; drop those holds.
        assert!(c.release_layer(base).unwrap().is_empty());
        assert!(c.release_layer(mid).unwrap().is_empty());
        let gone: Vec<_> = c.release_layer(top).unwrap().iter().map(|r| r.id).collect();
        assert_eq!(gone, vec![top, mid, base]);
        assert!(c.layers().unwrap().is_empty());
        assert!(c.release_layer(top).is_err());
    }

    #[test]
    fn snapshots_lineage_and_holds() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("db")).unwrap();
        let base = layer(&c, None, true);
        let s1 = SnapshotRecord {
            id: c.alloc_id().unwrap(),
            disk_layers: vec![base],
            ..Default::default()
        };
        c.put_snapshot(&s1).unwrap();
        let s2 = SnapshotRecord {
            id: c.alloc_id().unwrap(),
            parent: Some(s1.id),
            disk_layers: vec![base],
            ..Default::default()
        };
        c.put_snapshot(&s2).unwrap();
        assert_eq!(c.snapshot_children(s1.id).unwrap(), vec![s2.id]);
        assert_eq!(c.snapshot_ancestors(s2.id).unwrap(), vec![s1.id]);
        assert_eq!(c.layer(base).unwrap().holds, 3);
        assert!(matches!(c.remove_snapshot(s1.id), Err(CatalogError::InUse(_))));
        let t = TemplateRecord {
            name: "py".into(),
            base_layer: Some(base),
            snapshot: Some(s2.id),
            ..Default::default()
        };
        c.put_template(&t).unwrap();
        assert!(matches!(c.remove_snapshot(s2.id), Err(CatalogError::InUse(_))));
        c.remove_template("py").unwrap();
        c.remove_snapshot(s2.id).unwrap();
        c.remove_snapshot(s1.id).unwrap();
        let gone = c.release_layer(base).unwrap();
        assert_eq!(gone.len(), 1);
        let sb = SandboxRecord { id: "a".into(), ..Default::default() };
        c.put_sandbox(&sb).unwrap();
        assert_eq!(c.sandbox("a").unwrap(), sb);
        assert!(c.put_sandbox(&sb).is_err());
        c.remove_sandbox("a").unwrap();
        assert!(c.sandboxes().unwrap().is_empty());
    }

    fn memory_layer(c: &Catalog, parent: Option<LayerId>) -> LayerRecord {
        let mut r = LayerRecord::new(c.alloc_id().unwrap(), LayerKind::Memory, parent, 1 << 20);
        r.frozen = true;
        r.files = vec![format!("{}/0000.mlayer", r.id)];
        r
    }

    #[test]
    fn snapshots_commit_with_their_layers_and_move_the_sandbox_head() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("db")).unwrap();
        // A template snapshot: a full layer.
        let full = memory_layer(&c, None);
        let s1 = SnapshotRecord {
            id: c.alloc_id().unwrap(),
            memory_layer: Some(full.id),
            ..Default::default()
        };
        c.commit_snapshot(&s1, std::slice::from_ref(&full), None, None).unwrap();
        assert_eq!(c.layer(full.id).unwrap().holds, 1);
        // A sandbox restored from it holds the head and refers to the snapshot.
        let mut sb = SandboxRecord {
            id: "sb".into(),
            from_snapshot: Some(s1.id),
            memory_layer: Some(full.id),
            ..Default::default()
        };
        c.put_sandbox(&sb).unwrap();
        assert_eq!(c.layer(full.id).unwrap().holds, 2);
        assert_eq!(c.snapshot(s1.id).unwrap().refs, 1);
        // Its fork: a diff on top; the sandbox's head moves to it.
        let diff = memory_layer(&c, Some(full.id));
        let s2 = SnapshotRecord {
            id: c.alloc_id().unwrap(),
            parent: Some(s1.id),
            memory_layer: Some(diff.id),
            ..Default::default()
        };
        sb.memory_layer = Some(diff.id);
        sb.last_snapshot = Some(s2.id);
        assert!(c
            .commit_snapshot(&s2, std::slice::from_ref(&diff), Some(&sb), None)
            .unwrap()
            .is_empty());
        let (f, d) = (c.layer(full.id).unwrap(), c.layer(diff.id).unwrap());
        assert_eq!((f.holds, f.children, d.holds, d.children), (1, 1, 2, 0));
        // A failed commit changes nothing: the layer id is taken now.
        let s3 = SnapshotRecord { id: c.alloc_id().unwrap(), ..Default::default() };
        assert!(matches!(
            c.commit_snapshot(&s3, std::slice::from_ref(&diff), None, None),
            Err(CatalogError::Exists(_))
        ));
        assert!(c.snapshot(s3.id).is_err());
        // update_sandbox moves nothing when only the state changes.
        sb.state = "paused".into();
        assert!(c.update_sandbox(&sb).unwrap().is_empty());
        assert_eq!(c.layer(diff.id).unwrap().holds, 2);
        // Removing the fork snapshot (no referrers) keeps the layer the sandbox holds.
        assert!(c.remove_snapshot(s2.id).unwrap().is_empty());
        // Removing the sandbox collects the diff; the full layer stays for s1.
        let gone: Vec<_> = c.remove_sandbox("sb").unwrap().iter().map(|r| r.id).collect();
        assert_eq!(gone, vec![diff.id]);
        assert_eq!(c.snapshot(s1.id).unwrap().refs, 0);
        let gone: Vec<_> = c.remove_snapshot(s1.id).unwrap().iter().map(|r| r.id).collect();
        assert_eq!(gone, vec![full.id]);
        assert!(c.layers().unwrap().is_empty());
    }

    #[test]
    fn templates_update_moves_the_snapshot_reference_and_ops_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("db")).unwrap();
        let s = SnapshotRecord { id: c.alloc_id().unwrap(), ..Default::default() };
        c.put_snapshot(&s).unwrap();
        let mut t = TemplateRecord { name: "tg".into(), ..Default::default() };
        c.put_template(&t).unwrap();
        t.snapshot = Some(s.id);
        c.update_template(&t).unwrap();
        assert_eq!(c.snapshot(s.id).unwrap().refs, 1);
        assert_eq!(c.templates().unwrap(), vec![t.clone()]);
        t.snapshot = None;
        c.update_template(&t).unwrap();
        assert_eq!(c.snapshot(s.id).unwrap().refs, 0);
        assert!(c.update_template(&TemplateRecord::default()).is_err());
        let op = OpRecord { id: "fork-1".into(), children: vec!["a".into()], ..Default::default() };
        c.put_op(&op).unwrap();
        assert_eq!(c.ops().unwrap(), vec![op]);
        c.remove_op("fork-1").unwrap();
        assert!(c.ops().unwrap().is_empty());
    }

    #[test]
    fn corrupt_record_gives_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("db")).unwrap();
        let id = layer(&c, None, true);
        let mut bytes = record::encode(KIND_LAYER, &c.layer(id).unwrap());
        let n = bytes.len();
        bytes[n - 3] ^= 0xff;
        c.raw_put_layer_bytes(id, &bytes).unwrap();
        let err = c.layer(id).unwrap_err();
        assert!(matches!(
            err,
            CatalogError::Corrupt { source: record::RecordError::BadChecksum, .. }
        ));
        c.raw_put_layer_bytes(id, &bytes[..10]).unwrap();
        assert!(matches!(
            c.layer(id).unwrap_err(),
            CatalogError::Corrupt { source: record::RecordError::Truncated(10), .. }
        ));
    }

    #[test]
    fn recovery_removes_orphans_and_reports_missing() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("db")).unwrap();
        let files = dir.path().join("layers");
        std::fs::create_dir(&files).unwrap();
        let id = c.alloc_id().unwrap();
        let mut r = LayerRecord::new(id, LayerKind::Disk, None, 4096);
        r.files = vec!["kept".into(), "missing".into()];
        c.insert_layer(&r).unwrap();
        std::fs::write(files.join("kept"), b"x").unwrap();
        std::fs::write(files.join("orphan"), b"x").unwrap();
        let rep = c.recover(&files, &[LayerKind::Disk]).unwrap();
        assert_eq!(rep.removed_orphans, vec!["orphan".to_string()]);
        assert_eq!(rep.missing_files, vec![(id, "missing".to_string())]);
        assert!(files.join("kept").exists());
    }
}
