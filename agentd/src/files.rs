//! FilesystemService: files in a sandbox through guest-init's agent, one guest connection
//! per call (grove-proto's client over the VMM's vsock socket). Unary calls run on tokio's
//! blocking pool; Read and Write stream through a thread of their own with a small bounded
//! channel, so a file larger than memory passes through in chunks and a slow peer slows
//! the copy instead of growing a buffer here. guest-init confines paths to its root.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grove_proto::client::{ClientError, GuestClient};
use grove_proto::guest::{FileInfo, FileKind, FileRead, FileWriteOpen, WatchEvent, WatchKind};
use grove_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::error::{AgentError, Result};

/// Bytes one Write may carry in all.
pub const MAX_WRITE_BYTES: u64 = 64 << 30;
/// Bytes one Write message may carry.
pub const MAX_WRITE_MESSAGE: usize = 4 << 20;
/// Entries one List may return.
pub const MAX_LIST_ENTRIES: usize = 100_000;
/// Deepest List.
pub const MAX_DEPTH: u32 = 32;
/// Longest path.
pub const MAX_PATH: usize = 4096;
/// Read and Write streams open at once on a node.
pub const MAX_STREAMS: usize = 256;
/// Watch streams open at once on a node (each holds a guest connection and a thread here
/// and in the guest).
pub const MAX_WATCHES: usize = 1024;
/// How long a call waits for the guest's agent (a just-restored guest reconnects).
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long one answer may take (a hang guard, not a deadline for the whole call).
const ANSWER_WAIT: Duration = Duration::from_secs(120);

/// An absolute guest path of bounded length without NUL bytes.
pub fn check_path(p: &str) -> Result<()> {
    if !p.starts_with('/') {
        return Err(AgentError::InvalidArgument(format!("path {p:?} is not absolute")));
    }
    if p.len() > MAX_PATH || p.contains('\0') {
        return Err(AgentError::InvalidArgument(format!(
            "a path of at most {MAX_PATH} bytes without NUL"
        )));
    }
    Ok(())
}

/// A connection to the guest's agent behind `vsock` (retried for up to 10 s while a
/// just-restored guest's agent comes back); `answer` bounds each wait for an answer.
pub fn connect_agent(vsock: &Path, answer: Option<Duration>) -> Result<GuestClient> {
    let addr = format!("vsock-uds:{}:{}", vsock.display(), grove_proto::GUEST_VSOCK_PORT);
    GuestClient::connect_retry(&addr, Instant::now() + CONNECT_WAIT, CONNECT_WAIT, answer)
        .map_err(|e| AgentError::guest("connect", e))
}

/// [`connect_agent`] for file calls (each answer within 120 s).
pub fn connect(vsock: &Path) -> Result<GuestClient> {
    connect_agent(vsock, Some(ANSWER_WAIT))
}

/// A guest file's description as the API gives it, named `path`.
pub fn info_pb(i: &FileInfo, path: String) -> pb::FileInfo {
    let t = match i.kind() {
        FileKind::Regular => pb::FileType::Regular,
        FileKind::Directory => pb::FileType::Directory,
        FileKind::Symlink => pb::FileType::Symlink,
        _ => pb::FileType::Other,
    };
    pb::FileInfo {
        path,
        r#type: t.into(),
        size: i.size,
        mode: i.mode,
        uid: i.uid,
        gid: i.gid,
        mtime_unix_ns: i.mtime_ns,
        symlink_target: i.symlink_target.clone(),
    }
}

/// Runs `f` on a new guest connection, on tokio's blocking pool.
pub async fn unary<T: Send + 'static>(
    vsock: PathBuf,
    what: &'static str,
    f: impl FnOnce(&mut GuestClient) -> std::result::Result<T, ClientError> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(move || {
        let mut c = connect(&vsock)?;
        f(&mut c).map_err(|e| AgentError::guest(what, e))
    })
    .await
    .map_err(|e| AgentError::Internal(format!("file call: {e}")))?
}

