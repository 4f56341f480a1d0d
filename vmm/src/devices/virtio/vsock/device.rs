//! The virtio-vsock device: its queues, configuration space (the guest's cid), and the
//! moves between the queues and the host side ([`super::backend`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::backend::{Backend, BackendError};
use super::metrics::VsockMetrics;
use super::packet::{op, parse_tx, RxBuffer};
use super::{
    EVENT_QUEUE, EVENT_TRANSPORT_RESET, MAX_GUEST_CID, MIN_GUEST_CID, NUM_QUEUES, QUEUE_SIZE,
    RX_QUEUE, TX_QUEUE,
};
use crate::devices::virtio::{
    device_type, ActivateError, IrqKind, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestRam;

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// A context id outside the guests' range.
    #[error("vsock cid {0} is outside {MIN_GUEST_CID}..={MAX_GUEST_CID}")]
    Cid(u64),
    /// The host side.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A queue eventfd.
    #[error("cannot create a vsock queue eventfd")]
    EventFd(#[source] std::io::Error),
}

/// What `grove-vmm run --vsock-cid N --vsock-uds PATH` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id.
    pub cid: u64,
    /// The VM's unix socket (host programs connect here; guest connections to port P reach
    /// `PATH_P`).
    pub uds: PathBuf,
}

/// Checks a guest context id.
pub fn check_cid(cid: u64) -> Result<u64, VsockError> {
    if (MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid) {
        Ok(cid)
    } else {
        Err(VsockError::Cid(cid))
    }
}

