//! Driving grove-vmm processes: spawning them in their own process group (they outlive agentd),
//! adopting them again after a restart, watching them exit, killing them, and an async
//! client of their control socket built on `grove-vmm-api`'s encode/decode functions.
//!
//! Every VMM lives in a directory of its own (`DATA/vmm/VID/`): `api.sock`, `serial.log`
//! (guest console), `vmm.log` (its stderr: the last `grove-vmm: error:` line is the exit
//! reason) and `pid`. Nothing ties a VMM to agentd: no pipe (output goes to files), no
//! parent-death signal, its own process group, so `kill -9` of agentd, a signal to its group
//! or a closed terminal leaves it running and agentd re-adopts it through its socket.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use grove_vmm_api::{
    decode_reply, encode_request, ClientError, DecodeError, Reply, Request, RestoreReport,
    RunState, SnapshotKind, SnapshotReport, VmStatus, MAX_LINE,
};
use rustix::process::{Pid, PidfdFlags, Signal};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::error::{AgentError, Result};
use crate::layout::Layout;

/// How long one control request may take before agentd gives up on it (a hung VMM). A
/// snapshot of a large guest writes its memory inside the request.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// An async connection to a VMM's control socket. Requests are answered in order.
pub struct VmmConn {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl std::fmt::Debug for VmmConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmConn").field("path", &self.path).finish_non_exhaustive()
    }
}

impl VmmConn {
    /// Connects to the control socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Io { path: path.to_path_buf(), source })?;
        let (r, w) = s.into_split();
        Ok(Self { path: path.to_path_buf(), reader: BufReader::new(r), writer: w })
    }

    /// Sends `req` and waits for its reply (at most [`CALL_TIMEOUT`]).
    pub async fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        match tokio::time::timeout(CALL_TIMEOUT, self.call_inner(req)).await {
            Ok(r) => r,
            Err(_) => Err(self.timed_out()),
        }
    }

    fn timed_out(&self) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply in time"),
        }
    }

    async fn call_inner(&mut self, req: &Request) -> Result<Reply, ClientError> {
        self.send(req).await?;
        self.receive(req).await
    }

    async fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        let io = |source| ClientError::Io { path: self.path.clone(), source };
        self.writer.write_all(encode_request(req).as_bytes()).await.map_err(io)
    }

    /// The reply to `req`, sent before.
    async fn receive(&mut self, req: &Request) -> Result<Reply, ClientError> {
        let io = |source| ClientError::Io { path: self.path.clone(), source };
        let mut line = String::new();
        let limit = u64::try_from(MAX_LINE + 2).unwrap_or(u64::MAX);
        let n = (&mut self.reader).take(limit).read_line(&mut line).await.map_err(io)?;
        if n == 0 {
            return Err(ClientError::Closed { path: self.path.clone() });
        }
        if !line.ends_with('\n') {
            return Err(ClientError::BadReply {
                path: self.path.clone(),
                source: DecodeError::TooLong,
            });
        }
        match decode_reply(&line) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                Err(ClientError::Vmm { path: self.path.clone(), request: req.name(), source: e })
            }
            Err(source) => Err(ClientError::BadReply { path: self.path.clone(), source }),
        }
    }

    fn unexpected(&self, req: &Request, reply: Reply) -> ClientError {
        ClientError::Unexpected {
            path: self.path.clone(),
            request: req.name(),
            reply: Box::new(reply),
        }
    }

    /// `status`.
    pub async fn status(&mut self) -> Result<VmStatus, ClientError> {
        let req = Request::Status {};
        match self.call(&req).await? {
            Reply::Status(s) => Ok(s),
            r => Err(self.unexpected(&req, r)),
        }
    }

    async fn state_call(&mut self, req: Request) -> Result<RunState, ClientError> {
        match self.call(&req).await? {
            Reply::State(s) => Ok(s),
            r => Err(self.unexpected(&req, r)),
        }
    }

    /// `pause`.
    pub async fn pause(&mut self) -> Result<RunState, ClientError> {
        self.state_call(Request::Pause {}).await
    }

    /// `resume`.
    pub async fn resume(&mut self) -> Result<RunState, ClientError> {
        self.state_call(Request::Resume {}).await
    }

    async fn snapshot_call(&mut self, req: Request) -> Result<SnapshotReport, ClientError> {
        match self.call(&req).await? {
            Reply::Snapshot(s) => Ok(s),
            r => Err(self.unexpected(&req, r)),
        }
    }

    /// `snapshot` (durable when `fsync`).
    pub async fn snapshot(
        &mut self,
        kind: SnapshotKind,
        dir: &Path,
        fsync: bool,
    ) -> Result<SnapshotReport, ClientError> {
        self.snapshot_call(Request::Snapshot { kind, dir: dir.to_path_buf(), fsync }).await
    }

    /// `fork`.
    pub async fn fork(&mut self, dir: &Path) -> Result<SnapshotReport, ClientError> {
        self.snapshot_call(Request::Fork { dir: dir.to_path_buf() }).await
    }

    /// `restore` (standby VMMs).
    pub async fn restore(
        &mut self,
        snapshot: &Path,
        identity: u32,
        vsock: Option<&Path>,
        deterministic: bool,
    ) -> Result<RestoreReport, ClientError> {
        self.restore_beside(snapshot, identity, vsock, deterministic, async {}).await.0
    }

    /// `restore`, with `beside` awaited once the request is sent, while the VMM restores and
    /// together with its reply (the catalog commit of the sandbox's record, on a blocking
    /// thread: the two are independent, so a create pays the longer of them, not their sum).
    /// `beside` is not polled if the request could not be sent; its result comes back with
    /// the reply's.
    pub async fn restore_beside<F: std::future::Future>(
        &mut self,
        snapshot: &Path,
        identity: u32,
        vsock: Option<&Path>,
        deterministic: bool,
        beside: F,
    ) -> (Result<RestoreReport, ClientError>, Option<F::Output>) {
        // A guest with an agent gets its own vsock socket (`vsock`); the VMM then refreshes
        // its clock and entropy before it replies (not for a `deterministic` fork child,
        // which keeps the snapshot's). Others are restored as saved.
        let req = Request::Restore {
            snapshot: snapshot.to_path_buf(),
            identity,
            vsock_uds: vsock.map(Path::to_path_buf),
            vsock_cid: None,
            guest: grove_vmm_api::GuestRefresh { deterministic, ..Default::default() },
        };
        let sent = tokio::time::timeout(CALL_TIMEOUT, self.send(&req)).await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return (Err(e), None),
            Err(_) => return (Err(self.timed_out()), None),
        }
        let (reply, other) =
            tokio::join!(tokio::time::timeout(CALL_TIMEOUT, self.receive(&req)), beside);
        let reply = match reply {
            Ok(Ok(Reply::Restored(r))) => Ok(r),
            Ok(Ok(r)) => Err(self.unexpected(&req, r)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.timed_out()),
        };
        (reply, Some(other))
    }
}

