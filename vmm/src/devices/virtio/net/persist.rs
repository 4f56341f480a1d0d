//! virtio-net's saved state: the common virtio state and what the guest sees of the device
//! (MAC, MTU, queue size, offered offloads). The backend and the rate limits are the host's:
//! a restore gets them from its own command line. A frame read from the backend but not yet
//! delivered is not saved (the restored guest never sees it; no half-written buffer exists,
//! as frames are copied into guest memory whole before their chains are returned).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::device::{Net, NetParams};
use super::tap::Backend;
use super::{format_mac, NetConfig, QUEUE_SIZE_RANGE, RX_QUEUE};
use crate::devices::virtio::{IrqTrigger, QueueSaved, VirtioDevice, VirtioState};
use crate::memory::GuestRam;
use crate::persist::Persist;

/// Errors restoring a virtio-net.
#[derive(Debug, thiserror::Error)]
pub enum NetPersistError {
    /// The queue eventfds or limiter timers cannot be created.
    #[error("cannot create the device's eventfds or timers")]
    Io(#[source] std::io::Error),
    /// A saved queue size that is not a power of two in range.
    #[error("saved queue size {0} is not a power of two in {lo}..={hi}", lo = QUEUE_SIZE_RANGE.0, hi = QUEUE_SIZE_RANGE.1)]
    QueueSize(u16),
    /// Features saved as accepted that the saved device does not offer.
    #[error("saved features {0:#x} include ones the device does not offer")]
    Features(u64),
    /// A saved queue virtio-queue refuses.
    #[error("saved queue")]
    Queue(#[source] virtio_queue::Error),
    /// Activated, but not with two queues inside guest memory.
    #[error("saved as activated")]
    Activate(#[source] crate::devices::virtio::ActivateError),
    /// The command line asks for something the snapshot's device differs in.
    #[error("--net {key}={given} differs from the snapshot's {saved}")]
    Mismatch {
        /// The key.
        key: &'static str,
        /// Given on the command line.
        given: String,
        /// In the snapshot.
        saved: String,
    },
}

/// virtio-net's saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// Common virtio state.
    pub virtio: VirtioState,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// MTU offered, if any.
    pub mtu: Option<u16>,
    /// Size of each queue.
    pub queue_size: u16,
    /// Offloads offered.
    pub offload: bool,
}

/// What restoring a virtio-net needs.
pub struct NetArgs {
    /// Guest memory.
    pub mem: Arc<GuestRam>,
    /// Its interrupt (used when the saved device was activated).
    pub interrupt: Arc<IrqTrigger>,
    /// The restore's backend (normally its slot's tap).
    pub backend: Box<dyn Backend>,
    /// The restore's `--net`: its limits, and guest-visible values that must match.
    pub config: NetConfig,
}

fn same<T: PartialEq + std::fmt::Debug>(
    key: &'static str,
    given: Option<T>,
    saved: T,
    show: impl Fn(&T) -> String,
) -> Result<(), NetPersistError> {
    match given {
        Some(g) if g != saved => {
            Err(NetPersistError::Mismatch { key, given: show(&g), saved: show(&saved) })
        }
        _ => Ok(()),
    }
}

impl Persist for Net {
    type State = NetState;
    type Args = NetArgs;
    type Error = NetPersistError;

    fn save(&self) -> Result<NetState, NetPersistError> {
        let p = self.params();
        Ok(NetState {
            virtio: VirtioState {
                acked_features: self.acked_features(),
                activated: self.is_activated(),
                queues: self
                    .queues()
                    .iter()
                    .enumerate()
                    .map(|(i, q)| {
                        let mut s = QueueSaved::of(q);
                        if i == RX_QUEUE {
                            // Chains held for a frame that is not saved go back to the guest.
                            s.next_avail = s.next_avail.wrapping_sub(self.held_rx_chains());
                        }
                        s
                    })
                    .collect(),
            },
            mac: p.mac,
            mtu: p.mtu,
            queue_size: p.queue_size,
            offload: p.offload,
        })
    }

    fn restore(args: NetArgs, s: &NetState) -> Result<Self, NetPersistError> {
        let c = &args.config;
        same("mac", c.mac, s.mac, format_mac)?;
        same("queue-size", c.queue_size, s.queue_size, u16::to_string)?;
        same("offload", c.offload, s.offload, |b| if *b { "on".into() } else { "off".into() })?;
        same("mtu", c.mtu.map(Some), s.mtu, |m| format!("{m:?}"))?;
        let (lo, hi) = QUEUE_SIZE_RANGE;
        if !s.queue_size.is_power_of_two() || !(lo..=hi).contains(&s.queue_size) {
            return Err(NetPersistError::QueueSize(s.queue_size));
        }
        let params = NetParams {
            mac: s.mac,
            mtu: s.mtu,
            queue_size: s.queue_size,
            offload: s.offload,
            rx: c.rx,
            tx: c.tx,
        };
        let mut net = Net::new(args.mem, params, args.backend).map_err(NetPersistError::Io)?;
        if s.virtio.acked_features & !net.avail_features() != 0 {
            return Err(NetPersistError::Features(s.virtio.acked_features));
        }
        net.set_acked_features(s.virtio.acked_features);
        if s.virtio.activated {
            let queues = s
                .virtio
                .queues
                .iter()
                .map(QueueSaved::to_queue)
                .collect::<Result<Vec<_>, _>>()
                .map_err(NetPersistError::Queue)?;
            net.activate(queues, args.interrupt).map_err(NetPersistError::Activate)?;
        }
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use virtio_queue::QueueT;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::net::device::tests::{
        activate, add_chain, device, frame, params, ram, rings, BASE, MIB, MRG,
    };
    use crate::devices::virtio::net::frame::VnetHeader;
    use crate::devices::virtio::net::tap::{SocketBackend, TUN_F_CSUM};
    use crate::devices::virtio::net::DEFAULT_MAC;

    fn irq() -> Arc<IrqTrigger> {
        Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), 0))
    }

