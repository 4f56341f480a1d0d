//! A small blocking client for the guest protocol.
//!
//! One operation at a time: each call sends its request(s) and reads responses until the
//! operation ends. Responses for other ids (there are none unless the caller interleaves
//! operations with [`GuestClient::send`]) are returned by [`GuestClient::recv`] to callers
//! that drive the protocol themselves.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::frame::{self, FrameError};
use crate::guest::{
    request, response, ExecExit, ExecStart, ExecStdin, FileInfo, FileList, FileMkdir, FileRead,
    FileRemove, FileRename, FileStat, FileWriteChunk, FileWriteOpen, Hello, HelloReply, InfoReply,
    InfoRequest, PostRestore, Power, PowerAction, Request, Response, Stream,
};
use crate::{GUEST_MAGIC, GUEST_PROTOCOL_VERSION};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error("connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// Framing or transport error.
    #[error("guest protocol transport")]
    Frame(#[from] FrameError),
    /// The guest answered with an error.
    #[error("guest error {code:?} (errno {errno}): {message}")]
    Guest { code: crate::guest::ErrorCode, errno: i32, message: String },
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
}

/// Result of [`GuestClient::exec`].
#[derive(Debug, Default, Clone)]
pub struct ExecResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: ExecExit,
    pub pid: u32,
}

impl ExecResult {
    /// Exit code if the process exited normally.
    #[must_use]
    pub fn code(&self) -> Option<i32> {
        match self.exit.status {
            Some(crate::guest::exec_exit::Status::Code(c)) => Some(c),
            _ => None,
        }
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

/// A connection to a guest agent.
pub struct GuestClient {
    reader: BufReader<Box<dyn Read + Send>>,
    writer: BufWriter<Box<dyn Write + Send>>,
    next_id: u64,
    /// The guest's hello answer.
    pub hello: HelloReply,
}

impl GuestClient {
    /// Connects to `unix:/path`, `tcp:host:port` (or a bare `host:port`), or
    /// `vsock-uds:/path:PORT` and says hello.
    ///
    /// `vsock-uds` is the host side of a userspace vsock device (Firecracker's "hybrid vsock"
    /// convention, which grove-vmm follows): connect to the VMM's unix socket, send
    /// `CONNECT <port>\n`, read `OK <host port>\n`, then the stream reaches the guest's port.
    ///
    /// # Errors
    /// Connection, transport or hello errors.
    pub fn connect(addr: &str, timeout: Option<Duration>) -> Result<Self, ClientError> {
        let cerr = |source| ClientError::Connect { addr: addr.to_string(), source };
        if let Some(rest) = addr.strip_prefix("vsock-uds:") {
            let (path, port) = rest
                .rsplit_once(':')
                .and_then(|(p, port)| Some((p, port.parse::<u32>().ok()?)))
                .ok_or_else(|| {
                    cerr(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "want vsock-uds:PATH:PORT",
                    ))
                })?;
            let mut s = UnixStream::connect(Path::new(path)).map_err(cerr)?;
            s.set_read_timeout(timeout).map_err(cerr)?;
            s.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(cerr)?;
            // Read the reply byte by byte: nothing after the newline may be consumed.
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while line.len() < 64 {
                match s.read(&mut b).map_err(cerr)? {
                    0 => break,
                    _ if b[0] == b'\n' => break,
                    _ => line.push(b[0]),
                }
            }
            if !line.starts_with(b"OK ") {
                let msg =
                    format!("vsock CONNECT {port} refused: {:?}", String::from_utf8_lossy(&line));
                return Err(cerr(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, msg)));
            }
            let r = s.try_clone().map_err(cerr)?;
            Self::handshake(Box::new(r), Box::new(s))
        } else if let Some(path) = addr.strip_prefix("unix:") {
            let s = UnixStream::connect(Path::new(path)).map_err(cerr)?;
            s.set_read_timeout(timeout).map_err(cerr)?;
            let r = s.try_clone().map_err(cerr)?;
            Self::handshake(Box::new(r), Box::new(s))
        } else {
            let a = addr.strip_prefix("tcp:").unwrap_or(addr);
            let s = TcpStream::connect(a).map_err(cerr)?;
            s.set_nodelay(true).map_err(cerr)?;
            s.set_read_timeout(timeout).map_err(cerr)?;
            let r = s.try_clone().map_err(cerr)?;
            Self::handshake(Box::new(r), Box::new(s))
        }
    }

