//! The control socket (`--api-sock PATH`) as an event-loop subscriber: JSON lines over a Unix
//! stream socket, the protocol of `grove-vmm-api`. No thread per connection: the listener and
//! every connection are non-blocking fds in the VMM's epoll loop.
//!
//! Bounds: at most [`ApiConfig::max_connections`] connections (one more gets a
//! `resource-exhausted` reply and is closed); a connection idle for
//! [`ApiConfig::idle_timeout`] with no request outstanding is closed; a line longer than
//! [`MAX_LINE`] gets a `bad-request` reply and the connection is closed; a malformed line gets
//! a `bad-request` reply and the connection stays. Lines are queued in arrival order (bad
//! ones with their refusal) and answered by the controller ([`crate::controller`]) after each
//! event-loop turn, so replies go back in the order of the lines, buffered while the client
//! does not read.
//!
//! This module knows the protocol, not the VM: it never imports the VMM.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
pub use grove_vmm_api::{
    decode_request, encode_reply, ApiError as Refusal, ErrorCode, Reply, Request, MAX_LINE,
};

/// What a request's handler answers.
pub type Answer = Result<Reply, Refusal>;

/// A line received: a request to execute, or the refusal of a bad line (queued too, so that
/// replies keep the order of the lines).
pub type Pending = Result<Request, Refusal>;

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The socket cannot be bound.
    #[error("cannot listen on {path}")]
    Bind {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Limits of the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiConfig {
    /// Most connections open at once.
    pub max_connections: usize,
    /// A connection with nothing outstanding is closed after this long without traffic.
    pub idle_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self { max_connections: 16, idle_timeout: Duration::from_secs(600) }
    }
}

/// A connection's id (never reused, unlike fds).
pub type ConnId = u64;

struct Conn {
    id: ConnId,
    stream: UnixStream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    last: Instant,
    /// Requests queued and not answered yet.
    pending: usize,
    /// The peer stopped writing, or the line was too long: close once answered and flushed.
    closing: bool,
}

/// Parses one request line into a request or a `bad-request` refusal.
pub fn parse(line: &str) -> Result<Request, String> {
    decode_request(line).map_err(|e| format!("bad request: {}", crate::one_line(&e)))
}

/// The control socket.
pub struct ApiServer {
    listener: UnixListener,
    cfg: ApiConfig,
    conns: HashMap<RawFd, Conn>,
    queue: VecDeque<(ConnId, Pending)>,
    next_id: ConnId,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").field("conns", &self.conns.len()).finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket left by a dead VMM; nothing else is removed).
    pub fn bind(path: &str, cfg: ApiConfig) -> Result<Self, ApiServerError> {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if m.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let err = |source| ApiServerError::Bind { path: path.to_string(), source };
        let listener = UnixListener::bind(path).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(Self { listener, cfg, conns: HashMap::new(), queue: VecDeque::new(), next_id: 1 })
    }

