//! File operations, confined to the agent's allowed root.
//!
//! A path is first normalised lexically (`..` may not climb above the root: OUTSIDE_ROOT),
//! then resolved by the kernel with openat2(RESOLVE_IN_ROOT) relative to the root's fd:
//! symlinks and `..` inside the tree resolve as if the root were `/` (chroot semantics), so
//! nothing can lead out, and there is no window between a check and the use. Operations on
//! the last component itself (stat, remove, rename, mkdir) open its parent that way and then
//! use the *at() calls with a single name; recursive removal walks by fd with O_NOFOLLOW.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use grove_proto::guest::{
    response, FileChunk, FileInfo, FileKind, FileList, FileListReply, FileMkdir, FileRead,
    FileRemove, FileRename, FileStat, FileWatch, FileWriteChunk, FileWriteOpen, User, WatchEvent,
    WatchKind, WriteDone,
};

use super::{resolve_user, AgentError, Conn, Op};
use crate::sys;

const DEFAULT_CHUNK: usize = 256 * 1024;
const MAX_CHUNK: usize = 512 * 1024;
const LIST_BATCH: usize = 1000;
const LIST_BATCH_BYTES: usize = 256 * 1024;
const MAX_LIST: usize = 100_000;

/// An open file being written by a `write_open` operation.
pub struct WriteOp {
    file: File,
    written: u64,
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
}

/// Runs the operation with this thread's filesystem ids set to `user` (restored on drop).
struct AsUser(Option<(u32, u32)>);

impl AsUser {
    fn new(user: Option<&User>) -> Result<Self, AgentError> {
        Ok(Self(resolve_user(user)?.map(|u| sys::set_fs_ids(u.uid, u.gid))))
    }
}

impl Drop for AsUser {
    fn drop(&mut self) {
        if let Some((uid, gid)) = self.0 {
            sys::set_fs_ids(uid, gid);
        }
    }
}

/// Most directory levels a recursive removal descends.
const MAX_DEPTH: u32 = 512;

/// A protocol path, normalised lexically: its components below the root.
pub struct RelPath(Vec<OsString>);

impl RelPath {
    /// Parses and normalises `path` (absolute or relative, both taken inside the root).
    pub fn parse(path: &str) -> Result<Self, AgentError> {
        if path.is_empty() {
            return Err(AgentError::BadRequest("empty path".into()));
        }
        if path.contains('\0') || path.len() > 4096 {
            return Err(AgentError::BadRequest("path has a NUL byte or is too long".into()));
        }
        let mut parts: Vec<OsString> = Vec::new();
        for c in Path::new(path).components() {
            match c {
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
                Component::ParentDir => {
                    if parts.pop().is_none() {
                        return Err(AgentError::OutsideRoot(path.into()));
                    }
                }
                Component::Normal(p) => parts.push(p.to_os_string()),
            }
        }
        Ok(Self(parts))
    }

    fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The relative path for openat2 ("." for the root).
    fn rel(&self) -> PathBuf {
        if self.0.is_empty() {
            PathBuf::from(".")
        } else {
            self.0.iter().collect()
        }
    }

    /// (parent, last component); None for the root itself.
    fn split(&self) -> Option<(Self, &OsStr)> {
        let (last, parent) = self.0.split_last()?;
        Some((Self(parent.to_vec()), last.as_os_str()))
    }
}

fn os(what: &str, path: &str, e: std::io::Error) -> AgentError {
    if e.raw_os_error() == Some(libc::ENOSYS) {
        return AgentError::Unsupported("openat2 is not available (Linux >= 5.6 needed)".into());
    }
    if e.raw_os_error() == Some(libc::EXDEV) {
        return AgentError::OutsideRoot(path.into());
    }
    AgentError::os(format!("{what} {path}"), e)
}

/// Opens `rel` inside the root with `flags` (final symlinks followed unless O_NOFOLLOW).
fn open_in(conn: &Conn, rel: &RelPath, flags: i32, mode: u32) -> std::io::Result<OwnedFd> {
    sys::openat2(&conn.ctx.root_fd, &rel.rel(), flags, mode, conn.ctx.resolve)
}

