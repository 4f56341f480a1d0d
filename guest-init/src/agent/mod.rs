//! The guest agent: serves guest.proto (see proto/guest.proto and docs/guest.md) on any
//! byte-stream connection. One thread reads a connection's frames; operations that stream
//! (exec output, file watches) run on their own threads and share the connection's writer.

mod exec;
mod files;
mod info;

pub use info::uptime_ms;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use grove_proto::frame::{self, FrameError, MAX_FRAME_LEN};
use grove_proto::guest::{
    request, response, Error, ErrorCode, HelloReply, Ok as OkMsg, Pong, PowerAction, Response,
};
use grove_proto::{GUEST_MAGIC, GUEST_PROTOCOL_VERSION};

/// Most live operations (execs, writes, watches) one connection may hold.
const MAX_OPS_PER_CONN: usize = 256;
/// Most simultaneous connections.
const MAX_CONNS: usize = 64;

/// Errors of the agent's operations; each maps to one `ErrorCode` on the wire.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("{0}")]
    Protocol(String),
    #[error("{what}")]
    Os {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("path {0:?} escapes the allowed root")]
    OutsideRoot(String),
    #[error("no live operation {0}")]
    UnknownId(u64),
    #[error("too many live operations on this connection")]
    Limit,
    #[error("cannot start {what}")]
    Spawn {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
}

impl AgentError {
    pub(crate) fn os(what: impl Into<String>, source: io::Error) -> Self {
        Self::Os { what: what.into(), source }
    }

    fn to_wire(&self) -> Error {
        let (code, errno) = match self {
            Self::BadRequest(_) => (ErrorCode::BadRequest, 0),
            Self::Protocol(_) => (ErrorCode::Protocol, 0),
            Self::OutsideRoot(_) => (ErrorCode::OutsideRoot, 0),
            Self::UnknownId(_) => (ErrorCode::UnknownId, 0),
            Self::Limit => (ErrorCode::Limit, 0),
            Self::Unsupported(_) => (ErrorCode::Unsupported, 0),
            Self::Spawn { source, .. } => {
                (ErrorCode::SpawnFailed, source.raw_os_error().unwrap_or(0))
            }
            Self::Os { source, .. } => {
                let errno = source.raw_os_error().unwrap_or(0);
                let code = match errno {
                    libc::ENOENT => ErrorCode::NotFound,
                    libc::EACCES | libc::EPERM => ErrorCode::PermissionDenied,
                    libc::EEXIST | libc::ENOTEMPTY => ErrorCode::AlreadyExists,
                    libc::ENOTDIR => ErrorCode::NotADirectory,
                    libc::EISDIR => ErrorCode::IsADirectory,
                    _ => ErrorCode::Io,
                };
                (code, errno)
            }
        };
        let mut message = self.to_string();
        if let Some(src) = std::error::Error::source(self) {
            message = format!("{message}: {src}");
        }
        Error { code: code.into(), errno, message }
    }
}

/// What the agent needs to know about where it runs.
pub struct Ctx {
    /// Canonical allowed root for file operations.
    pub root: PathBuf,
    /// The root opened O_PATH: every file operation resolves relative to it with openat2.
    pub root_fd: std::os::fd::OwnedFd,
    /// openat2 `resolve` flags: RESOLVE_IN_ROOT, plus RESOLVE_NO_MAGICLINKS unless the root is /.
    pub resolve: u64,
    /// Running as PID 1 inside a guest (power and post-restore act on the machine).
    pub pid1: bool,
    conns: AtomicUsize,
}

impl Ctx {
    pub fn new(root: PathBuf, pid1: bool) -> io::Result<Arc<Self>> {
        let root = root.canonicalize()?;
        let root_fd = std::os::fd::OwnedFd::from(
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                .open(&root)?,
        );
        let mut resolve = libc::RESOLVE_IN_ROOT;
        if root != std::path::Path::new("/") {
            resolve |= libc::RESOLVE_NO_MAGICLINKS;
        }
        Ok(Arc::new(Self { root, root_fd, resolve, pid1, conns: AtomicUsize::new(0) }))
    }
}

/// The writing half of a connection, shared by the threads of its operations.
#[derive(Clone)]
pub struct Out {
    w: Arc<Mutex<Box<dyn Write + Send>>>,
    dead: Arc<AtomicBool>,
}