/// A directory's entries down to `depth` levels (breadth first), bounded.
pub fn list(c: &mut GuestClient, path: &str, depth: u32) -> Result<Vec<pb::FileInfo>> {
    let mut out = Vec::new();
    let mut level = vec![path.trim_end_matches('/').to_string()];
    for _ in 0..depth.max(1) {
        let mut next = Vec::new();
        for dir in &level {
            let shown = if dir.is_empty() { "/" } else { dir.as_str() };
            for e in c.list(shown).map_err(|e| AgentError::guest("list", e))? {
                let full = format!("{dir}/{}", e.name);
                if e.kind() == FileKind::Directory {
                    next.push(full.clone());
                }
                out.push(info_pb(&e, full));
                if out.len() > MAX_LIST_ENTRIES {
                    return Err(AgentError::ResourceExhausted(format!(
                        "over {MAX_LIST_ENTRIES} entries under {path}: list less deep"
                    )));
                }
            }
        }
        level = next;
        if level.is_empty() {
            break;
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Counts open streams (or running processes) of one kind against a limit; one is given
/// back when its guard drops.
pub struct Streams {
    open: AtomicUsize,
    max: usize,
    what: &'static str,
}

impl Default for Streams {
    /// Read and Write streams.
    fn default() -> Self {
        Self::new(MAX_STREAMS, "file streams are open")
    }
}

/// One open stream.
pub struct StreamSlot(Arc<Streams>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Streams {
    /// At most `max` at once; the refusal says "`max` `what` on this node already".
    #[must_use]
    pub fn new(max: usize, what: &'static str) -> Self {
        Self { open: AtomicUsize::new(0), max, what }
    }

    /// How many are taken now.
    pub fn taken(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// A slot, or RESOURCE_EXHAUSTED.
    pub fn take(self: &Arc<Self>) -> Result<StreamSlot> {
        if self.open.fetch_add(1, Ordering::SeqCst) >= self.max {
            self.open.fetch_sub(1, Ordering::SeqCst);
            return Err(AgentError::ResourceExhausted(format!(
                "{} {} on this node already",
                self.max, self.what
            )));
        }
        Ok(StreamSlot(self.clone()))
    }
}

type ChunkTx = mpsc::Sender<std::result::Result<pb::FileChunk, tonic::Status>>;

/// Hands each chunk the guest sends to the stream (one message per guest chunk).
struct ChunkSink {
    tx: ChunkTx,
    offset: u64,
}

impl Write for ChunkSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let chunk = pb::FileChunk { offset: self.offset, data: buf.to_vec() };
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
        })?;
        self.offset += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Streams a file: the chunks, or the error as the stream's end.
pub fn read(
    vsock: PathBuf,
    req: FileRead,
    slot: StreamSlot,
) -> mpsc::Receiver<std::result::Result<pb::FileChunk, tonic::Status>> {
    let (tx, rx) = mpsc::channel(8);
    let spawned = std::thread::Builder::new().name("file-read".into()).stack_size(256 << 10).spawn(
        move || {
            let _slot = slot;
            let mut sink = ChunkSink { tx: tx.clone(), offset: req.offset };
            let r = connect(&vsock).and_then(|mut c| {
                c.read_file_to(req, &mut sink).map_err(|e| AgentError::guest("read", e))
            });
            if let Err(e) = r {
                let _ = tx.blocking_send(Err(e.into()));
            }
        },
    );
    if let Err(e) = spawned {
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(Err(tonic::Status::internal(format!("file reader thread: {e}"))));
        return rx;
    }
    rx
}

/// The data of a Write's messages, as a reader for the guest client (its end is the
/// stream's end; a failed stream is an error, so the guest never takes a cut file as done).
struct ChanReader {
    rx: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChanReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Writes a file from a Write stream whose first message (already read) was `first`.
pub async fn write(
    vsock: PathBuf,
    open: FileWriteOpen,
    first: Vec<u8>,
    mut rest: tonic::Streaming<pb::WriteFileRequest>,
    slot: StreamSlot,
) -> Result<u64> {
    let (tx, rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("file-write".into())
        .stack_size(256 << 10)
        .spawn(move || {
            let _slot = slot;
            let mut src = ChanReader { rx, buf: Vec::new(), pos: 0 };
            let r = connect(&vsock).and_then(|mut c| {
                c.write_file_from(open, &mut src).map_err(|e| AgentError::guest("write", e))
            });
            let _ = done_tx.send(r);
        })
        .map_err(|e| AgentError::Internal(format!("file writer thread: {e}")))?;
    let mut total = first.len() as u64;
    let mut feed = tx.send(Ok(first)).await.is_ok();
    while feed {
        let msg = match rest.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(s) => {
                let _ = tx.send(Err(std::io::Error::other(format!("client stream: {s}")))).await;
                break;
            }
        };
        if msg.data.len() > MAX_WRITE_MESSAGE {
            let _ = tx.send(Err(std::io::Error::other("message too large"))).await;
            drop(tx);
            let _ = done_rx.await;
            return Err(AgentError::InvalidArgument(format!(
                "a Write message carries at most {MAX_WRITE_MESSAGE} bytes"
            )));
        }
        total += msg.data.len() as u64;
        if total > MAX_WRITE_BYTES {
            let _ = tx.send(Err(std::io::Error::other("write too large"))).await;
            drop(tx);
            let _ = done_rx.await;
            return Err(AgentError::ResourceExhausted(format!(
                "a Write carries at most {MAX_WRITE_BYTES} bytes"
            )));
        }
        feed = tx.send(Ok(msg.data)).await.is_ok();
    }
    drop(tx);
    done_rx.await.map_err(|_| AgentError::Internal("the file writer ended".into()))?
}

type EventTx = mpsc::Sender<std::result::Result<pb::FileEvent, tonic::Status>>;

/// A guest watch event as the API gives it: `dir`'s entry `name`.
pub fn event_pb(dir: &str, ev: &WatchEvent) -> pb::FileEvent {
    let kind = match ev.kind() {
        WatchKind::Created => pb::FileEventKind::Created,
        WatchKind::Modified => pb::FileEventKind::Modified,
        WatchKind::Removed => pb::FileEventKind::Removed,
        WatchKind::MovedFrom => pb::FileEventKind::RenamedFrom,
        WatchKind::MovedTo => pb::FileEventKind::RenamedTo,
        WatchKind::Unspecified => pb::FileEventKind::Unspecified,
    };
    let dir = dir.trim_end_matches('/');
    pb::FileEvent { path: format!("{dir}/{}", ev.name), kind: kind.into(), is_dir: ev.is_dir }
}

/// Watches directory `dir` in the guest: returns once the guest has the watch in place (or
/// refused it), with the stream of its events. A thread of its own reads the guest's
/// events; when the client goes away the watch is cancelled in the guest, and when the
/// guest connection ends (the sandbox stopped, was rewound or deleted) the stream ends with
/// UNAVAILABLE.
pub async fn watch(
    vsock: PathBuf,
    dir: String,
    slot: StreamSlot,
) -> Result<mpsc::Receiver<std::result::Result<pb::FileEvent, tonic::Status>>> {
    let (tx, rx) = mpsc::channel(64);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let events = tx.clone();
    std::thread::Builder::new()
        .name("file-watch".into())
        .stack_size(256 << 10)
        .spawn(move || {
            let _slot = slot;
            let _done = done_tx;
            let started = connect(&vsock).and_then(|mut c| {
                let id = c.watch_start(&dir).map_err(|e| AgentError::guest("watch", e))?;
                // Events come when they come: no answer timeout from here on.
                c.set_timeout(None).map_err(|e| AgentError::guest("watch", e))?;
                Ok((c, id))
            });
            let (mut c, id) = match started {
                Ok((c, id)) => {
                    let _ = ready_tx.send(Ok((c.sender(), id)));
                    (c, id)
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            forward_events(&mut c, id, &dir, &events);
        })
        .map_err(|e| AgentError::Internal(format!("file watch thread: {e}")))?;
    let (sender, id) = ready_rx
        .await
        .map_err(|_| AgentError::Internal("the file watch thread ended".into()))??;
    // The client's end: cancel the watch in the guest (its thread then sees the end).
    tokio::spawn(async move {
        tokio::select! {
            () = tx.closed() => {
                let _ = tokio::task::spawn_blocking(move || sender.cancel(id)).await;
            }
            _ = done_rx => {}
        }
    });
    Ok(rx)
}

/// Hands watch `id`'s events to `tx` until the watch ends, the client goes away or the
/// connection fails (then the stream gets the error).
fn forward_events(c: &mut GuestClient, id: u64, dir: &str, tx: &EventTx) {
    loop {
        match c.watch_next(id) {
            Ok(Some(ev)) => {
                if tx.blocking_send(Ok(event_pb(dir, &ev))).is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = tx.blocking_send(Err(AgentError::guest("watch", e).into()));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_events_name_the_full_path_and_their_kind() {
        let ev = |name: &str, kind: WatchKind, is_dir| WatchEvent {
            name: name.into(),
            kind: kind.into(),
            is_dir,
        };
        let e = event_pb("/root/", &ev("f", WatchKind::Created, false));
        assert_eq!(
            (e.path.as_str(), e.kind(), e.is_dir),
            ("/root/f", pb::FileEventKind::Created, false)
        );
        let e = event_pb("/", &ev("d", WatchKind::MovedTo, true));
        assert_eq!(
            (e.path.as_str(), e.kind(), e.is_dir),
            ("/d", pb::FileEventKind::RenamedTo, true)
        );
        let e = event_pb("/run", &ev("x", WatchKind::Removed, false));
        assert_eq!(e.kind(), pb::FileEventKind::Removed);
    }

    #[test]
    fn streams_are_bounded_and_given_back() {
        let s = Arc::new(Streams::new(2, "watches are open"));
        let a = s.take().unwrap();
        let _b = s.take().unwrap();
        let e = s.take().err().expect("a third is refused");
        assert!(
            matches!(e, AgentError::ResourceExhausted(ref m) if m.contains("2 watches")),
            "{e}"
        );
        drop(a);
        assert!(s.take().is_ok(), "a dropped slot is given back");
    }

    #[test]
    fn paths_are_checked() {
        assert!(check_path("/root/f").is_ok());
        assert!(check_path("root/f").is_err());
        assert!(check_path("").is_err());
        assert!(check_path("/a\0b").is_err());
        assert!(check_path(&format!("/{}", "a".repeat(MAX_PATH))).is_err());
    }

    #[test]
    fn a_reader_over_the_channel_ends_with_the_stream_or_its_error() {
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Ok(b"ab".to_vec())).unwrap();
        tx.try_send(Ok(b"cde".to_vec())).unwrap();
        drop(tx);
        let mut r = ChanReader { rx, buf: Vec::new(), pos: 0 };
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "abcde");
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Ok(b"ab".to_vec())).unwrap();
        tx.try_send(Err(std::io::Error::other("gone"))).unwrap();
        let mut r = ChanReader { rx, buf: Vec::new(), pos: 0 };
        let mut v = Vec::new();
        assert!(r.read_to_end(&mut v).is_err(), "a cut stream is not a complete file");
    }
}
