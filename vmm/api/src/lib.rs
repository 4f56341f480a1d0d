//! grove-vmm's control protocol, shared by grove-vmm, its tests, grove-bench and agentd.
//!
//! Transport: a Unix stream socket per VMM (`--api-sock PATH`), JSON lines. One request per
//! line, one reply line per request, in order. A line is at most [`MAX_LINE`] bytes.
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"ok":true,"reply":{"status":{"api_version":1,"state":"running",...}}}
//! -> {"cmd":"snapshot","kind":"full","dir":"/nonexistent"}
//! <- {"ok":false,"error":{"code":"not-found","message":"snapshot directory ..."}}
//! ```
//!
//! Requests refuse unknown fields, so a typo is an error rather than a silent default. An
//! error reply carries an [`ErrorCode`] that callers map to their own status codes (agentd
//! maps them to gRPC codes in one place) and a one-line message for people.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Version of this protocol, reported by `status`.
pub const API_VERSION: u32 = 1;

/// Longest request or reply line accepted, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;

/// Snapshot kind.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// Every non-zero page of guest memory.
    Full,
    /// The pages dirtied since the previous snapshot, on top of its chain.
    Diff,
}

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
// Unit-like requests are empty struct variants so that deny_unknown_fields applies to them.
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// What the VMM is and does: [`Reply::Status`].
    Status {},
    /// Pause the vCPUs: [`Reply::State`].
    Pause {},
    /// Resume the vCPUs: [`Reply::State`].
    Resume {},
    /// Snapshot the VM into `dir`: [`Reply::Snapshot`].
    Snapshot {
        /// Full or diff.
        kind: SnapshotKind,
        /// Directory of the snapshot (created; must not hold a snapshot already).
        dir: PathBuf,
        /// fsync layers and state before replying (durable snapshot).
        #[serde(default)]
        fsync: bool,
    },
    /// Fork snapshot into `dir` (the VM keeps running; paused only while the dirty set is
    /// written): [`Reply::Snapshot`].
    Fork {
        /// Directory of the snapshot.
        dir: PathBuf,
    },
    /// uffd restores: write the recorded first-touch order next to the chain head:
    /// [`Reply::WorkingSet`].
    SaveWorkingSet {},
    /// Standby VMMs only: restore this snapshot into the prepared VM: [`Reply::Restored`],
    /// sent once the guest has acknowledged its post-restore refresh (or that step was
    /// skipped or failed: the reply says which).
    Restore {
        /// Snapshot directory.
        snapshot: PathBuf,
        /// Identity for the guest (the test guest reads it on port 0x444).
        #[serde(default)]
        identity: u32,
        /// The restored VM's vsock socket (required when the snapshot has a vsock device:
        /// the snapshotted VM's socket may still be in use).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vsock_uds: Option<PathBuf>,
        /// Another vsock context id for the guest (default: the snapshot's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vsock_cid: Option<u64>,
        /// What the guest is told right after the restore.
        #[serde(default, skip_serializing_if = "GuestRefresh::is_default")]
        guest: GuestRefresh,
    },
}

/// What a restored guest is told before the restore is reported done (guest-init's
/// `PostRestore` over vsock): by default the host's wall clock and fresh entropy (the kernel
/// RNG is reseeded), plus a hostname and a network identity when given.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GuestRefresh {
    /// A deterministic fork: the guest keeps the snapshot's clock base and RNG state (no
    /// clock step, no reseed), so siblings run alike. A hostname or network identity is still
    /// applied. Off by default.
    #[serde(default)]
    pub deterministic: bool,
    /// A new hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// A new network identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<GuestNet>,
    /// How long to wait for the guest's answer, in ms (default [`GUEST_REFRESH_TIMEOUT_MS`],
    /// at most [`GUEST_REFRESH_MAX_TIMEOUT_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Default wait for a restored guest's post-restore answer (ms).
pub const GUEST_REFRESH_TIMEOUT_MS: u64 = 10_000;
/// Longest wait a request may ask for (ms).
pub const GUEST_REFRESH_MAX_TIMEOUT_MS: u64 = 120_000;

