//! Virtio 1.x devices over MMIO.
//!
//! - [`VirtioDevice`]: what a device implements (features, queues, config space, activation,
//!   reset, finishing pending work when the VM pauses, its saved state).
//! - [`mmio`]: the generic virtio-mmio transport (register file version 2): status and
//!   feature negotiation, queue setup, notifications, interrupt status.
//! - [`IrqTrigger`]: a device's interrupt, an eventfd KVM injects as an IOAPIC line (irqfd).
//! - [`QueueSaved`] / [`VirtioState`]: the saved form of queues and of the common device state.
//!
//! Queue notifications reach the device as eventfds: the device manager registers each queue's
//! eventfd as a KVM ioeventfd on the QueueNotify register (datamatch = queue index), so a
//! notification never leaves the kernel; the event loop wakes the device's event handler.
//! Should an ioeventfd be missing, the transport signals the same eventfd from the MMIO exit.
//!
//! Every device lives in its own folder with one shape (Firecracker's):
//! `<dev>/mod.rs` (constants, docs), `device.rs` (the runtime object, request parsing),
//! `event_handler.rs` (its event-loop subscriber), `persist.rs` (saved state and
//! [`crate::persist::Persist`], with a round-trip test), `metrics.rs` (counters).
//! Writes a device makes into guest memory go through vm-memory, whose dirty bitmap puts them
//! into the next diff snapshot.

use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub mod block;
pub mod mmio;
pub mod net;
pub mod queues;
pub mod rng;
pub mod vsock;

/// VIRTIO_F_VERSION_1: a virtio 1.x device (modern interface only).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device type ids (virtio 1.2 §5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bits (virtio-mmio InterruptStatus).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqKind {
    /// A used buffer was added to a queue.
    Vring = 1,
    /// The configuration changed (or the device needs a reset).
    Config = 2,
}

/// A device's interrupt: the InterruptStatus register and the eventfd KVM injects
/// (edge-triggered IOAPIC line, registered as an irqfd).
#[derive(Debug)]
pub struct IrqTrigger {
    /// InterruptStatus (bits of [`IrqKind`]).
    pub status: AtomicU32,
    /// The irqfd.
    pub evt: EventFd,
}

impl IrqTrigger {
    /// A trigger with status `status` over `evt`.
    pub fn new(evt: EventFd, status: u32) -> Self {
        Self { status: AtomicU32::new(status), evt }
    }

    /// Sets `kind` in InterruptStatus and raises the line.
    pub fn trigger(&self, kind: IrqKind) -> std::io::Result<()> {
        self.status.fetch_or(kind as u32, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// InterruptStatus now.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the bits the driver acknowledged.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Why a device refused to activate.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A different number of queues than the device has.
    #[error("{got} queues for a device with {want}")]
    QueueCount {
        /// Queues given.
        got: usize,
        /// Queues the device has.
        want: usize,
    },
    /// A queue the device needs is not ready or lies outside guest memory.
    #[error("queue {0} is not ready or not inside guest memory")]
    BadQueue(usize),
    /// Activated twice.
    #[error("device already activated")]
    AlreadyActive,
}

/// What every virtio device implements; the transport ([`mmio`]) drives it.
///
/// Devices are shared as `Arc<Mutex<_>>` between the transport (vCPU threads: register
/// accesses) and the event loop (queue processing). Lock order: transport, then device; a
/// device never locks its transport.
pub trait VirtioDevice: Send {
    /// Device type id ([`device_type`]).
    fn device_type(&self) -> u32;
    /// Features the device offers (always with [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// Features the driver accepted.
    fn acked_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Largest size of each queue (the queue count is this slice's length).
    fn queue_max_sizes(&self) -> &[u16];
    /// One eventfd per queue: the guest's notifications (ioeventfd or transport fallback).
    fn queue_events(&self) -> &[EventFd];
    /// Reads device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space at `offset` (ignored by devices without writable
    /// fields).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues (DRIVER_OK).
    fn activate(
        &mut self,
        queues: Vec<Queue>,
        interrupt: std::sync::Arc<IrqTrigger>,
    ) -> Result<(), ActivateError>;
    /// Whether the device is activated.
    fn is_activated(&self) -> bool;
    /// The live queues (empty before activation).
    fn queues(&self) -> &[Queue];
    /// Back to the state before activation (the driver wrote 0 to Status).
    fn reset(&mut self);
    /// Finishes what the guest has asked for so far: serves every pending notification, so
    /// nothing is in flight when the VM is paused (a snapshot then sees a consistent queue)
    /// and nothing is lost when it is restored. Asynchronous devices wait for their in-flight
    /// requests here, or record them in their saved state.
    fn process_pending(&mut self);
    /// The VM was paused (`true`) or resumed: a device that acts without a guest request (a
    /// network card receiving frames) leaves guest memory alone while the VM is paused.
    fn set_paused(&mut self, _paused: bool) {}
}

/// A queue's saved form (virtio-queue's `QueueState`, serialisable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSaved {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// Ready bit.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device reads.
    pub next_avail: u16,
    /// Next used-ring entry the device writes.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx: bool,
}

impl QueueSaved {
    /// Saves `q`.
    pub fn of(q: &Queue) -> Self {
        let s = q.state();
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }

    /// Rebuilds the queue; virtio-queue validates sizes and ring alignments (the file is
    /// untrusted).
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// Fresh queues of the given largest sizes.
pub fn new_queues(max_sizes: &[u16]) -> Result<Vec<Queue>, virtio_queue::Error> {
    max_sizes.iter().map(|&m| Queue::new(m)).collect()
}

/// The state every virtio device saves besides its own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioState {
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Whether the device was activated.
    pub activated: bool,
    /// Its live queues (when activated).
    pub queues: Vec<QueueSaved>,
}

impl VirtioState {
    /// The common state of `dev`.
    pub fn of(dev: &(impl VirtioDevice + ?Sized)) -> Self {
        Self {
            acked_features: dev.acked_features(),
            activated: dev.is_activated(),
            queues: dev.queues().iter().map(QueueSaved::of).collect(),
        }
    }

    /// Rebuilds the live queues (checked by virtio-queue: the file is untrusted).
    pub fn live_queues(&self) -> Result<Vec<Queue>, virtio_queue::Error> {
        self.queues.iter().map(QueueSaved::to_queue).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_state_round_trips_and_is_validated() {
        let mut q = Queue::new(256).unwrap();
        q.set_size(64);
        q.set_desc_table_address(Some(0x10_0000), Some(0));
        q.set_avail_ring_address(Some(0x10_1000), Some(0));
        q.set_used_ring_address(Some(0x10_2000), Some(0));
        q.set_ready(true);
        q.set_next_avail(7);
        q.set_next_used(5);
        let s = QueueSaved::of(&q);
        let back = s.to_queue().unwrap();
        assert_eq!(QueueSaved::of(&back), s);
        // A size that is not a power of two, or a misaligned ring, is refused.
        assert!(QueueSaved { size: 3, ..s }.to_queue().is_err());
        assert!(QueueSaved { used_ring: 0x10_2001, ..s }.to_queue().is_err());
        assert!(QueueSaved { max_size: 0, ..s }.to_queue().is_err());
    }

    #[test]
    fn interrupt_status_sets_and_acks() {
        let t = IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), 0);
        t.trigger(IrqKind::Vring).unwrap();
        t.trigger(IrqKind::Config).unwrap();
        assert_eq!(t.status(), 3);
        assert_eq!(t.evt.read().unwrap(), 2);
        t.ack(1);
        assert_eq!(t.status(), 2);
    }
}