/// The parent directory of `rel` (opened O_PATH) and the last component.
fn open_parent<'a>(
    conn: &Conn,
    rel: &'a RelPath,
    path: &str,
) -> Result<(OwnedFd, &'a OsStr), AgentError> {
    let (parent, name) =
        rel.split().ok_or_else(|| AgentError::BadRequest("the root itself".into()))?;
    let fd = open_in(conn, &parent, libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(|e| os("open parent of", path, e))?;
    Ok((fd, name))
}

fn info_of(name: String, fd: &OwnedFd) -> std::io::Result<FileInfo> {
    let f = File::from(fd.try_clone()?);
    let md = f.metadata()?;
    let ft = md.file_type();
    let kind = if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Directory
    } else if ft.is_file() {
        FileKind::Regular
    } else {
        FileKind::Other
    };
    Ok(FileInfo {
        name,
        kind: kind.into(),
        size: md.len(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime_ns: md.mtime().saturating_mul(1_000_000_000).saturating_add(md.mtime_nsec()),
        symlink_target: if ft.is_symlink() {
            sys::readlink_fd(fd).unwrap_or_default()
        } else {
            String::new()
        },
    })
}

/// Creates every missing directory of `rel` (mkdir -p), each relative to its parent's fd.
fn mkdir_p(conn: &Conn, rel: &RelPath, mode: u32, path: &str) -> Result<(), AgentError> {
    for i in 1..=rel.0.len() {
        let parent = RelPath(rel.0[..i - 1].to_vec());
        let pfd = open_in(conn, &parent, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(|e| os("mkdir -p", path, e))?;
        match sys::mkdirat(&pfd, &rel.0[i - 1], mode) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(os("mkdir -p", path, e)),
        }
    }
    // The last one must be a directory (an existing file is an error).
    open_in(conn, rel, libc::O_PATH | libc::O_DIRECTORY, 0).map_err(|e| os("mkdir -p", path, e))?;
    Ok(())
}

/// rm -r of `name` in `parent`, by fd, never following symlinks.
fn remove_tree(parent: &OwnedFd, name: &OsStr, depth: u32) -> std::io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
    }
    let dir = sys::openat(parent, name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW)?;
    let entries: Vec<(OsString, bool)> = fs::read_dir(sys::fd_path(&dir))?
        .map(|e| e.and_then(|e| Ok((e.file_name(), e.file_type()?.is_dir()))))
        .collect::<std::io::Result<_>>()?;
    for (n, is_dir) in entries {
        if is_dir {
            remove_tree(&dir, &n, depth + 1)?;
        } else {
            sys::unlinkat(&dir, &n, false)?;
        }
    }
    sys::unlinkat(parent, name, true)
}

pub fn stat(conn: &Conn, id: u64, req: &FileStat) -> Result<(), AgentError> {
    let _as = AsUser::new(req.user.as_ref())?;
    let rel = RelPath::parse(&req.path)?;
    let fd = open_in(conn, &rel, libc::O_PATH | libc::O_NOFOLLOW, 0)
        .map_err(|e| os("stat", &req.path, e))?;
    let name = rel.0.last().map_or_else(|| "/".to_string(), |n| n.to_string_lossy().into_owned());
    let info = info_of(name, &fd).map_err(|e| os("stat", &req.path, e))?;
    conn.out.send(id, response::Body::Stat(info));
    Ok(())
}

pub fn read(conn: &Conn, id: u64, req: &FileRead) -> Result<(), AgentError> {
    let chunk = match req.chunk_size as usize {
        0 => DEFAULT_CHUNK,
        n => n.min(MAX_CHUNK),
    };
    let mut f = {
        let _as = AsUser::new(req.user.as_ref())?;
        let rel = RelPath::parse(&req.path)?;
        let f = File::from(
            open_in(conn, &rel, libc::O_RDONLY, 0).map_err(|e| os("open", &req.path, e))?,
        );
        let md = f.metadata().map_err(|e| AgentError::os("fstat", e))?;
        if md.is_dir() {
            return Err(AgentError::os(
                req.path.clone(),
                std::io::Error::from_raw_os_error(libc::EISDIR),
            ));
        }
        f
    };
    f.seek(SeekFrom::Start(req.offset)).map_err(|e| AgentError::os("seek", e))?;
    // Stream on a helper thread: a large read must not hold up the connection's other
    // operations. The file is already open, so the permission check happened as `user`.
    let out = conn.out.clone();
    let (offset, length, path) = (req.offset, req.length, req.path.clone());
    std::thread::spawn(move || {
        if let Err(e) = stream_file(&mut f, offset, length, chunk, id, &out) {
            out.error(id, &AgentError::os(format!("read {path}"), e));
        }
    });
    Ok(())
}

