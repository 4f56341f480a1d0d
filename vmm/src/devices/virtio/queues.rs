//! The queue side every virtio device shares: its live queues, their notification eventfds,
//! its interrupt once activated; activation checks, reset, the used-ring notification after a
//! batch of chains, the event-loop wake-up, and saving and restoring the common state. A device
//! keeps one [`Queues`] and serves its requests; the rest is here.

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, IrqKind, IrqTrigger, QueueSaved, VirtioDevice, VirtioState};
use crate::memory::GuestMemory;

/// Why a saved device's queues cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum QueuesError {
    /// A saved queue virtio-queue refuses.
    #[error("saved queue")]
    Queue(#[source] virtio_queue::Error),
    /// Saved as activated, but its queues cannot be (wrong count, outside guest memory).
    #[error("saved as activated")]
    Activate(#[source] ActivateError),
}

/// A device's queues, their eventfds and its interrupt.
#[derive(Debug)]
pub struct Queues {
    max_sizes: Vec<u16>,
    /// The live queues (empty before activation).
    pub queues: Vec<Queue>,
    /// One notification eventfd per queue.
    pub evts: Vec<EventFd>,
    /// The interrupt, once activated.
    pub interrupt: Option<Arc<IrqTrigger>>,
}

impl Queues {
    /// Queues of these largest sizes, not activated.
    pub fn new(max_sizes: &[u16]) -> std::io::Result<Self> {
        Ok(Self {
            max_sizes: max_sizes.to_vec(),
            queues: Vec::new(),
            evts: max_sizes
                .iter()
                .map(|_| EventFd::new(libc::EFD_NONBLOCK))
                .collect::<Result<_, _>>()?,
            interrupt: None,
        })
    }

    /// Largest size of each queue.
    pub fn max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    /// Takes the driver's queues: as many as the device has, each inside guest memory.
    pub fn activate(
        &mut self,
        mem: &GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError> {
        if self.is_activated() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != self.max_sizes.len() {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: self.max_sizes.len(),
            });
        }
        if let Some(i) = queues.iter().position(|q| !q.is_valid(mem)) {
            return Err(ActivateError::BadQueue(i));
        }
        self.queues = queues;
        self.interrupt = Some(interrupt);
        Ok(())
    }

    /// Whether the device is activated.
    pub fn is_activated(&self) -> bool {
        self.interrupt.is_some()
    }

    /// Back to the state before activation.
    pub fn reset(&mut self) {
        self.queues.clear();
        self.interrupt = None;
        for e in &self.evts {
            let _ = e.read();
        }
    }

    /// Drains queue `i`'s notification; whether the device should serve it (activated).
    pub fn take_event(&self, i: usize) -> bool {
        if let Some(e) = self.evts.get(i) {
            let _ = e.read();
        }
        self.is_activated()
    }

    /// After serving chains of queue `i`: signals its eventfd again (more may be waiting:
    /// the event loop comes back after serving other events, instead of a loop here) and
    /// interrupts the driver if it wants to be.
    pub fn served(&mut self, mem: &GuestMemory, i: usize) {
        if let Some(e) = self.evts.get(i) {
            let _ = e.write(1);
        }
        let notify =
            self.queues.get_mut(i).is_none_or(|q| q.needs_notification(mem).unwrap_or(true));
        if let (true, Some(irq)) = (notify, &self.interrupt) {
            let _ = irq.trigger(IrqKind::Vring);
        }
    }

    /// Registers every queue's eventfd with the event loop.
    pub fn register(&self, ops: &mut EventOps) {
        // Registration fails only for an fd already registered, a programming error; the
        // device then never wakes, and the guest's requests time out rather than crash it.
        for e in &self.evts {
            let _ = ops.add(Events::new(e, EventSet::IN));
        }
    }

    /// The queue whose eventfd fired (drained), if the device should serve it.
    pub fn fired(&self, events: &Events) -> Option<usize> {
        let i = self.evts.iter().position(|e| std::os::fd::AsRawFd::as_raw_fd(e) == events.fd())?;
        self.take_event(i).then_some(i)
    }

    /// The common saved state.
    pub fn save(&self, acked_features: u64) -> VirtioState {
        VirtioState {
            acked_features,
            activated: self.is_activated(),
            queues: self.queues.iter().map(QueueSaved::of).collect(),
        }
    }
}

/// Restores the common state `s` into a fresh device: features, and if it was activated its
/// queues (validated) with `interrupt`.
pub fn restore_common<D: VirtioDevice + ?Sized>(
    d: &mut D,
    s: &VirtioState,
    interrupt: Arc<IrqTrigger>,
) -> Result<(), QueuesError> {
    d.set_acked_features(s.acked_features);
    if s.activated {
        let queues = s
            .queues
            .iter()
            .map(QueueSaved::to_queue)
            .collect::<Result<Vec<_>, _>>()
            .map_err(QueuesError::Queue)?;
        d.activate(queues, interrupt).map_err(QueuesError::Activate)?;
    }
    Ok(())
}
