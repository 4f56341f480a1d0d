//! Standby VMMs per VM shape (vCPUs, memory), refilled in the background: a create from a
//! warm template or a fork child takes one and sends it `restore`, so the request pays no
//! VM-creation ioctls (`KVM_CREATE_VM`, irqchip, PIT, memory slots, vCPUs: ~7-11 ms here).
//!
//! A standby VMM is a `grove-vmm standby` process in its own `DATA/vmm/VID` directory, like
//! any sandbox's VMM; after an agentd restart the ones still waiting are adopted back.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grove_vmm_api::RunState;
use tokio::sync::{Notify, Semaphore};

use crate::error::{AgentError, Result};
use crate::layout::Layout;
use crate::metrics::{Metrics, ShapeLabel};
use crate::vmm::{VmmConn, VmmProc};

/// A VM shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Shape {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub mem_mib: u32,
}

impl Shape {
    fn label(self) -> ShapeLabel {
        ShapeLabel { vcpus: self.vcpus.to_string(), memory_mib: self.mem_mib.to_string() }
    }
}

/// A standby VMM, connected and waiting for `restore`.
#[derive(Debug)]
pub struct Standby {
    /// The process.
    pub proc: VmmProc,
    /// Its control connection.
    pub conn: VmmConn,
}

#[derive(Default)]
struct ShapePool {
    ready: VecDeque<Standby>,
    starting: u32,
    target: u32,
}

/// How long a standby VMM may take to answer on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a refill waits after the take that woke it.
const REFILL_DELAY: Duration = Duration::from_millis(3);
/// Standby VMMs started at once (each costs a process and KVM setup).
const PARALLEL_STARTS: usize = 4;

