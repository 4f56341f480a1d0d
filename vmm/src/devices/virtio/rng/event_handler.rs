//! virtio-rng in the event loop: its queue's eventfd (the guest's notifications, through a
//! KVM ioeventfd) wakes it; it serves the queue.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Rng;

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        self.q.register(ops);
    }

    fn process(&mut self, events: Events, _: &mut EventOps) {
        if self.q.fired(&events).is_some() {
            self.process_queue();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::rng::device::tests::{ram, MIB};
    use crate::devices::virtio::{IrqTrigger, VirtioDevice};

    #[test]
    fn a_notification_through_the_event_loop_serves_the_queue() {
        let ram = ram();
        let mq = MockSplitQueue::create(ram.mem(), GuestAddress(MIB), 16);
        mq.add_desc_chains(
            &[virtio_queue::desc::RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
                2 * MIB,
                32,
                2,
                0,
            ))],
            0,
        )
        .unwrap();
        let q: Queue = mq.create_queue().unwrap();
        let rng = Arc::new(Mutex::new(Rng::new(ram.clone()).unwrap()));
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), 0));
        rng.lock().unwrap().activate(vec![q], irq.clone()).unwrap();
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(rng.clone());
        assert_eq!(mq.used().idx().load(), 0);
        rng.lock().unwrap().queue_events()[0].write(1).unwrap();
        em.run_with_timeout(1000).unwrap();
        assert_eq!(mq.used().idx().load(), 1, "served from the event loop");
        assert_eq!(mq.used().ring().ref_at(0).unwrap().load().len(), 32);
        assert_eq!(irq.evt.read().unwrap(), 1, "interrupt raised");
    }
}
