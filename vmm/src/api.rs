//! The control socket: JSON lines over a Unix stream socket (`--api-sock PATH`).
//!
//! One request per line, one reply line per request:
//! ```text
//! {"cmd":"status"}
//! {"cmd":"pause"}                     {"cmd":"resume"}
//! {"cmd":"snapshot","kind":"full","dir":"/snap/a"}      ("fsync":true to make it durable)
//! {"cmd":"snapshot","kind":"diff","dir":"/snap/b"}
//! {"cmd":"fork","dir":"/snap/f1"}
//! {"cmd":"save-working-set"}          (uffd restores: record the first-touch order)
//! {"cmd":"restore","snapshot":"/snap/f1","identity":3}   (`grove-vmm standby` only)
//! ```
//! Replies: `{"ok":true,...}` or `{"ok":false,"error":"..."}`. A bad request (unknown command,
//! bad field, line over 64 KiB) gets an error reply and leaves the VM as it was.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Sender};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::snapshot::SnapshotKind;
use crate::vcpu::VcpuEvent;
use crate::vm::Vm;

/// Longest request line accepted.
pub const MAX_LINE: u64 = 64 * 1024;

/// Errors from the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket cannot be bound.
    #[error("cannot listen on {path}")]
    Bind {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A client could not reach the socket or read its reply.
    #[error("control socket {path}")]
    Client {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The reply was not one JSON line.
    #[error("control socket {path} replied with something that is not JSON: {reply:?}")]
    BadReply {
        /// The path.
        path: String,
        /// What came back (at most the first 200 bytes).
        reply: String,
    },
}

/// Client side: sends one request line to the control socket at `path` and returns the
/// reply. The request is checked with the same parser the VMM uses before it is sent.
pub fn call(path: &str, request: &str) -> Result<Value, ApiError> {
    let client = |source| ApiError::Client { path: path.to_string(), source };
    let mut conn = UnixStream::connect(path).map_err(client)?;
    let mut line = request.trim().to_string();
    line.push('\n');
    conn.write_all(line.as_bytes()).map_err(client)?;
    let mut reply = String::new();
    BufReader::new(conn).take(MAX_LINE + 1).read_line(&mut reply).map_err(client)?;
    serde_json::from_str(reply.trim()).map_err(|_| ApiError::BadReply {
        path: path.to_string(),
        reply: reply.chars().take(200).collect(),
    })
}

/// Snapshot kind as written in requests.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Full.
    Full,
    /// Diff.
    Diff,
}

/// A request.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
// Unit-like requests are empty struct variants so that deny_unknown_fields applies to them.
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// VM status.
    Status {},
    /// Pause the vCPUs.
    Pause {},
    /// Resume the vCPUs.
    Resume {},
    /// Snapshot into `dir`.
    Snapshot {
        /// Full or diff.
        kind: Kind,
        /// Directory.
        dir: PathBuf,
        /// fsync layers and state.
        #[serde(default)]
        fsync: bool,
    },
    /// Fork snapshot into `dir`.
    Fork {
        /// Directory.
        dir: PathBuf,
    },
    /// Save the uffd working set.
    SaveWorkingSet {},
    /// Standby VMM only: restore this snapshot (mmap mode) into the prepared VM.
    Restore {
        /// Snapshot directory.
        snapshot: PathBuf,
        /// Identity for port 0x444.
        #[serde(default)]
        identity: u32,
    },
}

/// A request on its way to the VMM thread.
#[derive(Debug)]
pub struct ApiCall {
    /// The request.
    pub req: Request,
    /// Where the reply goes.
    pub reply: Sender<Value>,
}

/// Parses one request line.
pub fn parse(line: &str) -> Result<Request, String> {
    serde_json::from_str(line.trim()).map_err(|e| format!("bad request: {e}"))
}

fn err(msg: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": msg.to_string()})
}