fn stream_file(
    f: &mut File,
    mut offset: u64,
    length: u64,
    chunk: usize,
    id: u64,
    out: &super::Out,
) -> std::io::Result<()> {
    let mut left = if length == 0 { u64::MAX } else { length };
    let mut buf = vec![0u8; chunk];
    loop {
        let want = usize::try_from(left.min(chunk as u64)).unwrap_or(chunk);
        let mut n = 0;
        while n < want {
            match f.read(&mut buf[n..want]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        left -= n as u64;
        let eof = n < want || left == 0;
        let msg = FileChunk { offset, data: buf[..n].to_vec(), eof };
        offset += n as u64;
        if !out.send(id, response::Body::Chunk(msg)) || eof {
            return Ok(());
        }
    }
}

pub fn write_open(conn: &Conn, id: u64, req: &FileWriteOpen) -> Result<(), AgentError> {
    let mode = if req.mode == 0 { 0o644 } else { req.mode & 0o7777 };
    let file = {
        let _as = AsUser::new(req.user.as_ref())?;
        let rel = RelPath::parse(&req.path)?;
        if rel.is_root() {
            return Err(AgentError::BadRequest("cannot write the root".into()));
        }
        if req.mkdir_parents {
            if let Some((parent, _)) = rel.split() {
                mkdir_p(conn, &parent, 0o755, &req.path)?;
            }
        }
        let flags = libc::O_WRONLY
            | libc::O_CREAT
            | if req.append { libc::O_APPEND } else { libc::O_TRUNC };
        File::from(open_in(conn, &rel, flags, mode).map_err(|e| os("open", &req.path, e))?)
    };
    conn.insert_op(id, Op::Write(WriteOp { file, written: 0, mode, uid: req.uid, gid: req.gid }))?;
    conn.out.ok(id);
    Ok(())
}

pub fn write_chunk(conn: &Conn, id: u64, req: &FileWriteChunk) -> Result<(), AgentError> {
    let mut ops = conn.ops.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(Op::Write(w)) = ops.get_mut(&id) else {
        return Err(AgentError::UnknownId(id));
    };
    let res = w.file.write_all(&req.data).map_err(|e| AgentError::os("write", e));
    if res.is_ok() {
        w.written += req.data.len() as u64;
    }
    if res.is_err() || req.last {
        let Some(Op::Write(w)) = ops.remove(&id) else { unreachable!() };
        drop(ops);
        res?;
        // The mode is set explicitly: open(2) applied the umask.
        w.file
            .set_permissions(fs::Permissions::from_mode(w.mode))
            .map_err(|e| AgentError::os("chmod", e))?;
        if w.uid.is_some() || w.gid.is_some() {
            std::os::unix::fs::fchown(&w.file, w.uid, w.gid)
                .map_err(|e| AgentError::os("chown", e))?;
        }
        conn.out.send(id, response::Body::WriteDone(WriteDone { bytes: w.written }));
    }
    Ok(())
}

pub fn list(conn: &Conn, id: u64, req: &FileList) -> Result<(), AgentError> {
    let mut entries = {
        let _as = AsUser::new(req.user.as_ref())?;
        let rel = RelPath::parse(&req.path)?;
        let dir = open_in(conn, &rel, libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map_err(|e| os("list", &req.path, e))?;
        let rd = fs::read_dir(sys::fd_path(&dir)).map_err(|e| os("list", &req.path, e))?;
        let mut v = Vec::new();
        for e in rd {
            let e = e.map_err(|e| os("readdir", &req.path, e))?;
            if v.len() >= MAX_LIST {
                return Err(AgentError::Limit);
            }
            let name = e.file_name();
            // Entries that vanish meanwhile are skipped.
            if let Ok(fd) = sys::openat(&dir, &name, libc::O_PATH | libc::O_NOFOLLOW) {
                if let Ok(i) = info_of(name.to_string_lossy().into_owned(), &fd) {
                    v.push(i);
                }
            }
        }
        v
    };
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    // Batches of at most LIST_BATCH entries and LIST_BATCH_BYTES encoded bytes, so every
    // frame stays far below MAX_FRAME_LEN whatever the names and link targets.
    let mut batches: Vec<Vec<FileInfo>> = vec![Vec::new()];
    let mut bytes = 0;
    for e in entries {
        let len = prost::Message::encoded_len(&e) + 8;
        let cur = batches.last_mut().expect("never empty");
        if !cur.is_empty() && (cur.len() >= LIST_BATCH || bytes + len > LIST_BATCH_BYTES) {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += len;
        batches.last_mut().expect("never empty").push(e);
    }
    let n = batches.len();
    for (i, batch) in batches.into_iter().enumerate() {
        let reply = FileListReply { entries: batch, done: i + 1 == n };
        if !conn.out.send(id, response::Body::List(reply)) {
            break;
        }
    }
    Ok(())
}

pub fn mkdir(conn: &Conn, id: u64, req: &FileMkdir) -> Result<(), AgentError> {
    let _as = AsUser::new(req.user.as_ref())?;
    let rel = RelPath::parse(&req.path)?;
    let mode = if req.mode == 0 { 0o755 } else { req.mode & 0o7777 };
    if req.parents {
        mkdir_p(conn, &rel, mode, &req.path)?;
    } else {
        let (pfd, name) = open_parent(conn, &rel, &req.path)?;
        sys::mkdirat(&pfd, name, mode).map_err(|e| os("mkdir", &req.path, e))?;
    }
    conn.out.ok(id);
    Ok(())
}

pub fn remove(conn: &Conn, id: u64, req: &FileRemove) -> Result<(), AgentError> {
    let _as = AsUser::new(req.user.as_ref())?;
    let rel = RelPath::parse(&req.path)?;
    if rel.is_root() {
        return Err(AgentError::BadRequest("refusing to remove the root".into()));
    }
    let (pfd, name) = open_parent(conn, &rel, &req.path)?;
    let node = sys::openat(&pfd, name, libc::O_PATH | libc::O_NOFOLLOW)
        .map_err(|e| os("remove", &req.path, e))?;
    let is_dir = File::from(node).metadata().map_err(|e| os("remove", &req.path, e))?.is_dir();
    let r = match (is_dir, req.recursive) {
        (true, true) => remove_tree(&pfd, name, 0),
        (true, false) => sys::unlinkat(&pfd, name, true),
        (false, _) => sys::unlinkat(&pfd, name, false),
    };
    r.map_err(|e| os("remove", &req.path, e))?;
    conn.out.ok(id);
    Ok(())
}

pub fn rename(conn: &Conn, id: u64, req: &FileRename) -> Result<(), AgentError> {
    let _as = AsUser::new(req.user.as_ref())?;
    let (from, to) = (RelPath::parse(&req.from)?, RelPath::parse(&req.to)?);
    if from.is_root() || to.is_root() {
        return Err(AgentError::BadRequest("cannot rename the root".into()));
    }
    let (fd1, n1) = open_parent(conn, &from, &req.from)?;
    let (fd2, n2) = open_parent(conn, &to, &req.to)?;
    sys::renameat(&fd1, n1, &fd2, n2)
        .map_err(|e| os("rename", &format!("{} -> {}", req.from, req.to), e))?;
    conn.out.ok(id);
    Ok(())
}

pub fn watch(conn: &Conn, id: u64, req: &FileWatch) -> Result<(), AgentError> {
    let rel = RelPath::parse(&req.path)?;
    let dir = open_in(conn, &rel, libc::O_RDONLY | libc::O_DIRECTORY, 0)
        .map_err(|e| os("watch", &req.path, e))?;
    let ino =
        sys::Inotify::watch_dir(&sys::fd_path(&dir)).map_err(|e| os("watch", &req.path, e))?;
    drop(dir);
    let stop = Arc::new(AtomicBool::new(false));
    conn.insert_op(id, Op::Watch(Arc::clone(&stop)))?;
    conn.out.ok(id);
    let out = conn.out.clone();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let evs = match ino.read_events(200) {
                Ok(v) => v,
                Err(e) => {
                    out.error(id, &AgentError::os("inotify", e));
                    return;
                }
            };
            for (mask, name) in evs {
                let kind = if mask & libc::IN_CREATE != 0 {
                    WatchKind::Created
                } else if mask & (libc::IN_MODIFY | libc::IN_CLOSE_WRITE) != 0 {
                    WatchKind::Modified
                } else if mask & libc::IN_DELETE != 0 {
                    WatchKind::Removed
                } else if mask & libc::IN_MOVED_FROM != 0 {
                    WatchKind::MovedFrom
                } else if mask & libc::IN_MOVED_TO != 0 {
                    WatchKind::MovedTo
                } else {
                    continue;
                };
                let ev = WatchEvent { name, kind: kind.into(), is_dir: mask & libc::IN_ISDIR != 0 };
                if !out.send(id, response::Body::WatchEvent(ev)) {
                    return;
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_normalisation() {
        let p = |s: &str| RelPath::parse(s).map(|r| r.rel());
        assert_eq!(p("/a/x").unwrap(), PathBuf::from("a/x"));
        assert_eq!(p("a/../a/./x").unwrap(), PathBuf::from("a/x"));
        assert_eq!(p("/").unwrap(), PathBuf::from("."));
        assert_eq!(p("/a/..").unwrap(), PathBuf::from("."));
        for bad in ["..", "/../x", "a/../../x", "/a/b/../../.."] {
            assert!(matches!(RelPath::parse(bad), Err(AgentError::OutsideRoot(_))), "{bad}");
        }
        assert!(matches!(RelPath::parse(""), Err(AgentError::BadRequest(_))));
        assert!(matches!(RelPath::parse("a\0b"), Err(AgentError::BadRequest(_))));
        let r = RelPath::parse("/a/b/c").unwrap();
        let (parent, name) = r.split().unwrap();
        assert_eq!((parent.rel(), name), (PathBuf::from("a/b"), OsStr::new("c")));
        assert!(RelPath::parse("/").unwrap().split().is_none());
    }
}
