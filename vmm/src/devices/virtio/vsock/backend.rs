//! The host side of the vsock device: the VM's listening unix socket, host streams still
//! sending their `CONNECT` line, the connections, and the order in which connections get the
//! guest's receive buffers.
//!
//! Every host socket sits in one epoll set of its own (edge-triggered for streams); the
//! device registers that set's fd in the VMM's event loop, so the event loop wakes when any
//! host socket does, and [`Backend::process_events`] handles at most
//! [`EVENTS_PER_WAKE`] events per wake-up. A timerfd in the same set fires at the earliest
//! deadline (handshake, guest answer, close).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{After, Conn, ConnError, State};
use super::metrics::VsockMetrics;
use super::packet::{op, Header};
use super::{
    CONNECT_TIMEOUT, EVENTS_PER_WAKE, FIRST_LOCAL_PORT, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS,
    MAX_CONNECT_LINE, MAX_HANDSHAKES, MAX_ORPHAN_RSTS,
};

/// Errors setting up the host side.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The socket path is taken.
    #[error("vsock socket {0}: exists (another VM's, or a stale one: remove it)")]
    Exists(PathBuf),
    /// Binding the socket.
    #[error("vsock socket {path}: cannot bind")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The epoll set or the timer.
    #[error("vsock event set")]
    Epoll(#[source] std::io::Error),
}

const LISTENER: u64 = 0;
const TIMER: u64 = 1;
const FIRST_TOKEN: u64 = 2;

/// An accepted host stream that has not sent its `CONNECT` line yet.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// What a `CONNECT` line asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectLine {
    /// Not complete yet.
    Partial,
    /// A complete line naming this guest port.
    Port(u32),
    /// Malformed or too long.
    Bad,
}

/// Parses the bytes a host stream sent so far: `CONNECT <port>\n`, port decimal (no sign,
/// no spaces), at most [`MAX_CONNECT_LINE`] bytes.
#[must_use]
pub fn parse_connect_line(line: &[u8]) -> ConnectLine {
    let Some(body) = line.strip_suffix(b"\n") else {
        return if line.len() >= MAX_CONNECT_LINE || line.contains(&b'\n') {
            ConnectLine::Bad
        } else {
            ConnectLine::Partial
        };
    };
    let Some(num) = body.strip_prefix(b"CONNECT ") else { return ConnectLine::Bad };
    if num.is_empty() || num.len() > 10 || !num.iter().all(u8::is_ascii_digit) {
        return ConnectLine::Bad;
    }
    std::str::from_utf8(num)
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(ConnectLine::Bad, ConnectLine::Port)
}

