//! ProcessService's processes: commands run in a sandbox by guest-init's agent, reached with
//! grove-proto's client over the sandbox VMM's vsock socket (`CONNECT 1024`).
//!
//! One guest connection and one reader thread per process (not tokio's blocking pool: a
//! process may run for hours). The reader forwards the agent's events to the `Start` stream
//! through a bounded channel, so a slow client slows the guest process's output rather than
//! growing a buffer here; once the client is gone the events are dropped and the process
//! runs on. Stdin, signals and resizes go through the connection's sending half. At most
//! [`MAX_RUNNING`] processes run per node; the last [`KEEP_ENDED`] ended ones stay listed.
//! Each process keeps its last [`KEEP_OUTPUT`] bytes of output and publishes its events on
//! a broadcast channel, for `Connect` from other clients and `Wait`.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use grove_proto::client::{ExecEvent, GuestClient, GuestSender};
use grove_proto::guest::{exec_exit, EnvVar, ExecExit, ExecStart, PtySize, Stream, User};
use grove_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::error::{AgentError, Result};

/// Processes running at once on a node.
pub const MAX_RUNNING: usize = 1024;
/// Ended processes kept for List.
pub const KEEP_ENDED: usize = 256;
/// Output bytes kept per process for Connect's replay.
pub const KEEP_OUTPUT: usize = 1 << 20;
/// Live events a connected client may fall behind by.
const LIVE_BUFFER: usize = 1024;
/// Events buffered per stream before the reader waits for the client.
const STREAM_BUFFER: usize = 64;
/// Bounds on a start request.
const MAX_ARGV: usize = 256;
const MAX_ENV: usize = 256;
const MAX_ARG_BYTES: usize = 64 << 10;
const MAX_TIMEOUT_S: u32 = 30 * 24 * 3600;

/// A started process.
pub struct Proc {
    pub id: String,
    pub sandbox: String,
    pub argv: Vec<String>,
    pub started_unix_ms: u64,
    sender: GuestSender,
    exec: u64,
    pid: AtomicU32,
    exit: Mutex<Option<pb::ProcessExit>>,
    /// Kept output and the live events (locked together, so a Connect misses nothing).
    hub: Mutex<Hub>,
    ended: watch::Sender<bool>,
}

struct Hub {
    kept: VecDeque<pb::ProcessOutput>,
    kept_bytes: usize,
    live: broadcast::Sender<pb::ProcessEvent>,
}

type EventTx = mpsc::Sender<std::result::Result<pb::ProcessEvent, tonic::Status>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Proc {
    fn info(&self) -> pb::ProcessInfo {
        let exit = lock(&self.exit).clone();
        pb::ProcessInfo {
            process_id: self.id.clone(),
            sandbox_id: self.sandbox.clone(),
            argv: self.argv.clone(),
            pid: self.pid.load(Ordering::Relaxed),
            running: exit.is_none(),
            exit,
            started_unix_ms: self.started_unix_ms,
        }
    }

    fn check_running(&self) -> Result<()> {
        if lock(&self.exit).is_some() {
            return Err(AgentError::FailedPrecondition(format!("process {} has ended", self.id)));
        }
        Ok(())
    }
}

/// The node's processes.
pub struct Procs {
    next: AtomicU64,
    /// One slot per running process, held by its reader thread.
    running: Arc<crate::files::Streams>,
    map: Mutex<BTreeMap<String, Arc<Proc>>>,
    ended: Mutex<VecDeque<String>>,
}

impl Default for Procs {
    fn default() -> Self {
        Self {
            next: AtomicU64::default(),
            running: Arc::new(crate::files::Streams::new(MAX_RUNNING, "processes run")),
            map: Mutex::default(),
            ended: Mutex::default(),
        }
    }
}