/// Kills a VMM through a duplicate of its pidfd.
#[derive(Debug, Clone, Default)]
pub struct Killer(Option<Arc<OwnedFd>>);

impl Killer {
    /// Sends SIGKILL (a no-op if the VMM is gone).
    pub fn kill(&self) {
        if let Some(fd) = &self.0 {
            let _ = rustix::process::pidfd_send_signal(fd.as_fd(), Signal::KILL);
        }
    }
}

/// How a VMM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit status 0 (the guest shut down), as far as agentd could see.
    pub clean: bool,
    /// For people: the status and the VMM's last error line.
    pub reason: String,
}

/// A VMM process: spawned by this agentd (its child) or adopted after a restart.
pub struct VmmProc {
    /// Its directory name under `DATA/vmm`.
    pub vid: String,
    /// Its pid.
    pub pid: u32,
    pidfd: OwnedFd,
    child: Option<tokio::process::Child>,
    log: PathBuf,
}

impl std::fmt::Debug for VmmProc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmProc")
            .field("vid", &self.vid)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

fn pid_of(pid: u32) -> Result<Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| AgentError::Internal(format!("bad pid {pid}")))
}

impl VmmProc {
    /// Spawns `grove-vmm ARGS` for VMM directory `vid` in a session of its own, stdin and
    /// stdout on /dev/null (the guest console goes to `--serial`), stderr to `vmm.log`.
    pub fn spawn(vmm_bin: &Path, layout: &Layout, vid: &str, args: &[String]) -> Result<Self> {
        let dir = layout.vmm(vid);
        std::fs::create_dir_all(&dir).map_err(|e| AgentError::io("create", &dir, e))?;
        let log = layout.vmm_log(vid);
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| AgentError::io("open", &log, e))?;
        let mut cmd = tokio::process::Command::new(vmm_bin);
        // Its own process group: no signal aimed at agentd's group or terminal reaches it.
        // (process_group rather than a setsid pre_exec hook keeps std on posix_spawn,
        // a vfork-style spawn: a fork of agentd would copy its page tables on every VMM.)
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .kill_on_drop(false)
            .process_group(0);
        let child = cmd.spawn().map_err(|e| AgentError::io("spawn", vmm_bin, e))?;
        let pid =
            child.id().ok_or_else(|| AgentError::Internal("spawned VMM has no pid".into()))?;
        // A crash here leaves a VMM with no pid file: recovery finds it by its command line.
        fail::fail_point!("agentd::vmm::after_spawn");
        let pidfd = rustix::process::pidfd_open(pid_of(pid)?, PidfdFlags::empty())
            .map_err(|e| AgentError::io("pidfd_open", &dir, e.into()))?;
        let pidfile = layout.vmm_pid(vid);
        std::fs::write(&pidfile, format!("{pid}\n"))
            .map_err(|e| AgentError::io("write", &pidfile, e))?;
        Ok(Self { vid: vid.to_string(), pid, pidfd, child: Some(child), log })
    }

    /// Adopts a running VMM (not a child of this agentd) after checking that process `pid`
    /// is the grove-vmm of directory `vid` (its command line names the directory), so a
    /// reused pid is never taken for it.
    pub fn adopt(layout: &Layout, vid: &str, pid: u32) -> Result<Self> {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let want = layout.vmm(vid);
        let want = want.as_os_str().as_encoded_bytes();
        if !cmdline.windows(want.len()).any(|w| w == want) {
            return Err(AgentError::NotFound(format!("VMM {vid} (pid {pid})")));
        }
        let pidfd = rustix::process::pidfd_open(pid_of(pid)?, PidfdFlags::empty())
            .map_err(|_| AgentError::NotFound(format!("VMM {vid} (pid {pid})")))?;
        Ok(Self { vid: vid.to_string(), pid, pidfd, child: None, log: layout.vmm_log(vid) })
    }

    /// Whether the process has exited (its pidfd is readable), without waiting.
    pub fn has_exited(&self) -> bool {
        let mut fds = [rustix::event::PollFd::new(&self.pidfd, rustix::event::PollFlags::IN)];
        let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        rustix::event::poll(&mut fds, Some(&zero)).is_ok_and(|n| n > 0)
    }

    /// Kills the VMM and waits (at most 5 s) until it has exited.
    pub async fn kill_and_wait(&self) {
        self.kill();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.has_exited() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A handle that can kill this VMM after the process object moved elsewhere.
    pub fn killer(&self) -> Killer {
        Killer(self.pidfd.try_clone().ok().map(Arc::new))
    }

    /// Sends SIGKILL (through the pidfd: never another process that reused the pid).
    pub fn kill(&self) {
        let _ = rustix::process::pidfd_send_signal(self.pidfd.as_fd(), Signal::KILL);
    }

    /// Waits for the VMM to exit and says how it ended.
    pub async fn wait(mut self) -> ExitInfo {
        let pid = self.pid;
        let status = match self.child.as_mut() {
            Some(c) => c.wait().await.ok(),
            None => {
                // A pidfd becomes readable when the process exits.
                // SAFETY: the OwnedFd is a valid pidfd that AsyncFd owns from here on; it is
                // neither closed nor replaced while registered.
                if let Ok(fd) = unsafe { AsyncFd::register(self.pidfd) } {
                    let _ = fd.readable().await;
                }
                // Not our child: its status is readable only while it is a zombie that its
                // new parent has not reaped yet.
                zombie_status(pid)
            }
        };
        let last_error = last_error_line(&self.log);
        let (clean, how) = match status {
            Some(s) if s.success() => (true, "exited with status 0".to_string()),
            Some(s) => match (s.code(), s.signal()) {
                (Some(c), _) => (false, format!("exited with status {c}")),
                (None, Some(sig)) => (false, format!("killed by signal {sig}")),
                _ => (false, format!("ended: {s}")),
            },
            None => (false, "exited (status not seen: adopted after an agentd restart)".into()),
        };
        let reason = match last_error {
            Some(e) => format!("VMM {how}: {e}"),
            None => format!("VMM {how}"),
        };
        ExitInfo { clean, reason }
    }
}