impl Out {
    /// Sends one response; returns false once the connection is gone.
    pub fn send(&self, id: u64, body: response::Body) -> bool {
        if self.dead.load(Ordering::Relaxed) {
            return false;
        }
        let mut buf = Vec::new();
        if let Err(e) = frame::encode_frame(&Response { id, body: Some(body) }, &mut buf) {
            eprintln!("guest-init: agent: cannot encode response: {e}");
            return true;
        }
        let mut w = self.w.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.write_all(&buf).and_then(|()| w.flush()).is_err() {
            self.dead.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub fn error(&self, id: u64, e: &AgentError) -> bool {
        self.send(id, response::Body::Error(e.to_wire()))
    }

    pub fn ok(&self, id: u64) -> bool {
        self.send(id, response::Body::Ok(OkMsg {}))
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Relaxed)
    }
}

/// A live operation of a connection.
pub enum Op {
    Exec(exec::ExecOp),
    Write(files::WriteOp),
    Watch(Arc<AtomicBool>),
}

/// Per-connection state.
pub struct Conn {
    pub ctx: Arc<Ctx>,
    pub out: Out,
    pub ops: Arc<Mutex<HashMap<u64, Op>>>,
}

impl Conn {
    fn insert_op(&self, id: u64, op: Op) -> Result<(), AgentError> {
        let mut ops = self.ops.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if ops.len() >= MAX_OPS_PER_CONN {
            return Err(AgentError::Limit);
        }
        if ops.contains_key(&id) {
            return Err(AgentError::BadRequest(format!("operation id {id} is already live")));
        }
        ops.insert(id, op);
        Ok(())
    }
}

/// Serves one connection until it closes.
pub fn serve(ctx: Arc<Ctx>, reader: Box<dyn Read + Send>, writer: Box<dyn Write + Send>) {
    if ctx.conns.fetch_add(1, Ordering::SeqCst) >= MAX_CONNS {
        ctx.conns.fetch_sub(1, Ordering::SeqCst);
        let out = Out { w: Arc::new(Mutex::new(writer)), dead: Arc::new(AtomicBool::new(false)) };
        out.error(0, &AgentError::Protocol("too many connections".into()));
        return;
    }
    let conn = Conn {
        ctx: Arc::clone(&ctx),
        out: Out { w: Arc::new(Mutex::new(writer)), dead: Arc::new(AtomicBool::new(false)) },
        ops: Arc::new(Mutex::new(HashMap::new())),
    };
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let mut said_hello = false;
    loop {
        let payload = match frame::read_frame(&mut reader) {
            Ok(p) => p,
            Err(FrameError::TooLarge { len, max }) => {
                let e = Error {
                    code: ErrorCode::FrameTooLarge.into(),
                    errno: 0,
                    message: format!("frame of {len} bytes exceeds the limit of {max}; skipped"),
                };
                if !conn.out.send(0, response::Body::Error(e)) {
                    break;
                }
                continue;
            }
            Err(FrameError::Closed) => break,
            Err(e) => {
                // Not the client's clean close: worth a line on the console, where a host
                // that saw its connection end can look for the guest's side of it.
                let why =
                    std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default();
                eprintln!("guest-init: agent: connection ended: {e} {why}");
                break;
            }
        };
        let req = match frame::decode_request(&payload) {
            Ok(r) => r,
            Err(e) => {
                let e = Error {
                    code: ErrorCode::BadFrame.into(),
                    errno: 0,
                    message: format!(
                        "{e}: {}",
                        std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default()
                    ),
                };
                if !conn.out.send(0, response::Body::Error(e)) {
                    break;
                }
                continue;
            }
        };
        let id = req.id;
        let Some(body) = req.body else {
            conn.out.error(id, &AgentError::BadRequest("request without a body".into()));
            continue;
        };
        if let request::Body::Hello(h) = &body {
            if h.magic != GUEST_MAGIC || h.version != GUEST_PROTOCOL_VERSION {
                conn.out.error(
                    id,
                    &AgentError::Protocol(format!(
                        "hello with magic {:#x} version {}; this agent speaks magic {GUEST_MAGIC:#x} version {GUEST_PROTOCOL_VERSION}",
                        h.magic, h.version
                    )),
                );
                continue;
            }
            said_hello = true;
            conn.out.send(
                id,
                response::Body::Hello(HelloReply {
                    magic: GUEST_MAGIC,
                    version: GUEST_PROTOCOL_VERSION,
                    agent: format!("guest-init {}", env!("CARGO_PKG_VERSION")),
                    max_frame_len: MAX_FRAME_LEN,
                    uptime_ms: info::uptime_ms(),
                    pid1: ctx.pid1,
                }),
            );
            continue;
        }
        if !said_hello {
            conn.out.error(id, &AgentError::Protocol("the first request must be a hello".into()));
            continue;
        }
        if let Err(e) = dispatch(&conn, id, body) {
            conn.out.error(id, &e);
        }
        if conn.out.is_dead() {
            break;
        }
    }
    // The connection is gone: kill its processes, stop its watches, drop its files.
    let ops: Vec<(u64, Op)> =
        conn.ops.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain().collect();
    for (_, op) in ops {
        match op {
            Op::Exec(e) => e.kill(),
            Op::Watch(stop) => stop.store(true, Ordering::Relaxed),
            Op::Write(_) => {}
        }
    }
    ctx.conns.fetch_sub(1, Ordering::SeqCst);
}

fn dispatch(conn: &Conn, id: u64, body: request::Body) -> Result<(), AgentError> {
    use request::Body as B;
    match body {
        B::Hello(_) => unreachable!("handled by serve"),
        B::Ping(_) => {
            conn.out.send(id, response::Body::Pong(Pong {}));
        }
        B::ExecStart(r) => exec::start(conn, id, r)?,
        B::ExecStdin(r) => exec::stdin(conn, id, r)?,
        B::ExecResize(r) => exec::resize(conn, id, &r)?,
        B::ExecSignal(r) => exec::signal(conn, id, &r)?,
        B::Stat(r) => files::stat(conn, id, &r)?,
        B::Read(r) => files::read(conn, id, &r)?,
        B::WriteOpen(r) => files::write_open(conn, id, &r)?,
        B::WriteChunk(r) => files::write_chunk(conn, id, &r)?,
        B::List(r) => files::list(conn, id, &r)?,
        B::Mkdir(r) => files::mkdir(conn, id, &r)?,
        B::Remove(r) => files::remove(conn, id, &r)?,
        B::Rename(r) => files::rename(conn, id, &r)?,
        B::Watch(r) => files::watch(conn, id, &r)?,
        B::Cancel(_) => {
            let op = conn.ops.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
            match op {
                None => return Err(AgentError::UnknownId(id)),
                Some(Op::Exec(e)) => {
                    // Keep it registered: its ExecExit still comes.
                    e.kill();
                    conn.ops
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(id, Op::Exec(e));
                }
                Some(Op::Watch(stop)) => stop.store(true, Ordering::Relaxed),
                Some(Op::Write(_)) => {}
            }
            conn.out.ok(id);
        }
        B::Info(_) => {
            conn.out.send(id, response::Body::Info(info::info(&conn.ctx)));
        }
        B::PostRestore(r) => {
            info::post_restore(&conn.ctx, &r)?;
            conn.out.ok(id);
        }
        B::Power(p) => {
            let action = p.action();
            if action == PowerAction::Unspecified {
                return Err(AgentError::BadRequest("power action unspecified".into()));
            }
            conn.out.ok(id);
            if conn.ctx.pid1 {
                std::thread::spawn(move || crate::pid1::power(action));
            } else {
                eprintln!("guest-init: agent: {action:?} requested; exiting (agent-only mode)");
                std::process::exit(0);
            }
        }
    }
    Ok(())
}

/// A listening address: `unix:/path`, `tcp:host:port` or `vsock:port`.
pub enum Listen {
    Unix(PathBuf),
    Tcp(String),
    Vsock(u32),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            Ok(Self::Unix(PathBuf::from(p)))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            Ok(Self::Tcp(a.to_string()))
        } else if let Some(p) = s.strip_prefix("vsock:") {
            p.parse().map(Self::Vsock).map_err(|_| format!("bad vsock port in {s:?}"))
        } else {
            Err(format!("listen address {s:?} must start with unix:, tcp: or vsock:"))
        }
    }
}

