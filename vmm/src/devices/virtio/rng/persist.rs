//! virtio-rng's saved state: the common virtio state (features, activation, live queues).
//! The entropy source has no state; the counters start again at zero.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::device::Rng;
use crate::devices::virtio::queues::{restore_common, QueuesError};
use crate::devices::virtio::{IrqTrigger, VirtioDevice, VirtioState};
use crate::memory::GuestRam;
use crate::persist::Persist;

/// Errors restoring a virtio-rng.
#[derive(Debug, thiserror::Error)]
pub enum RngPersistError {
    /// The queue eventfd cannot be created.
    #[error("cannot create the queue eventfd")]
    EventFd(#[source] std::io::Error),
    /// The saved queues (activated, but not with exactly one queue inside guest memory).
    #[error(transparent)]
    Queues(#[from] QueuesError),
}

/// virtio-rng's saved state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngState {
    /// Common virtio state.
    pub virtio: VirtioState,
}

/// What restoring a virtio-rng needs.
pub struct RngArgs {
    /// Guest memory.
    pub mem: Arc<GuestRam>,
    /// Its interrupt (used when the saved device was activated).
    pub interrupt: Arc<IrqTrigger>,
}

impl Persist for Rng {
    type State = RngState;
    type Args = RngArgs;
    type Error = RngPersistError;

    fn save(&self) -> Result<RngState, RngPersistError> {
        Ok(RngState { virtio: self.q.save(self.acked_features()) })
    }

    fn restore(args: RngArgs, s: &RngState) -> Result<Self, RngPersistError> {
        let mut rng = Rng::new(args.mem).map_err(RngPersistError::EventFd)?;
        restore_common(&mut rng, &s.virtio, args.interrupt)?;
        Ok(rng)
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::rng::device::tests::{ram, MIB};
    use crate::devices::virtio::QueueSaved;
    use crate::devices::virtio::VIRTIO_F_VERSION_1;

    fn irq() -> Arc<IrqTrigger> {
        Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), 0))
    }

    #[test]
    fn an_activated_rng_round_trips_and_serves_on() {
        let ram = ram();
        let mq = MockSplitQueue::create(ram.mem(), GuestAddress(MIB), 16);
        let d = |a| RawDescriptor::from(Descriptor::new(a, 8, 2, 0));
        mq.add_desc_chains(&[d(2 * MIB)], 0).unwrap();
        let mut a = Rng::new(ram.clone()).unwrap();
        a.set_acked_features(VIRTIO_F_VERSION_1);
        a.activate(vec![mq.create_queue().unwrap()], irq()).unwrap();
        a.process_queue();
        let saved = a.save().unwrap();
        assert!(saved.virtio.activated);
        assert_eq!(saved.virtio.queues[0].next_avail, 1);
        let mut b = Rng::restore(RngArgs { mem: ram.clone(), interrupt: irq() }, &saved).unwrap();
        assert_eq!(b.save().unwrap(), saved, "save(restore(s)) == s");
        // The restored device continues where the saved one stopped: the next chain.
        mq.add_desc_chains(&[d(2 * MIB + 4096)], 1).unwrap();
        assert!(b.process_queue());
        assert_eq!(mq.used().idx().load(), 2);
        assert_eq!(mq.used().ring().ref_at(1).unwrap().load().id(), 1);
    }

    #[test]
    fn a_fresh_rng_round_trips_and_bad_states_are_refused() {
        let ram = ram();
        let a = Rng::new(ram.clone()).unwrap();
        let saved = a.save().unwrap();
        let b = Rng::restore(RngArgs { mem: ram.clone(), interrupt: irq() }, &saved).unwrap();
        assert!(!b.is_activated());
        assert_eq!(b.save().unwrap(), saved);
        // Activated with no queue, or with a queue outside guest memory: refused.
        let mut bad = saved.clone();
        bad.virtio.activated = true;
        assert!(Rng::restore(RngArgs { mem: ram.clone(), interrupt: irq() }, &bad).is_err());
        let q = QueueSaved {
            max_size: 16,
            size: 16,
            ready: true,
            desc_table: 0x7000_0000,
            avail_ring: 0x7000_1000,
            used_ring: 0x7000_2000,
            ..QueueSaved::default()
        };
        bad.virtio.queues = vec![q];
        assert!(matches!(
            Rng::restore(RngArgs { mem: ram, interrupt: irq() }, &bad),
            Err(RngPersistError::Queues(QueuesError::Activate(_)))
        ));
    }
}
