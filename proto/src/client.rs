//! The host side of the guest protocol: one blocking client for grove-vmm, its tests,
//! grove-bench, guest-ctl and agentd (which runs it under `spawn_blocking`).
//!
//! - Connecting: [`GuestClient::connect`] (one attempt) or [`GuestClient::connect_retry`]
//!   (until a deadline: a booting or just-restored guest refuses for a while). Addresses:
//!   `vsock-uds:PATH:PORT` (a grove-vmm's vsock socket, Firecracker's hybrid handshake),
//!   `unix:PATH`, `tcp:HOST:PORT`.
//! - Exec: [`GuestClient::exec`] collects everything; [`GuestClient::exec_start`] +
//!   [`GuestClient::exec_next`] stream output as it comes, with stdin, signals and PTY
//!   resizes sent from the same thread or, through a [`GuestSender`], from another one
//!   (an interactive session reads output while another thread types).
//! - Files: [`GuestClient::read_file_to`] / [`GuestClient::write_file_from`] stream through
//!   a reader or writer (bounded memory whatever the size).
//! - Errors: a guest that is gone (its VM ended, its connection was reset by a restore, the
//!   VMM closed the socket) gives [`ClientError::Gone`]; a read timeout gives
//!   [`ClientError::Timeout`]; the guest's own refusals give [`ClientError::Guest`].
//!
//! Responses are matched to requests by id; a response for another operation that arrives
//! while one is awaited is kept (up to [`MAX_PARKED`]) for whoever asks for it next.

use std::collections::VecDeque;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::frame::{self, FrameError};
use crate::guest::{
    request, response, ExecExit, ExecResize, ExecSignal, ExecStart, ExecStdin, FileInfo, FileList,
    FileMkdir, FileRead, FileRemove, FileRename, FileStat, FileWatch, FileWriteChunk,
    FileWriteOpen, Hello, HelloReply, InfoReply, InfoRequest, PostRestore, Power, PowerAction,
    PtySize, Request, Response, Stream, WatchEvent,
};
use crate::{GUEST_MAGIC, GUEST_PROTOCOL_VERSION};

/// Data sent per frame when streaming stdin or a file.
pub const CHUNK: usize = 256 * 1024;
/// Responses for other operations kept while one is awaited.
pub const MAX_PARKED: usize = 4096;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed (nothing listens, the handshake was refused).
    #[error("connect to {addr}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Retried until the deadline without success.
    #[error("connect to {addr}: gave up after {attempts} attempts in {waited_ms} ms")]
    Deadline {
        /// The address.
        addr: String,
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        waited_ms: u64,
        /// The last attempt's error.
        #[source]
        last: Box<ClientError>,
    },
    /// The connection ended: the guest, its VM or its connection is gone.
    #[error("the guest is gone ({0})")]
    Gone(String),
    /// No answer within the read timeout.
    #[error("no answer from the guest within the timeout")]
    Timeout,
    /// Framing or transport error.
    #[error("guest protocol transport")]
    Frame(#[from] FrameError),
    /// The guest answered with an error.
    #[error("guest error {code:?} (errno {errno}): {message}")]
    Guest {
        /// The guest's code.
        code: crate::guest::ErrorCode,
        /// The OS error number, if any.
        errno: i32,
        /// The guest's message.
        message: String,
    },
    /// The guest sent something that does not fit the operation.
    #[error("unexpected response: {0}")]
    Unexpected(String),
}