/// Binds `addr` and serves connections on a background thread.
pub fn listen(ctx: &Arc<Ctx>, addr: &Listen) -> io::Result<String> {
    let ctx = Arc::clone(ctx);
    match addr {
        Listen::Unix(p) => {
            let _ = std::fs::remove_file(p);
            let l = UnixListener::bind(p)?;
            let name = format!("unix:{}", p.display());
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    let ctx = Arc::clone(&ctx);
                    if let Ok(r) = s.try_clone() {
                        std::thread::spawn(move || serve(ctx, Box::new(r), Box::new(s)));
                    }
                }
            });
            Ok(name)
        }
        Listen::Tcp(a) => {
            let l = TcpListener::bind(a)?;
            let name = format!("tcp:{}", l.local_addr()?);
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    let _ = s.set_nodelay(true);
                    let ctx = Arc::clone(&ctx);
                    if let Ok(r) = s.try_clone() {
                        std::thread::spawn(move || serve(ctx, Box::new(r), Box::new(s)));
                    }
                }
            });
            Ok(name)
        }
        Listen::Vsock(port) => {
            let l = crate::sys::VsockListener::bind(*port)?;
            std::thread::spawn(move || loop {
                match l.accept() {
                    Ok(s) => {
                        let ctx = Arc::clone(&ctx);
                        if let Ok(r) = s.try_clone() {
                            std::thread::spawn(move || serve(ctx, Box::new(r), Box::new(s)));
                        }
                    }
                    Err(e) => {
                        eprintln!("guest-init: vsock accept: {e}");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            });
            Ok(format!("vsock:{port}"))
        }
    }
}

