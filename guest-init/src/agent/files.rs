//! File operations, confined to the agent's allowed root.
//!
//! Paths are resolved lexically inside the root (`..` may not climb above it), then the
//! nearest existing ancestor is canonicalised and must still lie inside the root, so a
//! symlink cannot lead out either. Operations that follow the final component (read, write,
//! list, mkdir, watch) also check the canonical target. The check and the use are separate
//! system calls (a process racing to swap a directory for a symlink could slip between
//! them); the agent's own guest is the only writer of its root, see docs/guest.md.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
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

/// Maps a protocol path to a host path inside `root`.
pub fn resolve(root: &Path, path: &str, follow: bool) -> Result<PathBuf, AgentError> {
    if path.is_empty() {
        return Err(AgentError::BadRequest("empty path".into()));
    }
    if path.contains('\0') || path.len() > 4096 {
        return Err(AgentError::BadRequest("path has a NUL byte or is too long".into()));
    }
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err(AgentError::OutsideRoot(path.into()));
                }
            }
            Component::Normal(p) => parts.push(p),
        }
    }
    let mut full = root.to_path_buf();
    full.extend(&parts);
    // The nearest existing ancestor (the parent for the final component, unless following).
    let mut probe = if follow || parts.is_empty() {
        full.clone()
    } else {
        full.parent().unwrap_or(root).to_path_buf()
    };
    loop {
        match probe.canonicalize() {
            Ok(c) => {
                if !c.starts_with(root) {
                    return Err(AgentError::OutsideRoot(path.into()));
                }
                break;
            }
            Err(_) => {
                if !probe.pop() || !probe.starts_with(root) {
                    break;
                }
            }
        }
    }
    Ok(full)
}

fn info_of(path: &Path, md: &fs::Metadata) -> FileInfo {
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
    FileInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        kind: kind.into(),
        size: md.len(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime_ns: md.mtime().saturating_mul(1_000_000_000).saturating_add(md.mtime_nsec()),
        symlink_target: if ft.is_symlink() {
            fs::read_link(path).map(|t| t.to_string_lossy().into_owned()).unwrap_or_default()
        } else {
            String::new()
        },
    }
}

pub fn stat(conn: &Conn, id: u64, req: &FileStat) -> Result<(), AgentError> {
    let _as = AsUser::new(req.user.as_ref())?;
    let p = resolve(&conn.ctx.root, &req.path, false)?;
    let md =
        fs::symlink_metadata(&p).map_err(|e| AgentError::os(format!("stat {}", req.path), e))?;
    conn.out.send(id, response::Body::Stat(info_of(&p, &md)));
    Ok(())
}

pub fn read(conn: &Conn, id: u64, req: &FileRead) -> Result<(), AgentError> {
    let chunk = match req.chunk_size as usize {
        0 => DEFAULT_CHUNK,
        n => n.min(MAX_CHUNK),
    };
    let mut f = {
        let _as = AsUser::new(req.user.as_ref())?;
        let p = resolve(&conn.ctx.root, &req.path, true)?;
        let f = File::open(&p).map_err(|e| AgentError::os(format!("open {}", req.path), e))?;
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
        let p = resolve(&conn.ctx.root, &req.path, true)?;
        if req.mkdir_parents {
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent).map_err(|e| AgentError::os("mkdir -p", e))?;
            }
        }
        let mut o = OpenOptions::new();
        o.write(true).create(true).mode(mode);
        if req.append {
            o.append(true);
        } else {
            o.truncate(true);
        }
        o.open(&p).map_err(|e| AgentError::os(format!("open {}", req.path), e))?
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
    let entries = {
        let _as = AsUser::new(req.user.as_ref())?;
        let p = resolve(&conn.ctx.root, &req.path, true)?;
        let rd = fs::read_dir(&p).map_err(|e| AgentError::os(format!("list {}", req.path), e))?;
        let mut v = Vec::new();
        for e in rd {
            let e = e.map_err(|e| AgentError::os("readdir", e))?;
            if v.len() >= MAX_LIST {
                return Err(AgentError::Limit);
            }
            if let Ok(md) = e.metadata() {
                v.push(info_of(&e.path(), &md));
            }
        }
        v
    };
    let mut entries = entries;
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut it = entries.chunks(LIST_BATCH).peekable();
    if it.peek().is_none() {
        conn.out.send(id, response::Body::List(FileListReply { entries: Vec::new(), done: true }));
    }
    while let Some(batch) = it.next() {
        let done = it.peek().is_none();
        if !conn.out.send(id, response::Body::List(FileListReply { entries: batch.to_vec(), done }))
        {
            break;
        }
    }
    Ok(())
}

