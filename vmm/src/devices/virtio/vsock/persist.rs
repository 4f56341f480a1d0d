//! virtio-vsock's saved state: the common virtio state and the guest's cid. Connections are
//! not saved: a restored device owes the guest a transport-reset event (sent as soon as the
//! guest has an event buffer), after which the guest drops the connections it had and host
//! programs connect again. The restored device binds its own unix socket (a fork child
//! cannot take its parent's) and may get another cid.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::device::{check_cid, Vsock, VsockConfig, VsockError};
use crate::devices::virtio::{IrqTrigger, VirtioDevice, VirtioState};
use crate::memory::GuestRam;
use crate::persist::Persist;

/// Errors restoring a virtio-vsock.
#[derive(Debug, thiserror::Error)]
pub enum VsockPersistError {
    /// Creating the device (cid, socket, eventfds).
    #[error(transparent)]
    Device(#[from] VsockError),
    /// A saved queue virtio-queue refuses.
    #[error("saved queue")]
    Queue(#[source] virtio_queue::Error),
    /// Activated, but not with three queues inside guest memory.
    #[error("saved as activated")]
    Activate(#[source] crate::devices::virtio::ActivateError),
}

/// virtio-vsock's saved state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockState {
    /// Common virtio state.
    pub virtio: VirtioState,
    /// The guest's context id.
    pub cid: u64,
    /// The socket the saved device had (for reference; a restore binds its own).
    pub uds: PathBuf,
}

/// What restoring a virtio-vsock needs.
pub struct VsockArgs {
    /// Guest memory.
    pub mem: Arc<GuestRam>,
    /// Its interrupt (used when the saved device was activated).
    pub interrupt: Arc<IrqTrigger>,
    /// The socket to bind (must not exist).
    pub uds: PathBuf,
    /// Another context id for the guest (else the saved one).
    pub cid: Option<u64>,
}

impl Persist for Vsock {
    type State = VsockState;
    type Args = VsockArgs;
    type Error = VsockPersistError;

    fn save(&self) -> Result<VsockState, VsockPersistError> {
        Ok(VsockState {
            virtio: VirtioState::of(self),
            cid: self.cid(),
            uds: self.uds().to_path_buf(),
        })
    }

    fn restore(args: VsockArgs, s: &VsockState) -> Result<Self, VsockPersistError> {
        let cid = check_cid(args.cid.unwrap_or(s.cid))?;
        let mut dev = Vsock::new(args.mem, &VsockConfig { cid, uds: args.uds })?;
        dev.set_acked_features(s.virtio.acked_features);
        if s.virtio.activated {
            let queues = s.virtio.live_queues().map_err(VsockPersistError::Queue)?;
            dev.activate(queues, args.interrupt).map_err(VsockPersistError::Activate)?;
            dev.pending_reset = true;
        }
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::devices::virtio::vsock::packet::{op, Header};
    use crate::devices::virtio::vsock::test_utils::{to_host, MockGuest, CID};
    use crate::devices::virtio::vsock::EVENT_TRANSPORT_RESET;

    fn restore(
        g: &MockGuest,
        uds: PathBuf,
        cid: Option<u64>,
        s: &VsockState,
    ) -> Result<Vsock, VsockPersistError> {
        Vsock::restore(VsockArgs { mem: g.ram.clone(), interrupt: g.irq.clone(), uds, cid }, s)
    }

    /// A copy of `g`'s guest memory, as a snapshot's child gets it.
    fn copy_memory(g: &MockGuest) -> Arc<GuestRam> {
        use vm_memory::{Bytes, GuestAddress};
        let size = g.ram.size();
        let ram = Arc::new(GuestRam::new_anonymous(size).unwrap());
        let mut buf = vec![0u8; usize::try_from(size).unwrap()];
        g.mem().read_slice(&mut buf, GuestAddress(0)).unwrap();
        ram.mem().write_slice(&buf, GuestAddress(0)).unwrap();
        ram
    }

    #[test]
    fn a_restored_device_resets_the_transport_and_serves_new_connections() {
        let mut g = MockGuest::new();
        let (mut old, _) = g.host_connect(1024);
        g.post_event();
        g.post_rx(8);
        let saved = g.dev.save().unwrap();
        assert!(saved.virtio.activated);
        assert_eq!((saved.cid, saved.uds.as_path()), (CID, g.uds.as_path()));
        // The child: the snapshot's memory, its own socket, another cid.
        let ram = copy_memory(&g);
        let irq = Arc::new(IrqTrigger::new(
            vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            0,
        ));
        let dir = tempfile::tempdir().unwrap();
        let uds2 = dir.path().join("child.sock");
        let args =
            VsockArgs { mem: ram.clone(), interrupt: irq.clone(), uds: uds2.clone(), cid: Some(7) };
        let child = Vsock::restore(args, &saved).unwrap();
        assert_eq!(child.backend().connections(), 0, "connections are not restored");
        assert_eq!(
            child.save().unwrap(),
            VsockState { cid: 7, uds: uds2.clone(), ..saved.clone() }
        );
        let mut cfg = [0u8; 8];
        child.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 7, "the guest re-reads its cid after the reset");
        let mut c = MockGuest::with(ram, child, irq, uds2, dir);
        c.adopt_buffers(&g);
        // The builder serves pending work right after a restore.
        c.dev.process_pending();
        assert_eq!(c.events(), vec![Some(EVENT_TRANSPORT_RESET)], "one transport-reset event");
        assert_eq!(c.dev.metrics().snapshot().resets, 1);
        c.dev.process_pending();
        assert!(c.events().is_empty(), "only once");
        assert!(g.events().is_empty(), "the running parent owes no event");
        // The parent keeps its connection.
        old.write_all(b"parent").unwrap();
        g.host_events();
        let got = g.rx();
        assert_eq!(got.last().map(|(h, d)| (h.op, d.clone())), Some((op::RW, b"parent".to_vec())));
        // The child serves new ones; a packet for the parent's connection gets a RST.
        c.send(Header { src_cid: 7, ..to_host(op::RW, 1024, 1 << 30) }, b"stale");
        c.expect_one(op::RST);
        let (mut s, hport) = c.host_connect(1024);
        c.send(Header { src_cid: 7, ..to_host(op::RW, 1024, hport) }, b"child");
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"child");
    }

    #[test]
    fn a_reset_owed_waits_for_an_event_buffer() {
        let mut g = MockGuest::new();
        let saved = g.dev.save().unwrap();
        let uds2 = g.dir.path().join("b.sock");
        let child = restore(&g, uds2.clone(), None, &saved).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut c = MockGuest::with(g.ram.clone(), child, g.irq.clone(), uds2, dir);
        c.dev.process_pending();
        assert!(c.events().is_empty(), "no event buffer yet");
        c.post_event();
        c.dev.serve(Vsock::process_event_queue);
        assert_eq!(c.events(), vec![Some(EVENT_TRANSPORT_RESET)]);
        let _ = &mut g;
    }

    #[test]
    fn a_fresh_device_round_trips_and_bad_states_are_refused() {
        let g = MockGuest::new();
        let mut saved = g.dev.save().unwrap();
        saved.virtio.activated = false;
        saved.virtio.queues.clear();
        let uds = g.dir.path().join("c.sock");
        let d = restore(&g, uds.clone(), None, &saved).unwrap();
        assert!(!d.is_activated());
        assert_eq!(d.save().unwrap(), VsockState { uds: uds.clone(), ..saved.clone() });
        drop(d);
        std::fs::remove_file(&uds).unwrap();
        // A socket path that exists, a bad cid, an activated state without queues.
        assert!(matches!(
            restore(&g, g.uds.clone(), None, &saved),
            Err(VsockPersistError::Device(VsockError::Backend(_)))
        ));
        assert!(matches!(
            restore(&g, uds.clone(), Some(2), &saved),
            Err(VsockPersistError::Device(VsockError::Cid(2)))
        ));
        let mut bad = saved.clone();
        bad.virtio.activated = true;
        assert!(matches!(
            restore(&g, uds.clone(), None, &bad),
            Err(VsockPersistError::Activate(_))
        ));
        let json = serde_json::to_string(&saved).unwrap();
        let back: VsockState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        assert!(serde_json::from_str::<VsockState>(&json.replace("\"cid\"", "\"cod\"")).is_err());
        let _ = UnixStream::connect(&g.uds).map(|mut s| s.write_all(b"x"));
    }
}