/// A checked start request, as the guest's agent takes it.
pub fn exec_start(req: &pb::StartProcessRequest) -> Result<ExecStart> {
    let bad = |m: String| Err(AgentError::InvalidArgument(m));
    if req.argv.is_empty() || req.argv.len() > MAX_ARGV {
        return bad(format!("argv needs 1..={MAX_ARGV} entries, not {}", req.argv.len()));
    }
    if req.argv[0].is_empty() {
        return bad("argv[0] is empty".into());
    }
    if req.env.len() > MAX_ENV {
        return bad(format!("{} environment variables (at most {MAX_ENV})", req.env.len()));
    }
    let bytes: usize = req.argv.iter().map(String::len).sum::<usize>()
        + req.env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        + req.cwd.len()
        + req.user.len();
    if bytes > MAX_ARG_BYTES {
        return bad(format!(
            "argv, env, cwd and user take {bytes} bytes (at most {MAX_ARG_BYTES})"
        ));
    }
    if req.argv.iter().chain(req.env.keys()).chain(req.env.values()).any(|s| s.contains('\0')) {
        return bad("a NUL byte in argv or env".into());
    }
    if req.env.keys().any(|k| k.is_empty() || k.contains('=')) {
        return bad("an environment name is empty or holds '='".into());
    }
    if !req.cwd.is_empty() && !req.cwd.starts_with('/') {
        return bad(format!("cwd {:?} is not absolute", req.cwd));
    }
    if req.timeout_seconds > MAX_TIMEOUT_S {
        return bad(format!("timeout of {} s (at most {MAX_TIMEOUT_S})", req.timeout_seconds));
    }
    let pty = match (req.pty_rows, req.pty_cols) {
        (0, 0) => None,
        (r, c) if r > 0 && c > 0 && r <= 1000 && c <= 1000 => Some(PtySize { rows: r, cols: c }),
        (r, c) => return bad(format!("PTY size {r}x{c} (both 1..=1000, or both 0)")),
    };
    let user = if req.user.is_empty() {
        None
    } else if let Ok(uid) = req.user.parse::<u32>() {
        Some(User { name: String::new(), uid: Some(uid), gid: None })
    } else if req.user.len() <= 32
        && req.user.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        Some(User { name: req.user.clone(), uid: None, gid: None })
    } else {
        return bad(format!("user {:?}: a name or a uid", req.user));
    };
    let mut env: Vec<EnvVar> =
        req.env.iter().map(|(k, v)| EnvVar { name: k.clone(), value: v.clone() }).collect();
    env.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(ExecStart {
        argv: req.argv.clone(),
        env,
        clear_env: false,
        cwd: req.cwd.clone(),
        user,
        timeout_ms: u64::from(req.timeout_seconds) * 1000,
        pty,
        stdin: req.stdin,
    })
}

fn exit_pb(e: &ExecExit) -> pb::ProcessExit {
    pb::ProcessExit {
        status: match e.status {
            Some(exec_exit::Status::Code(c)) => Some(pb::process_exit::Status::Code(c)),
            Some(exec_exit::Status::Signal(s)) => Some(pb::process_exit::Status::Signal(s)),
            None => None,
        },
        timed_out: e.timed_out,
        ..Default::default()
    }
}

type Events = mpsc::Receiver<std::result::Result<pb::ProcessEvent, tonic::Status>>;

