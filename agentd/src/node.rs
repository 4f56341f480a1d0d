//! The sandbox manager: templates, sandboxes and snapshots, their state machine, capacity,
//! TTLs, lifecycle events, garbage collection, and the recovery pass that runs at start.
//!
//! State machine of a sandbox (persisted in the catalog before any caller sees it):
//!
//! ```text
//!            create (boot)             pause            
//!   ──────▶ Creating ──ready──▶ Running ◀──────▶ Paused
//!   create (restore) ─────────▶   │  ▲  resume     │
//!                                 ▼  │             ▼
//!                             Snapshotting (snapshot, fork; back to where it was)
//!   VMM exits 0 ──▶ Stopped      VMM fails / dies ──▶ Failed (reason)
//!   delete: from any state (deleting flag persisted first; finished by recovery)
//! ```
//!
//! Every multi-step operation (fork, snapshot, warm) writes an op record first; recovery
//! finishes what completed (a snapshot the VMM wrote is registered) and rolls back the
//! rest (children that were never reported are killed and removed).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grove_proto::v1 as pb;
use grove_storage::block::layered::LayeredStore;
use grove_storage::block::{BlockStore, LayerId};
use grove_storage::catalog::{
    Catalog, LayerKind, LayerRecord, OpRecord, SandboxRecord, SnapshotId, SnapshotRecord,
    TemplateRecord,
};
use grove_vmm_api::{RunState, SnapshotKind, SnapshotReport};
use tokio::sync::{broadcast, mpsc, watch};

use crate::config::Config;
use crate::error::{one_line, AgentError, Result};
use crate::layout::Layout;
use crate::metrics::{rss_bytes, CreateLabel, Metrics, SandboxLabel, StateLabel};
use crate::pool::{connect_when_up, Pool, Shape, Standby};
use crate::validate;
use crate::vmm::{self, ExitInfo, Killer, VmmConn, VmmProc};

macro_rules! failpoint {
    ($name:expr) => {
        fail::fail_point!($name);
    };
}

/// A sandbox's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Booting (a cold boot waits for the guest's ready check).
    Creating,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
    /// A snapshot or fork is being taken.
    Snapshotting,
    /// The guest shut down.
    Stopped,
    /// The VMM failed or died.
    Failed,
}

impl State {
    /// The name stored in the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Creating => "creating",
            State::Running => "running",
            State::Paused => "paused",
            State::Snapshotting => "snapshotting",
            State::Stopped => "stopped",
            State::Failed => "failed",
        }
    }

    /// Parses a stored name (unknown names read as Failed).
    pub fn parse(s: &str) -> Self {
        match s {
            "creating" => State::Creating,
            "running" => State::Running,
            "paused" => State::Paused,
            "snapshotting" => State::Snapshotting,
            "stopped" => State::Stopped,
            _ => State::Failed,
        }
    }

    /// The API enum.
    pub fn to_pb(self) -> pb::SandboxState {
        match self {
            State::Creating => pb::SandboxState::Creating,
            State::Running => pb::SandboxState::Running,
            State::Paused => pb::SandboxState::Paused,
            State::Snapshotting => pb::SandboxState::Snapshotting,
            State::Stopped => pb::SandboxState::Stopped,
            State::Failed => pb::SandboxState::Failed,
        }
    }

    /// Whether a VMM runs for it (it counts against capacity).
    pub fn live(self) -> bool {
        !matches!(self, State::Stopped | State::Failed)
    }

    /// Every state.
    pub const ALL: [State; 6] = [
        State::Creating,
        State::Running,
        State::Paused,
        State::Snapshotting,
        State::Stopped,
        State::Failed,
    ];
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs blocking catalog and file work without stalling other tasks on this worker.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Parent and children of every sandbox that exists (children sorted by id).
#[derive(Default)]
struct Lineage {
    children: HashMap<String, Vec<String>>,
    parent: HashMap<String, String>,
}

impl Lineage {
    /// Every descendant of `id`, nearest first (breadth first).
    fn descendants(&self, id: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut i = 0;
        let mut next = self.children.get(id).cloned().unwrap_or_default();
        out.append(&mut next);
        while i < out.len() {
            if let Some(c) = self.children.get(&out[i]) {
                out.extend(c.iter().cloned());
            }
            i += 1;
        }
        out
    }

    /// Its parent, the parent's parent, … while they exist.
    fn ancestors(&self, id: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = self.parent.get(id);
        while let Some(p) = cur.filter(|p| !p.is_empty() && self.parent.contains_key(*p)) {
            if out.len() > self.parent.len() {
                break; // a cycle cannot be recorded; bounded all the same
            }
            out.push(p.clone());
            cur = self.parent.get(p);
        }
        out
    }

    fn fill(&self, mut s: pb::Sandbox) -> pb::Sandbox {
        s.children = self.children.get(&s.id).cloned().unwrap_or_default();
        s.ancestors = self.ancestors(&s.id);
        s
    }
}

/// The VMM connection of a sandbox; its mutex serialises operations on the sandbox.
#[derive(Default)]
struct Slot {
    conn: Option<VmmConn>,
}

struct Entry {
    rec: Mutex<SandboxRecord>,
    op: tokio::sync::Mutex<Slot>,
    killer: Mutex<Killer>,
    /// True once no VMM runs for the sandbox.
    exited: watch::Sender<bool>,
    /// Whether its shape is counted in the node's usage.
    counted: AtomicBool,
}

impl Entry {
    fn new(
        rec: SandboxRecord,
        conn: Option<VmmConn>,
        killer: Killer,
        exited: bool,
        counted: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            rec: Mutex::new(rec),
            op: tokio::sync::Mutex::new(Slot { conn }),
            killer: Mutex::new(killer),
            exited: watch::Sender::new(exited),
            counted: AtomicBool::new(counted),
        })
    }

    fn rec(&self) -> SandboxRecord {
        lock(&self.rec).clone()
    }
}

#[derive(Default, Debug, Clone, Copy)]
struct Usage {
    mem_mib: u64,
    vcpus: u64,
    sandboxes: u64,
}

/// Capacity held for sandboxes being made; what is not committed is given back on drop.
struct Reservation<'a> {
    node: &'a Node,
    shape: Shape,
    left: u32,
}

impl Reservation<'_> {
    fn commit_one(&mut self) {
        self.left = self.left.saturating_sub(1);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        for _ in 0..self.left {
            self.node.release_usage(self.shape);
        }
    }
}

/// What a new sandbox restored from a snapshot is made of.
struct NewSandbox {
    id: String,
    identity: u32,
    snap: SnapshotRecord,
    template: String,
    parent: String,
    labels: BTreeMap<String, String>,
    ttl_s: u32,
    source: &'static str,
    /// A deterministic fork child: its guest keeps the snapshot's clock and RNG state.
    deterministic: bool,
}

/// What a warm-up or cold boot runs.
struct BootSpec {
    tmpl: TemplateRecord,
    shape: Shape,
}

/// Progress of a template warm-up.
pub type Progress = mpsc::UnboundedSender<pb::WarmProgress>;

/// The node: everything agentd manages.
pub struct Node {
    cfg: Config,
    layout: Layout,
    catalog: Arc<Catalog>,
    store: LayeredStore,
    pool: Arc<Pool>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    events: broadcast::Sender<pb::Event>,
    sandboxes: Mutex<BTreeMap<String, Arc<Entry>>>,
    usage: Mutex<Usage>,
    templates_op: tokio::sync::Mutex<()>,
    id_seed: u64,
    id_counter: AtomicU64,
    started_unix_ms: u64,
    host_check: String,
    shutting_down: AtomicBool,
    /// ProcessService's processes.
    pub procs: Arc<crate::procs::Procs>,
    /// FilesystemService's open Read and Write streams.
    pub file_streams: Arc<crate::files::Streams>,
    /// FilesystemService's open Watch streams.
    pub file_watches: Arc<crate::files::Streams>,
}

/// Splitmix64: spreads a counter over 64 bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if ok {
        u64::from_le_bytes(b)
    } else {
        now_ms() ^ u64::from(std::process::id()).rotate_left(32)
    }
}