/// The wait status of a zombie process (`exit_code`, the last field of /proc/PID/stat).
fn zombie_status(pid: u32) -> Option<std::process::ExitStatus> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    if !rest.starts_with('Z') {
        return None;
    }
    let raw: i32 = rest.split_whitespace().last()?.parse().ok()?;
    Some(std::process::ExitStatus::from_raw(raw))
}

/// The last `grove-vmm: error: ...` line of a VMM log (its reason for exiting 1).
pub fn last_error_line(log: &Path) -> Option<String> {
    let text = std::fs::read(log).ok()?;
    let tail = &text[text.len().saturating_sub(16 * 1024)..];
    String::from_utf8_lossy(tail)
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("grove-vmm: error: ").map(str::to_string))
}

/// Reads a VMM directory's pid file.
pub fn read_pid(layout: &Layout, vid: &str) -> Option<u32> {
    std::fs::read_to_string(layout.vmm_pid(vid)).ok()?.trim().parse().ok()
}

/// Live grove-vmm processes with an argument inside `vmms` (the directory of all VMM
/// directories), each with the VMM directory it names, found by a scan of /proc: a
/// `kill -9` of agentd between a spawn and its pid file leaves a VMM that only its command
/// line ties to its directory.
pub fn running_under(vmms: &Path) -> Vec<(u32, String)> {
    let want = vmms.as_os_str().as_encoded_bytes();
    let vid_of = |arg: &[u8]| {
        let rest = arg.strip_prefix(want)?.strip_prefix(b"/")?;
        let vid = rest.split(|&b| b == b'/').next().filter(|v| !v.is_empty())?;
        std::str::from_utf8(vid).ok().map(str::to_string)
    };
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let mut args = cmd.split(|&b| b == 0);
        let is_vmm = args
            .next()
            .and_then(|a0| Path::new(std::ffi::OsStr::from_bytes(a0)).file_name())
            .is_some_and(|n| n == "grove-vmm");
        if !is_vmm || zombie_status(pid).is_some() {
            continue;
        }
        if let Some(vid) = args.find_map(vid_of) {
            out.push((pid, vid));
        }
    }
    out
}

