//! Opening the files a VMM is handed (kernel, initrd, state file, disk images) so that
//! they are what they claim: opened with `O_NONBLOCK` (a FIFO given as a kernel must not
//! block `open` forever), then checked with `fstat` on the opened descriptor (no race with a
//! rename) to be a regular file, or a block device where one is allowed, before a byte is
//! read. Reads that follow are bounded by the file's size or by a header.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Why an input file was refused.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// `open` failed.
    #[error("cannot open")]
    Open(#[source] std::io::Error),
    /// `fstat` failed.
    #[error("cannot stat")]
    Stat(#[source] std::io::Error),
    /// A directory, FIFO, socket, character device... where a regular file is meant.
    #[error("is a {kind}, not a regular file")]
    NotRegular {
        /// What the file is.
        kind: &'static str,
    },
    /// Reading failed.
    #[error("cannot read")]
    Read(#[source] std::io::Error),
    /// Larger than the caller accepts.
    #[error("{size} bytes, more than the {max} accepted")]
    TooBig {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
}

/// What kinds of file a caller accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accept {
    /// Regular files only (kernel, initrd, state file, memory layers).
    Regular,
    /// Regular files or block devices (disk images).
    RegularOrBlock,
}

/// The name of a file type, for errors.
fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Opens `path` read-only (and `O_NONBLOCK`, `O_CLOEXEC`) and checks on the descriptor that
/// it is a kind `accept` allows. Returns the file and its size (from `fstat`: for a block
/// device 0, its size is the caller's to ask).
pub fn open(path: &Path, accept: Accept) -> Result<(File, u64), InputError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(InputError::Open)?;
    let size = check(&file, accept)?;
    Ok((file, size))
}

/// Checks an opened file's kind (see [`open`]); returns its size.
pub fn check(file: &File, accept: Accept) -> Result<u64, InputError> {
    let m = file.metadata().map_err(InputError::Stat)?;
    let t = m.file_type();
    let ok = t.is_file() || (accept == Accept::RegularOrBlock && t.is_block_device());
    if !ok {
        return Err(InputError::NotRegular { kind: kind_of(t) });
    }
    Ok(m.len())
}

/// Reads a whole regular file of at most `max` bytes (the size checked before reading, and
/// the read itself bounded: a file that grows meanwhile is cut at `max + 1` and refused).
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, InputError> {
    let (file, size) = open(path, Accept::Regular)?;
    if size > max {
        return Err(InputError::TooBig { size, max });
    }
    let mut b = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(max.saturating_add(1)).read_to_end(&mut b).map_err(InputError::Read)?;
    let got = b.len() as u64;
    if got > max {
        return Err(InputError::TooBig { size: got, max });
    }
    Ok(b)
}

/// Makes a FIFO at `path` (tests of code that must not block on one).
#[cfg(test)]
pub(crate) fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_files_are_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        mkfifo(&fifo);
        // A FIFO with no writer: a blocking open would never return.
        let e = open(&fifo, Accept::Regular).unwrap_err();
        assert!(matches!(e, InputError::NotRegular { kind: "FIFO" }), "{e:?}");
        let e = open(d.path(), Accept::Regular).unwrap_err();
        assert!(matches!(e, InputError::NotRegular { kind: "directory" }), "{e:?}");
        let e = open(Path::new("/dev/zero"), Accept::RegularOrBlock).unwrap_err();
        assert!(matches!(e, InputError::NotRegular { kind: "character device" }), "{e:?}");
        // A symlink to /dev/zero is judged by what it points to.
        let link = d.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(read_bounded(&link, 1 << 20).is_err());
    }

    #[test]
    fn reads_are_bounded() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, [7u8; 100]).unwrap();
        assert_eq!(read_bounded(&f, 100).unwrap(), vec![7u8; 100]);
        let e = read_bounded(&f, 99).unwrap_err();
        assert!(matches!(e, InputError::TooBig { size: 100, max: 99 }), "{e:?}");
        assert!(matches!(open(&d.path().join("none"), Accept::Regular), Err(InputError::Open(_))));
    }
}