    fn args(
        ram: &Arc<GuestRam>,
        config: NetConfig,
    ) -> (NetArgs, std::os::unix::net::UnixDatagram, Arc<std::sync::atomic::AtomicU32>) {
        let (b, peer) = SocketBackend::pair().unwrap();
        let off = b.offload();
        (NetArgs { mem: ram.clone(), interrupt: irq(), backend: Box::new(b), config }, peer, off)
    }

    #[test]
    fn an_active_device_round_trips_and_goes_on_with_a_new_backend() {
        let ram = ram();
        let (rx, tx) = rings(&ram);
        let features = BASE | MRG | (1 << 1); // GUEST_CSUM
        let (mut a, peer_a, irq_a, _) = device(&ram, features, params());
        activate(&mut a, &rx, &tx, &irq_a);
        let mut rnext = 0;
        add_chain(&rx, &mut rnext, &[(2 * MIB, 2048, true)]);
        add_chain(&rx, &mut rnext, &[(2 * MIB + 0x1000, 2048, true)]);
        peer_a.send(&frame(VnetHeader::default(), 100)).unwrap();
        assert!(a.serve_rx());
        let saved = a.save().unwrap();
        assert!(saved.virtio.activated);
        assert_eq!(
            (saved.mac, saved.queue_size, saved.mtu, saved.offload),
            (DEFAULT_MAC, 16, Some(1500), true)
        );
        assert_eq!(saved.virtio.queues[0].next_avail, 1);
        let (args_b, peer_b, off_b) = args(&ram, NetConfig::new("tap0"));
        let mut b = Net::restore(args_b, &saved).unwrap();
        assert_eq!(b.save().unwrap(), saved, "save(restore(s)) == s");
        assert_eq!(off_b.load(Ordering::SeqCst), TUN_F_CSUM, "the new backend gets the offloads");
        // The restored device takes the next chain for the next frame from its own backend.
        peer_b.send(&frame(VnetHeader::default(), 60)).unwrap();
        assert!(b.serve_rx());
        assert_eq!(rx.used().idx().load(), 2);
        assert_eq!(rx.used().ring().ref_at(1).unwrap().load().id(), 1);
    }

