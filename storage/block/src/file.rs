//! Small file helpers shared by the layer code and the stores: positional reads that
//! zero-fill past the end of a file, whole writes, hole punching, range copies, directory
//! syncs.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::BlockError;

/// fsyncs a directory (after creating, renaming or removing entries in it).
pub fn sync_dir(dir: &Path) -> Result<(), BlockError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| BlockError::io("fsync dir", e))
}

/// Reads `buf.len()` bytes at `off`, zero-filling past the end of the file.
pub fn read_full(f: &File, buf: &mut [u8], off: u64) -> Result<(), BlockError> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BlockError::io("read layer", e)),
        }
    }
    Ok(())
}

/// Writes all of `buf` at `off`.
pub fn write_full(f: &File, buf: &[u8], off: u64) -> Result<(), BlockError> {
    f.write_all_at(buf, off).map_err(|e| BlockError::io("write layer", e))
}

/// Punches a hole (the range reads as zeroes, its blocks are freed); false where the
/// filesystem cannot.
pub fn punch_hole(f: &File, off: u64, len: u64) -> Result<bool, BlockError> {
    let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(BlockError::Invalid("range".into()));
    };
    // SAFETY: fallocate on a valid open fd with plain integer arguments; no memory
    // is passed to the kernel.
    let r = unsafe {
        libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, o, l)
    };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => Ok(false),
        _ => Err(BlockError::io("punch hole", e)),
    }
}

/// Copies `len` bytes at `off` from `src` to `dst` (same offset) with
/// copy_file_range (a reflink on xfs/btrfs), falling back to read/write.
pub fn copy_range(src: &File, dst: &File, off: u64, len: u64) -> Result<(), BlockError> {
    let mut done = 0u64;
    while done < len {
        let (Ok(mut so), Ok(mut dof)) = (i64::try_from(off + done), i64::try_from(off + done))
        else {
            return Err(BlockError::Invalid("range".into()));
        };
        let n = usize::try_from(len - done).unwrap_or(usize::MAX).min(1 << 30);
        // SAFETY: both fds are valid; the offset pointers point to live locals
        // that the kernel updates.
        let r = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut so, dst.as_raw_fd(), &mut dof, n, 0)
        };
        if r > 0 {
            done += r.unsigned_abs() as u64;
            continue;
        }
        if r == 0 {
            // Past the end of the source: the rest reads as zeroes (a hole).
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if matches!(
            e.raw_os_error(),
            Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
        ) {
            let mut buf = vec![0u8; 1 << 20];
            while done < len {
                let n = usize::try_from((len - done).min(1 << 20)).unwrap_or(1 << 20);
                read_full(src, &mut buf[..n], off + done)?;
                write_full(dst, &buf[..n], off + done)?;
                done += n as u64;
            }
            return Ok(());
        }
        return Err(BlockError::io("copy_file_range", e));
    }
    Ok(())
}