impl GuestRefresh {
    /// Whether this is the default (nothing but clock and entropy).
    #[must_use]
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Whether there is anything to tell the guest.
    #[must_use]
    pub fn has_work(&self) -> bool {
        !self.deterministic || self.hostname.is_some() || self.net.is_some()
    }

    /// Checks the fields (they reach the guest's kernel): a hostname of 1-64 letters, digits,
    /// dots and dashes; an interface name of 1-15 such characters (and `_`); an IPv4
    /// address with a prefix (`10.0.0.2/24`) and an optional IPv4 gateway; a timeout within
    /// bounds.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = |s: &str, max: usize, extra: &[char]| {
            !s.is_empty()
                && s.len() <= max
                && s.chars().all(|c| {
                    c.is_ascii_alphanumeric() || c == '-' || c == '.' || extra.contains(&c)
                })
        };
        if let Some(h) = &self.hostname {
            if !name_ok(h, 64, &[]) {
                return Err(format!("hostname {h:?}: 1-64 letters, digits, dots or dashes"));
            }
        }
        if let Some(n) = &self.net {
            if !name_ok(&n.iface, 15, &['_']) {
                return Err(format!(
                    "interface {:?}: 1-15 letters, digits, '.', '-', '_'",
                    n.iface
                ));
            }
            let ok = n.address.split_once('/').is_some_and(|(a, p)| {
                a.parse::<std::net::Ipv4Addr>().is_ok() && p.parse::<u8>().is_ok_and(|p| p <= 32)
            });
            if !ok {
                return Err(format!("address {:?}: want IPv4/prefix (10.0.0.2/24)", n.address));
            }
            if !n.gateway.is_empty() && n.gateway.parse::<std::net::Ipv4Addr>().is_err() {
                return Err(format!("gateway {:?}: want an IPv4 address or nothing", n.gateway));
            }
        }
        if self.timeout_ms.is_some_and(|t| t == 0 || t > GUEST_REFRESH_MAX_TIMEOUT_MS) {
            return Err(format!("timeout_ms: 1..={GUEST_REFRESH_MAX_TIMEOUT_MS}"));
        }
        Ok(())
    }
}

/// A network identity for a restored guest.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GuestNet {
    /// Interface (e.g. `eth0`).
    pub iface: String,
    /// IPv4 address with prefix (e.g. `10.0.0.2/24`).
    pub address: String,
    /// Default gateway (empty: none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
}

/// What became of a restored guest's post-restore refresh.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum GuestOutcome {
    /// Nothing to send (a deterministic fork without hostname or network), or no vsock
    /// device to send it through.
    #[default]
    Skipped,
    /// The guest applied it.
    Acknowledged,
    /// The guest did not answer in time, or refused (see `reason`).
    Failed,
}

/// The guest's answer to its post-restore refresh.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GuestAck {
    /// What happened.
    pub outcome: GuestOutcome,
    /// The guest's wall clock was stepped to the host's.
    #[serde(default)]
    pub clock: bool,
    /// Bytes of host entropy the guest added before reseeding its RNG (0: not reseeded).
    #[serde(default)]
    pub entropy: u32,
    /// The hostname set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The network identity was applied.
    #[serde(default)]
    pub net: bool,
    /// From the vCPUs running to the guest's answer (ms, VMM's clock).
    #[serde(default)]
    pub ms: f64,
    /// Why it was skipped or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Request {
    /// The request's command name as written on the wire.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status {} => "status",
            Request::Pause {} => "pause",
            Request::Resume {} => "resume",
            Request::Snapshot { .. } => "snapshot",
            Request::Fork { .. } => "fork",
            Request::SaveWorkingSet {} => "save-working-set",
            Request::Restore { .. } => "restore",
        }
    }
}

/// What the VMM is doing.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// A standby VMM waiting for a `restore`.
    Standby,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
}

