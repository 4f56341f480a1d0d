//! exec: processes with pipes or a PTY, streamed output, stdin, resize, signals, timeouts.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grove_proto::guest::{
    exec_exit, response, ExecExit, ExecOutput, ExecResize, ExecSignal, ExecStart, ExecStarted,
    ExecStdin, Stream,
};

use super::{clone_file, resolve_user, AgentError, Conn, Op};
use crate::sys;

/// Output is sent in pieces of at most this size.
const OUTPUT_CHUNK: usize = 64 * 1024;
/// After the process exits, how long to wait for its output pipes to drain while nothing
/// moves: a background grandchild may keep them open. Output still on its way to a slow
/// host (a pump in a send, or one that sent since the last look) extends the wait.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// A running process of a connection.
pub struct ExecOp {
    pid: i32,
    stdin: Option<SyncSender<ExecStdin>>,
    pty: Option<File>,
}

impl ExecOp {
    /// SIGKILL to the process group.
    pub fn kill(&self) {
        let _ = sys::kill(-self.pid, libc::SIGKILL);
    }
}

fn get_exec<T>(conn: &Conn, id: u64, f: impl FnOnce(&ExecOp) -> T) -> Result<T, AgentError> {
    let ops = conn.ops.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match ops.get(&id) {
        Some(Op::Exec(e)) => Ok(f(e)),
        _ => Err(AgentError::UnknownId(id)),
    }
}

fn winsize(rows: u32, cols: u32) -> Result<(u16, u16), AgentError> {
    let r = u16::try_from(rows).map_err(|_| AgentError::BadRequest("pty rows > 65535".into()))?;
    let c = u16::try_from(cols).map_err(|_| AgentError::BadRequest("pty cols > 65535".into()))?;
    Ok((if r == 0 { 24 } else { r }, if c == 0 { 80 } else { c }))
}

