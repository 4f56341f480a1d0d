//! virtio-net in the event loop: the two queue eventfds (the guest's notifications through
//! KVM ioeventfds, and the device's own "come back" signals), the backend's descriptor
//! (edge-triggered: the device reads until the backend has nothing or the guest no room, and
//! comes back through a queue eventfd or a limiter timer otherwise), and the limiters' timers.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Net;
use super::{RX_QUEUE, TX_QUEUE};

const RX_Q: u32 = 0;
const TX_Q: u32 = 1;
const BACKEND: u32 = 2;
const RX_TIMER: u32 = 3;
const TX_TIMER: u32 = 4;

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        // Registration fails only for an fd already registered, a programming error; the
        // device then never wakes, and the guest sees no traffic rather than a crash.
        let _ = ops.add(Events::with_data(&self.queue_evts[RX_QUEUE], RX_Q, EventSet::IN));
        let _ = ops.add(Events::with_data(&self.queue_evts[TX_QUEUE], TX_Q, EventSet::IN));
        let _ = ops.add(Events::with_data_raw(
            self.backend.fd(),
            BACKEND,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        ));
        if self.rx_limiter.is_limited() {
            let _ =
                ops.add(Events::with_data_raw(self.rx_limiter.timer_fd(), RX_TIMER, EventSet::IN));
        }
        if self.tx_limiter.is_limited() {
            let _ =
                ops.add(Events::with_data_raw(self.tx_limiter.timer_fd(), TX_TIMER, EventSet::IN));
        }
    }

    fn process(&mut self, events: Events, _: &mut EventOps) {
        match events.data() {
            RX_Q => {
                let _ = self.queue_evts[RX_QUEUE].read();
                self.process_rx();
            }
            TX_Q => {
                let _ = self.queue_evts[TX_QUEUE].read();
                self.process_tx();
            }
            BACKEND => self.process_rx(),
            RX_TIMER if self.rx_limiter.timer_fired() => self.process_rx(),
            TX_TIMER if self.tx_limiter.timer_fired() => self.process_tx(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};

    use super::*;
    use crate::devices::virtio::net::device::tests::{
        activate, add_chain, device, frame, params, ram, rings, BASE, MIB,
    };
    use crate::devices::virtio::net::frame::VnetHeader;
    use crate::devices::virtio::VirtioDevice;

    #[test]
    fn the_event_loop_moves_frames_both_ways() {
        let ram = ram();
        let (rx, tx) = rings(&ram);
        let (mut n, peer, irq, _) = device(&ram, BASE, params());
        activate(&mut n, &rx, &tx, &irq);
        let n = Arc::new(Mutex::new(n));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(n.clone());
        let turn = |em: &mut EventManager<_>| em.run_with_timeout(200).unwrap();
        turn(&mut em); // the activation's own wake-up: nothing to receive
        let mut rnext = 0;
        add_chain(&rx, &mut rnext, &[(2 * MIB, 2048, true)]);
        // A frame arrives at the backend: the edge wakes the device, which delivers it.
        peer.send(&frame(VnetHeader::default(), 80)).unwrap();
        turn(&mut em);
        assert_eq!(rx.used().idx().load(), 1, "received through the event loop");
        // The guest sends: its notification (the queue eventfd) wakes the device.
        let f = frame(VnetHeader::default(), 60);
        vm_memory::Bytes::write_slice(ram.mem(), &f, vm_memory::GuestAddress(3 * MIB)).unwrap();
        let mut tnext = 0;
        add_chain(&tx, &mut tnext, &[(3 * MIB, 72, false)]);
        n.lock().unwrap().queue_events()[TX_QUEUE].write(1).unwrap();
        turn(&mut em);
        let mut b = [0u8; 128];
        assert_eq!(peer.recv(&mut b).unwrap(), 72, "sent through the event loop");
        assert_eq!(tx.used().idx().load(), 1);
        // No receive buffers: the next frame waits, and the guest's notification brings it in.
        peer.send(&frame(VnetHeader::default(), 90)).unwrap();
        turn(&mut em);
        assert!(n.lock().unwrap().has_pending_frame());
        add_chain(&rx, &mut rnext, &[(2 * MIB + 0x1000, 2048, true)]);
        n.lock().unwrap().queue_events()[RX_QUEUE].write(1).unwrap();
        turn(&mut em);
        assert_eq!(rx.used().idx().load(), 2);
        assert_eq!(rx.used().ring().ref_at(1).unwrap().load().len(), 102);
    }
}