/// Whether a process with this pid exists (a zombie counts until reaped).
pub fn alive(pid: u32) -> bool {
    pid_of(pid).is_ok_and(|p| rustix::process::test_kill_process(p).is_ok())
}

/// Waits until `file` contains `needle` (polling every 2 ms), or until `deadline`, or until
/// `gone` says the process is gone. Returns whether it was found.
pub async fn wait_for_text(
    file: &Path,
    needle: &str,
    deadline: tokio::time::Instant,
    mut gone: impl FnMut() -> bool,
) -> bool {
    let mut seen = 0usize;
    let mut carry = String::new();
    loop {
        if let Ok(b) = std::fs::read(file) {
            if b.len() > seen {
                carry.push_str(&String::from_utf8_lossy(&b[seen..]));
                seen = b.len();
                if carry.contains(needle) {
                    return true;
                }
                // Keep only what a match could still start in.
                let keep = carry.len().saturating_sub(needle.len());
                let cut = (0..=keep).rev().find(|&i| carry.is_char_boundary(i)).unwrap_or(0);
                carry.drain(..cut);
            }
        }
        if gone() || tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_error_line_is_the_reason() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("vmm.log");
        assert_eq!(last_error_line(&log), None);
        std::fs::write(
            &log,
            "boot-timer: x\ngrove-vmm: error: first\ntiming: y\ngrove-vmm: error: KVM_RUN failed\n",
        )
        .unwrap();
        assert_eq!(last_error_line(&log).as_deref(), Some("KVM_RUN failed"));
    }

    #[tokio::test]
    async fn text_is_found_across_reads() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("serial.log");
        std::fs::write(&f, "RE").unwrap();
        let f2 = f.clone();
        let w = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            std::fs::write(&f2, "READY\nTTT").unwrap();
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        assert!(wait_for_text(&f, "READY", deadline, || false).await);
        w.await.unwrap();
        let soon = tokio::time::Instant::now() + Duration::from_millis(30);
        assert!(!wait_for_text(&f, "NEVER", soon, || false).await);
        let far = tokio::time::Instant::now() + Duration::from_secs(60);
        assert!(!wait_for_text(&f, "NEVER", far, || true).await);
    }

    #[tokio::test]
    async fn a_spawned_vmm_outlives_nothing_but_is_killed_by_pidfd() {
        // /bin/sleep stands in for grove-vmm: own process group, pid file, kill, exit reason.
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path().to_path_buf());
        layout.create().unwrap();
        let p = VmmProc::spawn(Path::new("/bin/sleep"), &layout, "v1", &["60".into()]).unwrap();
        assert_eq!(read_pid(&layout, "v1"), Some(p.pid));
        let pgid = rustix::process::getpgid(Some(pid_of(p.pid).unwrap())).unwrap();
        assert_eq!(pgid.as_raw_pid(), i32::try_from(p.pid).unwrap(), "own process group");
        assert!(!p.has_exited());
        assert!(alive(p.pid));
        // Adoption checks the command line names the directory: sleep's does not.
        assert!(VmmProc::adopt(&layout, "v1", p.pid).is_err());
        p.kill();
        let e = p.wait().await;
        assert!(!e.clean);
        assert_eq!(e.reason, "VMM killed by signal 9");
    }
}