    /// Says hello over an already connected stream (e.g. a vsock connection).
    ///
    /// # Errors
    /// Transport errors, or a hello the guest refused.
    pub fn handshake(
        reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
    ) -> Result<Self, ClientError> {
        let mut c = Self {
            reader: BufReader::with_capacity(1 << 16, reader),
            writer: BufWriter::with_capacity(1 << 16, writer),
            next_id: 1,
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

    /// Sends a request with a fresh id and returns the id.
    ///
    /// # Errors
    /// Transport errors.
    pub fn send(&mut self, body: request::Body) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send_with_id(id, body)?;
        Ok(id)
    }

    /// Sends a request for an existing operation `id`.
    ///
    /// # Errors
    /// Transport errors.
    pub fn send_with_id(&mut self, id: u64, body: request::Body) -> Result<(), ClientError> {
        frame::write_frame(&mut self.writer, &Request { id, body: Some(body) })?;
        Ok(())
    }

    /// Writes raw bytes to the stream (tests of malformed input).
    ///
    /// # Errors
    /// I/O errors.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.writer.write_all(bytes).map_err(FrameError::Io)?;
        self.writer.flush().map_err(FrameError::Io)?;
        Ok(())
    }

    /// Receives the next response.
    ///
    /// # Errors
    /// Transport or decode errors.
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        let p = frame::read_frame(&mut self.reader)?;
        Ok(frame::decode_response(&p)?)
    }

    /// Receives the next response for `id`, turning `Error` into [`ClientError::Guest`].
    fn expect(&mut self, id: u64) -> Result<response::Body, ClientError> {
        loop {
            let r = self.recv()?;
            if r.id != id {
                continue;
            }
            return match r.body {
                Some(response::Body::Error(e)) => {
                    Err(ClientError::Guest { code: e.code(), errno: e.errno, message: e.message })
                }
                Some(b) => Ok(b),
                None => Err(ClientError::Unexpected("empty response".into())),
            };
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

    /// Starts a process, feeds it `stdin` (then closes it) if given, and collects its output
    /// until it exits.
    ///
    /// # Errors
    /// Transport errors or a guest error (e.g. `SPAWN_FAILED`).
    pub fn exec(
        &mut self,
        mut req: ExecStart,
        stdin: Option<&[u8]>,
    ) -> Result<ExecResult, ClientError> {
        req.stdin = req.stdin || stdin.is_some();
        let id = self.send(request::Body::ExecStart(req))?;
        if let Some(data) = stdin {
            let mut chunks = data.chunks(256 * 1024).peekable();
            if chunks.peek().is_none() {
                self.send_with_id(
                    id,
                    request::Body::ExecStdin(ExecStdin { data: Vec::new(), eof: true }),
                )?;
            }
            while let Some(c) = chunks.next() {
                let eof = chunks.peek().is_none();
                self.send_with_id(
                    id,
                    request::Body::ExecStdin(ExecStdin { data: c.to_vec(), eof }),
                )?;
            }
        }
        self.collect_exec(id)
    }

    /// Collects the output of exec `id` until it exits.
    ///
    /// # Errors
    /// Transport errors or a guest error.
    pub fn collect_exec(&mut self, id: u64) -> Result<ExecResult, ClientError> {
        let mut res = ExecResult::default();
        loop {
            match self.expect(id)? {
                response::Body::ExecStarted(s) => res.pid = s.pid,
                response::Body::ExecOutput(o) => match o.stream() {
                    Stream::Stderr => res.stderr.extend_from_slice(&o.data),
                    _ => res.stdout.extend_from_slice(&o.data),
                },
                response::Body::ExecExit(e) => {
                    res.exit = e;
                    return Ok(res);
                }
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
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

    /// Reads a whole file (streamed in chunks).
    ///
    /// # Errors
    /// Guest errors.
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>, ClientError> {
        self.read_file_with(FileRead { path: path.into(), ..Default::default() })
    }

    /// Reads with explicit options.
    ///
    /// # Errors
    /// Guest errors.
    pub fn read_file_with(&mut self, req: FileRead) -> Result<Vec<u8>, ClientError> {
        let id = self.send(request::Body::Read(req))?;
        let mut out = Vec::new();
        loop {
            match self.expect(id)? {
                response::Body::Chunk(c) => {
                    out.extend_from_slice(&c.data);
                    if c.eof {
                        return Ok(out);
                    }
                }
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    /// Writes a whole file (streamed in 256 KiB chunks) with `mode` (0 = 0644).
    ///
    /// # Errors
    /// Guest errors.
    pub fn write_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<u64, ClientError> {
        self.write_file_with(FileWriteOpen { path: path.into(), mode, ..Default::default() }, data)
    }

    /// Writes with explicit options.
    ///
    /// # Errors
    /// Guest errors.
    pub fn write_file_with(
        &mut self,
        open: FileWriteOpen,
        data: &[u8],
    ) -> Result<u64, ClientError> {
        let id = self.send(request::Body::WriteOpen(open))?;
        self.expect_ok(id)?;
        let mut chunks = data.chunks(256 * 1024).peekable();
        if chunks.peek().is_none() {
            self.send_with_id(
                id,
                request::Body::WriteChunk(FileWriteChunk { data: Vec::new(), last: true }),
            )?;
        }
        while let Some(c) = chunks.next() {
            let last = chunks.peek().is_none();
            self.send_with_id(
                id,
                request::Body::WriteChunk(FileWriteChunk { data: c.to_vec(), last }),
            )?;
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
