//! The running VMM: the KVM VM, guest memory, vCPU threads, devices and the epoll event loop
//! that owns them. [`crate::builder`] makes one (boot, standby, cold restore);
//! [`crate::controller`] turns its loop and executes control requests; the snapshot paths
//! are in [`crate::snapshot`].
//!
//! Threads: this one (the event loop: device queues, the control socket, vCPU exits, timers),
//! one per vCPU (KVM_RUN; port and MMIO accesses to the bus), and with uffd memory the page
//! server.

use std::path::PathBuf;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use grove_memory::{LayerInfo, UffdMemory};
use grove_vmm_api::{GuestAck, RunState, VmStatus, API_VERSION};

use crate::devices::lock;
use crate::devices::manager::{DeviceManager, EventLoop};
use crate::exit::{ExitSignal, VmExit};
use crate::memory::GuestRam;
use crate::vstate::vcpu::{self, Vcpu, VcpuCmd, VcpuContext, VcpuError, VcpuHandle};
use crate::vstate::vm::{Vm, VmError};

/// Errors of the running VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// vCPU control.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A KVM VM operation.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// Wakes the event loop when a VM exit is recorded (its reading is all it does: the
/// controller takes the exit after each turn).
struct ExitWatcher(Arc<ExitSignal>);

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.0.eventfd(), EventSet::IN));
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.eventfd().read();
    }
}

/// Everything a VMM is made of, before its vCPU threads start.
pub struct VmmParts {
    /// The KVM VM.
    pub vm: Vm,
    /// Guest memory.
    pub ram: Arc<GuestRam>,
    /// CPUID fingerprint.
    pub fingerprint: u64,
    /// Devices.
    pub devices: DeviceManager,
    /// The event loop (devices registered; the control socket may be too).
    pub events: EventLoop,
    /// The exit signal devices and vCPUs report to.
    pub exit: Arc<ExitSignal>,
    /// Whether the memory slots log dirty pages.
    pub dirty_logging: bool,
    /// Memory layer chain behind guest memory (base first).
    pub layers: Vec<PathBuf>,
    /// Its head.
    pub head: Option<LayerInfo>,
    /// uffd restores without a working set: when to save the first-touch order.
    pub auto_working_set: Option<Instant>,
    /// vCPU threads started ahead (a standby VMM's), in vCPU order; the vCPUs without one
    /// get a thread at start.
    pub threads: Vec<vcpu::VcpuThread>,
}

/// A running VM.
pub struct Vmm {
    pub(crate) vm: Vm,
    pub(crate) ram: Arc<GuestRam>,
    pub(crate) fingerprint: u64,
    pub(crate) devices: DeviceManager,
    pub(crate) events: EventLoop,
    pub(crate) exit: Arc<ExitSignal>,
    pub(crate) vcpus: Vec<VcpuHandle>,
    pub(crate) paused: bool,
    pub(crate) dirty_logging: bool,
    /// MSR indices saved with each vCPU (read from KVM at the first snapshot).
    pub(crate) msr_list: Option<Arc<Vec<u32>>>,
    pub(crate) layers: Vec<PathBuf>,
    pub(crate) head: Option<LayerInfo>,
    pub(crate) auto_working_set: Option<Instant>,
    /// A restored VM: its guest's post-restore refresh.
    pub(crate) post_restore: Option<GuestAck>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm").field("vcpus", &self.vcpus.len()).finish_non_exhaustive()
    }
}

impl Vmm {
    /// Starts the vCPU threads (all at once, running) and returns the VMM.
    pub fn start(p: VmmParts, vcpus: Vec<Vcpu>) -> Result<Self, VmmError> {
        let mut events = p.events;
        events.add_subscriber(Arc::new(Mutex::new(ExitWatcher(p.exit.clone()))));
        vcpu::install_kick_handler()?;
        let ctx = VcpuContext { bus: p.devices.bus(), ram: p.ram.clone(), exit: p.exit.clone() };
        let mut handles = Vec::with_capacity(vcpus.len());
        let mut threads = p.threads.into_iter().peekable();
        for v in vcpus {
            let t = match threads.next_if(|t| t.index() == v.index) {
                Some(t) => t,
                None => vcpu::prespawn(v.index)?,
            };
            handles.push(t.start(v, ctx.clone(), false)?);
        }
        Ok(Self {
            vm: p.vm,
            ram: p.ram,
            fingerprint: p.fingerprint,
            devices: p.devices,
            events,
            exit: p.exit,
            vcpus: handles,
            paused: false,
            dirty_logging: p.dirty_logging,
            msr_list: None,
            layers: p.layers,
            head: p.head,
            auto_working_set: p.auto_working_set,
            post_restore: None,
        })
    }

