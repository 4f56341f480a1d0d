//! virtio-vsock in the event loop: the three queues' eventfds (the guest's notifications,
//! through KVM ioeventfds) and the host side's epoll set wake it.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Vsock;
use super::{EVENT_QUEUE, RX_QUEUE, TX_QUEUE};

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        // Registration fails only for an fd already registered, a programming error; the
        // device then never wakes for it and its connections stall rather than crash.
        for e in &self.queue_evts {
            let _ = ops.add(Events::new(e, EventSet::IN));
        }
        let _ = ops.add(Events::new_raw(self.backend.epoll_fd(), EventSet::IN));
    }

    fn process(&mut self, events: Events, _: &mut EventOps) {
        let fd = events.fd();
        if fd == self.backend.epoll_fd() {
            // Host connections keep being served before activation too (handshakes are
            // refused then), so their sockets never spin the loop.
            self.serve(Vsock::process_backend);
            return;
        }
        let Some(q) = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd) else { return };
        let _ = self.queue_evts[q].read();
        match q {
            RX_QUEUE => self.serve(Vsock::process_rx),
            TX_QUEUE => self.serve(|d| {
                let tx = d.process_tx();
                // Answers (RESPONSE, RST, credit) and data unblocked by credit go out now.
                d.process_rx() | tx
            }),
            EVENT_QUEUE => self.serve(Vsock::process_event_queue),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};

    use super::*;
    use crate::devices::virtio::vsock::device::VsockConfig;
    use crate::devices::virtio::vsock::packet::op;
    use crate::devices::virtio::vsock::test_utils::{to_host, MockGuest};
    use crate::devices::virtio::VirtioDevice;

    #[test]
    fn host_sockets_and_queue_notifications_are_served_from_the_event_loop() {
        let mut g = MockGuest::new();
        g.post_rx(4);
        let spare =
            Vsock::new(g.ram.clone(), &VsockConfig { cid: 9, uds: g.dir.path().join("spare") })
                .unwrap();
        let dev = Arc::new(Mutex::new(std::mem::replace(&mut g.dev, spare)));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        // A host connection wakes the loop through the device's epoll set.
        let mut s = UnixStream::connect(&g.uds).unwrap();
        s.write_all(b"CONNECT 1024\n").unwrap();
        for _ in 0..3 {
            em.run_with_timeout(100).unwrap();
        }
        std::mem::swap(&mut g.dev, &mut dev.lock().unwrap());
        let (req, _) = g.expect_one(op::REQUEST);
        assert!(g.irq.evt.read().unwrap() >= 1, "interrupt raised");
        // A transmit notification (the ioeventfd's eventfd) serves the queue.
        g.queue_tx(to_host(op::RESPONSE, 1024, req.src_port), &[]);
        std::mem::swap(&mut g.dev, &mut dev.lock().unwrap());
        dev.lock().unwrap().queue_events()[TX_QUEUE].write(1).unwrap();
        em.run_with_timeout(1000).unwrap();
        std::mem::swap(&mut g.dev, &mut dev.lock().unwrap());
        assert_eq!(g.used(TX_QUEUE).len(), 1);
        let mut line = [0u8; 32];
        let n = std::io::Read::read(&mut s, &mut line).unwrap();
        assert!(line[..n].starts_with(b"OK "));
    }
}