/// Reply to `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmStatus {
    /// [`API_VERSION`] of the VMM.
    pub api_version: u32,
    /// The VMM's process id.
    pub pid: u32,
    /// Run state.
    pub state: RunState,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in bytes.
    pub mem_bytes: u64,
    /// Identity given to the guest.
    pub identity: u32,
    /// Restore generation (0 on a fresh boot, +1 per restore).
    pub generation: u32,
    /// Whether KVM dirty logging is on (needed for diff snapshots and forks).
    pub dirty_logging: bool,
    /// Memory layer chain behind guest memory, base first (empty for a fresh boot).
    pub layers: Vec<PathBuf>,
    /// A restored VM: what became of its guest's post-restore refresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_restore: Option<GuestAck>,
    /// The vsock device, if the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockStatus>,
    /// Every virtio device's transport and queues, as the VMM sees them now: for a guest that
    /// waits on a device (a request the device never saw, or a completion whose interrupt the
    /// guest never took).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtio: Vec<VirtioStatus>,
}

/// A virtio-mmio device in `status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VirtioStatus {
    /// Device type (`block`, `vsock`, `net`, `rng`).
    pub kind: String,
    /// Register page address.
    pub base: u64,
    /// Interrupt line.
    pub gsi: u32,
    /// The Status register (driver progress bits).
    pub status: u32,
    /// InterruptStatus: bits raised and not yet acknowledged by the driver.
    pub interrupt_status: u32,
    /// The live queues (empty before the driver activated the device).
    pub queues: Vec<VirtqueueStatus>,
}

/// One live virtqueue in `status`: the ring indexes in guest memory beside the device's own.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VirtqueueStatus {
    /// Size the driver chose.
    pub size: u16,
    /// The available ring's index (what the driver has published), if readable.
    pub avail_idx: Option<u16>,
    /// Next available entry the device will read: behind `avail_idx`, requests wait.
    pub next_avail: u16,
    /// The used ring's index (what the device has completed), if readable.
    pub used_idx: Option<u16>,
}

/// The vsock device's state, in `status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VsockStatus {
    /// The VM's socket.
    pub uds: PathBuf,
    /// The guest's context id.
    pub cid: u64,
    /// Live connections.
    pub connections: u64,
    /// Host streams still sending their `CONNECT` line.
    pub handshakes: u64,
    /// The device's counters since the VMM started (packets, bytes, refusals, violations,
    /// timeouts, ...).
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// What a snapshot or fork did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotReport {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Chain depth (layers, base included).
    pub depth: u32,
    /// Pages written into the layer(s) of this snapshot.
    pub pages: u64,
    /// How long the vCPUs were paused (ms).
    pub pause_ms: f64,
    /// The whole operation (ms).
    pub total_ms: f64,
}

/// What a standby restore did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RestoreReport {
    /// From the request's arrival to the vCPUs running (ms, VMM's clock).
    pub restore_ms: f64,
    /// The guest's post-restore refresh (done before this reply).
    #[serde(default)]
    pub guest: GuestAck,
}

/// A successful reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    /// To `status`.
    Status(VmStatus),
    /// To `pause` and `resume`: the state now.
    State(RunState),
    /// To `snapshot` and `fork`.
    Snapshot(SnapshotReport),
    /// To `save-working-set`: the file written.
    WorkingSet(PathBuf),
    /// To `restore`.
    Restored(RestoreReport),
}

/// Why a request failed, for programs. Callers map these to their own codes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The line is not a request: not JSON, unknown command or field, too long.
    BadRequest,
    /// A field has a value the VMM refuses (a relative path, an impossible size).
    InvalidArgument,
    /// Something named by the request does not exist (a snapshot directory).
    NotFound,
    /// The destination already holds what the request would create.
    AlreadyExists,
    /// The request does not fit the VMM's state (a diff without a base, a restore into a VMM
    /// that already runs a VM, a request before a standby VMM has a VM).
    FailedPrecondition,
    /// The snapshot does not fit this VMM or host (CPUID fingerprint, vCPU count, layout).
    Incompatible,
    /// A file the request reads is corrupt or truncated.
    Corrupt,
    /// Out of a resource (disk space, memory, connections).
    ResourceExhausted,
    /// The VMM is shutting down.
    Unavailable,
    /// Anything else (a KVM ioctl that failed, an I/O error).
    Internal,
}