impl ClientError {
    /// The guest's error code, if this is a guest error.
    #[must_use]
    pub fn code(&self) -> Option<crate::guest::ErrorCode> {
        match self {
            Self::Guest { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the connection is unusable because the other side went away.
    #[must_use]
    pub fn is_gone(&self) -> bool {
        matches!(self, Self::Gone(_))
    }

    /// Sorts a transport error: the end of the stream or a reset means the guest is gone.
    fn transport(e: FrameError) -> Self {
        match e {
            FrameError::Closed => Self::Gone("connection closed".into()),
            FrameError::Truncated { .. } => Self::Gone("connection closed inside a frame".into()),
            FrameError::Io(e) => Self::io(e),
            e => Self::Frame(e),
        }
    }

    fn io(e: io::Error) -> Self {
        use io::ErrorKind as K;
        match e.kind() {
            K::WouldBlock | K::TimedOut => Self::Timeout,
            K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::UnexpectedEof
            | K::NotConnected => Self::Gone(e.to_string()),
            _ => Self::Frame(FrameError::Io(e)),
        }
    }
}

/// Result of [`GuestClient::exec`].
#[derive(Debug, Default, Clone)]
pub struct ExecResult {
    /// Standard output (or the terminal's output with a PTY).
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
    /// How it ended.
    pub exit: ExecExit,
    /// Its pid in the guest.
    pub pid: u32,
}

impl ExecResult {
    /// Exit code if the process exited normally.
    #[must_use]
    pub fn code(&self) -> Option<i32> {
        exit_code(&self.exit)
    }
    /// Signal number if the process was killed by a signal.
    #[must_use]
    pub fn signal(&self) -> Option<i32> {
        match self.exit.status {
            Some(crate::guest::exec_exit::Status::Signal(s)) => Some(s),
            _ => None,
        }
    }
}

/// The exit code in `e`, if the process exited normally.
#[must_use]
pub fn exit_code(e: &ExecExit) -> Option<i32> {
    match e.status {
        Some(crate::guest::exec_exit::Status::Code(c)) => Some(c),
        _ => None,
    }
}

/// One step of a running exec.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecEvent {
    /// The process started with this pid.
    Started(u32),
    /// Output (`data` empty and `eof` set when the stream closed).
    Output {
        /// Which stream.
        stream: Stream,
        /// Per-exec sequence number (both streams).
        seq: u64,
        /// The bytes.
        data: Vec<u8>,
        /// The stream closed.
        eof: bool,
    },
    /// It ended (the last event).
    Exit(ExecExit),
}

type Writer = Arc<Mutex<BufWriter<Box<dyn Write + Send>>>>;

/// The sending half of a connection, for another thread (stdin, signals, resizes while the
/// client's thread reads output). Every send is one whole frame.
#[derive(Clone)]
pub struct GuestSender {
    writer: Writer,
    next_id: Arc<AtomicU64>,
}

impl std::fmt::Debug for GuestSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestSender").finish_non_exhaustive()
    }
}

impl GuestSender {
    /// Sends a request with a fresh id; returns the id.
    ///
    /// # Errors
    /// Transport errors ([`ClientError::Gone`] when the connection ended).
    pub fn send(&self, body: request::Body) -> Result<u64, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.send_with_id(id, body)?;
        Ok(id)
    }

    /// Sends a request for an existing operation `id`.
    ///
    /// # Errors
    /// Transport errors.
    pub fn send_with_id(&self, id: u64, body: request::Body) -> Result<(), ClientError> {
        let mut w = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        frame::write_frame(&mut *w, &Request { id, body: Some(body) })
            .map_err(ClientError::transport)
    }

    /// Writes raw bytes (tests of malformed input).
    ///
    /// # Errors
    /// Transport errors.
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        let mut w = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        w.write_all(bytes).and_then(|()| w.flush()).map_err(ClientError::io)
    }

    /// Feeds exec `id`'s stdin (in [`CHUNK`]s); `eof` closes it after `data`.
    ///
    /// # Errors
    /// Transport errors.
    pub fn stdin(&self, id: u64, data: &[u8], eof: bool) -> Result<(), ClientError> {
        let mut chunks = data.chunks(CHUNK).peekable();
        if chunks.peek().is_none() {
            return self
                .send_with_id(id, request::Body::ExecStdin(ExecStdin { data: Vec::new(), eof }));
        }
        while let Some(c) = chunks.next() {
            let last = chunks.peek().is_none();
            let body = request::Body::ExecStdin(ExecStdin { data: c.to_vec(), eof: eof && last });
            self.send_with_id(id, body)?;
        }
        Ok(())
    }

    /// Sends `signal` to exec `id`'s process group.
    ///
    /// # Errors
    /// Transport errors.
    pub fn signal(&self, id: u64, signal: i32) -> Result<(), ClientError> {
        self.send_with_id(id, request::Body::ExecSignal(ExecSignal { signal }))
    }

    /// Cancels operation `id` (a watch ends with an `Ok`; an exec is killed).
    ///
    /// # Errors
    /// Transport errors.
    pub fn cancel(&self, id: u64) -> Result<(), ClientError> {
        self.send_with_id(id, request::Body::Cancel(crate::guest::Cancel {}))
    }

    /// Resizes exec `id`'s PTY.
    ///
    /// # Errors
    /// Transport errors.
    pub fn resize(&self, id: u64, rows: u32, cols: u32) -> Result<(), ClientError> {
        let size = Some(PtySize { rows, cols });
        self.send_with_id(id, request::Body::ExecResize(ExecResize { size }))
    }
}