    /// Takes the lines received so far, oldest first.
    pub fn take_requests(&mut self) -> Vec<(ConnId, Pending)> {
        self.queue.drain(..).collect()
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn fd_of(&self, id: ConnId) -> Option<RawFd> {
        self.conns.iter().find(|(_, c)| c.id == id).map(|(&fd, _)| fd)
    }

    /// Sends the answer to a request of connection `id` (dropped if it closed meanwhile).
    pub fn reply(&mut self, id: ConnId, answer: &Answer, ops: &mut EventOps) {
        let Some(fd) = self.fd_of(id) else { return };
        if let Some(c) = self.conns.get_mut(&fd) {
            c.pending = c.pending.saturating_sub(1);
            c.outbuf.extend_from_slice(encode_reply(answer).as_bytes());
        }
        self.flush(fd, ops);
    }

    /// Closes connections idle past the timeout; returns how long until the next may expire.
    pub fn expire(&mut self, now: Instant, ops: &mut EventOps) -> Option<Duration> {
        let t = self.cfg.idle_timeout;
        let idle: Vec<RawFd> = self
            .conns
            .iter()
            .filter(|(_, c)| c.pending == 0 && now.saturating_duration_since(c.last) >= t)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in idle {
            self.close(fd, ops);
        }
        self.conns
            .values()
            .filter(|c| c.pending == 0)
            .map(|c| t.saturating_sub(now.saturating_duration_since(c.last)))
            .min()
    }

    fn close(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(c) = self.conns.remove(&fd) {
            let _ = ops.remove(Events::empty(&c.stream));
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.conns.len() >= self.cfg.max_connections {
                let r = Err(Refusal::new(
                    ErrorCode::ResourceExhausted,
                    format!("too many control connections (at most {})", self.cfg.max_connections),
                ));
                // Best effort: a fresh socket's buffer takes one line.
                let mut s = stream;
                let _ = s.set_nonblocking(true);
                let _ = s.write_all(encode_reply(&r).as_bytes());
                continue;
            }
            if stream.set_nonblocking(true).is_err()
                || ops.add(Events::new(&stream, EventSet::IN)).is_err()
            {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let conn = Conn {
                id,
                stream,
                inbuf: Vec::new(),
                outbuf: Vec::new(),
                last: Instant::now(),
                pending: 0,
                closing: false,
            };
            self.conns.insert(conn.stream.as_raw_fd(), conn);
        }
    }

    /// Reads what the peer sent; queues requests, answers bad lines.
    fn read(&mut self, fd: RawFd) {
        let Some(c) = self.conns.get_mut(&fd) else { return };
        let mut buf = [0u8; 4096];
        loop {
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    c.closing = true;
                    break;
                }
                Ok(n) => {
                    c.last = Instant::now();
                    c.inbuf.extend_from_slice(&buf[..n]);
                    if c.inbuf.len() > 2 * MAX_LINE + 2 {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    c.closing = true;
                    break;
                }
            }
        }
        let bad = |msg: String| Err(Refusal::new(ErrorCode::BadRequest, msg));
        let too_long = || bad(format!("request line longer than {MAX_LINE} bytes"));
        loop {
            let Some(nl) = c.inbuf.iter().position(|&b| b == b'\n') else {
                if c.inbuf.len() > MAX_LINE {
                    c.pending += 1;
                    self.queue.push_back((c.id, too_long()));
                    c.inbuf.clear();
                    c.closing = true;
                }
                break;
            };
            let line: Vec<u8> = c.inbuf.drain(..=nl).collect();
            if line.len() - 1 > MAX_LINE {
                c.pending += 1;
                self.queue.push_back((c.id, too_long()));
                c.inbuf.clear();
                c.closing = true;
                break;
            }
            let item = match std::str::from_utf8(&line) {
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => parse(text).or_else(bad),
                Err(_) => bad("bad request: not UTF-8".into()),
            };
            c.pending += 1;
            self.queue.push_back((c.id, item));
        }
    }

    /// Writes what can be written; closes a finished connection; asks for OUT while data waits.
    fn flush(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(c) = self.conns.get_mut(&fd) else { return };
        let mut failed = false;
        while !c.outbuf.is_empty() {
            match c.stream.write(&c.outbuf) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(n) => {
                    c.outbuf.drain(..n);
                    c.last = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        let done = c.closing && c.pending == 0 && c.outbuf.is_empty();
        if failed || done {
            // Requests still queued for it run; their replies are dropped.
            self.close(fd, ops);
            return;
        }
        let want = if c.outbuf.is_empty() { EventSet::IN } else { EventSet::IN | EventSet::OUT };
        let _ = ops.modify(Events::new(&c.stream, want));
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        // Fails only for an fd registered twice; the socket would then stay silent.
        let _ = ops.add(Events::new(&self.listener, EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
            return;
        }
        let set = events.event_set();
        if set.contains(EventSet::IN) || set.contains(EventSet::HANG_UP) {
            self.read(fd);
        }
        if set.contains(EventSet::ERROR) {
            if let Some(c) = self.conns.get_mut(&fd) {
                c.closing = true;
                c.outbuf.clear();
            }
        }
        self.flush(fd, ops);
    }
}

#[cfg(test)]
mod tests;