    /// One turn of the event loop: waits up to `timeout` (forever if `None`) and dispatches.
    pub fn run_events(&mut self, timeout: Option<Duration>) -> Result<(), event_manager::Error> {
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis().max(1)).unwrap_or(i32::MAX));
        self.events.run_with_timeout(ms).map(|_| ())
    }

    /// The event loop (to add subscribers or reach one's event ops).
    pub fn events(&mut self) -> &mut EventLoop {
        &mut self.events
    }

    /// Whether a vCPU or a device recorded an exit (left for [`Vmm::take_exit`]).
    pub fn exit_requested(&self) -> bool {
        self.exit.requested()
    }

    /// Records the guest's post-restore refresh (reported by `status`).
    pub fn set_post_restore(&mut self, ack: GuestAck) {
        self.post_restore = Some(ack);
    }

    /// Takes the exit recorded by a vCPU or a device, if any.
    pub fn take_exit(&self) -> Option<VmExit> {
        self.exit.take()
    }

    /// Pauses every vCPU (returns when all are out of KVM_RUN), then lets the devices finish
    /// their pending work, so a snapshot sees nothing in flight.
    pub fn pause(&mut self) -> Result<(), VmmError> {
        if self.paused {
            return Ok(());
        }
        let (ack_tx, ack_rx) = channel();
        for v in &self.vcpus {
            v.cmds.send(VcpuCmd::Pause(ack_tx.clone())).map_err(|_| VcpuError::Gone(v.index))?;
            v.kick();
        }
        // Only the vCPU threads hold senders now: a thread that died (its queued Pause
        // dropped with it) makes recv fail instead of waiting forever.
        drop(ack_tx);
        for v in &self.vcpus {
            ack_rx.recv().map_err(|_| VcpuError::Gone(v.index))?;
        }
        self.devices.set_paused(true);
        self.devices.process_pending();
        self.paused = true;
        Ok(())
    }

    /// Resumes every vCPU.
    pub fn resume(&mut self) -> Result<(), VmmError> {
        if !self.paused {
            return Ok(());
        }
        self.devices.set_paused(false);
        for v in &self.vcpus {
            v.cmds.send(VcpuCmd::Resume).map_err(|_| VcpuError::Gone(v.index))?;
        }
        self.paused = false;
        Ok(())
    }

    /// Runs `job` on every (paused) vCPU thread and collects the results in vCPU order.
    pub fn on_vcpus<T: Send + 'static>(
        &self,
        job: impl Fn(&mut Vcpu) -> T + Send + Sync + 'static,
    ) -> Result<Vec<T>, VcpuError> {
        let job = Arc::new(job);
        let mut rxs = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let (tx, rx) = channel();
            let job = job.clone();
            v.cmds
                .send(VcpuCmd::Run(Box::new(move |vcpu| {
                    let _ = tx.send(job(vcpu));
                })))
                .map_err(|_| VcpuError::Gone(v.index))?;
            rxs.push((v.index, rx));
        }
        rxs.into_iter().map(|(i, rx)| rx.recv().map_err(|_| VcpuError::Gone(i))).collect()
    }

    /// Turns dirty-page logging on or off on every slot.
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<(), VmmError> {
        if self.dirty_logging != on {
            self.vm.set_memory_slots(&self.ram, on)?;
            self.dirty_logging = on;
        }
        Ok(())
    }

    /// Whether the vCPUs are paused.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// The `status` reply.
    pub fn status(&self) -> VmStatus {
        let ports = lock(self.devices.ports());
        VmStatus {
            api_version: API_VERSION,
            pid: std::process::id(),
            state: if self.paused { RunState::Paused } else { RunState::Running },
            vcpus: u32::try_from(self.vcpus.len()).unwrap_or(u32::MAX),
            mem_bytes: self.ram.size(),
            identity: ports.identity(),
            generation: ports.generation(),
            dirty_logging: self.dirty_logging,
            layers: self.layers.clone(),
            post_restore: self.post_restore.clone(),
            vsock: self.devices.vsock_status(),
            virtio: self.devices.virtio_status(),
        }
    }

    /// Guest memory.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The devices.
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// The page server, when memory was restored in uffd mode.
    pub fn uffd(&self) -> Option<&UffdMemory> {
        self.ram.owner()?.downcast_ref::<UffdMemory>()
    }

    /// The page server's failure, if the memory is served by one and it failed.
    pub fn page_server_failure(&self) -> Option<String> {
        self.uffd()?.failure().map(|e| crate::one_line(&*e))
    }

    /// When the first-touch order of a first uffd restore is due to be saved.
    pub fn working_set_due(&self) -> Option<Instant> {
        self.auto_working_set
    }
}