/// Executes a request on the VMM thread.
pub fn handle(vm: &mut Vm, req: Request) -> Value {
    match req {
        Request::Status {} => json!({
            "ok": true,
            "state": if vm.paused { "paused" } else { "running" },
            "vcpus": vm.vcpus.len(),
            "mem_bytes": vm.ram.size(),
            "identity": vm.bus.identity(),
            "generation": vm.bus.generation(),
            "dirty_logging": vm.dirty_logging,
            "layers": vm.layers.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        }),
        Request::Pause {} => match vm.pause() {
            Ok(()) => json!({"ok": true, "state": "paused"}),
            Err(e) => err(crate::one_line(&e)),
        },
        Request::Resume {} => match vm.resume() {
            Ok(()) => json!({"ok": true, "state": "running"}),
            Err(e) => err(crate::one_line(&e)),
        },
        Request::Snapshot { kind, dir, fsync } => {
            let kind = match kind {
                Kind::Full => SnapshotKind::Full,
                Kind::Diff => SnapshotKind::Diff,
            };
            match vm.snapshot(kind, &dir, fsync) {
                Ok(r) => json!({"ok": true, "snapshot": r}),
                Err(e) => err(crate::one_line(&e)),
            }
        }
        Request::Fork { dir } => match vm.fork(&dir) {
            Ok(r) => json!({"ok": true, "snapshot": r}),
            Err(e) => err(crate::one_line(&e)),
        },
        Request::Restore { .. } => err("a VM is already running in this grove-vmm"),
        Request::SaveWorkingSet {} => match vm.save_working_set() {
            Ok(p) => json!({"ok": true, "path": p}),
            Err(e) => err(crate::one_line(&e)),
        },
    }
}

/// Binds the socket and starts the accept thread; requests go to `events`.
pub fn start(path: &str, events: Sender<VcpuEvent>) -> Result<(), ApiError> {
    // A stale socket from a dead VMM would make bind fail; only a socket is removed.
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if m.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    let listener = UnixListener::bind(path)
        .map_err(|source| ApiError::Bind { path: path.to_string(), source })?;
    std::thread::Builder::new()
        .name("api".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let events = events.clone();
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .stack_size(256 * 1024)
                    .spawn(move || serve_conn(conn, &events));
            }
        })
        .map_err(|source| ApiError::Bind { path: path.to_string(), source })?;
    Ok(())
}

fn serve_conn(conn: UnixStream, events: &Sender<VcpuEvent>) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        let n = match reader.by_ref().take(MAX_LINE + 1).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let too_long = u64::try_from(n).unwrap_or(u64::MAX) > MAX_LINE;
        let reply = if too_long {
            err(format!("request line longer than {MAX_LINE} bytes"))
        } else if line.trim().is_empty() {
            continue;
        } else {
            match parse(&line) {
                Err(e) => err(e),
                Ok(req) => {
                    let (tx, rx) = channel();
                    if events.send(VcpuEvent::Api(ApiCall { req, reply: tx })).is_err() {
                        return;
                    }
                    rx.recv().unwrap_or_else(|_| err("VMM is shutting down"))
                }
            }
        };
        let mut s = reply.to_string();
        s.push('\n');
        if out.write_all(s.as_bytes()).is_err() || too_long {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(parse(r#"{"cmd":"status"}"#), Ok(Request::Status {}));
        assert_eq!(parse(r#" {"cmd":"pause"} "#), Ok(Request::Pause {}));
        assert_eq!(
            parse(r#"{"cmd":"snapshot","kind":"diff","dir":"/a"}"#),
            Ok(Request::Snapshot { kind: Kind::Diff, dir: "/a".into(), fsync: false })
        );
        assert_eq!(parse(r#"{"cmd":"fork","dir":"/f"}"#), Ok(Request::Fork { dir: "/f".into() }));
        assert_eq!(parse(r#"{"cmd":"save-working-set"}"#), Ok(Request::SaveWorkingSet {}));
    }

    #[test]
    fn client_round_trip_over_a_socket() {
        let dir = std::env::temp_dir().join(format!("grove-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let sock = sock.to_str().unwrap().to_string();
        let (tx, rx) = channel();
        start(&sock, tx).unwrap();
        // Stand in for the VMM thread: answer every request with its command echoed.
        std::thread::spawn(move || {
            while let Ok(VcpuEvent::Api(c)) = rx.recv() {
                let _ = c.reply.send(json!({"ok": true, "echo": format!("{:?}", c.req)}));
            }
        });
        let ok = call(&sock, r#"{"cmd":"status"}"#).unwrap();
        assert_eq!(ok["ok"], true);
        assert!(ok["echo"].as_str().unwrap().contains("Status"));
        let bad = call(&sock, r#"{"cmd":"explode"}"#).unwrap();
        assert_eq!(bad["ok"], false);
        assert!(matches!(
            call(dir.join("nope.sock").to_str().unwrap(), "{}"),
            Err(ApiError::Client { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
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
            assert!(parse(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