pub fn start(conn: &Conn, id: u64, req: ExecStart) -> Result<(), AgentError> {
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(AgentError::BadRequest("argv is empty".into()));
    }
    if req
        .argv
        .iter()
        .chain(req.env.iter().flat_map(|e| [&e.name, &e.value]))
        .any(|s| s.contains('\0'))
    {
        return Err(AgentError::BadRequest("NUL byte in argv or env".into()));
    }
    if req.env.iter().any(|e| e.name.is_empty() || e.name.contains('=')) {
        return Err(AgentError::BadRequest("bad environment variable name".into()));
    }
    if conn.ops.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(&id) {
        return Err(AgentError::BadRequest(format!("operation id {id} is already live")));
    }
    let user = resolve_user(req.user.as_ref())?;
    let mut cmd = Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..]);
    if req.clear_env {
        cmd.env_clear();
    }
    if let Some(u) = &user {
        if let Some(h) = &u.home {
            cmd.env("HOME", h);
        }
        if let Some(n) = &u.name {
            cmd.env("USER", n).env("LOGNAME", n);
        }
    }
    if !req.clear_env && std::env::var_os("PATH").is_none() {
        cmd.env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    }
    for e in &req.env {
        cmd.env(&e.name, &e.value);
    }
    cmd.current_dir(if req.cwd.is_empty() { "/" } else { &req.cwd });

    let pty = match &req.pty {
        Some(size) => {
            let (r, c) = winsize(size.rows, size.cols)?;
            let (m, s) = sys::openpty(r, c).map_err(|e| AgentError::os("openpty", e))?;
            cmd.stdin(Stdio::from(clone_file(&s)?))
                .stdout(Stdio::from(clone_file(&s)?))
                .stderr(Stdio::from(s));
            cmd.env("TERM", std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()));
            Some(m)
        }
        None => {
            cmd.stdin(if req.stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        }
    };
    let ctty = pty.is_some();
    let creds =
        user.as_ref().map(|u| sys::Creds { uid: u.uid, gid: u.gid, groups: u.groups.clone() });
    set_pre_exec(&mut cmd, ctty, creds);

    let started = Instant::now();
    let (mut child, status_rx) = crate::reaper::spawn(&mut cmd)
        .map_err(|e| AgentError::Spawn { what: req.argv[0].clone(), source: e })?;
    drop(cmd); // closes our copies of the PTY slave
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);

    let seq = Arc::new(AtomicU64::new(0));
    let sending = Arc::new(AtomicUsize::new(0));
    let (done_tx, done_rx) = channel::<()>();
    let mut pumps = 0;
    let mut pump = |src: Box<dyn Read + Send>, stream: Stream| {
        let out = conn.out.clone();
        let seq = Arc::clone(&seq);
        let sending = Arc::clone(&sending);
        let done = done_tx.clone();
        pumps += 1;
        std::thread::spawn(move || {
            pump_output(src, stream, id, &out, &seq, &sending);
            let _ = done.send(());
        });
    };
    let stdin: Option<Box<dyn Write + Send>> = match &pty {
        Some(m) => {
            pump(Box::new(clone_file(m)?), Stream::Stdout);
            if req.stdin {
                Some(Box::new(clone_file(m)?))
            } else {
                None
            }
        }
        None => {
            if let Some(o) = child.stdout.take() {
                pump(Box::new(o), Stream::Stdout);
            }
            if let Some(e) = child.stderr.take() {
                pump(Box::new(e), Stream::Stderr);
            }
            child.stdin.take().map(|s| Box::new(s) as Box<dyn Write + Send>)
        }
    };
    drop(done_tx);
    drop(child);
    let stdin = stdin.map(|w| {
        let (tx, rx) = sync_channel::<ExecStdin>(16);
        let out = conn.out.clone();
        std::thread::spawn(move || stdin_writer(w, &rx, id, &out));
        tx
    });
    let op = ExecOp { pid, stdin, pty };
    if let Err(e) = conn.insert_op(id, Op::Exec(op)) {
        let _ = sys::kill(-pid, libc::SIGKILL);
        return Err(e);
    }
    conn.out.send(
        id,
        response::Body::ExecStarted(ExecStarted { pid: u32::try_from(pid).unwrap_or(0) }),
    );

    let out = conn.out.clone();
    let ops = Arc::clone(&conn.ops);
    let timeout = (req.timeout_ms > 0).then(|| Duration::from_millis(req.timeout_ms));
    std::thread::spawn(move || {
        let mut timed_out = false;
        let status = match timeout {
            Some(t) => match status_rx.recv_timeout(t) {
                Ok(s) => Some(s),
                Err(RecvTimeoutError::Timeout) => {
                    timed_out = true;
                    let _ = sys::kill(-pid, libc::SIGKILL);
                    let _ = sys::kill(pid, libc::SIGKILL);
                    status_rx.recv().ok()
                }
                Err(RecvTimeoutError::Disconnected) => None,
            },
            None => status_rx.recv().ok(),
        };
        let duration = started.elapsed();
        // Let the output drain so every ExecOutput precedes ExecExit.
        wait_drained(&done_rx, pumps, &seq, &sending);
        ops.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
        let mut exit = ExecExit {
            timed_out,
            duration_us: u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
            ..Default::default()
        };
        if let Some(s) = status {
            if libc::WIFEXITED(s) {
                exit.status = Some(exec_exit::Status::Code(libc::WEXITSTATUS(s)));
            } else if libc::WIFSIGNALED(s) {
                exit.status = Some(exec_exit::Status::Signal(libc::WTERMSIG(s)));
                exit.core_dumped = libc::WCOREDUMP(s);
            }
        }
        out.send(id, response::Body::ExecExit(exit));
    });
    Ok(())
}

fn set_pre_exec(cmd: &mut Command, ctty: bool, creds: Option<sys::Creds>) {
    // SAFETY: the hook runs in the forked child before exec and only calls
    // sys::child_setup, which makes async-signal-safe syscalls and does not allocate
    // (`creds` was built before the fork).
    unsafe {
        cmd.pre_exec(move || sys::child_setup(ctty, creds.as_ref()));
    }
}

