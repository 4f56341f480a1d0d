//! Thin wrappers around mmap/munmap/mprotect and eventfd: the unsafe system calls
//! of the restore modes live here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The host page size.
pub fn page_size() -> u32 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(v).unwrap_or(4096)
}

/// One restored guest memory region: where it lives in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoredRegion {
    /// Guest physical address.
    pub gpa: u64,
    /// Host virtual address of the first byte.
    pub host_addr: usize,
    /// Length in bytes.
    pub len: usize,
}

impl RestoredRegion {
    /// The host address as a pointer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.host_addr as *mut u8
    }
}

/// An owned anonymous reservation (later partly replaced by file mappings),
/// unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    /// Reserves `len` bytes of private, lazily allocated, zero-filled memory.
    pub fn anonymous(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh mapping at an address the kernel picks; touches no existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { addr: p as usize, len })
    }

    /// Maps `len` bytes of `fd` at `file_off`, private copy-on-write, at `offset`
    /// inside this reservation (replacing what was there).
    pub fn map_file_at(
        &self,
        offset: usize,
        len: usize,
        fd: RawFd,
        file_off: u64,
    ) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "mapping outside region"));
        }
        // SAFETY: the range is inside our own reservation (bounds checked above); nobody
        // holds references into guest memory while it is built.
        unsafe { map_file_fixed((self.addr + offset) as *mut u8, len, fd, file_off) }
    }

    /// Makes the whole mapping inaccessible.
    pub fn protect_none(&self) -> io::Result<()> {
        // SAFETY: changes the protection of our own mapping; accesses then fault
        // (SIGSEGV in user space, EFAULT in kernel accesses) instead of touching memory.
        let r =
            unsafe { libc::mprotect(self.addr as *mut libc::c_void, self.len, libc::PROT_NONE) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, for a successful `anonymous`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes at `offset .. offset + len` as a mutable slice.
    ///
    /// # Safety
    /// No other reference to that range may exist and no other thread may access it
    /// while the slice lives; the range must be inside the mapping.
    #[allow(clippy::mut_from_ref)] // The memory is not owned by `self`'s bytes; see Safety.
    pub unsafe fn slice_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        debug_assert!(offset + len <= self.len);
        // SAFETY: in bounds and exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut((self.addr + offset) as *mut u8, len) }
    }
}

/// Maps `len` bytes of `fd` at `file_off`, private copy-on-write, at `dst`, replacing the
/// pages there (`MAP_FIXED`). Shared by the restore modes here and by the VMM's standby
/// restore, which maps layers over memory it reserved itself.
///
/// # Safety
/// `dst .. dst + len` must lie inside a mapping the caller owns, and no reference into that
/// range may be alive (its contents change under it).
pub unsafe fn map_file_fixed(dst: *mut u8, len: usize, fd: RawFd, file_off: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(file_off)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset"))?;
    // SAFETY: MAP_FIXED replaces pages only inside the caller's own mapping, with no live
    // references into it (this function's contract).
    let p = unsafe {
        libc::mmap(
            dst.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            fd,
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range this object owns; the owner guarantees no
        // user of the memory remains (documented on MappedMemory / UffdMemory).
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

/// A non-blocking eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd creates a new descriptor; no memory is passed.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd.
pub fn eventfd_signal(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local buffer to a descriptor we own.
    unsafe {
        libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len());
    }
}

/// Polls `fds` for readability; returns which are readable.
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    loop {
        // SAFETY: `p` is a live array of `p.len()` pollfd structs.
        let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
        if r >= 0 {
            return Ok(p.iter().map(|x| x.revents & (libc::POLLIN | libc::POLLERR) != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
