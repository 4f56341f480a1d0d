//! The post-restore refresh: before a restore (or a fork child's start) is reported done, the
//! guest is told the host's wall clock and fresh entropy (guest-init steps CLOCK_REALTIME,
//! adds the bytes with RNDADDENTROPY and reseeds with RNDRESEEDCRNG), and a new hostname and
//! network identity when given. A deterministic fork skips the clock and the entropy.
//!
//! How: a helper thread connects to the VM's own vsock socket (port
//! [`grove_proto::GUEST_VSOCK_PORT`], the hybrid handshake) with grove-proto's client and
//! sends `PostRestore`; meanwhile the VMM thread keeps turning the event loop, which serves
//! that connection like any other. The restored device first sent the guest its
//! transport-reset event, which drops the connections the snapshot's guest had; a new
//! connection that races that reset is retried until the deadline.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps};
use grove_proto::client::{ClientError, GuestClient};
use grove_proto::guest::{NetConfig, PostRestore};
use grove_vmm_api::{GuestAck, GuestOutcome, GuestRefresh, GUEST_REFRESH_TIMEOUT_MS};
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::Vmm;

/// Host entropy bytes sent to the guest.
pub const ENTROPY_BYTES: usize = 64;

/// Wakes the event loop when the helper thread is done.
struct Wake(Arc<EventFd>);

impl MutEventSubscriber for Wake {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new_raw(self.0.as_raw_fd(), EventSet::IN));
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.read();
    }
}

fn entropy() -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; ENTROPY_BYTES];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
    Ok(b)
}

fn skipped(reason: &str) -> GuestAck {
    GuestAck { outcome: GuestOutcome::Skipped, reason: Some(reason.into()), ..GuestAck::default() }
}

/// The exchange with the guest, on the helper thread: connect (retrying while the guest
/// refuses or resets), send `PostRestore`, wait for its `Ok`.
fn tell_guest(
    addr: &str,
    spec: &GuestRefresh,
    entropy: &[u8],
    deadline: Instant,
) -> Result<(), ClientError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut c = GuestClient::connect_retry(addr, deadline, Duration::from_secs(1), Some(left))?;
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let req = PostRestore {
            wall_clock_ns: (!spec.deterministic)
                .then(|| i64::try_from(now.as_nanos()).unwrap_or(i64::MAX)),
            entropy: entropy.to_vec(),
            hostname: spec.hostname.clone().unwrap_or_default(),
            net: spec.net.as_ref().map(|n| NetConfig {
                iface: n.iface.clone(),
                address: n.address.clone(),
                gateway: n.gateway.clone(),
            }),
        };
        match c.post_restore(req) {
            Ok(()) => return Ok(()),
            // The transport reset reached the guest after this connection was made.
            Err(e) if e.is_gone() && Instant::now() < deadline => {}
            Err(e) => return Err(e),
        }
    }
}

/// Starts the exchange on a helper thread (which installs the refresh filter first); its
/// result arrives on the receiver, and `wake` is signalled.
fn start(
    uds: &Path,
    spec: &GuestRefresh,
    entropy: Vec<u8>,
    deadline: Instant,
    wake: Arc<EventFd>,
) -> std::io::Result<Receiver<Result<(), String>>> {
    let (tx, rx) = channel();
    let addr = format!("vsock-uds:{}:{}", uds.display(), grove_proto::GUEST_VSOCK_PORT);
    let spec = spec.clone();
    std::thread::Builder::new().name("grove-refresh".into()).spawn(move || {
        crate::seccomp::install_or_exit(crate::seccomp::Kind::Refresh);
        let r = tell_guest(&addr, &spec, &entropy, deadline).map_err(|e| crate::one_line(&e));
        let _ = tx.send(r);
        let _ = wake.write(1);
    })?;
    Ok(rx)
}

fn failed(reason: String) -> GuestAck {
    GuestAck { outcome: GuestOutcome::Failed, reason: Some(reason), ..GuestAck::default() }
}

/// A started exchange.
struct Started {
    t0: Instant,
    deadline: Instant,
    reseed: bool,
    sub: SubscriberId,
    rx: Receiver<Result<(), String>>,
}

/// Everything up to the helper thread's start; `Err` is the answer when there is nothing to
/// wait for.
fn begin(vmm: &mut Vmm, spec: &GuestRefresh) -> Result<Started, GuestAck> {
    let t0 = Instant::now();
    if !spec.has_work() {
        return Err(skipped(
            "deterministic fork: the guest keeps the snapshot's clock and RNG state",
        ));
    }
    let Some(uds) = vmm.devices().vsock_uds() else {
        return Err(skipped("no vsock device to reach the guest through"));
    };
    let (entropy, reseed) = if spec.deterministic {
        (Vec::new(), false)
    } else {
        match entropy() {
            Ok(e) => (e, true),
            Err(e) => return Err(failed(format!("host entropy: {e}"))),
        }
    };
    let timeout = Duration::from_millis(spec.timeout_ms.unwrap_or(GUEST_REFRESH_TIMEOUT_MS));
    let deadline = t0 + timeout;
    let wake = match EventFd::new(libc::EFD_NONBLOCK) {
        Ok(e) => Arc::new(e),
        Err(e) => return Err(failed(format!("eventfd: {e}"))),
    };
    let sub = vmm.events().add_subscriber(Arc::new(Mutex::new(Wake(wake.clone()))));
    match start(&uds, spec, entropy, deadline, wake) {
        Ok(rx) => Ok(Started { t0, deadline, reseed, sub, rx }),
        Err(e) => {
            let _ = vmm.events().remove_subscriber(sub);
            Err(failed(format!("helper thread: {e}")))
        }
    }
}

/// Refreshes a just-restored guest (see the module doc), turning `vmm`'s event loop until the
/// guest answers, the deadline passes or the VM ends (its exit stays recorded for the
/// caller). `spec` is validated by the caller. The VMM thread installs its seccomp filter
/// here, after the helper thread started and before it dispatches a single event.
pub fn run(vmm: &mut Vmm, spec: &GuestRefresh) -> GuestAck {
    let started = begin(vmm, spec);
    // No thread is started by this one from here on (a filter is inherited by new threads).
    crate::seccomp::install_or_exit(crate::seccomp::Kind::Vmm);
    let Started { t0, deadline, reseed, sub, rx } = match started {
        Ok(s) => s,
        Err(ack) => return ack,
    };
    // The helper's reads end at the deadline; a little more for it to report.
    let give_up = deadline + Duration::from_secs(1);
    let result = loop {
        if let Ok(r) = rx.try_recv() {
            break r;
        }
        if vmm.exit_requested() {
            break Err("the VM ended".to_string());
        }
        let left = give_up.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err("no answer from the helper thread".to_string());
        }
        if let Err(e) = vmm.run_events(Some(left)) {
            break Err(crate::one_line(&e));
        }
    };
    let _ = vmm.events().remove_subscriber(sub);
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    match result {
        Ok(()) => GuestAck {
            outcome: GuestOutcome::Acknowledged,
            clock: !spec.deterministic,
            entropy: if reseed { u32::try_from(ENTROPY_BYTES).unwrap_or(0) } else { 0 },
            hostname: spec.hostname.clone(),
            net: spec.net.is_some(),
            ms,
            reason: None,
        },
        Err(reason) => GuestAck { ms, ..failed(reason) },
    }
}