/// An error reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({code:?})")]
pub struct ApiError {
    /// For programs.
    pub code: ErrorCode,
    /// For people: one line.
    pub message: String,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

/// One reply line on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct ReplyLine {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reply: Option<Reply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ApiError>,
}

/// A line that is not a valid request or reply.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Longer than [`MAX_LINE`].
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    /// Not the expected JSON.
    #[error("bad line")]
    Json(#[source] serde_json::Error),
    /// A reply line whose `ok` does not match what it carries.
    #[error("reply line has ok={ok} but carries {what}")]
    Inconsistent {
        /// The `ok` field.
        ok: bool,
        /// What it carried instead.
        what: &'static str,
    },
}

/// Parses one request line (surrounding whitespace ignored).
pub fn decode_request(line: &str) -> Result<Request, DecodeError> {
    if line.len() > MAX_LINE {
        return Err(DecodeError::TooLong);
    }
    serde_json::from_str(line.trim()).map_err(DecodeError::Json)
}

/// One request line, newline included.
#[must_use]
pub fn encode_request(req: &Request) -> String {
    // Serialising these plain types cannot fail.
    let mut s = serde_json::to_string(req).unwrap_or_default();
    s.push('\n');
    s
}

/// One reply line, newline included.
#[must_use]
pub fn encode_reply(reply: &Result<Reply, ApiError>) -> String {
    let line = match reply {
        Ok(r) => ReplyLine { ok: true, reply: Some(r.clone()), error: None },
        Err(e) => ReplyLine { ok: false, reply: None, error: Some(e.clone()) },
    };
    let mut s = serde_json::to_string(&line).unwrap_or_default();
    s.push('\n');
    s
}

/// Parses one reply line.
pub fn decode_reply(line: &str) -> Result<Result<Reply, ApiError>, DecodeError> {
    if line.len() > MAX_LINE {
        return Err(DecodeError::TooLong);
    }
    let l: ReplyLine = serde_json::from_str(line.trim()).map_err(DecodeError::Json)?;
    match (l.ok, l.reply, l.error) {
        (true, Some(r), None) => Ok(Ok(r)),
        (false, None, Some(e)) => Ok(Err(e)),
        (ok, _, _) => Err(DecodeError::Inconsistent {
            ok,
            what: if ok { "no reply or an error" } else { "no error or a reply" },
        }),
    }
}

/// Client-side errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket cannot be reached, or the connection broke.
    #[error("control socket {path}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The VMM closed the connection without replying.
    #[error("control socket {path}: the VMM closed the connection")]
    Closed {
        /// The socket path.
        path: PathBuf,
    },
    /// The reply is not a reply line.
    #[error("control socket {path}: bad reply")]
    BadReply {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// The VMM refused or failed the request.
    #[error("control socket {path}: {request}")]
    Vmm {
        /// The socket path.
        path: PathBuf,
        /// The request's command.
        request: &'static str,
        /// The VMM's error.
        #[source]
        source: ApiError,
    },
    /// The reply does not answer the request (a protocol bug).
    #[error("control socket {path}: {request} got an unexpected reply {reply:?}")]
    Unexpected {
        /// The socket path.
        path: PathBuf,
        /// The request's command.
        request: &'static str,
        /// The reply.
        reply: Box<Reply>,
    },
}

impl ClientError {
    /// The VMM's error code, when the VMM answered with an error.
    #[must_use]
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Vmm { source, .. } => Some(source.code),
            _ => None,
        }
    }
}