/// The virtio-vsock device.
pub struct Vsock {
    mem: Arc<GuestRam>,
    pub(super) acked_features: u64,
    pub(super) queues: Vec<Queue>,
    pub(super) queue_evts: [EventFd; NUM_QUEUES],
    pub(super) interrupt: Option<Arc<IrqTrigger>>,
    pub(super) backend: Backend,
    metrics: Arc<VsockMetrics>,
    /// A transport-reset event is owed to the guest (a restored device).
    pub(super) pending_reset: bool,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cid", &self.backend.guest_cid())
            .field("activated", &self.is_activated())
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A device for guest `cfg.cid`, its socket bound at `cfg.uds`; not activated.
    pub fn new(mem: Arc<GuestRam>, cfg: &VsockConfig) -> Result<Self, VsockError> {
        let cid = check_cid(cfg.cid)?;
        let metrics = Arc::new(VsockMetrics::default());
        let backend = Backend::bind(&cfg.uds, cid, metrics.clone())?;
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::EventFd);
        Ok(Self {
            mem,
            acked_features: 0,
            queues: Vec::new(),
            queue_evts: [evt()?, evt()?, evt()?],
            interrupt: None,
            backend,
            metrics,
            pending_reset: false,
            scratch: Vec::new(),
        })
    }

    /// The guest's context id.
    #[must_use]
    pub fn cid(&self) -> u64 {
        self.backend.guest_cid()
    }

    /// The VM's unix socket.
    #[must_use]
    pub fn uds(&self) -> &Path {
        self.backend.uds()
    }

    /// The device's counters.
    #[must_use]
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// The host side.
    #[must_use]
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The host side, to change (tests drive its deadlines).
    #[cfg(test)]
    pub(crate) fn backend_mut(&mut self) -> &mut Backend {
        &mut self.backend
    }

    fn signal(&self) {
        if let Some(irq) = &self.interrupt {
            let _ = irq.trigger(IrqKind::Vring);
        }
    }

    fn add_used(&mut self, q: usize, head: u16, len: u32) -> bool {
        if self.queues[q].add_used(self.mem.mem(), head, len).is_err() {
            VsockMetrics::inc(&self.metrics.queue_errors);
            return false;
        }
        true
    }

    /// Serves the transmit queue (at most one queue's worth of chains); returns whether any
    /// chain was used. More left: the queue's eventfd is signalled again.
    pub fn process_tx(&mut self) -> bool {
        if !self.is_activated() {
            return false;
        }
        let mem = self.mem.clone();
        let cid = self.cid();
        let mut used = false;
        let budget = self.queues[TX_QUEUE].size();
        let mut served = 0;
        while served < budget {
            let Some(chain) = self.queues[TX_QUEUE].pop_descriptor_chain(mem.mem()) else { break };
            served += 1;
            let head = chain.head_index();
            match parse_tx(mem.mem(), chain) {
                Err(_) => VsockMetrics::inc(&self.metrics.malformed),
                Ok(pkt) => match pkt.check(cid) {
                    Err(e) => {
                        VsockMetrics::inc(&self.metrics.malformed);
                        if e.answer_with_rst() {
                            self.backend.reject(&pkt.hdr);
                        }
                    }
                    Ok(()) => {
                        let mut data = std::mem::take(&mut self.scratch);
                        if pkt.hdr.op == op::RW && !pkt.read_payload(mem.mem(), &mut data) {
                            VsockMetrics::inc(&self.metrics.malformed);
                            self.backend.reject(&pkt.hdr);
                        } else {
                            if pkt.hdr.op != op::RW {
                                data.clear();
                            }
                            VsockMetrics::inc(&self.metrics.tx_packets);
                            VsockMetrics::add(&self.metrics.tx_bytes, data.len() as u64);
                            self.backend.recv(&pkt.hdr, &data);
                        }
                        self.scratch = data;
                    }
                },
            }
            if !self.add_used(TX_QUEUE, head, 0) {
                break;
            }
            used = true;
        }
        if served == budget {
            let _ = self.queue_evts[TX_QUEUE].write(1);
        }
        used
    }

    /// Fills receive buffers with the packets the host side has for the guest (at most one
    /// queue's worth); returns whether any buffer was used.
    pub fn process_rx(&mut self) -> bool {
        if !self.is_activated() {
            return false;
        }
        let mem = self.mem.clone();
        let mut used = false;
        let budget = self.queues[RX_QUEUE].size();
        let mut served = 0;
        while served < budget && self.backend.has_rx() {
            let Some(chain) = self.queues[RX_QUEUE].pop_descriptor_chain(mem.mem()) else { break };
            served += 1;
            let head = chain.head_index();
            let len = match RxBuffer::parse(mem.mem(), chain) {
                Err(_) => {
                    VsockMetrics::inc(&self.metrics.bad_rx_buffers);
                    0
                }
                Ok(buf) => {
                    let mut data = std::mem::take(&mut self.scratch);
                    let Some(hdr) = self.backend.next_rx(buf.room(), &mut data) else {
                        // Nothing was due after all: the buffer stays the guest's.
                        self.scratch = data;
                        self.queues[RX_QUEUE].go_to_previous_position();
                        break;
                    };
                    let n = buf.write(mem.mem(), &hdr, &data).unwrap_or(0);
                    VsockMetrics::inc(&self.metrics.rx_packets);
                    VsockMetrics::add(&self.metrics.rx_bytes, data.len() as u64);
                    self.scratch = data;
                    n
                }
            };
            if !self.add_used(RX_QUEUE, head, len) {
                break;
            }
            used = true;
        }
        if served == budget && self.backend.has_rx() {
            let _ = self.queue_evts[RX_QUEUE].write(1);
        }
        used
    }

    /// Delivers an owed transport-reset event if the guest has an event buffer; returns
    /// whether it did.
    pub fn process_event_queue(&mut self) -> bool {
        if !self.is_activated() || !self.pending_reset {
            return false;
        }
        let mem = self.mem.clone();
        while let Some(chain) = self.queues[EVENT_QUEUE].pop_descriptor_chain(mem.mem()) {
            let head = chain.head_index();
            let mut written = 0;
            for d in chain {
                if d.is_write_only() && d.len() >= 4 {
                    if mem.mem().write_slice(&EVENT_TRANSPORT_RESET.to_le_bytes(), d.addr()).is_ok()
                    {
                        written = 4;
                    }
                    break;
                }
            }
            if !self.add_used(EVENT_QUEUE, head, written) {
                return false;
            }
            if written == 4 {
                self.pending_reset = false;
                VsockMetrics::inc(&self.metrics.resets);
                return true;
            }
            VsockMetrics::inc(&self.metrics.bad_rx_buffers);
        }
        false
    }

    /// The host sockets woke the event loop.
    pub fn process_backend(&mut self) -> bool {
        self.backend.process_events();
        self.process_rx()
    }

    /// Runs one step (`f`) and raises the interrupt if it used buffers.
    pub fn serve(&mut self, f: impl FnOnce(&mut Self) -> bool) {
        if f(self) {
            self.signal();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // le64 guest_cid at offset 0; anything else reads zero.
        let cfg = self.cid().to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.checked_add(i as u64).and_then(|a| usize::try_from(a).ok());
            *b = at.and_then(|a| cfg.get(a)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, _: u64, _: &[u8]) {}

    fn activate(
        &mut self,
        queues: Vec<Queue>,
        interrupt: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError> {
        if self.is_activated() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount { got: queues.len(), want: NUM_QUEUES });
        }
        if let Some(i) = queues.iter().position(|q| !q.is_valid(self.mem.mem())) {
            return Err(ActivateError::BadQueue(i));
        }
        self.queues = queues;
        self.interrupt = Some(interrupt);
        self.backend.set_active(true);
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.interrupt.is_some()
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn reset(&mut self) {
        self.queues.clear();
        self.interrupt = None;
        self.pending_reset = false;
        self.backend.set_active(false);
        self.backend.reset();
        for e in &self.queue_evts {
            let _ = e.read();
        }
    }

    fn process_pending(&mut self) {
        // Packets are handled synchronously: nothing is in flight. Serve what the guest
        // notified and the event loop has not seen yet, and owe nothing to the event queue.
        for e in &self.queue_evts {
            let _ = e.read();
        }
        if self.is_activated() {
            let mut used = self.process_event_queue();
            used |= self.process_tx();
            used |= self.process_rx();
            if used {
                self.signal();
            }
        }
    }
}