impl Node {
    /// Opens the data directory, runs the recovery pass and starts the background tasks
    /// (standby pool refill, TTL reaper). Must run inside a multi-threaded tokio runtime.
    pub async fn start(cfg: Config) -> Result<Arc<Self>> {
        let layout = Layout::new(cfg.data_dir.clone());
        layout.check_socket_room().map_err(AgentError::InvalidArgument)?;
        layout.create().map_err(|e| AgentError::io("create", layout.root(), e))?;
        let catalog = Arc::new(Catalog::open(&layout.catalog())?);
        let store = LayeredStore::with_catalog(layout.layers(), catalog.clone(), 4096)?;
        let metrics = Arc::new(Metrics::new());
        let cat = catalog.clone();
        let pool = Pool::new(
            cfg.vmm.clone(),
            layout.clone(),
            cfg.pool_size,
            metrics.clone(),
            Box::new(move || Ok(format!("v{:016x}", cat.alloc_id()?))),
        );
        let host_check = tokio::process::Command::new(&cfg.vmm)
            .args(["check-host", "--json"])
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let (events, _) = broadcast::channel(4096);
        let node = Arc::new(Self {
            procs: Arc::default(),
            file_streams: Arc::default(),
            file_watches: Arc::new(crate::files::Streams::new(
                crate::files::MAX_WATCHES,
                "file watches are open",
            )),
            cfg,
            layout,
            catalog,
            store,
            pool,
            metrics,
            events,
            sandboxes: Mutex::new(BTreeMap::new()),
            usage: Mutex::new(Usage::default()),
            templates_op: tokio::sync::Mutex::new(()),
            id_seed: random_seed(),
            id_counter: AtomicU64::new(0),
            started_unix_ms: now_ms(),
            host_check,
            shutting_down: AtomicBool::new(false),
        });
        node.recover().await?;
        tokio::spawn(node.pool.clone().run());
        let n = Arc::downgrade(&node);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let Some(node) = n.upgrade() else { return };
                node.reap_expired();
            }
        });
        Ok(node)
    }

    /// The data directory layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Stops taking requests; running sandboxes keep running (a restart adopts them).
    pub fn shut_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    fn check_open(&self) -> Result<()> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(AgentError::Unavailable("agentd is shutting down".into()));
        }
        Ok(())
    }

    /// Kills the standby VMMs (tests and benches that own their data dir).
    pub fn drain_pool(&self) {
        self.pool.drain();
    }

    // ------------------------------------------------------------ helpers

    fn new_id(&self) -> String {
        let n = self.id_counter.fetch_add(1, Ordering::Relaxed);
        format!("sb-{:016x}", mix(self.id_seed ^ mix(n)))
    }

    fn alloc_vid(&self) -> Result<String> {
        Ok(format!("v{:016x}", self.catalog.alloc_id()?))
    }

    fn alloc_identity(&self) -> Result<u32> {
        let id = self.catalog.alloc_id()?;
        u32::try_from(id + 2)
            .map_err(|_| AgentError::ResourceExhausted("guest identities are used up".into()))
    }

    fn entry(&self, id: &str) -> Result<Arc<Entry>> {
        validate::sandbox_id(id)?;
        lock(&self.sandboxes)
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("sandbox {id}")))
    }

    fn emit(&self, kind: pb::EventKind, rec: &SandboxRecord) {
        let _ = self.events.send(pb::Event {
            kind: kind.into(),
            sandbox: Some(self.to_pb(rec)),
            unix_ms: now_ms(),
        });
    }

    /// Subscribes to lifecycle events.
    pub fn subscribe(&self) -> broadcast::Receiver<pb::Event> {
        self.events.subscribe()
    }

    /// The API view of a sandbox record.
    fn to_pb(&self, r: &SandboxRecord) -> pb::Sandbox {
        pb::Sandbox {
            id: r.id.clone(),
            state: State::parse(&r.state).to_pb().into(),
            reason: r.reason.clone(),
            template: r.template.clone(),
            from_snapshot: r.from_snapshot.unwrap_or(0),
            parent: r.parent.clone(),
            labels: r.labels.clone().into_iter().collect(),
            vcpus: r.vcpus,
            memory_mib: r.mem_mib,
            created_unix_ms: r.created_unix_ms,
            expires_unix_ms: r.expires_unix_ms,
            identity: r.identity,
            vmm_pid: r.pid,
            disk_layer: r.disk_layer.unwrap_or(0),
            disk_attached: r.disk_layer.is_some(),
            // Filled by Get and List (`Lineage::fill`).
            children: Vec::new(),
            ancestors: Vec::new(),
        }
    }

    /// Deletes the files of collected layer records (memory layers live under
    /// `snapshots/`, block layers under `layers/`).
    fn remove_layer_files(&self, collected: &[LayerRecord]) {
        for r in collected {
            let dir = match r.kind {
                LayerKind::Memory => self.layout.snapshots(),
                _ => self.layout.layers(),
            };
            for f in &r.files {
                let p = dir.join(f);
                let _ = std::fs::remove_file(&p);
                if r.kind == LayerKind::Memory {
                    let _ = std::fs::remove_file(PathBuf::from(format!("{}.ws", p.display())));
                    if let Some(parent) = p.parent() {
                        let _ = std::fs::remove_dir(parent);
                    }
                }
            }
        }
    }

    /// Persists a change to a sandbox record, then publishes it (cache, event).
    fn persist(&self, e: &Entry, f: impl FnOnce(&mut SandboxRecord)) -> Result<SandboxRecord> {
        let old = e.rec();
        let mut new = old.clone();
        f(&mut new);
        let collected = blocking(|| self.catalog.update_sandbox(&new))?;
        self.remove_layer_files(&collected);
        *lock(&e.rec) = new.clone();
        if old.state != new.state || old.reason != new.reason {
            self.emit(pb::EventKind::StateChanged, &new);
        }
        Ok(new)
    }

    fn reserve(&self, shape: Shape, n: u32) -> Result<Reservation<'_>> {
        let mut u = lock(&self.usage);
        let mem = u64::from(shape.mem_mib) * u64::from(n);
        let cpus = u64::from(shape.vcpus) * u64::from(n);
        let c = &self.cfg;
        if u.mem_mib + mem > c.max_memory_mib {
            return Err(AgentError::ResourceExhausted(format!(
                "not enough memory: {mem} MiB asked, {} of {} MiB free",
                c.max_memory_mib.saturating_sub(u.mem_mib),
                c.max_memory_mib
            )));
        }
        if u.vcpus + cpus > u64::from(c.max_vcpus) {
            return Err(AgentError::ResourceExhausted(format!(
                "not enough vCPUs: {cpus} asked, {} of {} free",
                u64::from(c.max_vcpus).saturating_sub(u.vcpus),
                c.max_vcpus
            )));
        }
        if u.sandboxes + u64::from(n) > u64::from(c.max_sandboxes) {
            return Err(AgentError::ResourceExhausted(format!(
                "sandbox limit: {} of {} in use",
                u.sandboxes, c.max_sandboxes
            )));
        }
        u.mem_mib += mem;
        u.vcpus += cpus;
        u.sandboxes += u64::from(n);
        Ok(Reservation { node: self, shape, left: n })
    }

    fn release_usage(&self, shape: Shape) {
        let mut u = lock(&self.usage);
        u.mem_mib = u.mem_mib.saturating_sub(u64::from(shape.mem_mib));
        u.vcpus = u.vcpus.saturating_sub(u64::from(shape.vcpus));
        u.sandboxes = u.sandboxes.saturating_sub(1);
    }

    fn count_usage(&self, shape: Shape) {
        let mut u = lock(&self.usage);
        u.mem_mib += u64::from(shape.mem_mib);
        u.vcpus += u64::from(shape.vcpus);
        u.sandboxes += 1;
    }

    fn uncount(&self, e: &Entry) {
        if e.counted.swap(false, Ordering::SeqCst) {
            let r = lock(&e.rec);
            self.release_usage(Shape { vcpus: r.vcpus, mem_mib: r.mem_mib });
        }
    }

    /// The root disk of a booting VMM: the template's base layer (a raw image, never
    /// written) under a writable layer in the VMM's directory (`VID/root.data`, `.idx`).
    /// grove-vmm owns the chain from there: a snapshot or fork moves the writable layer into
    /// the snapshot directory (`disk-root.data`, `.idx`, frozen) and the VM goes on with a new
    /// one; a restore opens the frozen chain and writes a new layer into its `--disk-dir`
    /// (its VMM directory). The state file names the chain relative to the snapshot
    /// directory, so the data directory can move.
    fn boot_disk_args(&self, base: Option<LayerId>, vid: &str) -> Result<Vec<String>> {
        let Some(base) = base else { return Ok(Vec::new()) };
        let rec = self.catalog.layer(base)?;
        let data = rec
            .files
            .first()
            .ok_or_else(|| AgentError::Internal(format!("base layer {base} has no data file")))?;
        Ok(vec![
            "--disk".into(),
            format!(
                "{},layer={},id=root",
                self.layout.layers().join(data).display(),
                self.layout.vmm(vid).join("root").display()
            ),
        ])
    }

    // ------------------------------------------------------------ VMMs

    /// A standby VMM of `shape` from the pool (counted as a miss if there is none).
    fn take_standby(&self, shape: Shape) -> Option<Standby> {
        let standby = self.pool.take(shape);
        if standby.is_none() {
            self.metrics.pool_misses.inc();
        }
        standby
    }

    /// A standby VMM that could not restore (it died, or refused) is dropped; the caller
    /// falls back to a cold restore.
    fn drop_failed_standby(&self, proc: &VmmProc, e: &grove_vmm_api::ClientError) {
        tracing::warn!(vid = %proc.vid, error = %one_line(e), "standby restore failed");
        self.discard_vmm(proc);
    }

    /// Kills a VMM no record names and removes its directory.
    fn discard_vmm(&self, proc: &VmmProc) {
        proc.kill();
        let _ = std::fs::remove_dir_all(self.layout.vmm(&proc.vid));
    }

    /// A new `grove-vmm restore` process (no standby VMM was at hand).
    async fn start_cold_restore(
        &self,
        snap_dir: &Path,
        identity: u32,
        agent: bool,
        deterministic: bool,
        source: &'static str,
        t: Instant,
    ) -> Result<(VmmProc, VmmConn)> {
        let vid = self.alloc_vid()?;
        let l = &self.layout;
        let mut args = vec![
            "restore".into(),
            "--snapshot".into(),
            snap_dir.display().to_string(),
            "--identity".into(),
            identity.to_string(),
            "--api-sock".into(),
            l.vmm_sock(&vid).display().to_string(),
            "--serial".into(),
            l.vmm_serial(&vid).display().to_string(),
            "--disk-dir".into(),
            l.vmm(&vid).display().to_string(),
        ];
        if agent {
            args.push("--vsock-uds".into());
            args.push(l.vmm_vsock(&vid).display().to_string());
            if deterministic {
                args.push("--deterministic".into());
            }
        }
        let proc = VmmProc::spawn(&self.cfg.vmm, l, &vid, &args)?;
        match connect_when_up(l, &vid, &proc).await {
            Ok(conn) => {
                self.observe_restore(source, "cold", t);
                Ok((proc, conn))
            }
            Err(e) => {
                proc.kill();
                let _ = std::fs::remove_dir_all(l.vmm(&vid));
                Err(e)
            }
        }
    }

    fn observe_restore(&self, source: &'static str, path: &'static str, t: Instant) {
        self.metrics
            .restore_seconds
            .get_or_create(&CreateLabel { source: source.into(), path: path.into() })
            .observe(t.elapsed().as_secs_f64());
    }

    /// Watches a sandbox's VMM: when it exits, the sandbox becomes Stopped or Failed.
    fn watch_exit(self: &Arc<Self>, id: String, proc: VmmProc) {
        let node = Arc::downgrade(self);
        let vid = proc.vid.clone();
        tokio::spawn(async move {
            let info = proc.wait().await;
            if let Some(node) = node.upgrade() {
                node.on_exit(&id, &vid, info).await;
            }
        });
    }

    async fn on_exit(&self, id: &str, vid: &str, info: ExitInfo) {
        let Some(e) = lock(&self.sandboxes).get(id).cloned() else { return };
        // A VMM the record no longer names (replaced by a rewind) ends nothing.
        if lock(&e.rec).vmm != vid {
            return;
        }
        e.exited.send_replace(true);
        if lock(&e.rec).deleting {
            return;
        }
        let _slot = e.op.lock().await;
        let rec = e.rec();
        if rec.deleting || !State::parse(&rec.state).live() {
            return;
        }
        let state = if info.clean { State::Stopped } else { State::Failed };
        self.metrics.vmm_exits.get_or_create(&StateLabel { state: state.as_str().into() }).inc();
        tracing::info!(sandbox = %id, reason = %info.reason, "VMM exited");
        self.uncount(&e);
        if let Err(err) = self.persist(&e, |r| {
            r.state = state.as_str().into();
            r.reason = info.reason.clone();
            r.pid = 0;
        }) {
            tracing::error!(sandbox = %id, error = %err.one_line(), "cannot record VMM exit");
        }
    }

    // ------------------------------------------------------------ templates

    /// Registers a template: kernel (and initrd) copied into the data dir, the root disk
    /// made a base layer.
    pub async fn register_template(
        &self,
        req: pb::RegisterTemplateRequest,
    ) -> Result<pb::Template> {
        self.check_open()?;
        validate::name("template", &req.name)?;
        let kernel = validate::host_file("kernel", &req.kernel)?;
        let initrd = if req.initrd.is_empty() {
            None
        } else {
            Some(validate::host_file("initrd", &req.initrd)?)
        };
        validate::cmdline(&req.cmdline)?;
        let vcpus = if req.vcpus == 0 { 1 } else { req.vcpus };
        let mem = if req.memory_mib == 0 { 256 } else { req.memory_mib };
        validate::vcpus(vcpus)?;
        validate::mem_mib(mem)?;
        let ready = pb::ReadyCheck::try_from(req.ready_check).map_err(|_| {
            AgentError::InvalidArgument(format!("unknown ready check {}", req.ready_check))
        })?;
        let (ready_check, ready_arg) = match ready {
            pb::ReadyCheck::BootTimer => ("boot-timer", String::new()),
            pb::ReadyCheck::SerialText => {
                validate::ready_text(&req.ready_text)?;
                ("serial-text", req.ready_text.clone())
            }
        };
        if req.ready_timeout_seconds > 3600 {
            return Err(AgentError::InvalidArgument("ready timeout over 3600 s".into()));
        }
        let rootfs = match &req.rootfs {
            None => None,
            Some(pb::register_template_request::Rootfs::RootfsImage(p)) => {
                Some((validate::host_file("rootfs image", p)?, false))
            }
            Some(pb::register_template_request::Rootfs::RootfsDir(p)) => {
                Some((validate::host_dir("rootfs directory", p)?, true))
            }
        };
        let _g = self.templates_op.lock().await;
        if self.catalog.template(&req.name).is_ok() {
            return Err(AgentError::AlreadyExists(format!("template {}", req.name)));
        }
        let dir = self.layout.template(&req.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| AgentError::io("create", &dir, e))?;
        let result = blocking(|| -> Result<TemplateRecord> {
            copy_synced(&kernel, &dir.join("kernel"))?;
            if let Some(i) = &initrd {
                copy_synced(i, &dir.join("initrd"))?;
            }
            let base_layer = match &rootfs {
                None => None,
                Some((p, is_dir)) => Some(self.import_rootfs(p, *is_dir, req.disk_mib, &dir)?),
            };
            Ok(TemplateRecord {
                name: req.name.clone(),
                base_layer,
                kernel: format!("templates/{}/kernel", req.name),
                cmdline: req.cmdline.clone(),
                start_command: Vec::new(),
                snapshot: None,
                initrd: initrd.as_ref().map(|_| format!("templates/{}/initrd", req.name)),
                vcpus,
                mem_mib: mem,
                ready_check: ready_check.into(),
                ready_arg,
                ready_timeout_s: if req.ready_timeout_seconds == 0 {
                    120
                } else {
                    req.ready_timeout_seconds
                },
                source: kernel.display().to_string(),
                created_unix_ms: now_ms(),
                guest_agent: req.guest_agent,
            })
        });
        let rec = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // The template's hold replaces the one create_base gave the caller.
        let put = blocking(|| -> Result<()> {
            self.catalog.put_template(&rec)?;
            if let Some(l) = rec.base_layer {
                self.store.release(l)?;
            }
            Ok(())
        });
        if let Err(e) = put {
            if let Some(l) = rec.base_layer {
                let _ = self.store.release(l);
            }
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        tracing::info!(template = %rec.name, "template registered");
        Ok(self.template_pb(&rec))
    }

    fn import_rootfs(
        &self,
        p: &Path,
        is_dir: bool,
        disk_mib: u32,
        tmp_dir: &Path,
    ) -> Result<LayerId> {
        let mib = 1u64 << 20;
        if !is_dir {
            let len = std::fs::metadata(p).map_err(|e| AgentError::io("stat", p, e))?.len();
            let size = (u64::from(disk_mib) * mib).max(len.div_ceil(mib) * mib);
            return Ok(self.store.create_base(size, Some(p))?);
        }
        let used = dir_size(p);
        let size = if disk_mib > 0 {
            u64::from(disk_mib) * mib
        } else {
            (used + used / 2 + 64 * mib).div_ceil(mib) * mib
        };
        let img = tmp_dir.join("rootfs.img.tmp");
        let out = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(p)
            .arg(&img)
            .arg(format!("{}M", size / mib))
            .output()
            .map_err(|e| AgentError::io("run mkfs.ext4 (e2fsprogs) for", p, e))?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&img);
            return Err(AgentError::InvalidArgument(format!(
                "mkfs.ext4 -d {} failed: {}",
                p.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let r = self.store.create_base(size, Some(&img));
        let _ = std::fs::remove_file(&img);
        Ok(r?)
    }

    fn template_pb(&self, t: &TemplateRecord) -> pb::Template {
        let in_use =
            lock(&self.sandboxes).values().filter(|e| lock(&e.rec).template == t.name).count();
        let disk_bytes =
            t.base_layer.and_then(|l| self.catalog.layer(l).ok()).map_or(0, |l| l.size);
        pb::Template {
            name: t.name.clone(),
            kernel: t.source.clone(),
            has_initrd: t.initrd.is_some(),
            cmdline: t.cmdline.clone(),
            vcpus: t.vcpus,
            memory_mib: t.mem_mib,
            base_layer: t.base_layer.unwrap_or(0),
            disk_bytes,
            ready_check: if t.ready_check == "serial-text" {
                pb::ReadyCheck::SerialText.into()
            } else {
                pb::ReadyCheck::BootTimer.into()
            },
            ready_text: t.ready_arg.clone(),
            snapshot: t.snapshot.unwrap_or(0),
            created_unix_ms: t.created_unix_ms,
            sandboxes: u32::try_from(in_use).unwrap_or(u32::MAX),
            guest_agent: t.guest_agent,
        }
    }

    /// Whether sandboxes of template `name` run guest-init's agent (a vsock device).
    fn has_agent(&self, template: &str) -> bool {
        !template.is_empty() && self.catalog.template(template).is_ok_and(|t| t.guest_agent)
    }

    /// Every template.
    pub fn list_templates(&self) -> Result<Vec<pb::Template>> {
        Ok(self.catalog.templates()?.iter().map(|t| self.template_pb(t)).collect())
    }

    /// Deletes a template; refused while sandboxes made from it exist.
    pub async fn delete_template(&self, name: &str) -> Result<()> {
        self.check_open()?;
        validate::name("template", name)?;
        let _g = self.templates_op.lock().await;
        let t = self
            .catalog
            .template(name)
            .map_err(|_| AgentError::NotFound(format!("template {name}")))?;
        let users = self.template_pb(&t).sandboxes;
        if users > 0 {
            return Err(AgentError::FailedPrecondition(format!(
                "template {name} is used by {users} sandbox(es): delete them first"
            )));
        }
        let collected = blocking(|| self.catalog.remove_template(name))?;
        self.remove_layer_files(&collected);
        let _ = std::fs::remove_dir_all(self.layout.template(name));
        let shape = Shape { vcpus: t.vcpus, mem_mib: t.mem_mib };
        let still_wanted =
            self.catalog.templates()?.iter().any(|o| {
                o.snapshot.is_some() && Shape { vcpus: o.vcpus, mem_mib: o.mem_mib } == shape
            });
        if !still_wanted {
            self.pool.unwant(shape);
        }
        self.gc_snapshots();
        Ok(())
    }

    /// Boots a template's kernel in a new VMM directory.
    fn spawn_boot(&self, spec: &BootSpec, vid: &str) -> Result<VmmProc> {
        let l = &self.layout;
        let mut args = vec![
            "run".to_string(),
            "--kernel".into(),
            l.root().join(&spec.tmpl.kernel).display().to_string(),
            "--cmdline".into(),
            spec.tmpl.cmdline.clone(),
            "--vcpus".into(),
            spec.shape.vcpus.to_string(),
            "--mem-mib".into(),
            spec.shape.mem_mib.to_string(),
            "--serial".into(),
            l.vmm_serial(vid).display().to_string(),
            "--api-sock".into(),
            l.vmm_sock(vid).display().to_string(),
            // A virtio-rng device: a restored or forked Linux guest reads fresh host entropy
            // from /dev/hwrng (its snapshot carries the device to every restore).
            "--rng".into(),
        ];
        if let Some(i) = &spec.tmpl.initrd {
            args.push("--initrd".into());
            args.push(l.root().join(i).display().to_string());
        }
        if spec.tmpl.guest_agent {
            args.push("--vsock-uds".into());
            args.push(l.vmm_vsock(vid).display().to_string());
        }
        args.extend(self.boot_disk_args(spec.tmpl.base_layer, vid)?);
        VmmProc::spawn(&self.cfg.vmm, l, vid, &args)
    }

    /// Waits for a booting guest's ready check.
    async fn wait_ready(&self, tmpl: &TemplateRecord, vid: &str, proc: &VmmProc) -> Result<()> {
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(u64::from(tmpl.ready_timeout_s.max(1)));
        let (file, needle) = if tmpl.ready_check == "serial-text" {
            (self.layout.vmm_serial(vid), tmpl.ready_arg.clone())
        } else {
            (self.layout.vmm_log(vid), "boot-timer: guest ready".to_string())
        };
        if vmm::wait_for_text(&file, &needle, deadline, || proc.has_exited()).await {
            return Ok(());
        }
        let why = if proc.has_exited() {
            vmm::last_error_line(&self.layout.vmm_log(vid))
                .map_or_else(|| "the VMM exited".to_string(), |e| format!("the VMM exited: {e}"))
        } else {
            format!("no ready signal ({needle:?}) within {} s", tmpl.ready_timeout_s)
        };
        Err(AgentError::FailedPrecondition(format!(
            "template {} did not become ready: {why}",
            tmpl.name
        )))
    }

    /// Boots the template once, waits for its ready check and snapshots it: later creates
    /// restore that snapshot.
    pub async fn warm(self: &Arc<Self>, name: &str, progress: Progress) -> Result<pb::Template> {
        self.check_open()?;
        validate::name("template", name)?;
        let _g = self.templates_op.lock().await;
        let tmpl = self
            .catalog
            .template(name)
            .map_err(|_| AgentError::NotFound(format!("template {name}")))?;
        let shape = Shape { vcpus: tmpl.vcpus, mem_mib: tmpl.mem_mib };
        let t0 = Instant::now();
        let say = |stage: pb::warm_progress::Stage, msg: String| {
            let _ = progress.send(pb::WarmProgress {
                stage: stage.into(),
                message: msg,
                elapsed_ms: t0.elapsed().as_secs_f64() * 1000.0,
                template: None,
            });
        };
        let res = self.reserve(shape, 1)?;
        let vid = self.alloc_vid()?;
        let sid = self.catalog.alloc_id()?;
        let op = OpRecord {
            id: format!("warm-{sid}"),
            kind: "warm".into(),
            sandbox: vid.clone(),
            snapshot: Some(sid),
            children: Vec::new(),
            dir: Layout::snapshot_rel(sid),
            started_unix_ms: now_ms(),
        };
        blocking(|| self.catalog.put_op(&op))?;
        say(
            pb::warm_progress::Stage::Booting,
            format!("booting {} ({} vCPU, {} MiB)", name, shape.vcpus, shape.mem_mib),
        );
        let spec = BootSpec { tmpl: tmpl.clone(), shape };
        let result = async {
            let proc = self.spawn_boot(&spec, &vid)?;
            let killer = proc.killer();
            let r = async {
                say(
                    pb::warm_progress::Stage::WaitingReady,
                    "waiting for the guest's ready check".into(),
                );
                self.wait_ready(&tmpl, &vid, &proc).await?;
                let mut conn = connect_when_up(&self.layout, &vid, &proc).await?;
                say(
                    pb::warm_progress::Stage::Snapshotting,
                    "guest ready; writing the snapshot".into(),
                );
                let dir = self.layout.snapshot(sid);
                let rep = conn
                    .snapshot(SnapshotKind::Full, &dir, true)
                    .await
                    .map_err(|e| AgentError::vmm("snapshot", e))?;
                let snap = self.register_snapshot(&RegisterSnapshot {
                    sid,
                    rep: &rep,
                    base: None,
                    pinned: false,
                    lineage: None,
                    shape,
                    source: String::new(),
                    labels: BTreeMap::from([("grove.template".to_string(), name.to_string())]),
                    sandbox: None,
                    disk_base: tmpl.base_layer,
                })?;
                let mut t = tmpl.clone();
                t.snapshot = Some(snap.id);
                let collected = blocking(|| self.catalog.update_template(&t))?;
                self.remove_layer_files(&collected);
                Ok::<_, AgentError>(t)
            }
            .await;
            killer.kill();
            let _ = proc.wait().await;
            r
        }
        .await;
        drop(res);
        let _ = std::fs::remove_dir_all(self.layout.vmm(&vid));
        if result.is_err() && self.catalog.snapshot(sid).is_err() {
            let _ = std::fs::remove_dir_all(self.layout.snapshot(sid));
        }
        blocking(|| self.catalog.remove_op(&op.id))?;
        self.gc_snapshots();
        let t = result?;
        self.pool.want(shape);
        let pb_t = self.template_pb(&t);
        let _ = progress.send(pb::WarmProgress {
            stage: pb::warm_progress::Stage::Done.into(),
            message: format!("warm: snapshot {}", t.snapshot.unwrap_or(0)),
            elapsed_ms: t0.elapsed().as_secs_f64() * 1000.0,
            template: Some(pb_t.clone()),
        });
        tracing::info!(template = %name, snapshot = t.snapshot.unwrap_or(0), ms = t0.elapsed().as_secs_f64() * 1000.0, "template warm");
        Ok(pb_t)
    }

    // ------------------------------------------------------------ snapshots

    /// Records a snapshot the VMM wrote into `snapshots/SID`: its new memory layers (on
    /// `base`), the snapshot, and the sandbox's moved head, in one catalog transaction.
    fn register_snapshot(&self, r: &RegisterSnapshot<'_>) -> Result<SnapshotRecord> {
        let dir = self.layout.snapshot(r.sid);
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| AgentError::io("read", &dir, e))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.ends_with(".mlayer"))
            .collect();
        files.sort();
        let mut layers = Vec::new();
        let mut head = r.base;
        for f in &files {
            let path = dir.join(f);
            let size =
                std::fs::metadata(&path).map_err(|e| AgentError::io("stat", &path, e))?.len();
            // A full layer (depth 0) starts a chain; every other layer sits on the head.
            let parent = if f.starts_with("0000.") { None } else { head };
            let mut l = LayerRecord::new(self.catalog.alloc_id()?, LayerKind::Memory, parent, size);
            l.frozen = true;
            l.files = vec![format!("{}/{f}", r.sid)];
            head = Some(l.id);
            layers.push(l);
        }
        let snap = SnapshotRecord {
            id: r.sid,
            parent: r.lineage.filter(|p| self.catalog.snapshot(*p).is_ok()),
            // The snapshot holds the base image under its disk chain; the frozen layers
            // above it are grove-vmm's `disk-*` files in this and earlier snapshot
            // directories (lineage).
            disk_layers: r.disk_base.into_iter().collect(),
            memory_layer: head,
            state_file: Some(format!("{}/vmstate", r.sid)),
            labels: r.labels.clone(),
            refs: 0,
            created_unix_ms: now_ms(),
            pinned: r.pinned,
            sandbox: r.source.clone(),
            vcpus: r.shape.vcpus,
            mem_mib: r.shape.mem_mib,
            depth: r.rep.depth,
            pages: r.rep.pages,
            pause_ms: r.rep.pause_ms,
        };
        let sandbox = r.sandbox.as_ref().map(|s| {
            let mut s = s.clone();
            s.memory_layer = head;
            s.last_snapshot = Some(r.sid);
            s
        });
        let collected =
            blocking(|| self.catalog.commit_snapshot(&snap, &layers, sandbox.as_ref(), None))?;
        self.remove_layer_files(&collected);
        Ok(snap)
    }

    fn snapshot_pb(&self, s: &SnapshotRecord) -> pb::SnapshotInfo {
        pb::SnapshotInfo {
            id: s.id,
            parent: s.parent.unwrap_or(0),
            sandbox: s.sandbox.clone(),
            labels: s.labels.clone().into_iter().collect(),
            vcpus: s.vcpus,
            memory_mib: s.mem_mib,
            depth: s.depth,
            pages: s.pages,
            pause_ms: s.pause_ms,
            created_unix_ms: s.created_unix_ms,
            refs: s.refs,
        }
    }

    /// Every snapshot.
    pub fn list_snapshots(&self) -> Result<Vec<pb::SnapshotInfo>> {
        let mut v = self.catalog.snapshots()?;
        v.sort_by_key(|s| s.id);
        Ok(v.iter().map(|s| self.snapshot_pb(s)).collect())
    }

    /// Deletes a snapshot nothing uses.
    pub fn delete_snapshot(&self, id: SnapshotId) -> Result<()> {
        self.check_open()?;
        let s = self
            .catalog
            .snapshot(id)
            .map_err(|_| AgentError::NotFound(format!("snapshot {id}")))?;
        let users = lock(&self.sandboxes)
            .values()
            .filter(|e| lock(&e.rec).from_snapshot == Some(id))
            .count();
        if s.refs > 0
            || users > 0
            || !self.catalog.snapshot_children(id)?.is_empty()
            || self.disk_chained(&s)
        {
            return Err(AgentError::FailedPrecondition(format!(
                "snapshot {id} is in use (by {} sandbox(es) or template(s), later snapshots, or the disk of the sandbox it was taken of)",
                s.refs
            )));
        }
        let collected = blocking(|| self.catalog.remove_snapshot(id))?;
        self.remove_layer_files(&collected);
        self.remove_snapshot_dir_files(&s);
        self.gc_snapshots();
        Ok(())
    }

    fn remove_snapshot_dir_files(&self, s: &SnapshotRecord) {
        if let Some(f) = &s.state_file {
            let p = self.layout.snapshots().join(f);
            let _ = std::fs::remove_file(&p);
            if let Some(d) = p.parent() {
                // grove-vmm's frozen disk layers (`disk-<id>.data`, `.idx`).
                for f in list_dir(d) {
                    if is_disk_layer_file(&f) {
                        let _ = std::fs::remove_file(d.join(f));
                    }
                }
                let _ = std::fs::remove_dir(d);
            }
        }
    }

    /// Whether a running sandbox's disk sits on this snapshot's frozen disk layers (its last
    /// snapshot, when the snapshot has a disk): its next snapshot will name them, so they
    /// stay until the sandbox is gone or has a later snapshot (which descends from this one).
    fn disk_chained(&self, s: &SnapshotRecord) -> bool {
        !s.disk_layers.is_empty()
            && lock(&self.sandboxes).values().any(|e| lock(&e.rec).last_snapshot == Some(s.id))
    }

    /// Collects snapshots nothing refers to (not pinned, no referrers, no later snapshots),
    /// repeatedly, so that a chain of fork snapshots goes once its last child is gone.
    fn gc_snapshots(&self) {
        loop {
            let Ok(snaps) = self.catalog.snapshots() else { return };
            let mut changed = false;
            for s in snaps {
                if s.pinned || s.refs > 0 || self.disk_chained(&s) {
                    continue;
                }
                if self.catalog.snapshot_children(s.id).map_or(true, |c| !c.is_empty()) {
                    continue;
                }
                if let Ok(collected) = blocking(|| self.catalog.remove_snapshot(s.id)) {
                    self.remove_layer_files(&collected);
                    self.remove_snapshot_dir_files(&s);
                    changed = true;
                }
            }
            if !changed {
                return;
            }
        }
    }

    // ------------------------------------------------------------ sandboxes

    /// Creates a sandbox (see `SandboxService.Create`).
    pub async fn create(self: &Arc<Self>, req: pb::CreateRequest) -> Result<pb::Sandbox> {
        self.check_open()?;
        let t = Instant::now();
        if req.network.is_some() {
            return Err(AgentError::Unimplemented(
                "network: reserved for netd, which is not part of this agentd yet".into(),
            ));
        }
        let labels = validate::labels(&req.labels)?;
        validate::ttl(req.ttl_seconds)?;
        if req.vcpus != 0 {
            validate::vcpus(req.vcpus)?;
        }
        if req.memory_mib != 0 {
            validate::mem_mib(req.memory_mib)?;
        }
        match req.source {
            None => {
                Err(AgentError::InvalidArgument("create needs a template or a snapshot_id".into()))
            }
            Some(pb::create_request::Source::Template(name)) => {
                validate::name("template", &name)?;
                let tmpl = self
                    .catalog
                    .template(&name)
                    .map_err(|_| AgentError::NotFound(format!("template {name}")))?;
                let shape = Shape {
                    vcpus: if req.vcpus == 0 { tmpl.vcpus } else { req.vcpus },
                    mem_mib: if req.memory_mib == 0 { tmpl.mem_mib } else { req.memory_mib },
                };
                let warm = tmpl
                    .snapshot
                    .filter(|_| shape == Shape { vcpus: tmpl.vcpus, mem_mib: tmpl.mem_mib })
                    .and_then(|s| self.catalog.snapshot(s).ok());
                let mut res = self.reserve(shape, 1)?;
                let rec = match warm {
                    Some(snap) => {
                        let spec = NewSandbox {
                            id: self.new_id(),
                            identity: self.alloc_identity()?,
                            snap,
                            template: name,
                            parent: String::new(),
                            labels,
                            ttl_s: req.ttl_seconds,
                            source: "template",
                            deterministic: false,
                        };
                        self.new_from_snapshot(spec).await?
                    }
                    None => {
                        self.new_by_boot(BootSpec { tmpl, shape }, labels, req.ttl_seconds).await?
                    }
                };
                res.commit_one();
                self.metrics
                    .create_seconds
                    .get_or_create(&CreateLabel {
                        source: "template".into(),
                        path: if rec.from_snapshot.is_some() { "restore" } else { "boot" }.into(),
                    })
                    .observe(t.elapsed().as_secs_f64());
                Ok(self.to_pb(&rec))
            }
            Some(pb::create_request::Source::SnapshotId(sid)) => {
                let snap = self
                    .catalog
                    .snapshot(sid)
                    .map_err(|_| AgentError::NotFound(format!("snapshot {sid}")))?;
                let shape = Shape { vcpus: snap.vcpus, mem_mib: snap.mem_mib };
                if (req.vcpus != 0 && req.vcpus != shape.vcpus)
                    || (req.memory_mib != 0 && req.memory_mib != shape.mem_mib)
                {
                    return Err(AgentError::FailedPrecondition(format!(
                        "snapshot {sid} restores only at its own shape ({} vCPU, {} MiB)",
                        shape.vcpus, shape.mem_mib
                    )));
                }
                let template = lock(&self.sandboxes)
                    .get(&snap.sandbox)
                    .map(|e| lock(&e.rec).template.clone())
                    .unwrap_or_default();
                let mut res = self.reserve(shape, 1)?;
                let spec = NewSandbox {
                    id: self.new_id(),
                    identity: self.alloc_identity()?,
                    snap,
                    template,
                    parent: String::new(),
                    labels,
                    ttl_s: req.ttl_seconds,
                    source: "snapshot",
                    deterministic: false,
                };
                let rec = self.new_from_snapshot(spec).await?;
                res.commit_one();
                self.metrics
                    .create_seconds
                    .get_or_create(&CreateLabel {
                        source: "snapshot".into(),
                        path: "restore".into(),
                    })
                    .observe(t.elapsed().as_secs_f64());
                Ok(self.to_pb(&rec))
            }
        }
    }

    /// A sandbox restored from a snapshot; the caller holds its capacity.
    ///
    /// With a standby VMM, the record is committed while the VMM restores (the restore
    /// request is sent first, then the commit runs, then the reply is read): nothing is
    /// reported before both are done, a failed restore removes the record again, and a
    /// crash in between leaves either a VMM no record names (killed by recovery) or a
    /// committed record whose VMM restored (adopted) or, had the request been lost, still
    /// stands by (rolled back by recovery).
    async fn new_from_snapshot(self: &Arc<Self>, s: NewSandbox) -> Result<SandboxRecord> {
        let shape = Shape { vcpus: s.snap.vcpus, mem_mib: s.snap.mem_mib };
        let dir = self.layout.snapshot(s.snap.id);
        let started = Instant::now();
        let agent = self.has_agent(&s.template);
        if let Some(Standby { proc, mut conn }) = self.take_standby(shape) {
            let rec = self.new_record(&s, &proc);
            let vsock = agent.then(|| self.layout.vmm_vsock(&proc.vid));
            let (restored, committed) = conn
                .restore_beside(&dir, s.identity, vsock.as_deref(), s.deterministic, {
                    let (catalog, rec) = (self.catalog.clone(), rec.clone());
                    async move {
                        let t = Instant::now();
                        let r = tokio::task::spawn_blocking(move || {
                            failpoint!("agentd::create::restore_sent");
                            catalog.put_sandbox(&rec).map_err(AgentError::from)
                        })
                        .await
                        .unwrap_or_else(|e| Err(AgentError::Internal(format!("commit: {e}"))));
                        (r, t.elapsed())
                    }
                })
                .await;
            let commit_time = committed.as_ref().map(|c| c.1);
            let committed = committed.map(|c| c.0);
            match (restored, committed) {
                (Ok(_), Some(Ok(()))) => {
                    self.observe_restore(s.source, "standby", started);
                    failpoint!("agentd::create::after_restore");
                    return Ok(self.created(rec, conn, proc, started, commit_time));
                }
                (Ok(_), committed) => {
                    // Restored, but no record names it.
                    self.discard_vmm(&proc);
                    return Err(match committed {
                        Some(Err(e)) => e,
                        _ => AgentError::Internal("the record was not committed".into()),
                    });
                }
                (Err(e), committed) => {
                    if let Some(Ok(())) = committed {
                        let collected = blocking(|| self.catalog.remove_sandbox(&rec.id))?;
                        self.remove_layer_files(&collected);
                    }
                    self.drop_failed_standby(&proc, &e);
                }
            }
        }
        let (proc, conn) = self
            .start_cold_restore(&dir, s.identity, agent, s.deterministic, s.source, started)
            .await?;
        let restored = Instant::now();
        failpoint!("agentd::create::after_restore");
        let rec = self.new_record(&s, &proc);
        if let Err(e) = blocking(|| self.catalog.put_sandbox(&rec)) {
            self.discard_vmm(&proc);
            return Err(e.into());
        }
        let commit_time = restored.elapsed();
        Ok(self.created(rec, conn, proc, started, Some(commit_time)))
    }

    /// The record of a sandbox restored by `proc` from `s`, Running.
    fn new_record(&self, s: &NewSandbox, proc: &VmmProc) -> SandboxRecord {
        let now = now_ms();
        SandboxRecord {
            id: s.id.clone(),
            // The sandbox holds the base image under its disk; its writable layer is the
            // VMM's (`--disk-dir`: its VMM directory).
            disk_layer: s.snap.disk_layers.first().copied(),
            from_snapshot: Some(s.snap.id),
            state: State::Running.as_str().into(),
            labels: s.labels.clone(),
            memory_layer: s.snap.memory_layer,
            last_snapshot: Some(s.snap.id),
            template: s.template.clone(),
            parent: s.parent.clone(),
            vcpus: s.snap.vcpus,
            mem_mib: s.snap.mem_mib,
            identity: s.identity,
            created_unix_ms: now,
            expires_unix_ms: if s.ttl_s == 0 { 0 } else { now + u64::from(s.ttl_s) * 1000 },
            reason: String::new(),
            vmm: proc.vid.clone(),
            pid: proc.pid,
            deleting: false,
        }
    }

    /// A created sandbox, committed: into the table, its exit watched, announced.
    fn created(
        self: &Arc<Self>,
        rec: SandboxRecord,
        conn: VmmConn,
        proc: VmmProc,
        started: Instant,
        commit_time: Option<Duration>,
    ) -> SandboxRecord {
        let entry = Entry::new(rec.clone(), Some(conn), proc.killer(), false, true);
        lock(&self.sandboxes).insert(rec.id.clone(), entry);
        self.watch_exit(rec.id.clone(), proc);
        self.emit(pb::EventKind::Created, &rec);
        tracing::debug!(
            sandbox = %rec.id,
            restore_and_commit_ms = started.elapsed().as_secs_f64() * 1000.0,
            commit_ms = commit_time.map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            "create steps"
        );
        tracing::info!(sandbox = %rec.id, snapshot = ?rec.from_snapshot, identity = rec.identity, "sandbox running");
        rec
    }

    /// A sandbox booted from the template's kernel (not warm, or another shape).
    async fn new_by_boot(
        self: &Arc<Self>,
        spec: BootSpec,
        labels: BTreeMap<String, String>,
        ttl_s: u32,
    ) -> Result<SandboxRecord> {
        let disk = spec.tmpl.base_layer;
        let vid = self.alloc_vid()?;
        let now = now_ms();
        let rec = SandboxRecord {
            id: self.new_id(),
            disk_layer: disk,
            from_snapshot: None,
            state: State::Creating.as_str().into(),
            labels,
            template: spec.tmpl.name.clone(),
            vcpus: spec.shape.vcpus,
            mem_mib: spec.shape.mem_mib,
            identity: self.alloc_identity()?,
            created_unix_ms: now,
            expires_unix_ms: if ttl_s == 0 { 0 } else { now + u64::from(ttl_s) * 1000 },
            vmm: vid.clone(),
            ..Default::default()
        };
        blocking(|| self.catalog.put_sandbox(&rec))?;
        let entry = Entry::new(rec.clone(), None, Killer::default(), true, true);
        lock(&self.sandboxes).insert(rec.id.clone(), entry.clone());
        self.emit(pb::EventKind::Created, &rec);
        let booted = async {
            let proc = self.spawn_boot(&spec, &vid)?;
            *lock(&entry.killer) = proc.killer();
            entry.exited.send_replace(false);
            let r = async {
                self.wait_ready(&spec.tmpl, &vid, &proc).await?;
                connect_when_up(&self.layout, &vid, &proc).await
            }
            .await;
            Ok::<_, AgentError>((proc, r))
        }
        .await;
        let (proc, conn) = match booted {
            Ok((proc, Ok(conn))) => (proc, conn),
            Ok((proc, Err(e))) => {
                proc.kill();
                let _ = proc.wait().await;
                entry.exited.send_replace(true);
                entry.counted.store(false, Ordering::SeqCst);
                self.remove_sandbox_now(&entry);
                return Err(e);
            }
            Err(e) => {
                entry.counted.store(false, Ordering::SeqCst);
                self.remove_sandbox_now(&entry);
                return Err(e);
            }
        };
        let pid = proc.pid;
        entry.op.lock().await.conn = Some(conn);
        self.watch_exit(rec.id.clone(), proc);
        self.persist(&entry, |r| {
            r.state = State::Running.as_str().into();
            r.pid = pid;
        })
    }

    /// Removes a sandbox whose VMM is gone: record, layers, VMM directory, entry.
    fn remove_sandbox_now(&self, e: &Entry) {
        let rec = e.rec();
        match blocking(|| self.catalog.remove_sandbox(&rec.id)) {
            Ok(collected) => self.remove_layer_files(&collected),
            Err(err) => {
                tracing::error!(sandbox = %rec.id, error = %one_line(&err), "cannot remove record");
            }
        }
        if !rec.vmm.is_empty() {
            let _ = std::fs::remove_dir_all(self.layout.vmm(&rec.vmm));
        }
        lock(&self.sandboxes).remove(&rec.id);
        self.uncount(e);
        self.emit(pb::EventKind::Deleted, &rec);
    }

    /// One sandbox, with its lineage.
    pub fn get(&self, id: &str) -> Result<pb::Sandbox> {
        let rec = self.entry(id)?.rec();
        Ok(self.lineage().fill(self.to_pb(&rec)))
    }

    // ------------------------------------------------------------ processes

    /// Starts a process in a running sandbox whose template runs guest-init's agent.
    pub async fn start_process(
        self: &Arc<Self>,
        req: &pb::StartProcessRequest,
    ) -> Result<(
        Arc<crate::procs::Proc>,
        mpsc::Receiver<std::result::Result<pb::ProcessEvent, tonic::Status>>,
    )> {
        let start = crate::procs::exec_start(req)?;
        let vsock = self.agent_vsock(&req.sandbox_id)?;
        let (p, rx) = self.procs.start(&req.sandbox_id, &vsock, start, now_ms()).await?;
        if !req.checkpoint {
            return Ok((p, rx));
        }
        Ok((p.clone(), self.checkpoint_after(req.sandbox_id.clone(), p.id.clone(), rx)))
    }

    /// Forwards a process's events; at its exit, snapshots the sandbox and names the
    /// snapshot in the exit event. Runs to the exit even when the client is gone.
    fn checkpoint_after(
        self: &Arc<Self>,
        sandbox: String,
        process: String,
        mut rx: mpsc::Receiver<std::result::Result<pb::ProcessEvent, tonic::Status>>,
    ) -> mpsc::Receiver<std::result::Result<pb::ProcessEvent, tonic::Status>> {
        let (tx, out) = mpsc::channel(64);
        let node = self.clone();
        tokio::spawn(async move {
            let mut listening = true;
            while let Some(ev) = rx.recv().await {
                let ev = match ev {
                    Ok(pb::ProcessEvent { event: Some(pb::process_event::Event::Exit(mut x)) }) => {
                        let labels =
                            HashMap::from([("grove.process".to_string(), process.clone())]);
                        let req = pb::SnapshotRequest { id: sandbox.clone(), labels };
                        match node.snapshot(req).await {
                            Ok(s) => x.checkpoint_snapshot_id = s.id,
                            Err(e) => x.checkpoint_error = e.one_line(),
                        }
                        tracing::info!(sandbox = %sandbox, process = %process, snapshot = x.checkpoint_snapshot_id, "checkpoint after the process");
                        Ok(pb::ProcessEvent { event: Some(pb::process_event::Event::Exit(x)) })
                    }
                    other => other,
                };
                if listening {
                    listening = tx.send(ev).await.is_ok();
                }
            }
        });
        out
    }

    /// The vsock socket of a running sandbox whose template runs guest-init's agent.
    pub fn agent_vsock(&self, sandbox: &str) -> Result<PathBuf> {
        self.check_open()?;
        let rec = self.entry(sandbox)?.rec();
        if !self.has_agent(&rec.template) {
            return Err(AgentError::FailedPrecondition(format!(
                "sandbox {} has no guest agent (its template was registered without guest_agent)",
                rec.id
            )));
        }
        let st = State::parse(&rec.state);
        if st != State::Running || rec.deleting {
            return Err(AgentError::FailedPrecondition(format!(
                "sandbox {} is {}: its guest agent answers while it runs",
                rec.id,
                if rec.deleting { "being deleted" } else { st.as_str() }
            )));
        }
        Ok(self.layout.vmm_vsock(&rec.vmm))
    }

    /// Fork exploration: forks `req.id` and starts each child's files and command; the
    /// stream carries the fork first, then every child's events as they come.
    pub async fn fork_run(
        self: &Arc<Self>,
        req: pb::ForkRunRequest,
    ) -> Result<mpsc::Receiver<std::result::Result<pb::ForkRunEvent, tonic::Status>>> {
        const MAX_FILES_BYTES: usize = 16 << 20;
        validate::fork_count(req.count)?;
        if req.children.len() > req.count as usize {
            return Err(AgentError::InvalidArgument(format!(
                "{} children for a count of {}",
                req.children.len(),
                req.count
            )));
        }
        // Every child's work is checked before anything is forked.
        let mut plans = Vec::with_capacity(req.count as usize);
        for i in 0..req.count as usize {
            let spec = req.children.get(i).cloned().unwrap_or_default();
            let argv = if spec.argv.is_empty() { req.argv.clone() } else { spec.argv.clone() };
            let mut env = req.env.clone();
            env.extend(spec.env.clone());
            let start = if argv.is_empty() {
                None
            } else {
                let s = pb::StartProcessRequest {
                    sandbox_id: String::new(),
                    argv,
                    env,
                    cwd: req.cwd.clone(),
                    timeout_seconds: req.timeout_seconds,
                    ..Default::default()
                };
                Some(crate::procs::exec_start(&s)?)
            };
            let bytes: usize = spec.files.iter().map(|(p, d)| p.len() + d.len()).sum();
            if bytes > MAX_FILES_BYTES {
                return Err(AgentError::InvalidArgument(format!(
                    "child {i}'s files take {bytes} bytes (at most {MAX_FILES_BYTES})"
                )));
            }
            for p in spec.files.keys() {
                crate::files::check_path(p)?;
            }
            let mut files: Vec<(String, Vec<u8>)> = spec.files.into_iter().collect();
            files.sort();
            plans.push((start, files));
        }
        // The parent must run guest-init's agent: the children's work goes through it.
        self.agent_vsock(&req.id)?;
        let child_labels =
            req.children.iter().map(|c| pb::Labels { labels: c.labels.clone() }).collect();
        // Each child's files and command start as soon as that child runs; its events wait
        // behind the `forked` event (the gate), which comes once every child runs. If the
        // fork fails, its children are deleted with whatever they started, the gate closes
        // without opening and the caller gets the fork's error alone.
        let (running_tx, mut running_rx) = mpsc::unbounded_channel::<(usize, String)>();
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
        let (tx, rx) = mpsc::channel(256);
        let mut plans: Vec<Option<_>> = plans.into_iter().map(Some).collect();
        let starter = {
            let node = self.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some((i, id)) = running_rx.recv().await {
                    let Some((start, files)) = plans.get_mut(i).and_then(Option::take) else {
                        continue;
                    };
                    let (node, tx, mut gate) = (node.clone(), tx.clone(), gate_rx.clone());
                    tokio::spawn(async move {
                        let index = u32::try_from(i).unwrap_or(u32::MAX);
                        let ev = |event| pb::ForkRunEvent {
                            child: index,
                            sandbox_id: id.clone(),
                            event,
                        };
                        let r = node.run_in_child(&id, index, start, files).await;
                        if !matches!(gate.wait_for(|open| *open).await.as_deref(), Ok(true)) {
                            return; // the fork failed: this child is gone
                        }
                        match r {
                            Err(e) => {
                                let msg = e.one_line();
                                let _ = tx
                                    .send(Ok(ev(Some(pb::fork_run_event::Event::Error(msg)))))
                                    .await;
                            }
                            Ok(None) => {}
                            Ok(Some(mut events)) => {
                                while let Some(e) = events.recv().await {
                                    let Ok(e) = e else { break };
                                    let wrapped = ev(Some(pb::fork_run_event::Event::Process(e)));
                                    if tx.send(Ok(wrapped)).await.is_err() {
                                        break; // the client went away; the command runs on
                                    }
                                }
                            }
                        }
                    });
                }
            })
        };
        let forked = self
            .fork_notify(
                pb::ForkRequest {
                    id: req.id.clone(),
                    count: req.count,
                    labels: req.labels.clone(),
                    child_labels,
                    ttl_seconds: req.ttl_seconds,
                    deterministic: req.deterministic,
                },
                Some(running_tx),
            )
            .await;
        let forked = match forked {
            Ok(f) => f,
            Err(e) => {
                drop(gate_tx);
                starter.abort();
                return Err(e);
            }
        };
        let _ = tx
            .send(Ok(pb::ForkRunEvent {
                child: 0,
                sandbox_id: String::new(),
                event: Some(pb::fork_run_event::Event::Forked(forked)),
            }))
            .await;
        let _ = gate_tx.send(true);
        Ok(rx)
    }

    /// One ForkRun child's work: its files, then its command (with its index and id).
    async fn run_in_child(
        &self,
        id: &str,
        index: u32,
        start: Option<grove_proto::guest::ExecStart>,
        files: Vec<(String, Vec<u8>)>,
    ) -> Result<Option<mpsc::Receiver<std::result::Result<pb::ProcessEvent, tonic::Status>>>> {
        let vsock = self.agent_vsock(id)?;
        if !files.is_empty() {
            crate::files::unary(vsock.clone(), "write", move |c| {
                for (p, d) in &files {
                    c.write_file_with(
                        grove_proto::guest::FileWriteOpen {
                            path: p.clone(),
                            mkdir_parents: true,
                            ..Default::default()
                        },
                        d,
                    )?;
                }
                Ok(())
            })
            .await?;
        }
        let Some(mut start) = start else { return Ok(None) };
        for (name, value) in
            [("GROVE_CHILD_INDEX", index.to_string()), ("GROVE_SANDBOX_ID", id.into())]
        {
            start.env.retain(|e| e.name != name);
            start.env.push(grove_proto::guest::EnvVar { name: name.into(), value });
        }
        let (_, events) = self.procs.start(id, &vsock, start, now_ms()).await?;
        Ok(Some(events))
    }

    /// The processes of a sandbox (all when empty).
    pub fn list_processes(&self, sandbox: &str) -> Result<Vec<pb::ProcessInfo>> {
        if !sandbox.is_empty() {
            validate::sandbox_id(sandbox)?;
        }
        Ok(self.procs.list(sandbox))
    }

    // ------------------------------------------------------------ lineage

    /// Who was forked from whom, among the sandboxes that exist now.
    fn lineage(&self) -> Lineage {
        let mut l = Lineage::default();
        for (id, e) in lock(&self.sandboxes).iter() {
            let parent = lock(&e.rec).parent.clone();
            if !parent.is_empty() {
                l.children.entry(parent.clone()).or_default().push(id.clone());
            }
            l.parent.insert(id.clone(), parent);
        }
        l
    }

    /// Deletes a sandbox, and with `subtree` every descendant first (deepest first).
    /// Returns the ids deleted; one deleted meanwhile (a TTL) is passed over.
    pub async fn delete_tree(&self, id: &str, subtree: bool) -> Result<Vec<String>> {
        self.entry(id)?;
        let mut order = if subtree { self.lineage().descendants(id) } else { Vec::new() };
        order.reverse();
        order.push(id.to_string());
        let mut deleted = Vec::with_capacity(order.len());
        for d in order {
            match self.delete(&d).await {
                Ok(()) => deleted.push(d),
                Err(AgentError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    /// Keeps `id` and deletes its siblings (the other children of its parent) with their
    /// subtrees.
    pub async fn keep(&self, id: &str) -> Result<Vec<String>> {
        self.check_open()?;
        let rec = self.entry(id)?.rec();
        if rec.parent.is_empty() {
            return Err(AgentError::FailedPrecondition(format!(
                "sandbox {id} has no parent: it has no siblings to delete"
            )));
        }
        let siblings: Vec<String> = self
            .lineage()
            .children
            .remove(&rec.parent)
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c != id)
            .collect();
        let mut deleted = Vec::new();
        for s in siblings {
            deleted.extend(self.delete_tree(&s, true).await?);
        }
        Ok(deleted)
    }

    /// Sets (0: clears) the TTL of a sandbox, and with `subtree` of its descendants.
    pub async fn set_ttl(&self, req: &pb::SetTtlRequest) -> Result<Vec<pb::Sandbox>> {
        self.check_open()?;
        validate::ttl(req.ttl_seconds)?;
        self.entry(&req.id)?;
        let mut ids = vec![req.id.clone()];
        if req.subtree {
            ids.extend(self.lineage().descendants(&req.id));
        }
        let expires = match req.ttl_seconds {
            0 => 0,
            s => now_ms() + u64::from(s) * 1000,
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Ok(e) = self.entry(&id) else { continue };
            let _slot = e.op.lock().await;
            if lock(&e.rec).deleting {
                continue;
            }
            let rec = self.persist(&e, |r| r.expires_unix_ms = expires)?;
            out.push(self.to_pb(&rec));
        }
        Ok(out)
    }

    /// Whether `snap` is in the history of sandbox `rec`: taken of it, the snapshot it was
    /// created or last rewound from, or an ancestor (parent chain) of either.
    fn in_history(&self, rec: &SandboxRecord, snap: &SnapshotRecord) -> Result<bool> {
        if snap.sandbox == rec.id {
            return Ok(true);
        }
        let mut starts: Vec<SnapshotId> = rec.from_snapshot.into_iter().collect();
        starts.extend(
            blocking(|| self.catalog.snapshots())?
                .iter()
                .filter(|s| s.sandbox == rec.id)
                .map(|s| s.id),
        );
        for start in starts {
            let mut cur = Some(start);
            // Bounded: a chain is as long as the snapshots that exist.
            for _ in 0..=4096 {
                let Some(c) = cur else { break };
                if c == snap.id {
                    return Ok(true);
                }
                cur = self.catalog.snapshot(c).ok().and_then(|s| s.parent);
            }
        }
        Ok(false)
    }

    /// Restores a sandbox in place to an earlier snapshot of its history: a new VMM (a
    /// standby one if the pool has one) restored with the sandbox's identity replaces the
    /// old one. The record names the new VMM before the old one is killed, so a crash in
    /// between leaves one VMM no record names, which recovery kills.
    pub async fn rewind(self: &Arc<Self>, req: &pb::RewindRequest) -> Result<pb::Sandbox> {
        self.check_open()?;
        let e = self.entry(&req.id)?;
        let snap = self
            .catalog
            .snapshot(req.snapshot_id)
            .map_err(|_| AgentError::NotFound(format!("snapshot {}", req.snapshot_id)))?;
        let mut slot = e.op.lock().await;
        let rec = e.rec();
        let st = State::parse(&rec.state);
        if rec.deleting || !matches!(st, State::Running | State::Paused) {
            return Err(AgentError::FailedPrecondition(format!(
                "sandbox {} is {}: rewind needs running or paused",
                rec.id,
                if rec.deleting { "being deleted" } else { st.as_str() }
            )));
        }
        if !self.in_history(&rec, &snap)? {
            return Err(AgentError::FailedPrecondition(format!(
                "snapshot {} is not in sandbox {}'s history",
                snap.id, rec.id
            )));
        }
        if (snap.vcpus, snap.mem_mib) != (rec.vcpus, rec.mem_mib) {
            return Err(AgentError::FailedPrecondition(format!(
                "snapshot {} has another shape than sandbox {}",
                snap.id, rec.id
            )));
        }
        let started = Instant::now();
        let shape = Shape { vcpus: rec.vcpus, mem_mib: rec.mem_mib };
        let (proc, conn) = self
            .restore_vmm(
                shape,
                &self.layout.snapshot(snap.id),
                rec.identity,
                self.has_agent(&rec.template),
                "rewind",
                started,
            )
            .await?;
        failpoint!("agentd::rewind::restored");
        let new = match self.persist(&e, |r| {
            r.vmm = proc.vid.clone();
            r.pid = proc.pid;
            r.state = State::Running.as_str().into();
            r.reason.clear();
            r.from_snapshot = Some(snap.id);
            r.last_snapshot = Some(snap.id);
            r.memory_layer = snap.memory_layer;
            r.disk_layer = snap.disk_layers.first().copied();
        }) {
            Ok(r) => r,
            Err(err) => {
                self.discard_vmm(&proc);
                return Err(err);
            }
        };
        failpoint!("agentd::rewind::committed");
        let old = std::mem::replace(&mut *lock(&e.killer), proc.killer());
        slot.conn = Some(conn);
        old.kill();
        // Its files go now (unlinking what a dying process holds is fine); its exit is
        // ignored (the record names the new VMM).
        if !rec.vmm.is_empty() {
            let _ = std::fs::remove_dir_all(self.layout.vmm(&rec.vmm));
        }
        self.watch_exit(new.id.clone(), proc);
        drop(slot);
        self.gc_snapshots();
        tracing::info!(sandbox = %new.id, snapshot = snap.id, ms = started.elapsed().as_secs_f64() * 1000.0, "rewound");
        Ok(self.lineage().fill(self.to_pb(&new)))
    }

    /// A VMM restored from `dir` with `identity`: a standby one of `shape` when the pool has
    /// one (a standby that fails is dropped), else a new `grove-vmm restore`.
    async fn restore_vmm(
        &self,
        shape: Shape,
        dir: &Path,
        identity: u32,
        agent: bool,
        source: &'static str,
        started: Instant,
    ) -> Result<(VmmProc, VmmConn)> {
        if let Some(Standby { proc, mut conn }) = self.take_standby(shape) {
            let vsock = agent.then(|| self.layout.vmm_vsock(&proc.vid));
            match conn.restore(dir, identity, vsock.as_deref(), false).await {
                Ok(_) => {
                    self.observe_restore(source, "standby", started);
                    return Ok((proc, conn));
                }
                Err(e) => self.drop_failed_standby(&proc, &e),
            }
        }
        self.start_cold_restore(dir, identity, agent, false, source, started).await
    }

    /// Sandboxes matching every label and any of the states, from `after` on.
    pub fn list(&self, req: &pb::ListRequest) -> Result<pb::ListResponse> {
        let want_labels = validate::labels(&req.labels)?;
        let size = match req.page_size {
            0 => 100,
            n if n > 1000 => return Err(AgentError::InvalidArgument("page_size over 1000".into())),
            n => n as usize,
        };
        if !req.page_token.is_empty() {
            validate::sandbox_id(&req.page_token)
                .map_err(|_| AgentError::InvalidArgument("bad page_token".into()))?;
        }
        let mut states = Vec::new();
        for s in &req.states {
            let st = pb::SandboxState::try_from(*s)
                .map_err(|_| AgentError::InvalidArgument(format!("unknown state {s}")))?;
            states.push(st);
        }
        let lineage = self.lineage();
        let map = lock(&self.sandboxes);
        let mut out = Vec::new();
        let mut next = String::new();
        let range = if req.page_token.is_empty() {
            map.range::<String, _>(..)
        } else {
            map.range::<String, _>((
                std::ops::Bound::Excluded(req.page_token.clone()),
                std::ops::Bound::Unbounded,
            ))
        };
        for (id, e) in range {
            let r = lock(&e.rec);
            if !want_labels.iter().all(|(k, v)| r.labels.get(k) == Some(v)) {
                continue;
            }
            if !states.is_empty() && !states.contains(&State::parse(&r.state).to_pb()) {
                continue;
            }
            if out.len() == size {
                next = out.last().map_or_else(String::new, |s: &pb::Sandbox| s.id.clone());
                break;
            }
            let _ = id;
            out.push(lineage.fill(self.to_pb(&r)));
        }
        Ok(pb::ListResponse { sandboxes: out, next_page_token: next })
    }

    async fn conn<'a>(&self, slot: &'a mut Slot, rec: &SandboxRecord) -> Result<&'a mut VmmConn> {
        if slot.conn.is_none() {
            let c = VmmConn::connect(&self.layout.vmm_sock(&rec.vmm))
                .await
                .map_err(|e| AgentError::vmm("connect", e))?;
            slot.conn = Some(c);
        }
        slot.conn.as_mut().ok_or_else(|| AgentError::Internal("no VMM connection".into()))
    }

    fn drop_conn_on_io(slot: &mut Slot, e: &grove_vmm_api::ClientError) {
        if e.code().is_none() {
            slot.conn = None;
        }
    }

    /// Pauses or resumes a sandbox.
    pub async fn set_paused(&self, id: &str, pause: bool) -> Result<pb::Sandbox> {
        self.check_open()?;
        let e = self.entry(id)?;
        let mut slot = e.op.lock().await;
        let rec = e.rec();
        let (from, to) =
            if pause { (State::Running, State::Paused) } else { (State::Paused, State::Running) };
        let st = State::parse(&rec.state);
        if st != from || rec.deleting {
            return Err(AgentError::FailedPrecondition(format!(
                "sandbox {id} is {}: {} needs {}",
                st.as_str(),
                if pause { "pause" } else { "resume" },
                from.as_str()
            )));
        }
        let conn = self.conn(&mut slot, &rec).await?;
        let r = if pause { conn.pause().await } else { conn.resume().await };
        if let Err(err) = r {
            Self::drop_conn_on_io(&mut slot, &err);
            return Err(AgentError::vmm(if pause { "pause" } else { "resume" }, err));
        }
        let rec = self.persist(&e, |r| r.state = to.as_str().into())?;
        Ok(self.to_pb(&rec))
    }

    /// Snapshots a sandbox (durable, pinned).
    pub async fn snapshot(&self, req: pb::SnapshotRequest) -> Result<pb::SnapshotInfo> {
        self.check_open()?;
        let labels = validate::labels(&req.labels)?;
        let e = self.entry(&req.id)?;
        let mut slot = e.op.lock().await;
        let rec = e.rec();
        let prev = State::parse(&rec.state);
        if !matches!(prev, State::Running | State::Paused) || rec.deleting {
            return Err(AgentError::FailedPrecondition(format!(
                "sandbox {} is {}: snapshot needs running or paused",
                rec.id,
                prev.as_str()
            )));
        }
        let sid = self.catalog.alloc_id()?;
        let op = OpRecord {
            id: format!("snapshot-{sid}"),
            kind: "snapshot".into(),
            sandbox: rec.id.clone(),
            snapshot: Some(sid),
            children: Vec::new(),
            dir: Layout::snapshot_rel(sid),
            started_unix_ms: now_ms(),
        };
        blocking(|| self.catalog.put_op(&op))?;
        let r = self.take_snapshot(&e, &mut slot, sid, true, labels, prev).await;
        blocking(|| self.catalog.remove_op(&op.id))?;
        let snap = r?;
        Ok(self.snapshot_pb(&snap))
    }

    /// The snapshot step of Snapshot and Fork: Snapshotting, the VMM's snapshot (durable)
    /// or fork (page cache), the records, then back to `prev`.
    async fn take_snapshot(
        &self,
        e: &Entry,
        slot: &mut Slot,
        sid: SnapshotId,
        durable: bool,
        labels: BTreeMap<String, String>,
        prev: State,
    ) -> Result<SnapshotRecord> {
        let rec = self.persist(e, |r| r.state = State::Snapshotting.as_str().into())?;
        let dir = self.layout.snapshot(sid);
        let restore_state = |node: &Self| {
            let _ = node.persist(e, |r| r.state = prev.as_str().into());
        };
        let conn = match self.conn(slot, &rec).await {
            Ok(c) => c,
            Err(err) => {
                restore_state(self);
                return Err(err);
            }
        };
        let rep: std::result::Result<SnapshotReport, _> = if durable {
            let kind =
                if rec.memory_layer.is_some() { SnapshotKind::Diff } else { SnapshotKind::Full };
            conn.snapshot(kind, &dir, true).await
        } else {
            conn.fork(&dir).await
        };
        let rep = match rep {
            Ok(r) => r,
            Err(err) => {
                Self::drop_conn_on_io(slot, &err);
                let _ = std::fs::remove_dir_all(&dir);
                restore_state(self);
                return Err(AgentError::vmm(if durable { "snapshot" } else { "fork" }, err));
            }
        };
        failpoint!("agentd::snapshot::after_vmm");
        let mut after = rec.clone();
        after.state = prev.as_str().into();
        let snap = self.register_snapshot(&RegisterSnapshot {
            sid,
            rep: &rep,
            base: rec.memory_layer,
            pinned: durable,
            lineage: rec.last_snapshot,
            shape: Shape { vcpus: rec.vcpus, mem_mib: rec.mem_mib },
            source: rec.id.clone(),
            labels,
            sandbox: Some(after.clone()),
            disk_base: rec.disk_layer,
        });
        let snap = match snap {
            Ok(s) => s,
            Err(err) => {
                restore_state(self);
                return Err(err);
            }
        };
        // The record was committed with the snapshot; refresh the cache and tell watchers.
        let fresh = self.catalog.sandbox(&rec.id)?;
        *lock(&e.rec) = fresh.clone();
        self.emit(pb::EventKind::StateChanged, &fresh);
        Ok(snap)
    }

    /// Forks a running sandbox into `count` children.
    pub async fn fork(self: &Arc<Self>, req: pb::ForkRequest) -> Result<pb::ForkResponse> {
        self.fork_notify(req, None).await
    }

    /// [`Self::fork`], telling `running` each child's index and id as soon as that child
    /// runs (before the others are done: ForkRun starts its work there).
    async fn fork_notify(
        self: &Arc<Self>,
        req: pb::ForkRequest,
        running: Option<mpsc::UnboundedSender<(usize, String)>>,
    ) -> Result<pb::ForkResponse> {
        self.check_open()?;
        let t = Instant::now();
        validate::fork_count(req.count)?;
        validate::ttl(req.ttl_seconds)?;
        let labels = validate::labels(&req.labels)?;
        if req.child_labels.len() > req.count as usize {
            return Err(AgentError::InvalidArgument(format!(
                "{} child_labels for {} children",
                req.child_labels.len(),
                req.count
            )));
        }
        let mut per_child = Vec::new();
        for l in &req.child_labels {
            per_child.push(validate::merge_labels(&labels, &validate::labels(&l.labels)?)?);
        }
        let e = self.entry(&req.id)?;
        let mut slot = e.op.lock().await;
        let rec = e.rec();
        let prev = State::parse(&rec.state);
        if !matches!(prev, State::Running | State::Paused) || rec.deleting {
            return Err(AgentError::FailedPrecondition(format!(
                "sandbox {} is {}: fork needs running or paused",
                rec.id,
                prev.as_str()
            )));
        }
        let shape = Shape { vcpus: rec.vcpus, mem_mib: rec.mem_mib };
        let mut res = self.reserve(shape, req.count)?;
        let sid = self.catalog.alloc_id()?;
        let children: Vec<String> = (0..req.count).map(|_| self.new_id()).collect();
        let op = OpRecord {
            id: format!("fork-{sid}"),
            kind: "fork".into(),
            sandbox: rec.id.clone(),
            snapshot: Some(sid),
            children: children.clone(),
            dir: Layout::snapshot_rel(sid),
            started_unix_ms: now_ms(),
        };
        blocking(|| self.catalog.put_op(&op))?;
        let snap_labels = BTreeMap::from([("grove.fork-of".to_string(), rec.id.clone())]);
        let snap = match self.take_snapshot(&e, &mut slot, sid, false, snap_labels, prev).await {
            Ok(s) => s,
            Err(err) => {
                let _ = blocking(|| self.catalog.remove_op(&op.id));
                return Err(err);
            }
        };
        drop(slot);
        tracing::info!(sandbox = %rec.id, snapshot = sid, pause_ms = snap.pause_ms, "fork: snapshot taken");
        failpoint!("agentd::fork::after_snapshot");
        let mut tasks = Vec::new();
        for (i, id) in children.iter().enumerate() {
            let identity = self.alloc_identity()?;
            let spec = NewSandbox {
                id: id.clone(),
                identity,
                snap: snap.clone(),
                template: rec.template.clone(),
                parent: rec.id.clone(),
                labels: per_child.get(i).cloned().unwrap_or_else(|| labels.clone()),
                ttl_s: req.ttl_seconds,
                source: "fork",
                deterministic: req.deterministic,
            };
            let node = self.clone();
            let running = running.clone();
            tasks.push(tokio::spawn(async move {
                let r = node.new_from_snapshot(spec).await;
                if let (Ok(rec), Some(tx)) = (&r, running) {
                    let _ = tx.send((i, rec.id.clone()));
                }
                r
            }));
        }
        let mut made = Vec::new();
        let mut first_err = None;
        for t in tasks {
            match t.await {
                Ok(Ok(r)) => {
                    res.commit_one();
                    made.push(r);
                }
                Ok(Err(err)) => first_err = first_err.or(Some(err)),
                Err(j) => {
                    first_err =
                        first_err.or(Some(AgentError::Internal(format!("fork child task: {j}"))));
                }
            }
        }
        tracing::info!(sandbox = %rec.id, children = made.len(), "fork: children running");
        failpoint!("agentd::fork::after_children");
        if let Some(err) = first_err {
            // All or nothing: the children that did start go away again.
            for r in &made {
                let _ = self.delete(&r.id).await;
            }
            let _ = blocking(|| self.catalog.remove_op(&op.id));
            self.gc_snapshots();
            return Err(err);
        }
        blocking(|| self.catalog.remove_op(&op.id))?;
        self.metrics.fork_seconds.observe(t.elapsed().as_secs_f64());
        self.metrics.fork_pause_seconds.observe(snap.pause_ms / 1000.0);
        made.sort_by_key(|r| children.iter().position(|c| *c == r.id));
        let snap = self.catalog.snapshot(sid).unwrap_or(snap);
        Ok(pb::ForkResponse {
            snapshot: Some(self.snapshot_pb(&snap)),
            children: made.iter().map(|r| self.to_pb(r)).collect(),
        })
    }

    /// Deletes a sandbox: its VMM, record, writable layer and files.
    pub async fn delete(&self, id: &str) -> Result<()> {
        let e = self.entry(id)?;
        let slot = e.op.lock().await;
        if !lock(&e.rec).deleting {
            self.persist(&e, |r| r.deleting = true)?;
        }
        failpoint!("agentd::delete::after_mark");
        drop(slot);
        self.finish_delete(&e).await;
        self.gc_snapshots();
        Ok(())
    }

    async fn finish_delete(&self, e: &Entry) {
        let mut slot = e.op.lock().await;
        slot.conn = None;
        lock(&e.killer).kill();
        let mut rx = e.exited.subscribe();
        if tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|x| *x)).await.is_err() {
            let id = e.rec().id;
            tracing::warn!(sandbox = %id, "VMM did not exit within 10 s of SIGKILL");
        }
        drop(slot);
        self.remove_sandbox_now(e);
    }

    fn reap_expired(self: &Arc<Self>) {
        let now = now_ms();
        let due: Vec<String> = lock(&self.sandboxes)
            .iter()
            .filter(|(_, e)| {
                let r = lock(&e.rec);
                r.expires_unix_ms != 0 && r.expires_unix_ms <= now && !r.deleting
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let node = self.clone();
            tokio::spawn(async move {
                tracing::info!(sandbox = %id, "TTL expired");
                if let Err(e) = node.delete(&id).await {
                    tracing::warn!(sandbox = %id, error = %e.one_line(), "TTL delete failed");
                }
            });
        }
    }

    // ------------------------------------------------------------ node

    /// Refreshes the gauges that describe the node now and encodes every metric.
    pub fn metrics_text(&self) -> String {
        let mut by_state: HashMap<&'static str, i64> =
            State::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        let mut rss_total = 0u64;
        self.metrics.vmm_rss.clear();
        for (id, e) in lock(&self.sandboxes).iter() {
            let r = lock(&e.rec);
            *by_state.entry(State::parse(&r.state).as_str()).or_default() += 1;
            if r.pid != 0 {
                let rss = rss_bytes(r.pid);
                rss_total += rss;
                self.metrics
                    .vmm_rss
                    .get_or_create(&SandboxLabel { sandbox: id.clone() })
                    .set(i64::try_from(rss).unwrap_or(i64::MAX));
            }
        }
        for (s, n) in by_state {
            self.metrics.sandboxes.get_or_create(&StateLabel { state: s.into() }).set(n);
        }
        self.metrics.vmm_rss_total.set(i64::try_from(rss_total).unwrap_or(i64::MAX));
        self.metrics.encode()
    }

    /// `NodeService.Info`.
    pub fn info(&self) -> pb::NodeInfo {
        let u = *lock(&self.usage);
        let kvm = serde_json::from_str::<serde_json::Value>(&self.host_check)
            .ok()
            .and_then(|v| {
                let k = v.get("kvm")?;
                let kind = k.get("kind")?.as_str()?.to_string();
                Some(match k.get("module").and_then(|m| m.as_str()) {
                    Some(m) => format!("{kind} ({m})"),
                    None => kind,
                })
            })
            .unwrap_or_default();
        let read =
            |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default();
        pb::NodeInfo {
            agentd_version: env!("CARGO_PKG_VERSION").into(),
            vmm_api_version: grove_vmm_api::API_VERSION,
            api: "grove.v1".into(),
            hostname: read("/proc/sys/kernel/hostname"),
            kernel: read("/proc/sys/kernel/osrelease"),
            host_check_json: self.host_check.clone(),
            kvm,
            capacity: Some(pb::Capacity {
                memory_mib: self.cfg.max_memory_mib,
                memory_used_mib: u.mem_mib,
                vcpus: self.cfg.max_vcpus,
                vcpus_used: u32::try_from(u.vcpus).unwrap_or(u32::MAX),
                sandboxes: u32::try_from(lock(&self.sandboxes).len()).unwrap_or(u32::MAX),
            }),
            pools: self
                .pool
                .sizes()
                .into_iter()
                .map(|(s, ready, target)| pb::StandbyPool {
                    vcpus: s.vcpus,
                    memory_mib: s.mem_mib,
                    ready,
                    target,
                })
                .collect(),
            data_dir: self.layout.root().display().to_string(),
            started_unix_ms: self.started_unix_ms,
        }
    }

    /// Current sandboxes as CURRENT events (for Watch with include_current).
    pub fn current_events(&self, id: Option<&str>) -> Vec<pb::Event> {
        lock(&self.sandboxes)
            .values()
            .map(|e| e.rec())
            .filter(|r| id.is_none_or(|i| i == r.id))
            .map(|r| pb::Event {
                kind: pb::EventKind::Current.into(),
                sandbox: Some(self.to_pb(&r)),
                unix_ms: now_ms(),
            })
            .collect()
    }

    /// Checks a sandbox id exists (Watch of one sandbox).
    pub fn exists(&self, id: &str) -> Result<()> {
        self.entry(id).map(|_| ())
    }

    // ------------------------------------------------------------ recovery

    /// The recovery pass: finishes or rolls back operations a crash interrupted, adopts
    /// running VMMs, marks dead ones Failed, adopts or kills VMMs no record names, and
    /// removes files nothing names.
    async fn recover(self: &Arc<Self>) -> Result<()> {
        let t = Instant::now();
        let records = self.catalog.sandboxes()?;
        let by_id: HashMap<String, SandboxRecord> =
            records.iter().map(|r| (r.id.clone(), r.clone())).collect();
        // 1. Operations in progress.
        for op in self.catalog.ops()? {
            tracing::warn!(op = %op.id, "recovery: unfinished operation");
            match op.kind.as_str() {
                "fork" | "snapshot" => {
                    // Children were never reported: roll them back (their VMM directories
                    // are killed below as VMMs no record names).
                    for c in &op.children {
                        if let Some(r) = by_id.get(c) {
                            self.kill_recorded_vmm(r).await;
                            let collected = self.catalog.remove_sandbox(c)?;
                            self.remove_layer_files(&collected);
                            if !r.vmm.is_empty() {
                                let _ = std::fs::remove_dir_all(self.layout.vmm(&r.vmm));
                            }
                        }
                    }
                    if let (Some(sid), Some(parent)) = (op.snapshot, by_id.get(&op.sandbox)) {
                        self.recover_snapshot(&op, sid, parent).await;
                    }
                }
                _ => {
                    // warm: the boot VMM goes; a snapshot it registered without the template
                    // naming it is collected by the snapshot GC below.
                    if let Some(pid) = vmm::read_pid(&self.layout, &op.sandbox) {
                        if let Ok(p) = VmmProc::adopt(&self.layout, &op.sandbox, pid) {
                            p.kill_and_wait().await;
                        }
                    }
                    let _ = std::fs::remove_dir_all(self.layout.vmm(&op.sandbox));
                }
            }
            if let Some(sid) = op.snapshot {
                if self.catalog.snapshot(sid).is_err() {
                    let _ = std::fs::remove_dir_all(self.layout.snapshot(sid));
                }
            }
            self.catalog.remove_op(&op.id)?;
        }
        // 2. Sandboxes.
        for r in self.catalog.sandboxes()? {
            let st = State::parse(&r.state);
            if r.deleting || st == State::Creating {
                // A delete finishes; a create that never reported rolls back.
                self.kill_recorded_vmm(&r).await;
                let collected = self.catalog.remove_sandbox(&r.id)?;
                self.remove_layer_files(&collected);
                if !r.vmm.is_empty() {
                    let _ = std::fs::remove_dir_all(self.layout.vmm(&r.vmm));
                }
                tracing::info!(sandbox = %r.id, "recovery: {}", if r.deleting { "delete finished" } else { "create rolled back" });
                continue;
            }
            if !st.live() {
                lock(&self.sandboxes)
                    .insert(r.id.clone(), Entry::new(r, None, Killer::default(), true, false));
                continue;
            }
            self.adopt_sandbox(r).await?;
        }
        for t in self.catalog.templates()? {
            if t.snapshot.is_some() {
                self.pool.want(Shape { vcpus: t.vcpus, mem_mib: t.mem_mib });
            }
        }
        // 3. VMM directories no sandbox names: standby VMMs go back to the pool, the rest
        //    (half-made sandboxes) are killed.
        let named: std::collections::HashSet<String> =
            lock(&self.sandboxes).values().map(|e| lock(&e.rec).vmm.clone()).collect();
        for vid in list_dir(&self.layout.vmms()) {
            if named.contains(&vid) {
                continue;
            }
            self.recover_unnamed_vmm(&vid).await;
        }
        // 4. VMMs that no pid file names (a spawn cut short by the crash, whose directory
        //    may be gone by now): found by their command lines and killed.
        for (pid, vid) in vmm::running_under(&self.layout.vmms()) {
            if vmm::read_pid(&self.layout, &vid) == Some(pid) {
                continue;
            }
            if let Ok(p) = VmmProc::adopt(&self.layout, &vid, pid) {
                tracing::warn!(vid, pid, "recovery: killing a VMM without a pid file");
                p.kill_and_wait().await;
            }
            if vmm::read_pid(&self.layout, &vid).is_none() && !named.contains(&vid) {
                let _ = std::fs::remove_dir_all(self.layout.vmm(&vid));
            }
        }
        // 5. Snapshot directories nothing names.
        self.remove_unnamed_snapshot_files()?;
        self.gc_snapshots();
        let n = lock(&self.sandboxes).len();
        tracing::info!(sandboxes = n, ms = t.elapsed().as_secs_f64() * 1000.0, "recovery done");
        Ok(())
    }

    /// A snapshot or fork interrupted by a crash: registered if the VMM finished it and
    /// its chain now includes it (the VMM would name those layers in later snapshots),
    /// dropped otherwise.
    async fn recover_snapshot(&self, op: &OpRecord, sid: SnapshotId, parent: &SandboxRecord) {
        if self.catalog.snapshot(sid).is_ok() {
            return;
        }
        let dir = self.layout.snapshot(sid);
        let complete = dir.join("vmstate").is_file();
        let status = match VmmConn::connect(&self.layout.vmm_sock(&parent.vmm)).await {
            Ok(mut c) => c.status().await.ok(),
            Err(_) => None,
        };
        let canon = dir.canonicalize().unwrap_or(dir.clone());
        let in_chain =
            status.as_ref().is_some_and(|s| s.layers.iter().any(|l| l.starts_with(&canon)));
        if !(complete && in_chain) {
            tracing::warn!(op = %op.id, "recovery: snapshot rolled back");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        let pages = 0;
        let rep = SnapshotReport {
            dir: dir.clone(),
            depth: status.as_ref().map_or(0, |s| u32::try_from(s.layers.len()).unwrap_or(0)),
            pages,
            pause_ms: 0.0,
            total_ms: 0.0,
        };
        let mut after = parent.clone();
        after.state = State::Running.as_str().into();
        let r = self.register_snapshot(&RegisterSnapshot {
            sid,
            rep: &rep,
            base: parent.memory_layer,
            pinned: op.kind == "snapshot",
            lineage: parent.last_snapshot,
            shape: Shape { vcpus: parent.vcpus, mem_mib: parent.mem_mib },
            source: parent.id.clone(),
            labels: BTreeMap::new(),
            sandbox: Some(after),
            disk_base: parent.disk_layer,
        });
        match r {
            Ok(_) => tracing::info!(op = %op.id, "recovery: snapshot finished"),
            Err(e) => {
                tracing::error!(op = %op.id, error = %e.one_line(), "recovery: cannot register snapshot");
            }
        }
    }

    async fn kill_recorded_vmm(&self, r: &SandboxRecord) {
        if r.vmm.is_empty() {
            return;
        }
        let pid = if r.pid != 0 { Some(r.pid) } else { vmm::read_pid(&self.layout, &r.vmm) };
        if let Some(pid) = pid {
            if let Ok(p) = VmmProc::adopt(&self.layout, &r.vmm, pid) {
                p.kill_and_wait().await;
            }
        }
    }

    /// A live sandbox after a restart: its VMM adopted if it answers, else Failed.
    async fn adopt_sandbox(self: &Arc<Self>, mut r: SandboxRecord) -> Result<()> {
        let pid = if r.pid != 0 { Some(r.pid) } else { vmm::read_pid(&self.layout, &r.vmm) };
        let proc = pid.and_then(|p| VmmProc::adopt(&self.layout, &r.vmm, p).ok());
        let mut why = "VMM gone while agentd was down".to_string();
        if let Some(proc) = proc {
            let sock = self.layout.vmm_sock(&r.vmm);
            let status = match VmmConn::connect(&sock).await {
                Ok(mut c) => match c.status().await {
                    Ok(s) if Some(s.pid) == pid => Some((c, s)),
                    Ok(s) => {
                        why = format!("VMM socket answered for pid {} instead of {:?}", s.pid, pid);
                        None
                    }
                    Err(e) => {
                        why = format!("VMM unreachable: {}", one_line(&e));
                        None
                    }
                },
                Err(e) => {
                    why = format!("VMM unreachable: {}", one_line(&e));
                    None
                }
            };
            if let Some((_, s)) = status.as_ref().filter(|(_, s)| s.state == RunState::Standby) {
                // Committed beside a restore request the VMM never served (see
                // `new_from_snapshot`): a create that was never reported rolls back.
                tracing::info!(sandbox = %r.id, vid = %r.vmm, pid = s.pid, "recovery: create rolled back (its VMM never restored)");
                proc.kill_and_wait().await;
                let collected = self.catalog.remove_sandbox(&r.id)?;
                self.remove_layer_files(&collected);
                let _ = std::fs::remove_dir_all(self.layout.vmm(&r.vmm));
                return Ok(());
            }
            if let Some((conn, s)) = status {
                let state = match s.state {
                    RunState::Paused => State::Paused,
                    _ => State::Running,
                };
                let changed = State::parse(&r.state) != state || r.pid != proc.pid;
                r.state = state.as_str().into();
                r.pid = proc.pid;
                if changed {
                    self.catalog.update_sandbox(&r)?;
                }
                self.count_usage(Shape { vcpus: r.vcpus, mem_mib: r.mem_mib });
                let id = r.id.clone();
                let entry = Entry::new(r, Some(conn), proc.killer(), false, true);
                lock(&self.sandboxes).insert(id.clone(), entry);
                self.watch_exit(id.clone(), proc);
                tracing::info!(sandbox = %id, "recovery: VMM adopted");
                return Ok(());
            }
            // A VMM that does not answer is of no use: stop it.
            proc.kill_and_wait().await;
        }
        let last = vmm::last_error_line(&self.layout.vmm_log(&r.vmm));
        r.state = State::Failed.as_str().into();
        r.reason = match last {
            Some(l) => format!("{why}: grove-vmm: {l}"),
            None => why,
        };
        r.pid = 0;
        self.catalog.update_sandbox(&r)?;
        tracing::warn!(sandbox = %r.id, reason = %r.reason, "recovery: sandbox failed");
        let id = r.id.clone();
        lock(&self.sandboxes).insert(id, Entry::new(r, None, Killer::default(), true, false));
        Ok(())
    }

    async fn recover_unnamed_vmm(&self, vid: &str) {
        let proc = vmm::read_pid(&self.layout, vid)
            .and_then(|pid| VmmProc::adopt(&self.layout, vid, pid).ok());
        if let Some(proc) = proc {
            if let Ok(mut conn) = VmmConn::connect(&self.layout.vmm_sock(vid)).await {
                if let Ok(s) = conn.status().await {
                    if s.state == RunState::Standby && s.pid == proc.pid {
                        let shape = Shape {
                            vcpus: s.vcpus,
                            mem_mib: u32::try_from(s.mem_bytes >> 20).unwrap_or(0),
                        };
                        match self.pool.adopt(shape, Standby { proc, conn }) {
                            None => {
                                tracing::info!(vid, "recovery: standby VMM adopted");
                                return;
                            }
                            Some(sb) => {
                                sb.proc.kill();
                                let _ = std::fs::remove_dir_all(self.layout.vmm(vid));
                                return;
                            }
                        }
                    }
                }
            }
            tracing::warn!(vid, pid = proc.pid, "recovery: killing a VMM no sandbox names");
            proc.kill_and_wait().await;
        }
        let _ = std::fs::remove_dir_all(self.layout.vmm(vid));
    }

    fn remove_unnamed_snapshot_files(&self) -> Result<()> {
        let mut named = std::collections::HashSet::new();
        for l in self.catalog.layers()? {
            if l.kind == LayerKind::Memory {
                named.extend(l.files.iter().cloned());
            }
        }
        let mut with_record = std::collections::HashSet::new();
        for s in self.catalog.snapshots()? {
            named.extend(s.state_file.iter().cloned());
            with_record.insert(s.id.to_string());
        }
        for d in list_dir(&self.layout.snapshots()) {
            let dir = self.layout.snapshots().join(&d);
            let mut kept = 0;
            for f in list_dir(&dir) {
                let rel = format!("{d}/{f}");
                let is_ws =
                    f.ends_with(".mlayer.ws") && named.contains(rel.trim_end_matches(".ws"));
                // A recorded snapshot's frozen disk layers (grove-vmm names them in its state).
                let is_disk = is_disk_layer_file(&f) && with_record.contains(&d);
                if named.contains(&rel) || is_ws || is_disk {
                    kept += 1;
                } else {
                    let _ = std::fs::remove_file(dir.join(&f));
                }
            }
            if kept == 0 {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        Ok(())
    }
}

/// Inputs of [`Node::register_snapshot`].
struct RegisterSnapshot<'a> {
    sid: SnapshotId,
    rep: &'a SnapshotReport,
    base: Option<LayerId>,
    pinned: bool,
    lineage: Option<SnapshotId>,
    shape: Shape,
    source: String,
    labels: BTreeMap<String, String>,
    sandbox: Option<SandboxRecord>,
    /// The base layer under the VM's disk chain, held by the snapshot.
    disk_base: Option<LayerId>,
}

/// grove-vmm's frozen disk layer files in a snapshot directory: `disk-<id>.data`, `.idx`.
fn is_disk_layer_file(name: &str) -> bool {
    name.starts_with("disk-")
        && (name.ends_with(".data") || name.ends_with(".idx"))
        && !name.contains('/')
}

fn list_dir(d: &Path) -> Vec<String> {
    std::fs::read_dir(d)
        .map(|it| {
            it.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(it) = std::fs::read_dir(&d) else { continue };
        for e in it.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Copies a file and fsyncs the copy (a template's kernel must survive a crash once its
/// record is committed).
fn copy_synced(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).map_err(|e| AgentError::io("copy to", to, e))?;
    std::fs::File::open(to).and_then(|f| f.sync_all()).map_err(|e| AgentError::io("fsync", to, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_count() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), s);
        }
        assert_eq!(State::parse("garbage"), State::Failed);
        assert!(State::Paused.live() && !State::Stopped.live() && !State::Failed.live());
    }

    #[test]
    fn ids_are_well_formed_and_distinct() {
        let seed = random_seed();
        let ids: std::collections::HashSet<String> =
            (0..10_000u64).map(|n| format!("sb-{:016x}", mix(seed ^ mix(n)))).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            validate::sandbox_id(id).unwrap();
        }
    }
}