impl Procs {
    /// Starts `start` in the guest whose agent listens behind `vsock` (a VMM's vsock
    /// socket); returns the process and its event stream (the first event is `started`).
    pub async fn start(
        self: &Arc<Self>,
        sandbox: &str,
        vsock: &Path,
        start: ExecStart,
        now_ms: u64,
    ) -> Result<(Arc<Proc>, Events)> {
        // Taken before anything is made; the reader thread holds it (so it is given back
        // whenever that thread ends, or is never started).
        let slot = self.running.take()?;
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("p-{n}");
        let vsock = vsock.to_path_buf();
        let argv = start.argv.clone();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let (ready_tx, ready_rx) = oneshot::channel();
        let procs = self.clone();
        let (sandbox_s, id_s) = (sandbox.to_string(), id.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("proc-{n}"))
            .stack_size(256 << 10)
            .spawn(move || {
                let _slot = slot;
                // Connect and start; the first answer is ExecStarted or the guest's error.
                let begun = (|| {
                    // No answer timeout: a process may stay silent for hours.
                    let mut c = crate::files::connect_agent(&vsock, None)?;
                    let exec = c.exec_start(start).map_err(|e| AgentError::guest("exec", e))?;
                    // The agent may send output before its ExecStarted (its threads race):
                    // what comes first is kept for the pump. A spawn failure is an error.
                    let mut early = VecDeque::new();
                    loop {
                        match c.exec_next(exec).map_err(|e| AgentError::guest("exec", e))? {
                            ExecEvent::Started(pid) => return Ok((c, exec, pid, early)),
                            e @ ExecEvent::Exit(_) => {
                                early.push_back(e);
                                return Ok((c, exec, 0, early));
                            }
                            e => early.push_back(e),
                        }
                    }
                })();
                let (mut client, exec, pid, early) = match begun {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let p = Arc::new(Proc {
                    id: id_s,
                    sandbox: sandbox_s,
                    argv,
                    started_unix_ms: now_ms,
                    sender: client.sender(),
                    exec,
                    pid: AtomicU32::new(pid),
                    exit: Mutex::new(None),
                    hub: Mutex::new(Hub {
                        kept: VecDeque::new(),
                        kept_bytes: 0,
                        live: broadcast::channel(LIVE_BUFFER).0,
                    }),
                    ended: watch::Sender::new(false),
                });
                lock(&procs.map).insert(p.id.clone(), p.clone());
                let started = pb::ProcessEvent {
                    event: Some(pb::process_event::Event::Started(pb::ProcessStarted {
                        process_id: p.id.clone(),
                        pid,
                    })),
                };
                let _ = tx.blocking_send(Ok(started));
                if ready_tx.send(Ok(p.clone())).is_err() {
                    // The request went away before the start was reported: the process
                    // runs on (it is listed), its output is dropped.
                }
                let exit = procs.pump(&p, &mut client, early, &tx);
                let ev =
                    pb::ProcessEvent { event: Some(pb::process_event::Event::Exit(exit.clone())) };
                {
                    let hub = lock(&p.hub);
                    *lock(&p.exit) = Some(exit);
                    let _ = hub.live.send(ev.clone());
                }
                p.ended.send_replace(true);
                let _ = tx.blocking_send(Ok(ev));
                procs.ended(&p.id);
            });
        if let Err(e) = spawned {
            return Err(AgentError::Internal(format!("process reader thread: {e}")));
        }
        match ready_rx.await {
            Ok(Ok(p)) => Ok((p, rx)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(AgentError::Internal("the process reader ended".into())),
        }
    }

    /// Forwards a process's output until it exits (or the guest goes away).
    fn pump(
        &self,
        p: &Proc,
        client: &mut GuestClient,
        mut early: VecDeque<ExecEvent>,
        tx: &EventTx,
    ) -> pb::ProcessExit {
        let exec = p.exec;
        let mut listening = true;
        loop {
            let next = match early.pop_front() {
                Some(e) => Ok(e),
                None => client.exec_next(exec),
            };
            match next {
                Ok(ExecEvent::Output { stream, seq, data, .. }) => {
                    if data.is_empty() {
                        continue; // a stream's end
                    }
                    let stream = match stream {
                        Stream::Stderr => pb::OutputStream::Stderr,
                        _ => pb::OutputStream::Stdout,
                    };
                    let out = pb::ProcessOutput { stream: stream.into(), seq, data };
                    let ev = pb::ProcessEvent {
                        event: Some(pb::process_event::Event::Output(out.clone())),
                    };
                    {
                        let mut hub = lock(&p.hub);
                        hub.kept_bytes += out.data.len();
                        hub.kept.push_back(out);
                        while hub.kept_bytes > KEEP_OUTPUT {
                            let Some(old) = hub.kept.pop_front() else { break };
                            hub.kept_bytes -= old.data.len();
                        }
                        let _ = hub.live.send(ev.clone());
                    }
                    if listening {
                        listening = tx.blocking_send(Ok(ev)).is_ok();
                    }
                }
                Ok(ExecEvent::Exit(e)) => return exit_pb(&e),
                Ok(ExecEvent::Started(_)) => {}
                Err(e) => {
                    return pb::ProcessExit {
                        status: None,
                        error: crate::error::one_line(&AgentError::guest("exec", e)),
                        ..Default::default()
                    }
                }
            }
        }
    }

    fn ended(&self, id: &str) {
        let mut ended = lock(&self.ended);
        ended.push_back(id.to_string());
        while ended.len() > KEEP_ENDED {
            if let Some(old) = ended.pop_front() {
                lock(&self.map).remove(&old);
            }
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Proc>> {
        lock(&self.map)
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("process {id}")))
    }

    /// Feeds a process's stdin.
    pub fn stdin(&self, id: &str, data: &[u8], eof: bool) -> Result<()> {
        if data.len() > 4 << 20 {
            return Err(AgentError::InvalidArgument("stdin chunks are at most 4 MiB".into()));
        }
        let p = self.get(id)?;
        p.check_running()?;
        p.sender.stdin(p.exec, data, eof).map_err(|e| AgentError::guest("stdin", e))
    }

    /// Signals a process's group.
    pub fn signal(&self, id: &str, signal: i32) -> Result<()> {
        if !(1..=64).contains(&signal) {
            return Err(AgentError::InvalidArgument(format!("signal {signal} (1..=64)")));
        }
        let p = self.get(id)?;
        p.check_running()?;
        p.sender.signal(p.exec, signal).map_err(|e| AgentError::guest("signal", e))
    }

    /// Resizes a PTY process's terminal.
    pub fn resize(&self, id: &str, rows: u32, cols: u32) -> Result<()> {
        if !(1..=1000).contains(&rows) || !(1..=1000).contains(&cols) {
            return Err(AgentError::InvalidArgument(format!("size {rows}x{cols} (1..=1000)")));
        }
        let p = self.get(id)?;
        p.check_running()?;
        p.sender.resize(p.exec, rows, cols).map_err(|e| AgentError::guest("resize", e))
    }

    /// The processes of `sandbox` (all when empty), by id.
    pub fn list(&self, sandbox: &str) -> Vec<pb::ProcessInfo> {
        let map = lock(&self.map);
        let mut v: Vec<pb::ProcessInfo> = map
            .values()
            .filter(|p| sandbox.is_empty() || p.sandbox == sandbox)
            .map(|p| p.info())
            .collect();
        v.sort_by_key(|p| p.process_id.trim_start_matches("p-").parse::<u64>().unwrap_or(0));
        v
    }

    /// Attaches to a process: `started`, its kept output from `from_seq`, then the live
    /// events until its exit.
    pub fn connect(
        &self,
        id: &str,
        from_seq: u64,
    ) -> Result<mpsc::Receiver<std::result::Result<pb::ProcessEvent, tonic::Status>>> {
        let p = self.get(id)?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let (replay, exit, mut live) = {
            let hub = lock(&p.hub);
            let replay: Vec<pb::ProcessOutput> =
                hub.kept.iter().filter(|o| o.seq >= from_seq).cloned().collect();
            (replay, lock(&p.exit).clone(), hub.live.subscribe())
        };
        let started = pb::ProcessEvent {
            event: Some(pb::process_event::Event::Started(pb::ProcessStarted {
                process_id: p.id.clone(),
                pid: p.pid.load(Ordering::Relaxed),
            })),
        };
        tokio::spawn(async move {
            let ev = |e| pb::ProcessEvent { event: Some(e) };
            if tx.send(Ok(started)).await.is_err() {
                return;
            }
            let mut last = None;
            for o in replay {
                last = Some(o.seq);
                if tx.send(Ok(ev(pb::process_event::Event::Output(o)))).await.is_err() {
                    return;
                }
            }
            if let Some(x) = exit {
                let _ = tx.send(Ok(ev(pb::process_event::Event::Exit(x)))).await;
                return;
            }
            loop {
                match live.recv().await {
                    Ok(e) => {
                        // Output the replay already gave is not sent twice.
                        if let Some(pb::process_event::Event::Output(o)) = &e.event {
                            if last.is_some_and(|l| o.seq <= l) {
                                continue;
                            }
                        }
                        let end = matches!(e.event, Some(pb::process_event::Event::Exit(_)));
                        if tx.send(Ok(e)).await.is_err() || end {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(tonic::Status::data_loss(format!(
                                "fell {n} events behind the process's output: connect again \
                                 from the last sequence number seen"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(rx)
    }

    /// Waits until a process ends; its exit.
    pub async fn wait(&self, id: &str) -> Result<pb::ProcessExit> {
        let p = self.get(id)?;
        let mut rx = p.ended.subscribe();
        let _ = rx.wait_for(|e| *e).await;
        let exit = lock(&p.exit).clone();
        exit.ok_or_else(|| AgentError::Internal("ended without an exit".into()))
    }

    /// Processes running now.
    pub fn running(&self) -> usize {
        self.running.taken()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(argv: &[&str]) -> pb::StartProcessRequest {
        pb::StartProcessRequest {
            sandbox_id: "sb-0000000000000001".into(),
            argv: argv.iter().map(|s| (*s).to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn start_requests_are_checked() {
        assert!(exec_start(&req(&["echo", "hi"])).is_ok());
        assert!(exec_start(&req(&[])).is_err());
        assert!(exec_start(&req(&[""])).is_err());
        assert!(exec_start(&req(&["a\0b"])).is_err());
        let mut r = req(&["sh"]);
        r.cwd = "tmp".into();
        assert!(exec_start(&r).is_err());
        let mut r = req(&["sh"]);
        r.pty_rows = 24;
        assert!(exec_start(&r).is_err(), "a PTY needs both sizes");
        r.pty_cols = 80;
        assert_eq!(exec_start(&r).unwrap().pty, Some(PtySize { rows: 24, cols: 80 }));
        let mut r = req(&["sh"]);
        r.user = "1000".into();
        assert_eq!(exec_start(&r).unwrap().user.unwrap().uid, Some(1000));
        r.user = "bad user".into();
        assert!(exec_start(&r).is_err());
        let mut r = req(&["sh"]);
        r.env.insert("A=B".into(), "x".into());
        assert!(exec_start(&r).is_err());
        let mut r = req(&["sh"]);
        r.timeout_seconds = MAX_TIMEOUT_S + 1;
        assert!(exec_start(&r).is_err());
        let big = "x".repeat(MAX_ARG_BYTES);
        assert!(exec_start(&req(&["echo", &big])).is_err());
        let r = exec_start(&req(&["true"])).unwrap();
        assert_eq!((r.timeout_ms, r.stdin, r.clear_env), (0, false, false));
    }
}