/// A blocking client on one connection; requests are answered in order.
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the control socket at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| ClientError::Io { path: path.clone(), source };
        let writer = UnixStream::connect(&path).map_err(io)?;
        let reader = BufReader::new(writer.try_clone().map_err(io)?);
        Ok(Self { path, reader, writer })
    }

    /// Sets a timeout on each read and write (None: wait forever).
    pub fn set_timeout(&self, t: Option<Duration>) -> Result<(), ClientError> {
        let io = |source| ClientError::Io { path: self.path.clone(), source };
        self.writer.set_read_timeout(t).map_err(io)?;
        self.writer.set_write_timeout(t).map_err(io)
    }

    /// Sends `req` and waits for its reply.
    pub fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        let io = |source| ClientError::Io { path: self.path.clone(), source };
        self.writer.write_all(encode_request(req).as_bytes()).map_err(io)?;
        let mut line = String::new();
        let limit = u64::try_from(MAX_LINE + 2).unwrap_or(u64::MAX);
        let n = self.reader.by_ref().take(limit).read_line(&mut line).map_err(io)?;
        if n == 0 {
            return Err(ClientError::Closed { path: self.path.clone() });
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
    pub fn status(&mut self) -> Result<VmStatus, ClientError> {
        let req = Request::Status {};
        match self.call(&req)? {
            Reply::Status(s) => Ok(s),
            r => Err(self.unexpected(&req, r)),
        }
    }

    fn state_call(&mut self, req: Request) -> Result<RunState, ClientError> {
        match self.call(&req)? {
            Reply::State(s) => Ok(s),
            r => Err(self.unexpected(&req, r)),
        }
    }

    /// `pause`.
    pub fn pause(&mut self) -> Result<RunState, ClientError> {
        self.state_call(Request::Pause {})
    }

    /// `resume`.
    pub fn resume(&mut self) -> Result<RunState, ClientError> {
        self.state_call(Request::Resume {})
    }

    fn snapshot_call(&mut self, req: Request) -> Result<SnapshotReport, ClientError> {
        match self.call(&req)? {
            Reply::Snapshot(s) => Ok(s),
            r => Err(self.unexpected(&req, r)),
        }
    }

    /// `snapshot`.
    pub fn snapshot(
        &mut self,
        kind: SnapshotKind,
        dir: impl Into<PathBuf>,
        fsync: bool,
    ) -> Result<SnapshotReport, ClientError> {
        self.snapshot_call(Request::Snapshot { kind, dir: dir.into(), fsync })
    }

    /// `fork`.
    pub fn fork(&mut self, dir: impl Into<PathBuf>) -> Result<SnapshotReport, ClientError> {
        self.snapshot_call(Request::Fork { dir: dir.into() })
    }

    /// `save-working-set`.
    pub fn save_working_set(&mut self) -> Result<PathBuf, ClientError> {
        let req = Request::SaveWorkingSet {};
        match self.call(&req)? {
            Reply::WorkingSet(p) => Ok(p),
            r => Err(self.unexpected(&req, r)),
        }
    }

    /// `restore` (standby VMMs), of a snapshot without a vsock device or with the default
    /// refresh; see [`Client::restore_with`].
    pub fn restore(
        &mut self,
        snapshot: impl Into<PathBuf>,
        identity: u32,
    ) -> Result<RestoreReport, ClientError> {
        self.restore_with(Request::Restore {
            snapshot: snapshot.into(),
            identity,
            vsock_uds: None,
            vsock_cid: None,
            guest: GuestRefresh::default(),
        })
    }

    /// `restore` (standby VMMs) with every field; `req` must be a [`Request::Restore`].
    pub fn restore_with(&mut self, req: Request) -> Result<RestoreReport, ClientError> {
        match self.call(&req)? {
            Reply::Restored(r) => Ok(r),
            r => Err(self.unexpected(&req, r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(decode_request(r#"{"cmd":"status"}"#).unwrap(), Request::Status {});
        assert_eq!(decode_request(" {\"cmd\":\"pause\"} \n").unwrap(), Request::Pause {});
        assert_eq!(
            decode_request(r#"{"cmd":"snapshot","kind":"diff","dir":"/a"}"#).unwrap(),
            Request::Snapshot { kind: SnapshotKind::Diff, dir: "/a".into(), fsync: false }
        );
        assert_eq!(
            decode_request(r#"{"cmd":"fork","dir":"/f"}"#).unwrap(),
            Request::Fork { dir: "/f".into() }
        );
        assert_eq!(
            decode_request(r#"{"cmd":"restore","snapshot":"/s"}"#).unwrap(),
            Request::Restore {
                snapshot: "/s".into(),
                identity: 0,
                vsock_uds: None,
                vsock_cid: None,
                guest: GuestRefresh::default()
            }
        );
        let r = decode_request(
            r#"{"cmd":"restore","snapshot":"/s","vsock_uds":"/c.sock","guest":{"deterministic":true,"hostname":"c1","net":{"iface":"eth0","address":"10.0.0.3/24"}}}"#,
        )
        .unwrap();
        let Request::Restore { vsock_uds, guest, .. } = r else { panic!() };
        assert_eq!(vsock_uds.as_deref(), Some(Path::new("/c.sock")));
        assert!(guest.deterministic && guest.has_work());
        assert_eq!(guest.net.unwrap().gateway, "");
        assert!(decode_request(r#"{"cmd":"restore","snapshot":"/s","guest":{"clock":1}}"#).is_err());
    }

    #[test]
    fn bad_requests_are_errors() {
        for bad in [
            "",
            "not json",
            r#"{"cmd":"explode"}"#,
            r#"{"cmd":"snapshot","kind":"half","dir":"/a"}"#,
            r#"{"cmd":"snapshot","kind":"full"}"#,
            r#"{"cmd":"pause","extra":1}"#,
            r#"{"dir":"/a"}"#,
            "[1,2,3]",
        ] {
            assert!(decode_request(bad).is_err(), "{bad:?} must be refused");
        }
        let long = format!("{{\"cmd\":\"fork\",\"dir\":\"{}\"}}", "a".repeat(MAX_LINE));
        assert!(matches!(decode_request(&long), Err(DecodeError::TooLong)));
    }

    #[test]
    fn every_request_round_trips_and_names_itself() {
        let reqs = [
            Request::Status {},
            Request::Pause {},
            Request::Resume {},
            Request::Snapshot { kind: SnapshotKind::Full, dir: "/d".into(), fsync: true },
            Request::Fork { dir: "/f".into() },
            Request::SaveWorkingSet {},
            Request::Restore {
                snapshot: "/s".into(),
                identity: 7,
                vsock_uds: Some("/v".into()),
                vsock_cid: Some(9),
                guest: GuestRefresh { hostname: Some("h".into()), ..Default::default() },
            },
        ];
        for r in reqs {
            let line = encode_request(&r);
            assert!(line.ends_with('\n'));
            assert!(line.contains(&format!("\"cmd\":\"{}\"", r.name())), "{line}");
            assert_eq!(decode_request(&line).unwrap(), r);
        }
    }

    #[test]
    fn replies_round_trip() {
        let replies: Vec<Result<Reply, ApiError>> = vec![
            Ok(Reply::Status(VmStatus {
                api_version: API_VERSION,
                pid: 42,
                state: RunState::Paused,
                vcpus: 2,
                mem_bytes: 1 << 28,
                identity: 3,
                generation: 1,
                dirty_logging: true,
                layers: vec!["/l/0000.mlayer".into()],
                post_restore: None,
                vsock: Some(VsockStatus {
                    uds: "/v.sock".into(),
                    cid: 3,
                    connections: 2,
                    handshakes: 0,
                    counters: [("rx_packets".to_string(), 5)].into_iter().collect(),
                }),
                virtio: vec![VirtioStatus {
                    kind: "block".into(),
                    base: 0xd000_0000,
                    gsi: 5,
                    status: 15,
                    interrupt_status: 1,
                    queues: vec![VirtqueueStatus {
                        size: 256,
                        avail_idx: Some(7),
                        next_avail: 7,
                        used_idx: None,
                    }],
                }],
            })),
            Ok(Reply::State(RunState::Running)),
            Ok(Reply::Snapshot(SnapshotReport {
                dir: "/s".into(),
                depth: 2,
                pages: 10,
                pause_ms: 0.5,
                total_ms: 1.5,
            })),
            Ok(Reply::WorkingSet("/l/0000.mlayer.ws".into())),
            Ok(Reply::Restored(RestoreReport { restore_ms: 1.25, guest: GuestAck::default() })),
            Ok(Reply::Restored(RestoreReport {
                restore_ms: 1.25,
                guest: GuestAck {
                    outcome: GuestOutcome::Acknowledged,
                    clock: true,
                    entropy: 64,
                    hostname: Some("c".into()),
                    net: false,
                    ms: 3.5,
                    reason: None,
                },
            })),
            Err(ApiError::new(ErrorCode::AlreadyExists, "snapshot directory /s: holds a snapshot")),
        ];
        for r in replies {
            let line = encode_reply(&r);
            assert_eq!(decode_reply(&line).unwrap(), r, "{line}");
        }
        let err = encode_reply(&Err(ApiError::new(ErrorCode::NotFound, "x")));
        assert_eq!(err.trim(), r#"{"ok":false,"error":{"code":"not-found","message":"x"}}"#);
    }

    #[test]
    fn guest_refresh_is_validated() {
        let ok = GuestRefresh {
            hostname: Some("child-1.grove".into()),
            net: Some(GuestNet {
                iface: "eth0".into(),
                address: "10.1.2.3/24".into(),
                gateway: "10.1.2.1".into(),
            }),
            timeout_ms: Some(5000),
            ..Default::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        assert!(GuestRefresh::default().has_work(), "clock and entropy by default");
        let det = GuestRefresh { deterministic: true, ..Default::default() };
        assert!(!det.has_work());
        let bad_host = |h: &str| GuestRefresh { hostname: Some(h.into()), ..Default::default() };
        for h in ["", "a b", "x;reboot", &"a".repeat(65), "h\n"] {
            assert!(bad_host(h).validate().is_err(), "{h:?}");
        }
        let net = |iface: &str, address: &str, gateway: &str| GuestRefresh {
            net: Some(GuestNet {
                iface: iface.into(),
                address: address.into(),
                gateway: gateway.into(),
            }),
            ..Default::default()
        };
        assert!(net("eth0", "10.0.0.1/24", "").validate().is_ok());
        for (i, a, g) in [
            ("", "10.0.0.1/24", ""),
            ("averyveryverylongname", "10.0.0.1/24", ""),
            ("eth0", "10.0.0.1", ""),
            ("eth0", "10.0.0.1/33", ""),
            ("eth0", "10.0.0/24", ""),
            ("eth0", "10.0.0.1/24", "gw"),
        ] {
            assert!(net(i, a, g).validate().is_err(), "{i} {a} {g}");
        }
        for t in [0, GUEST_REFRESH_MAX_TIMEOUT_MS + 1] {
            assert!(GuestRefresh { timeout_ms: Some(t), ..Default::default() }.validate().is_err());
        }
    }

    #[test]
    fn inconsistent_replies_are_refused() {
        for bad in [
            r#"{"ok":true}"#,
            r#"{"ok":false}"#,
            r#"{"ok":true,"error":{"code":"internal","message":"x"}}"#,
            r#"{"ok":false,"reply":{"state":"running"}}"#,
            r#"{"ok":true,"reply":{"state":"running"},"extra":1}"#,
            r#"{"ok":false,"error":{"code":"no-such-code","message":"x"}}"#,
        ] {
            assert!(decode_reply(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn client_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        // A stand-in VMM: answers status, refuses pause, replies to resume with a snapshot
        // report (a protocol bug the client must catch), then closes on fork.
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut out = conn.try_clone().unwrap();
            let mut lines = BufReader::new(conn).lines();
            while let Some(Ok(line)) = lines.next() {
                let reply = match decode_request(&line).unwrap() {
                    Request::Status {} => Ok(Reply::State(RunState::Running)),
                    Request::Pause {} => Err(ApiError::new(ErrorCode::FailedPrecondition, "no")),
                    Request::Resume {} => Ok(Reply::WorkingSet("/x".into())),
                    _ => return,
                };
                out.write_all(encode_reply(&reply).as_bytes()).unwrap();
            }
        });
        let mut c = Client::connect(&sock).unwrap();
        c.set_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(c.call(&Request::Status {}).unwrap(), Reply::State(RunState::Running));
        let e = c.pause().unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::FailedPrecondition));
        assert!(matches!(c.resume(), Err(ClientError::Unexpected { request: "resume", .. })));
        assert!(matches!(c.fork("/f"), Err(ClientError::Closed { .. })));
        server.join().unwrap();
        assert!(matches!(
            Client::connect(dir.path().join("nope.sock")),
            Err(ClientError::Io { .. })
        ));
    }
}