/// Waits for `pumps` output pumps to end. Gives up after [`DRAIN_GRACE`] without progress
/// (no message sent, none in a send): pipes a background process keeps open.
fn wait_drained(done: &Receiver<()>, pumps: usize, seq: &AtomicU64, sending: &AtomicUsize) {
    let mut left = pumps;
    let mut seen = seq.load(Ordering::SeqCst);
    let mut deadline = Instant::now() + DRAIN_GRACE;
    while left > 0 {
        match done.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(()) => left -= 1,
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {
                let now_seq = seq.load(Ordering::SeqCst);
                if now_seq == seen && sending.load(Ordering::SeqCst) == 0 {
                    return;
                }
                seen = now_seq;
                deadline = Instant::now() + DRAIN_GRACE;
            }
        }
    }
}

fn pump_output(
    mut src: Box<dyn Read + Send>,
    stream: Stream,
    id: u64,
    out: &super::Out,
    seq: &AtomicU64,
    sending: &AtomicUsize,
) {
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    loop {
        match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let msg = ExecOutput {
                    stream: stream.into(),
                    seq: seq.fetch_add(1, Ordering::SeqCst),
                    data: buf[..n].to_vec(),
                    eof: false,
                };
                sending.fetch_add(1, Ordering::SeqCst);
                let sent = out.send(id, response::Body::ExecOutput(msg));
                sending.fetch_sub(1, Ordering::SeqCst);
                if !sent {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A PTY master reads EIO once the last slave fd is closed.
            Err(_) => break,
        }
    }
    out.send(
        id,
        response::Body::ExecOutput(ExecOutput {
            stream: stream.into(),
            seq: seq.fetch_add(1, Ordering::SeqCst),
            data: Vec::new(),
            eof: true,
        }),
    );
}

/// Feeds a process's stdin in order; closing happens on eof or when the exec ends.
fn stdin_writer(
    mut w: Box<dyn Write + Send>,
    rx: &std::sync::mpsc::Receiver<ExecStdin>,
    id: u64,
    out: &super::Out,
) {
    while let Ok(req) = rx.recv() {
        if let Err(e) = w.write_all(&req.data).and_then(|()| w.flush()) {
            // EPIPE: the process closed its stdin; not an error of the operation.
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                out.error(id, &AgentError::os("write stdin", e));
            }
            return;
        }
        if req.eof {
            return;
        }
    }
}

pub fn stdin(conn: &Conn, id: u64, req: ExecStdin) -> Result<(), AgentError> {
    let tx = get_exec(conn, id, |e| e.stdin.clone())?
        .ok_or_else(|| AgentError::BadRequest("stdin was not requested for this exec".into()))?;
    // Blocks when 16 writes are queued: back-pressure for a process that does not read.
    tx.send(req).map_err(|_| AgentError::BadRequest("stdin is closed".into()))
}

pub fn resize(conn: &Conn, id: u64, req: &ExecResize) -> Result<(), AgentError> {
    let size = req.size.unwrap_or_default();
    let (r, c) = winsize(size.rows, size.cols)?;
    get_exec(conn, id, |e| match &e.pty {
        Some(m) => {
            sys::set_winsize(m.as_raw_fd(), r, c).map_err(|e| AgentError::os("TIOCSWINSZ", e))
        }
        None => Err(AgentError::BadRequest("the process has no PTY".into())),
    })?
}

pub fn signal(conn: &Conn, id: u64, req: &ExecSignal) -> Result<(), AgentError> {
    if req.signal <= 0 || req.signal >= 65 {
        return Err(AgentError::BadRequest(format!("bad signal {}", req.signal)));
    }
    let pid = get_exec(conn, id, |e| e.pid)?;
    sys::kill(-pid, req.signal)
        .or_else(|_| sys::kill(pid, req.signal))
        .map_err(|e| AgentError::os("kill", e))
}