/// The stream under a connection, for timeouts.
enum Ctl {
    Unix(UnixStream),
    Tcp(TcpStream),
    None,
}

/// A connection to a guest agent.
pub struct GuestClient {
    reader: BufReader<Box<dyn Read + Send>>,
    sender: GuestSender,
    ctl: Ctl,
    parked: VecDeque<Response>,
    /// The guest's hello answer.
    pub hello: HelloReply,
}

impl std::fmt::Debug for GuestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestClient").field("agent", &self.hello.agent).finish_non_exhaustive()
    }
}

/// The hybrid-vsock handshake on a connected stream: `CONNECT <port>\n`, then `OK <n>\n`.
fn vsock_handshake(s: &mut UnixStream, port: u32) -> io::Result<()> {
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: nothing after the newline may be consumed (it is the guest's data).
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut b)? {
            0 => break,
            _ if b[0] == b'\n' => break,
            _ => line.push(b[0]),
        }
    }
    if line.starts_with(b"OK ") {
        return Ok(());
    }
    let msg = if line.is_empty() {
        format!("vsock port {port}: refused (nothing listens there, or the guest is not ready)")
    } else {
        format!("vsock CONNECT {port} refused: {:?}", String::from_utf8_lossy(&line))
    };
    Err(io::Error::new(io::ErrorKind::ConnectionRefused, msg))
}

impl GuestClient {
    /// Connects once to `unix:/path`, `tcp:host:port` (or a bare `host:port`), or
    /// `vsock-uds:/path:PORT` and says hello; `timeout` bounds every later read.
    ///
    /// `vsock-uds` is the host side of grove-vmm's vsock device (Firecracker's "hybrid vsock"
    /// convention): connect to the VM's unix socket, send `CONNECT <port>\n`, read
    /// `OK <host port>\n`, then the stream reaches the guest's port.
    ///
    /// # Errors
    /// Connection, transport or hello errors.
    pub fn connect(addr: &str, timeout: Option<Duration>) -> Result<Self, ClientError> {
        let cerr = |source| ClientError::Connect { addr: addr.to_string(), source };
        let (r, w, ctl): (Box<dyn Read + Send>, Box<dyn Write + Send>, Ctl) = if let Some(rest) =
            addr.strip_prefix("vsock-uds:")
        {
            let (path, port) = rest
                .rsplit_once(':')
                .and_then(|(p, port)| Some((p, port.parse::<u32>().ok()?)))
                .ok_or_else(|| {
                    cerr(io::Error::new(io::ErrorKind::InvalidInput, "want vsock-uds:PATH:PORT"))
                })?;
            let mut s = UnixStream::connect(Path::new(path)).map_err(cerr)?;
            s.set_read_timeout(timeout).map_err(cerr)?;
            vsock_handshake(&mut s, port).map_err(cerr)?;
            let r = s.try_clone().map_err(cerr)?;
            let c = s.try_clone().map_err(cerr)?;
            (Box::new(r), Box::new(s), Ctl::Unix(c))
        } else if let Some(path) = addr.strip_prefix("unix:") {
            let s = UnixStream::connect(Path::new(path)).map_err(cerr)?;
            s.set_read_timeout(timeout).map_err(cerr)?;
            let r = s.try_clone().map_err(cerr)?;
            let c = s.try_clone().map_err(cerr)?;
            (Box::new(r), Box::new(s), Ctl::Unix(c))
        } else {
            let a = addr.strip_prefix("tcp:").unwrap_or(addr);
            let s = TcpStream::connect(a).map_err(cerr)?;
            s.set_nodelay(true).map_err(cerr)?;
            s.set_read_timeout(timeout).map_err(cerr)?;
            let r = s.try_clone().map_err(cerr)?;
            let c = s.try_clone().map_err(cerr)?;
            (Box::new(r), Box::new(s), Ctl::Tcp(c))
        };
        let mut c = Self::handshake(r, w)?;
        c.ctl = ctl;
        Ok(c)
    }