/// A user resolved from a `User` message.
pub struct UserIds {
    pub uid: u32,
    pub gid: u32,
    /// Primary gid plus the groups /etc/group lists the user in.
    pub groups: Vec<u32>,
    pub name: Option<String>,
    pub home: Option<String>,
}

/// Resolves a `User` to ids via /etc/passwd; `None` for "the agent's own".
pub fn resolve_user(u: Option<&grove_proto::guest::User>) -> Result<Option<UserIds>, AgentError> {
    let Some(u) = u else { return Ok(None) };
    if u.name.is_empty() && u.uid.is_none() {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            continue;
        }
        let (Ok(uid), Ok(gid)) = (f[2].parse::<u32>(), f[3].parse::<u32>()) else {
            continue;
        };
        if (!u.name.is_empty() && f[0] == u.name) || (u.name.is_empty() && u.uid == Some(uid)) {
            let gid = u.gid.unwrap_or(gid);
            return Ok(Some(UserIds {
                uid,
                gid,
                groups: supplementary_groups(&group, f[0], gid),
                name: Some(f[0].to_string()),
                home: Some(f[5].to_string()),
            }));
        }
    }
    match u.uid {
        Some(uid) if u.name.is_empty() => {
            let gid = u.gid.unwrap_or(uid);
            Ok(Some(UserIds { uid, gid, groups: vec![gid], name: None, home: None }))
        }
        _ => Err(AgentError::BadRequest(format!("unknown user {:?}", u.name))),
    }
}

/// `primary` plus every group of /etc/group whose member list names `user` (at most 64).
pub fn supplementary_groups(group_file: &str, user: &str, primary: u32) -> Vec<u32> {
    let mut out = vec![primary];
    for line in group_file.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || !f[3].split(',').any(|m| m.trim() == user) {
            continue;
        }
        if let Ok(g) = f[2].parse::<u32>() {
            if !out.contains(&g) && out.len() < 64 {
                out.push(g);
            }
        }
    }
    out
}

/// A `File` helper for the read half of a PTY master etc.
pub(crate) fn clone_file(f: &File) -> Result<File, AgentError> {
    f.try_clone().map_err(|e| AgentError::os("dup", e))
}

#[cfg(test)]
mod tests {
    use super::supplementary_groups;

    #[test]
    fn groups_from_group_file() {
        let g = "root:x:0:\nssl-cert:x:103:postgres,alice\nadm:x:4:alice\nbad:x:notanumber:alice\nshort:x\n";
        assert_eq!(supplementary_groups(g, "alice", 1000), [1000, 103, 4]);
        assert_eq!(supplementary_groups(g, "postgres", 103), [103]);
        assert_eq!(supplementary_groups(g, "nobody", 65534), [65534]);
    }
}