pub fn mkdir(conn: &Conn, id: u64, req: &FileMkdir) -> Result<(), AgentError> {
    let _as = AsUser::new(req.user.as_ref())?;
    let p = resolve(&conn.ctx.root, &req.path, true)?;
    let mode = if req.mode == 0 { 0o755 } else { req.mode & 0o7777 };
    let mut b = fs::DirBuilder::new();
    b.recursive(req.parents);
    std::os::unix::fs::DirBuilderExt::mode(&mut b, mode);
    b.create(&p).map_err(|e| AgentError::os(format!("mkdir {}", req.path), e))?;
    conn.out.ok(id);
    Ok(())
}

pub fn remove(conn: &Conn, id: u64, req: &FileRemove) -> Result<(), AgentError> {
    let _as = AsUser::new(req.user.as_ref())?;
    let p = resolve(&conn.ctx.root, &req.path, false)?;
    if p == conn.ctx.root {
        return Err(AgentError::BadRequest("refusing to remove the root".into()));
    }
    let md =
        fs::symlink_metadata(&p).map_err(|e| AgentError::os(format!("remove {}", req.path), e))?;
    let r = if md.is_dir() {
        if req.recursive {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_dir(&p)
        }
    } else {
        fs::remove_file(&p)
    };
    r.map_err(|e| AgentError::os(format!("remove {}", req.path), e))?;
    conn.out.ok(id);
    Ok(())
}

pub fn rename(conn: &Conn, id: u64, req: &FileRename) -> Result<(), AgentError> {
    let _as = AsUser::new(req.user.as_ref())?;
    let from = resolve(&conn.ctx.root, &req.from, false)?;
    let to = resolve(&conn.ctx.root, &req.to, false)?;
    if from == conn.ctx.root || to == conn.ctx.root {
        return Err(AgentError::BadRequest("cannot rename the root".into()));
    }
    fs::rename(&from, &to)
        .map_err(|e| AgentError::os(format!("rename {} -> {}", req.from, req.to), e))?;
    conn.out.ok(id);
    Ok(())
}

pub fn watch(conn: &Conn, id: u64, req: &FileWatch) -> Result<(), AgentError> {
    let p = resolve(&conn.ctx.root, &req.path, true)?;
    let ino = sys::Inotify::watch_dir(&p)
        .map_err(|e| AgentError::os(format!("watch {}", req.path), e))?;
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
    fn resolve_confines_paths() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        fs::create_dir(root.join("a")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("a/out")).unwrap();
        std::os::unix::fs::symlink("../a", root.join("a/in")).unwrap();
        assert_eq!(resolve(&root, "/a/x", true).unwrap(), root.join("a/x"));
        assert_eq!(resolve(&root, "a/../a/./x", true).unwrap(), root.join("a/x"));
        assert_eq!(resolve(&root, "/", true).unwrap(), root);
        for bad in ["..", "/../x", "a/../../x", "/a/out", "/a/out/passwd", "/a/out/nonexistent/y"] {
            assert!(matches!(resolve(&root, bad, true), Err(AgentError::OutsideRoot(_))), "{bad}");
        }
        // The link itself may be removed or stat'ed (not followed), but not followed.
        assert!(resolve(&root, "/a/out", false).is_ok());
        assert!(resolve(&root, "/a/in/x", true).is_ok());
        assert!(matches!(resolve(&root, "", true), Err(AgentError::BadRequest(_))));
    }
}