    #[test]
    fn chains_held_for_an_unsaved_frame_go_back_to_the_guest() {
        let ram = ram();
        let (rx, tx) = rings(&ram);
        let (mut a, peer, irq_a, _) = device(&ram, BASE | MRG, params());
        activate(&mut a, &rx, &tx, &irq_a);
        let mut rnext = 0;
        add_chain(&rx, &mut rnext, &[(2 * MIB, 1024, true)]);
        peer.send(&frame(VnetHeader::default(), 3000)).unwrap();
        assert!(!a.serve_rx());
        assert_eq!((a.held_rx_chains(), a.queues()[0].next_avail()), (1, 1));
        let saved = a.save().unwrap();
        assert_eq!(
            saved.virtio.queues[0].next_avail, 0,
            "the held chain is not taken in the snapshot"
        );
        let (args_b, peer_b, _) = args(&ram, NetConfig::new("tap0"));
        let mut b = Net::restore(args_b, &saved).unwrap();
        assert!(!b.has_pending_frame(), "the in-flight frame stays with the original VM");
        peer_b.send(&frame(VnetHeader::default(), 60)).unwrap();
        assert!(b.serve_rx());
        assert_eq!(rx.used().ring().ref_at(0).unwrap().load().id(), 0, "the same chain, used");
    }

    #[test]
    fn bad_states_and_mismatched_options_are_refused() {
        let ram = ram();
        let (a, ..) = device(&ram, 0, params());
        let saved = a.save().unwrap();
        let restore = |s: &NetState, c: NetConfig| Net::restore(args(&ram, c).0, s);
        assert!(!restore(&saved, NetConfig::new("t")).unwrap().is_activated());
        let mut c = NetConfig::new("t");
        c.mac = Some([2, 0, 0, 0, 0, 1]);
        let e = restore(&saved, c).unwrap_err();
        assert!(matches!(e, NetPersistError::Mismatch { key: "mac", .. }), "{e}");
        assert!(e.to_string().contains("02:00:00:00:00:01"));
        let mut c = NetConfig::new("t");
        c.queue_size = Some(256);
        assert!(matches!(
            restore(&saved, c),
            Err(NetPersistError::Mismatch { key: "queue-size", .. })
        ));
        let mut c = NetConfig::new("t");
        c.mtu = Some(9000);
        assert!(matches!(restore(&saved, c), Err(NetPersistError::Mismatch { key: "mtu", .. })));
        let mut c = NetConfig::new("t");
        c.mac = Some(DEFAULT_MAC);
        c.offload = Some(true);
        assert!(restore(&saved, c).is_ok(), "matching values are fine");
        for qs in [0u16, 3, 2048] {
            let bad = NetState { queue_size: qs, ..saved.clone() };
            assert!(matches!(
                restore(&bad, NetConfig::new("t")),
                Err(NetPersistError::QueueSize(_))
            ));
        }
        let mut bad = saved.clone();
        bad.offload = false;
        bad.virtio.acked_features = 1; // CSUM, not offered without offloads
        assert!(matches!(restore(&bad, NetConfig::new("t")), Err(NetPersistError::Features(1))));
        let mut bad = saved.clone();
        bad.virtio.activated = true;
        assert!(matches!(restore(&bad, NetConfig::new("t")), Err(NetPersistError::Activate(_))));
        bad.virtio.queues = vec![QueueSaved { size: 3, ..QueueSaved::default() }; 2];
        assert!(matches!(restore(&bad, NetConfig::new("t")), Err(NetPersistError::Queue(_))));
    }
}