/// Connects a non-blocking unix stream to `path` without waiting: a listener whose backlog
/// is full refuses (EAGAIN) instead of stalling the event loop.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    // SAFETY: a plain zeroed sockaddr_un is a valid value of the type.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or_default();
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from(ErrorKind::InvalidInput));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket this function just created and nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).unwrap_or(0);
    // SAFETY: `addr` is a valid sockaddr_un that lives across the call, `len` its size.
    let r = unsafe { libc::connect(fd, std::ptr::addr_of!(addr).cast(), len) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// The host side of one vsock device.
pub struct Backend {
    uds: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_at: Option<Instant>,
    guest_cid: u64,
    active: bool,
    handshakes: HashMap<u64, Handshake>,
    conns: HashMap<u64, Conn>,
    by_ports: HashMap<(u32, u32), u64>,
    local_ports: HashSet<u32>,
    next_token: u64,
    next_local_port: u32,
    /// Connections with a packet for the guest, in turn.
    rxq: VecDeque<u64>,
    /// RSTs for packets that belong to no connection.
    orphan_rsts: VecDeque<Header>,
    metrics: Arc<VsockMetrics>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("uds", &self.uds)
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

fn stream_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

impl Backend {
    /// Binds the VM's socket at `uds` (which must not exist).
    pub fn bind(
        uds: &Path,
        guest_cid: u64,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, BackendError> {
        if uds.symlink_metadata().is_ok() {
            return Err(BackendError::Exists(uds.to_path_buf()));
        }
        let bind_err = |source| BackendError::Bind { path: uds.to_path_buf(), source };
        let listener = UnixListener::bind(uds).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let epoll = Epoll::new().map_err(BackendError::Epoll)?;
        let timer = TimerFd::new().map_err(|e| BackendError::Epoll(e.into()))?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER),
            )
            .map_err(BackendError::Epoll)?;
        epoll
            .ctl(ControlOperation::Add, timer.as_raw_fd(), EpollEvent::new(EventSet::IN, TIMER))
            .map_err(BackendError::Epoll)?;
        Ok(Self {
            uds: uds.to_path_buf(),
            listener,
            epoll,
            timer,
            timer_at: None,
            guest_cid,
            active: false,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            local_ports: HashSet::new(),
            next_token: FIRST_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            rxq: VecDeque::new(),
            orphan_rsts: VecDeque::new(),
            metrics,
        })
    }

    /// The socket path.
    #[must_use]
    pub fn uds(&self) -> &Path {
        &self.uds
    }

    /// The guest's context id.
    #[must_use]
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The epoll set's fd (for the VMM's event loop).
    #[must_use]
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Live connections.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Host streams still sending their `CONNECT` line.
    #[must_use]
    pub fn handshakes(&self) -> usize {
        self.handshakes.len()
    }

    /// Whether the driver is ready (host connections are refused before).
    pub fn set_active(&mut self, active: bool) {
        self.active = active;
    }

    /// Drops every connection and handshake (driver reset, or a restored device): host
    /// streams are closed, the guest is told nothing (its driver is starting over or gets
    /// the transport-reset event).
    pub fn reset(&mut self) {
        let n = self.conns.len() as u64;
        self.conns.clear();
        self.by_ports.clear();
        self.local_ports.clear();
        self.handshakes.clear();
        self.rxq.clear();
        self.orphan_rsts.clear();
        VsockMetrics::add(&self.metrics.closed, n);
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn register(&self, fd: RawFd, events: EventSet, token: u64) -> bool {
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token)).is_ok()
    }

    fn schedule(&mut self, id: u64) {
        if let Some(c) = self.conns.get_mut(&id) {
            if !c.queued && c.wants_rx() {
                c.queued = true;
                self.rxq.push_back(id);
            }
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id) {
            self.by_ports.remove(&(c.local_port, c.peer_port));
            self.local_ports.remove(&c.local_port);
            VsockMetrics::inc(&self.metrics.closed);
            // Dropping the stream closes it, which also takes it out of the epoll set.
        }
    }

    /// Queues a RST for a packet that has no connection (bounded: beyond the limit the RST
    /// is dropped and the guest's own timeouts end its socket).
    fn orphan_rst(&mut self, to: &Header) {
        if to.op == op::RST {
            return;
        }
        if self.orphan_rsts.len() >= MAX_ORPHAN_RSTS {
            VsockMetrics::inc(&self.metrics.rsts_dropped);
            return;
        }
        self.orphan_rsts.push_back(to.reply(op::RST));
    }

    /// Handles a malformed packet that names a guest source: its connection (if any) ends
    /// and the guest gets a RST.
    pub fn reject(&mut self, h: &Header) {
        if let Some(id) = self.by_ports.get(&(h.dst_port, h.src_port)).copied() {
            self.kill(id);
        } else {
            self.orphan_rst(h);
        }
    }

    /// Ends connection `id` with a RST to the guest.
    fn kill(&mut self, id: u64) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.reset();
            self.schedule(id);
        }
    }

    /// Handles a checked packet from the guest (`payload`: its RW data).
    pub fn recv(&mut self, h: &Header, payload: &[u8]) {
        let now = Instant::now();
        let Some(id) = self.by_ports.get(&(h.dst_port, h.src_port)).copied() else {
            self.recv_unknown(h);
            return;
        };
        let Some(c) = self.conns.get_mut(&id) else { return };
        if h.op == op::RST {
            if c.state == State::Connecting {
                VsockMetrics::inc(&self.metrics.refused);
            }
            self.remove(id);
            return;
        }
        if h.op == op::REQUEST {
            // A second REQUEST on a live connection: the guest's state is not ours.
            VsockMetrics::inc(&self.metrics.violations);
            self.kill(id);
            return;
        }
        let closing_both = c.state == State::Closing && h.op == op::SHUTDOWN;
        let was_connecting = c.state == State::Connecting;
        let r = c.update_peer_credit(h).and_then(|()| c.recv(h, payload, now));
        match r {
            Ok(()) => {
                if was_connecting && c.state == State::Established {
                    VsockMetrics::inc(&self.metrics.host_connections);
                }
                if closing_both {
                    // A closing connection's peer closed too: done, with a RST.
                    c.reset();
                }
            }
            Err(ConnError::Host) => {
                VsockMetrics::inc(&self.metrics.refused);
                c.reset();
            }
            Err(_) => {
                VsockMetrics::inc(&self.metrics.violations);
                c.reset();
            }
        }
        self.schedule(id);
        self.arm_timer();
    }

    /// A packet for no connection: a REQUEST opens one to `PATH_<port>`; anything else but
    /// a RST gets a RST.
    fn recv_unknown(&mut self, h: &Header) {
        if h.op != op::REQUEST {
            self.orphan_rst(h);
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            VsockMetrics::inc(&self.metrics.refused);
            self.orphan_rst(h);
            return;
        }
        let mut path = self.uds.clone().into_os_string();
        path.push(format!("_{}", h.dst_port));
        let Ok(stream) = connect_nonblocking(Path::new(&path)) else {
            VsockMetrics::inc(&self.metrics.refused);
            self.orphan_rst(h);
            return;
        };
        let id = self.token();
        if !self.register(stream.as_raw_fd(), stream_events(), id) {
            self.orphan_rst(h);
            return;
        }
        let c = Conn::guest_initiated(stream, h);
        self.by_ports.insert((c.local_port, c.peer_port), id);
        self.conns.insert(id, c);
        VsockMetrics::inc(&self.metrics.guest_connections);
        self.schedule(id);
    }

    /// Whether a packet waits for a receive buffer.
    #[must_use]
    pub fn has_rx(&self) -> bool {
        !self.orphan_rsts.is_empty() || !self.rxq.is_empty()
    }

    /// The next packet for the guest (payload into `out`, at most `room` bytes), in turn
    /// between connections; `None` when nothing is due.
    pub fn next_rx(&mut self, room: usize, out: &mut Vec<u8>) -> Option<Header> {
        out.clear();
        if let Some(h) = self.orphan_rsts.pop_front() {
            VsockMetrics::inc(&self.metrics.rsts_sent);
            return Some(h);
        }
        let now = Instant::now();
        while let Some(id) = self.rxq.pop_front() {
            let Some(c) = self.conns.get_mut(&id) else { continue };
            c.queued = false;
            let Some((h, after)) = c.next_packet(self.guest_cid, room, out, now) else { continue };
            if h.op == op::RST {
                VsockMetrics::inc(&self.metrics.rsts_sent);
            }
            match after {
                After::Remove => self.remove(id),
                After::Keep => self.schedule(id),
            }
            self.arm_timer();
            return Some(h);
        }
        None
    }

    /// Handles what the host sockets reported (at most [`EVENTS_PER_WAKE`] events).
    pub fn process_events(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        let mut handled = 0;
        while handled < EVENTS_PER_WAKE {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            for ev in &events[..n] {
                self.event(ev.data(), ev.event_set());
            }
            handled += n;
            if n < events.len() {
                break;
            }
        }
        self.arm_timer();
    }

    fn event(&mut self, token: u64, set: EventSet) {
        match token {
            LISTENER => self.accept(),
            TIMER => {
                // Disarming resets the expiry count (the fd stops being readable) without a
                // read, which on this blocking timerfd could wait if it was re-armed meanwhile.
                let _ = self.timer.clear();
                self.timer_at = None;
                self.expire_at(Instant::now());
            }
            t if self.handshakes.contains_key(&t) => self.handshake(t),
            t => {
                let now = Instant::now();
                let Some(c) = self.conns.get_mut(&t) else { return };
                if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                    c.host_hung_up(now);
                }
                if set.intersects(EventSet::IN | EventSet::READ_HANG_UP) {
                    c.host_readable();
                }
                if set.contains(EventSet::OUT) {
                    c.host_writable(now);
                }
                self.schedule(t);
            }
        }
    }

    fn accept(&mut self) {
        for _ in 0..MAX_HANDSHAKES {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let full = self.handshakes.len() >= MAX_HANDSHAKES
                || self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS;
            if full || stream.set_nonblocking(true).is_err() {
                // Closed at once: the host program sees a refused connection.
                VsockMetrics::inc(&self.metrics.refused);
                continue;
            }
            let t = self.token();
            if !self.register(
                stream.as_raw_fd(),
                EventSet::IN | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
                t,
            ) {
                continue;
            }
            let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
            self.handshakes.insert(t, Handshake { stream, line: Vec::new(), deadline });
            // The line may be there already (a registration only reports later edges).
            self.handshake(t);
        }
    }

    /// Reads a host stream's `CONNECT` line byte by byte (nothing past the newline is
    /// consumed: it is the connection's first data).
    fn handshake(&mut self, t: u64) {
        let Some(hs) = self.handshakes.get_mut(&t) else { return };
        let mut b = [0u8; 1];
        let verdict = loop {
            match hs.stream.read(&mut b) {
                Ok(0) => break ConnectLine::Bad,
                Ok(_) => {
                    hs.line.push(b[0]);
                    match parse_connect_line(&hs.line) {
                        ConnectLine::Partial => {}
                        v => break v,
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break ConnectLine::Partial,
                Err(_) => break ConnectLine::Bad,
            }
        };
        match verdict {
            ConnectLine::Partial => {}
            ConnectLine::Bad => {
                VsockMetrics::inc(&self.metrics.refused);
                self.handshakes.remove(&t);
            }
            ConnectLine::Port(port) => {
                let Some(hs) = self.handshakes.remove(&t) else { return };
                if !self.active || self.conns.len() >= MAX_CONNECTIONS {
                    VsockMetrics::inc(&self.metrics.refused);
                    return;
                }
                let Some(local) = self.alloc_local_port() else {
                    VsockMetrics::inc(&self.metrics.refused);
                    return;
                };
                // The stream stays registered under the same token, now for writes too.
                let ev = EpollEvent::new(stream_events(), t);
                if self.epoll.ctl(ControlOperation::Modify, hs.stream.as_raw_fd(), ev).is_err() {
                    return;
                }
                let c =
                    Conn::host_initiated(hs.stream, local, port, Instant::now() + CONNECT_TIMEOUT);
                self.local_ports.insert(local);
                self.by_ports.insert((local, port), t);
                self.conns.insert(t, c);
                self.schedule(t);
            }
        }
    }

    fn alloc_local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = if p == u32::MAX - 1 { FIRST_LOCAL_PORT } else { p + 1 };
            if !self.local_ports.contains(&p) {
                return Some(p);
            }
        }
        None
    }

    /// Ends what is past its deadline at `now`.
    pub fn expire_at(&mut self, now: Instant) {
        let before = self.handshakes.len();
        self.handshakes.retain(|_, h| h.deadline > now);
        VsockMetrics::add(&self.metrics.timeouts, (before - self.handshakes.len()) as u64);
        let due: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            VsockMetrics::inc(&self.metrics.timeouts);
            if let Some(c) = self.conns.get_mut(&id) {
                c.deadline = None;
                c.reset();
            }
            self.schedule(id);
        }
    }

    /// Arms the timer for the earliest deadline.
    fn arm_timer(&mut self) {
        let next = self
            .handshakes
            .values()
            .map(|h| h.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline))
            .min();
        if next == self.timer_at {
            return;
        }
        self.timer_at = next;
        let after = match next {
            Some(at) => at.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)),
            None => Duration::ZERO,
        };
        // A zero duration disarms the timer.
        let _ = self.timer.reset(after, None);
    }

    /// Counters.
    #[must_use]
    pub fn metrics(&self) -> &Arc<VsockMetrics> {
        &self.metrics
    }
}