    /// Connects like [`GuestClient::connect`], retrying until `deadline` while the guest
    /// refuses, resets the connection or does not answer (each attempt's hello waits at most
    /// `attempt_timeout`). Afterwards reads wait for `timeout` (None: forever).
    ///
    /// # Errors
    /// [`ClientError::Deadline`] with the last attempt's error; a hello the guest refuses
    /// (wrong protocol) is returned at once.
    pub fn connect_retry(
        addr: &str,
        deadline: Instant,
        attempt_timeout: Duration,
        timeout: Option<Duration>,
    ) -> Result<Self, ClientError> {
        let t0 = Instant::now();
        let mut pause = Duration::from_millis(2);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let per = attempt_timeout.min(left).max(Duration::from_millis(1));
            match Self::connect(addr, Some(per)) {
                Ok(c) => {
                    c.set_timeout(timeout)?;
                    return Ok(c);
                }
                Err(e @ (ClientError::Guest { .. } | ClientError::Unexpected(_))) => return Err(e),
                Err(e) => {
                    if Instant::now() + pause >= deadline {
                        return Err(ClientError::Deadline {
                            addr: addr.to_string(),
                            attempts,
                            waited_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
                            last: Box::new(e),
                        });
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
            }
        }
    }

    /// Says hello over an already connected stream.
    ///
    /// # Errors
    /// Transport errors, or a hello the guest refused.
    pub fn handshake(
        reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
    ) -> Result<Self, ClientError> {
        let mut c = Self {
            reader: BufReader::with_capacity(1 << 16, reader),
            sender: GuestSender {
                writer: Arc::new(Mutex::new(BufWriter::with_capacity(1 << 16, writer))),
                next_id: Arc::new(AtomicU64::new(1)),
            },
            ctl: Ctl::None,
            parked: VecDeque::new(),
            hello: HelloReply::default(),
        };
        let id = c.send(request::Body::Hello(Hello {
            magic: GUEST_MAGIC,
            version: GUEST_PROTOCOL_VERSION,
            client: format!("grove-proto {}", env!("CARGO_PKG_VERSION")),
        }))?;
        match c.expect(id)? {
            response::Body::Hello(h)
                if h.magic == GUEST_MAGIC && h.version == GUEST_PROTOCOL_VERSION =>
            {
                c.hello = h;
                Ok(c)
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sets how long a read may wait (None: forever). Only for sockets this client opened.
    ///
    /// # Errors
    /// The socket's error.
    pub fn set_timeout(&self, t: Option<Duration>) -> Result<(), ClientError> {
        match &self.ctl {
            Ctl::Unix(s) => s.set_read_timeout(t),
            Ctl::Tcp(s) => s.set_read_timeout(t),
            Ctl::None => Ok(()),
        }
        .map_err(ClientError::io)
    }

    /// A sending half for another thread.
    #[must_use]
    pub fn sender(&self) -> GuestSender {
        self.sender.clone()
    }

    /// Sends a request with a fresh id and returns the id.
    ///
    /// # Errors
    /// Transport errors.
    pub fn send(&mut self, body: request::Body) -> Result<u64, ClientError> {
        self.sender.send(body)
    }

    /// Sends a request for an existing operation `id`.
    ///
    /// # Errors
    /// Transport errors.
    pub fn send_with_id(&mut self, id: u64, body: request::Body) -> Result<(), ClientError> {
        self.sender.send_with_id(id, body)
    }

    /// Writes raw bytes to the stream (tests of malformed input).
    ///
    /// # Errors
    /// I/O errors.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.sender.send_raw(bytes)
    }

    /// Receives the next response off the stream (parked ones first).
    ///
    /// # Errors
    /// Transport or decode errors.
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        if let Some(r) = self.parked.pop_front() {
            return Ok(r);
        }
        self.read_one()
    }

    fn read_one(&mut self) -> Result<Response, ClientError> {
        let p = frame::read_frame(&mut self.reader).map_err(ClientError::transport)?;
        frame::decode_response(&p).map_err(ClientError::transport)
    }

    /// Receives the next response for `id`, turning `Error` into [`ClientError::Guest`];
    /// responses for other ids are parked.
    fn expect(&mut self, id: u64) -> Result<response::Body, ClientError> {
        let r = match self.parked.iter().position(|r| r.id == id) {
            Some(i) => self.parked.remove(i).unwrap_or_default(),
            None => loop {
                let r = self.read_one()?;
                if r.id == id {
                    break r;
                }
                if self.parked.len() >= MAX_PARKED {
                    return Err(ClientError::Unexpected(format!(
                        "more than {MAX_PARKED} responses for other operations"
                    )));
                }
                self.parked.push_back(r);
            },
        };
        match r.body {
            Some(response::Body::Error(e)) => {
                Err(ClientError::Guest { code: e.code(), errno: e.errno, message: e.message })
            }
            Some(b) => Ok(b),
            None => Err(ClientError::Unexpected("empty response".into())),
        }
    }

    fn expect_ok(&mut self, id: u64) -> Result<(), ClientError> {
        match self.expect(id)? {
            response::Body::Ok(_) => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Round trip without side effects.
    ///
    /// # Errors
    /// Transport errors.
    pub fn ping(&mut self) -> Result<(), ClientError> {
        let id = self.send(request::Body::Ping(crate::guest::Ping {}))?;
        match self.expect(id)? {
            response::Body::Pong(_) => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Starts a process; returns the exec's id for [`GuestClient::exec_next`], stdin,
    /// signals and resizes.
    ///
    /// # Errors
    /// Transport errors.
    pub fn exec_start(&mut self, req: ExecStart) -> Result<u64, ClientError> {
        self.send(request::Body::ExecStart(req))
    }

    /// The next event of exec `id` (output as the guest sends it).
    ///
    /// # Errors
    /// Transport errors or a guest error (e.g. `SPAWN_FAILED`).
    pub fn exec_next(&mut self, id: u64) -> Result<ExecEvent, ClientError> {
        match self.expect(id)? {
            response::Body::ExecStarted(s) => Ok(ExecEvent::Started(s.pid)),
            response::Body::ExecOutput(o) => {
                Ok(ExecEvent::Output { stream: o.stream(), seq: o.seq, data: o.data, eof: o.eof })
            }
            response::Body::ExecExit(e) => Ok(ExecEvent::Exit(e)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Feeds exec `id`'s stdin; see [`GuestSender::stdin`].
    ///
    /// # Errors
    /// Transport errors.
    pub fn stdin(&mut self, id: u64, data: &[u8], eof: bool) -> Result<(), ClientError> {
        self.sender.stdin(id, data, eof)
    }

    /// Signals exec `id`; see [`GuestSender::signal`].
    ///
    /// # Errors
    /// Transport errors.
    pub fn signal(&mut self, id: u64, signal: i32) -> Result<(), ClientError> {
        self.sender.signal(id, signal)
    }

    /// Runs a process and hands each piece of output to `out` as it arrives; returns how
    /// the process ended.
    ///
    /// # Errors
    /// Transport errors or a guest error.
    pub fn exec_stream(
        &mut self,
        req: ExecStart,
        mut out: impl FnMut(Stream, &[u8]),
    ) -> Result<(u32, ExecExit), ClientError> {
        let id = self.exec_start(req)?;
        let mut pid = 0;
        loop {
            match self.exec_next(id)? {
                ExecEvent::Started(p) => pid = p,
                ExecEvent::Output { stream, data, .. } => out(stream, &data),
                ExecEvent::Exit(e) => return Ok((pid, e)),
            }
        }
    }

    /// Starts a process, feeds it `stdin` (then closes it) if given, and collects its output
    /// until it exits. Large stdin is fed from a second thread, so a process that writes
    /// while it reads never blocks the exchange.
    ///
    /// # Errors
    /// Transport errors or a guest error (e.g. `SPAWN_FAILED`).
    pub fn exec(
        &mut self,
        mut req: ExecStart,
        stdin: Option<&[u8]>,
    ) -> Result<ExecResult, ClientError> {
        req.stdin = req.stdin || stdin.is_some();
        let id = self.exec_start(req)?;
        let Some(data) = stdin else { return self.collect_exec(id) };
        if data.len() <= CHUNK {
            self.stdin(id, data, true)?;
            return self.collect_exec(id);
        }
        let sender = self.sender();
        std::thread::scope(|s| {
            let feeder = s.spawn(move || sender.stdin(id, data, true));
            let r = self.collect_exec(id);
            // A process that exits without reading all its input ends the feeding with an
            // error the result already explains.
            let _ = feeder.join();
            r
        })
    }

    /// Collects the output of exec `id` until it exits.
    ///
    /// # Errors
    /// Transport errors or a guest error.
    pub fn collect_exec(&mut self, id: u64) -> Result<ExecResult, ClientError> {
        let mut res = ExecResult::default();
        loop {
            match self.exec_next(id)? {
                ExecEvent::Started(pid) => res.pid = pid,
                ExecEvent::Output { stream: Stream::Stderr, data, .. } => {
                    res.stderr.extend_from_slice(&data);
                }
                ExecEvent::Output { data, .. } => res.stdout.extend_from_slice(&data),
                ExecEvent::Exit(e) => {
                    res.exit = e;
                    return Ok(res);
                }
            }
        }
    }

    /// Runs `argv` with no stdin; convenience for [`GuestClient::exec`].
    ///
    /// # Errors
    /// As [`GuestClient::exec`].
    pub fn run(&mut self, argv: &[&str]) -> Result<ExecResult, ClientError> {
        self.exec(
            ExecStart {
                argv: argv.iter().map(|s| (*s).to_string()).collect(),
                ..Default::default()
            },
            None,
        )
    }

    /// Stats a path.
    ///
    /// # Errors
    /// Guest errors such as `NOT_FOUND`, `OUTSIDE_ROOT`.
    pub fn stat(&mut self, path: &str) -> Result<FileInfo, ClientError> {
        let id = self.send(request::Body::Stat(FileStat { path: path.into(), user: None }))?;
        match self.expect(id)? {
            response::Body::Stat(i) => Ok(i),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Reads a whole file into memory.
    ///
    /// # Errors
    /// Guest errors.
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>, ClientError> {
        self.read_file_with(FileRead { path: path.into(), ..Default::default() })
    }

    /// Reads with explicit options into memory.
    ///
    /// # Errors
    /// Guest errors.
    pub fn read_file_with(&mut self, req: FileRead) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        self.read_file_to(req, &mut out)?;
        Ok(out)
    }

    /// Streams a file (or a range of it) into `out`, chunk by chunk; returns the bytes read.
    ///
    /// # Errors
    /// Guest errors, or `out`'s error (as [`FrameError::Io`]).
    pub fn read_file_to(&mut self, req: FileRead, out: &mut dyn Write) -> Result<u64, ClientError> {
        let id = self.send(request::Body::Read(req))?;
        let mut n = 0u64;
        loop {
            match self.expect(id)? {
                response::Body::Chunk(c) => {
                    out.write_all(&c.data).map_err(|e| ClientError::Frame(FrameError::Io(e)))?;
                    n += c.data.len() as u64;
                    if c.eof {
                        return Ok(n);
                    }
                }
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    /// Writes a whole file with `mode` (0 = 0644).
    ///
    /// # Errors
    /// Guest errors.
    pub fn write_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<u64, ClientError> {
        self.write_file_with(FileWriteOpen { path: path.into(), mode, ..Default::default() }, data)
    }

    /// Writes a whole file with explicit options.
    ///
    /// # Errors
    /// Guest errors.
    pub fn write_file_with(
        &mut self,
        open: FileWriteOpen,
        mut data: &[u8],
    ) -> Result<u64, ClientError> {
        self.write_file_from(open, &mut data)
    }

    /// Streams `src` into a file in [`CHUNK`]s until `src` ends; returns the bytes the guest
    /// wrote.
    ///
    /// # Errors
    /// Guest errors, or `src`'s error (as [`FrameError::Io`]).
    pub fn write_file_from(
        &mut self,
        open: FileWriteOpen,
        src: &mut dyn Read,
    ) -> Result<u64, ClientError> {
        let id = self.send(request::Body::WriteOpen(open))?;
        self.expect_ok(id)?;
        let mut buf = vec![0u8; CHUNK];
        let mut next = read_full(src, &mut buf)?;
        loop {
            let chunk = buf[..next].to_vec();
            // One chunk ahead: the last one carries `last`.
            let following = if next == CHUNK { read_full(src, &mut buf)? } else { 0 };
            let last = following == 0;
            self.send_with_id(id, request::Body::WriteChunk(FileWriteChunk { data: chunk, last }))?;
            if last {
                break;
            }
            next = following;
        }
        match self.expect(id)? {
            response::Body::WriteDone(d) => Ok(d.bytes),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Lists a directory.
    ///
    /// # Errors
    /// Guest errors.
    pub fn list(&mut self, path: &str) -> Result<Vec<FileInfo>, ClientError> {
        let id = self.send(request::Body::List(FileList { path: path.into(), user: None }))?;
        let mut out = Vec::new();
        loop {
            match self.expect(id)? {
                response::Body::List(mut l) => {
                    out.append(&mut l.entries);
                    if l.done {
                        return Ok(out);
                    }
                }
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    /// Creates a directory (with parents if `parents`).
    ///
    /// # Errors
    /// Guest errors.
    pub fn mkdir(&mut self, path: &str, parents: bool) -> Result<(), ClientError> {
        let id = self.send(request::Body::Mkdir(FileMkdir {
            path: path.into(),
            parents,
            ..Default::default()
        }))?;
        self.expect_ok(id)
    }

    /// Removes a path (a directory tree if `recursive`).
    ///
    /// # Errors
    /// Guest errors.
    pub fn remove(&mut self, path: &str, recursive: bool) -> Result<(), ClientError> {
        let id = self.send(request::Body::Remove(FileRemove {
            path: path.into(),
            recursive,
            user: None,
        }))?;
        self.expect_ok(id)
    }

    /// Renames a path.
    ///
    /// # Errors
    /// Guest errors.
    pub fn rename(&mut self, from: &str, to: &str) -> Result<(), ClientError> {
        let id = self.send(request::Body::Rename(FileRename {
            from: from.into(),
            to: to.into(),
            user: None,
        }))?;
        self.expect_ok(id)
    }

    /// Starts watching a directory; returns the watch's id once the guest has it in place.
    ///
    /// # Errors
    /// Guest errors (not found, not a directory, outside the root).
    pub fn watch_start(&mut self, dir: &str) -> Result<u64, ClientError> {
        let id = self.send(request::Body::Watch(FileWatch { path: dir.into() }))?;
        self.expect_ok(id)?;
        Ok(id)
    }

    /// The next event of watch `id`; `None` once the watch has ended (cancelled through
    /// [`GuestSender::cancel`]).
    ///
    /// # Errors
    /// Transport and guest errors (the guest's inotify failed).
    pub fn watch_next(&mut self, id: u64) -> Result<Option<WatchEvent>, ClientError> {
        match self.expect(id)? {
            response::Body::WatchEvent(e) => Ok(Some(e)),
            response::Body::Ok(_) => Ok(None),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Uptime, load, memory and disk of the guest.
    ///
    /// # Errors
    /// Transport errors.
    pub fn info(&mut self) -> Result<InfoReply, ClientError> {
        let id = self.send(request::Body::Info(InfoRequest {}))?;
        match self.expect(id)? {
            response::Body::Info(i) => Ok(i),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Post-restore steps (clock, entropy, hostname, network).
    ///
    /// # Errors
    /// Guest errors.
    pub fn post_restore(&mut self, req: PostRestore) -> Result<(), ClientError> {
        let id = self.send(request::Body::PostRestore(req))?;
        self.expect_ok(id)
    }

    /// Powers the guest off or reboots it (answered before it happens).
    ///
    /// # Errors
    /// Guest errors.
    pub fn power(&mut self, action: PowerAction) -> Result<(), ClientError> {
        let id = self.send(request::Body::Power(Power { action: action.into() }))?;
        self.expect_ok(id)
    }
}

/// Fills `buf` from `src` as far as it goes; returns the bytes read (less than `buf.len()`
/// only at the end of `src`).
fn read_full(src: &mut dyn Read, buf: &mut [u8]) -> Result<usize, ClientError> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ClientError::Frame(FrameError::Io(e))),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{HelloReply, Ok as OkMsg};

    /// A stand-in agent on the other end of a socket pair: answers hello, then runs `f`.
    fn peer(
        f: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) -> (GuestClient, std::thread::JoinHandle<()>) {
        let (a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let req = frame::decode_request(&frame::read_frame(&mut b).unwrap()).unwrap();
            let hello = HelloReply {
                magic: GUEST_MAGIC,
                version: GUEST_PROTOCOL_VERSION,
                ..Default::default()
            };
            let r = Response { id: req.id, body: Some(response::Body::Hello(hello)) };
            frame::write_frame(&mut b, &r).unwrap();
            f(&mut b);
        });
        let c = GuestClient::handshake(Box::new(a.try_clone().unwrap()), Box::new(a)).unwrap();
        (c, t)
    }

    #[test]
    fn a_closed_or_reset_connection_is_gone() {
        let (mut c, t) = peer(|_| {});
        t.join().unwrap();
        let e = c.ping().unwrap_err();
        assert!(e.is_gone(), "{e:?}");
    }

    #[test]
    fn responses_for_other_operations_are_kept() {
        let (mut c, t) = peer(|b| {
            let ping = frame::decode_request(&frame::read_frame(b).unwrap()).unwrap();
            // An answer for some other id comes first.
            let other = Response { id: 999, body: Some(response::Body::Ok(OkMsg {})) };
            frame::write_frame(b, &other).unwrap();
            let pong =
                Response { id: ping.id, body: Some(response::Body::Pong(crate::guest::Pong {})) };
            frame::write_frame(b, &pong).unwrap();
        });
        c.ping().unwrap();
        assert_eq!(c.recv().unwrap().id, 999, "parked, not lost");
        t.join().unwrap();
    }

    #[test]
    fn connect_retry_gives_up_at_the_deadline_with_the_last_error() {
        let dir = std::env::temp_dir().join(format!("grove-proto-retry-{}", std::process::id()));
        let addr = format!("vsock-uds:{}:1024", dir.join("absent.sock").display());
        let t0 = Instant::now();
        let e = GuestClient::connect_retry(
            &addr,
            Instant::now() + Duration::from_millis(200),
            Duration::from_millis(50),
            None,
        )
        .unwrap_err();
        let ClientError::Deadline { attempts, last, .. } = e else { panic!("{e:?}") };
        assert!(attempts > 1);
        assert!(matches!(*last, ClientError::Connect { .. }));
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_refused_vsock_handshake_is_a_connect_error() {
        let dir = tempdir();
        let sock = dir.join("v.sock");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 13];
            s.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"CONNECT 1024\n");
            // Closed without OK: nothing listens in the guest.
        });
        let e =
            GuestClient::connect(&format!("vsock-uds:{}:1024", sock.display()), None).unwrap_err();
        t.join().unwrap();
        let ClientError::Connect { source, .. } = e else { panic!("{e:?}") };
        assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> std::path::PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "grove-proto-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
