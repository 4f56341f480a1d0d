//! virtio-blk in the event loop: its queue's eventfd (the guest's notifications, through a
//! KVM ioeventfd) wakes it; it serves the queue.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Block;

impl MutEventSubscriber for Block {
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
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::super::device::tests::{bytes, device, hdr, w, MIB};
    use super::*;
    use crate::devices::virtio::{IrqTrigger, VirtioDevice};

    #[test]
    fn a_notification_through_the_event_loop_serves_the_queue() {
        let t = tempfile::tempdir().unwrap();
        let (ram, blk) = device(t.path(), true);
        let mq = MockSplitQueue::create(ram.mem(), GuestAddress(MIB), 16);
        let h = hdr(&ram, 2 * MIB, VIRTIO_BLK_T_GET_ID, 0);
        let chain: Vec<_> =
            [h, w(4 * MIB, 20), w(3 * MIB, 1)]
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let s = virtio_queue::desc::split::Descriptor::from(*d);
                    let (f, n) = if i < 2 { (s.flags() | 1, i as u16 + 1) } else { (s.flags(), 0) };
                    virtio_queue::desc::RawDescriptor::from(
                        virtio_queue::desc::split::Descriptor::new(s.addr().0, s.len(), f, n),
                    )
                })
                .collect();
        mq.add_desc_chains(&chain, 0).unwrap();
        let blk = Arc::new(Mutex::new(blk));
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), 0));
        blk.lock().unwrap().activate(vec![mq.create_queue().unwrap()], irq.clone()).unwrap();
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(blk.clone());
        assert_eq!(mq.used().idx().load(), 0);
        blk.lock().unwrap().queue_events()[0].write(1).unwrap();
        em.run_with_timeout(1000).unwrap();
        assert_eq!(mq.used().idx().load(), 1, "served from the event loop");
        assert_eq!(&bytes(&ram, 4 * MIB, 4), b"root");
        assert_eq!(irq.evt.read().unwrap(), 1, "interrupt raised");
    }
}