/// The pools, by shape.
pub struct Pool {
    shapes: Mutex<HashMap<Shape, ShapePool>>,
    wake: Notify,
    starts: Semaphore,
    vmm_bin: PathBuf,
    layout: Layout,
    size: u32,
    metrics: Arc<Metrics>,
    next_vid: Box<dyn Fn() -> Result<String> + Send + Sync>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pool {
    /// A pool of `size` standby VMMs per shape; `next_vid` names new VMM directories.
    pub fn new(
        vmm_bin: PathBuf,
        layout: Layout,
        size: u32,
        metrics: Arc<Metrics>,
        next_vid: Box<dyn Fn() -> Result<String> + Send + Sync>,
    ) -> Arc<Self> {
        Arc::new(Self {
            shapes: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            starts: Semaphore::new(PARALLEL_STARTS),
            vmm_bin,
            layout,
            size,
            metrics,
            next_vid,
        })
    }

    /// Keeps a pool for `shape` (a warm template's).
    pub fn want(&self, shape: Shape) {
        let mut g = lock(&self.shapes);
        let p = g.entry(shape).or_default();
        if p.target != self.size {
            p.target = self.size;
            self.metrics.pool_target.get_or_create(&shape.label()).set(i64::from(self.size));
            self.wake.notify_one();
        }
    }

    /// Stops keeping a pool for `shape` and kills its standby VMMs.
    pub fn unwant(&self, shape: Shape) {
        let mut g = lock(&self.shapes);
        if let Some(mut p) = g.remove(&shape) {
            for s in p.ready.drain(..) {
                s.proc.kill();
                let _ = std::fs::remove_dir_all(self.layout.vmm(&s.proc.vid));
            }
        }
        self.metrics.pool_ready.get_or_create(&shape.label()).set(0);
        self.metrics.pool_target.get_or_create(&shape.label()).set(0);
    }

    /// A standby VMM of `shape`, if one is ready (the refill starts at once).
    pub fn take(&self, shape: Shape) -> Option<Standby> {
        let mut g = lock(&self.shapes);
        let p = g.get_mut(&shape)?;
        let s = p.ready.pop_front();
        self.publish(shape, p);
        drop(g);
        self.wake.notify_one();
        s
    }

    /// Adds an adopted standby VMM (after a restart) to its shape's pool; returns it back
    /// if no pool wants it (call [`want`](Self::want) for the shapes in use first).
    pub fn adopt(&self, shape: Shape, s: Standby) -> Option<Standby> {
        let mut g = lock(&self.shapes);
        let Some(p) = g.get_mut(&shape) else { return Some(s) };
        if p.ready.len() >= usize::try_from(p.target).unwrap_or(usize::MAX) {
            return Some(s);
        }
        p.ready.push_back(s);
        self.publish(shape, p);
        None
    }

    fn publish(&self, shape: Shape, p: &ShapePool) {
        let n = i64::try_from(p.ready.len()).unwrap_or(i64::MAX);
        self.metrics.pool_ready.get_or_create(&shape.label()).set(n);
    }

    /// (shape, ready, target) of every pool.
    pub fn sizes(&self) -> Vec<(Shape, u32, u32)> {
        let g = lock(&self.shapes);
        let mut v: Vec<_> = g
            .iter()
            .map(|(s, p)| (*s, u32::try_from(p.ready.len()).unwrap_or(u32::MAX), p.target))
            .collect();
        v.sort();
        v
    }

    /// Runs the refill loop (spawn it once).
    pub async fn run(self: Arc<Self>) {
        loop {
            let mut todo = Vec::new();
            {
                let mut g = lock(&self.shapes);
                for (shape, p) in g.iter_mut() {
                    let have = u32::try_from(p.ready.len()).unwrap_or(u32::MAX) + p.starting;
                    for _ in have..p.target {
                        p.starting += 1;
                        todo.push(*shape);
                    }
                }
            }
            for shape in todo {
                let me = self.clone();
                tokio::spawn(async move {
                    let _permit = me.starts.acquire().await;
                    let r = me.start(shape).await;
                    let failed = {
                        let mut g = lock(&me.shapes);
                        let p = g.entry(shape).or_default();
                        p.starting = p.starting.saturating_sub(1);
                        match r {
                            Ok(s) if p.target == 0 => {
                                // The shape was dropped meanwhile.
                                s.proc.kill();
                                let _ = std::fs::remove_dir_all(me.layout.vmm(&s.proc.vid));
                                None
                            }
                            Ok(s) => {
                                me.metrics.pool_started.inc();
                                p.ready.push_back(s);
                                me.publish(shape, p);
                                None
                            }
                            Err(e) => Some(e),
                        }
                    };
                    if let Some(e) = failed {
                        me.metrics.pool_failures.inc();
                        tracing::warn!(vcpus = shape.vcpus, mem_mib = shape.mem_mib, error = %e.one_line(), "standby VMM failed to start");
                        // Back off before the next attempt.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        me.wake.notify_one();
                    }
                });
            }
            tokio::select! {
                () = self.wake.notified() => {
                    // A take wakes this: let the request that took a standby VMM finish its
                    // restore before a new VMM's spawn and KVM setup compete for the CPUs.
                    tokio::time::sleep(REFILL_DELAY).await;
                }
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }

    /// Starts one standby VMM and waits until it answers `status` as standby.
    async fn start(&self, shape: Shape) -> Result<Standby> {
        let vid = (self.next_vid)()?;
        let l = &self.layout;
        let args = vec![
            "standby".into(),
            "--api-sock".into(),
            l.vmm_sock(&vid).display().to_string(),
            "--vcpus".into(),
            shape.vcpus.to_string(),
            "--mem-mib".into(),
            shape.mem_mib.to_string(),
            "--serial".into(),
            l.vmm_serial(&vid).display().to_string(),
            // A restored sandbox's writable disk layers (`root.data`, `root.idx`) go into its
            // own VMM directory, removed with it.
            "--disk-dir".into(),
            l.vmm(&vid).display().to_string(),
        ];
        let proc = VmmProc::spawn(&self.vmm_bin, l, &vid, &args)?;
        match connect_when_up(l, &vid, &proc).await {
            Ok(mut conn) => match conn.status().await {
                Ok(st) if st.state == RunState::Standby => Ok(Standby { proc, conn }),
                Ok(st) => {
                    proc.kill();
                    Err(AgentError::Internal(format!("standby VMM {vid} says {:?}", st.state)))
                }
                Err(e) => {
                    proc.kill();
                    Err(AgentError::vmm("status", e))
                }
            },
            Err(e) => {
                proc.kill();
                let _ = std::fs::remove_dir_all(l.vmm(&vid));
                Err(e)
            }
        }
    }

    /// Kills every ready standby VMM and removes its directory (shutdown of a test node).
    pub fn drain(&self) {
        let mut g = lock(&self.shapes);
        for (shape, p) in g.iter_mut() {
            for s in p.ready.drain(..) {
                s.proc.kill();
                let _ = std::fs::remove_dir_all(self.layout.vmm(&s.proc.vid));
            }
            p.target = 0;
            self.metrics.pool_ready.get_or_create(&shape.label()).set(0);
        }
    }
}

/// Connects to a new VMM's socket once it is up (it binds it after its KVM setup), or fails
/// when the VMM exits or [`START_TIMEOUT`] passes.
pub async fn connect_when_up(layout: &Layout, vid: &str, proc: &VmmProc) -> Result<VmmConn> {
    let sock = layout.vmm_sock(vid);
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        match VmmConn::connect(&sock).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                if proc.has_exited() || tokio::time::Instant::now() >= deadline {
                    let why = crate::vmm::last_error_line(&layout.vmm_log(vid))
                        .unwrap_or_else(|| crate::error::one_line(&e));
                    return Err(AgentError::Internal(format!("VMM {vid} did not come up: {why}")));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
