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

/// A userfaultfd (missing-page mode), through the kernel ABI that `linux-raw-sys` describes
/// (no bindgen, so the VMM that links this crate needs no libclang).
#[derive(Debug)]
pub(crate) struct Uffd {
    fd: OwnedFd,
}

/// `UFFDIO_*` ioctls a registered range must offer the page server.
pub(crate) const UFFD_NEEDED_IOCTLS: u64 = (1 << uffd_abi::_UFFDIO_COPY)
    | (1 << uffd_abi::_UFFDIO_ZEROPAGE)
    | (1 << uffd_abi::_UFFDIO_WAKE);

mod uffd_abi {
    pub(crate) use linux_raw_sys::general::{
        __NR_userfaultfd, uffd_msg, uffdio_api, uffdio_copy, uffdio_range, uffdio_register,
        uffdio_zeropage, _UFFDIO_COPY, _UFFDIO_WAKE, _UFFDIO_ZEROPAGE,
        UFFDIO_REGISTER_MODE_MISSING, UFFD_API, UFFD_EVENT_PAGEFAULT, USERFAULTFD_IOC,
    };
    pub(crate) use linux_raw_sys::ioctl::{
        UFFDIO_API, UFFDIO_COPY, UFFDIO_REGISTER, UFFDIO_WAKE, UFFDIO_ZEROPAGE,
    };
    /// `USERFAULTFD_IOC_NEW` = `_IO(USERFAULTFD_IOC, 0x00)` (on /dev/userfaultfd).
    pub(crate) const USERFAULTFD_IOC_NEW: u32 = USERFAULTFD_IOC << 8;
}

/// The result of an ioctl that reports progress in a field: bytes done, or the errno.
fn uffd_progress(ret: libc::c_int, done: i64) -> io::Result<usize> {
    if ret == 0 || done > 0 {
        // Complete, or partial (EAGAIN with `done` bytes filled): the caller continues.
        return usize::try_from(done).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL));
    }
    if done < 0 {
        let errno = i32::try_from(-done).unwrap_or(libc::EINVAL);
        return Err(io::Error::from_raw_os_error(errno));
    }
    Err(io::Error::last_os_error())
}

impl Uffd {
    /// A new non-blocking, close-on-exec userfaultfd that also takes faults raised inside the
    /// kernel (KVM touches guest memory through get_user_pages), after the API handshake.
    /// Falls back to /dev/userfaultfd when the system call is not allowed.
    pub(crate) fn new() -> io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: userfaultfd(2) takes one integer argument and creates a descriptor.
        let r = unsafe { libc::syscall(libc::c_long::from(uffd_abi::__NR_userfaultfd), flags) };
        let raw = if r >= 0 {
            RawFd::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?
        } else {
            let first = io::Error::last_os_error();
            let dev = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/userfaultfd")
                .map_err(|_| first)?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument and returns
            // a new descriptor; `dev` is a live descriptor.
            let r = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    libc::c_ulong::from(uffd_abi::USERFAULTFD_IOC_NEW),
                    flags,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            r
        };
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut api =
            uffd_abi::uffdio_api { api: u64::from(uffd_abi::UFFD_API), features: 0, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes one uffdio_api, a live local.
        let r = unsafe {
            libc::ioctl(fd.as_raw_fd(), libc::c_ulong::from(uffd_abi::UFFDIO_API), &raw mut api)
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Registers `addr .. addr + len` (an anonymous mapping of ours) for missing-page faults;
    /// returns the `UFFDIO_*` ioctls the range supports (bit `_UFFDIO_COPY`, ...).
    pub(crate) fn register(&self, addr: usize, len: usize) -> io::Result<u64> {
        let mut reg = uffd_abi::uffdio_register {
            range: uffd_abi::uffdio_range { start: addr as u64, len: len as u64 },
            mode: u64::from(uffd_abi::UFFDIO_REGISTER_MODE_MISSING),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register, a live local; it only
        // changes how faults in the range are handled.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::c_ulong::from(uffd_abi::UFFDIO_REGISTER),
                &raw mut reg,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(reg.ioctls)
    }

    /// `UFFDIO_COPY`: fills missing pages at `dst` from `src`; returns the bytes filled
    /// (fewer than `len` when interrupted: call again for the rest).
    ///
    /// # Safety
    /// `src .. src + len` must be readable; `dst .. dst + len` must lie inside a range
    /// registered with this userfaultfd.
    pub(crate) unsafe fn copy(&self, src: *const u8, dst: usize, len: usize) -> io::Result<usize> {
        let mut c = uffd_abi::uffdio_copy {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            // Mode 0: wake the faulting threads once the pages are in.
            mode: 0,
            copy: 0,
        };
        // SAFETY: the kernel reads `len` bytes at `src` and fills only missing pages of the
        // registered range at `dst` (the caller's contract); `c` is a live local.
        let r = unsafe {
            libc::ioctl(self.fd.as_raw_fd(), libc::c_ulong::from(uffd_abi::UFFDIO_COPY), &raw mut c)
        };
        uffd_progress(r, c.copy)
    }

    /// `UFFDIO_ZEROPAGE`: maps the zero page over missing pages of `dst .. dst + len`;
    /// returns the bytes done.
    ///
    /// # Safety
    /// `dst .. dst + len` must lie inside a range registered with this userfaultfd.
    pub(crate) unsafe fn zeropage(&self, dst: usize, len: usize) -> io::Result<usize> {
        let mut z = uffd_abi::uffdio_zeropage {
            range: uffd_abi::uffdio_range { start: dst as u64, len: len as u64 },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: fills only missing pages of the registered range (the caller's contract);
        // `z` is a live local.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::c_ulong::from(uffd_abi::UFFDIO_ZEROPAGE),
                &raw mut z,
            )
        };
        uffd_progress(r, z.zeropage)
    }

    /// `UFFDIO_WAKE`: wakes the threads waiting on faults in `addr .. addr + len`.
    pub(crate) fn wake(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut range = uffd_abi::uffdio_range { start: addr as u64, len: len as u64 };
        // SAFETY: UFFDIO_WAKE reads one uffdio_range, a live local; waking changes no memory.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::c_ulong::from(uffd_abi::UFFDIO_WAKE),
                &raw mut range,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads the pending events (non-blocking) and returns the addresses of page faults;
    /// other events are ignored (none are enabled).
    pub(crate) fn read_faults(&self, out: &mut Vec<usize>) -> io::Result<()> {
        const BATCH: usize = 64;
        let mut msgs = [std::mem::MaybeUninit::<uffd_abi::uffd_msg>::uninit(); BATCH];
        let size = std::mem::size_of::<uffd_abi::uffd_msg>();
        // SAFETY: reads at most BATCH whole messages into a live buffer of that size.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), msgs.as_mut_ptr().cast(), BATCH * size) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(()) } else { Err(e) };
        }
        let n = usize::try_from(r).unwrap_or(0) / size;
        for m in &msgs[..n] {
            // SAFETY: the kernel wrote the first `n` messages completely.
            let m = unsafe { m.assume_init() };
            if u32::from(m.event) == uffd_abi::UFFD_EVENT_PAGEFAULT {
                // SAFETY: for a page-fault event the `pagefault` member of the union is the
                // one the kernel filled.
                let addr = unsafe { m.arg.pagefault.address };
                out.push(usize::try_from(addr).unwrap_or(usize::MAX));
            }
        }
        Ok(())
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Whether the `len` bytes at `p` are all zero, read with volatile loads only: the guest may
/// be writing them (a fork's pre-copy), so no Rust reference is made to them. 16 bytes per
/// load (SSE2, part of x86-64's baseline) where aligned, bytes at the unaligned edges.
///
/// `p .. p + len` must be readable (the callers pass a vm-memory `VolatileSlice`'s range).
pub(crate) fn is_zero_volatile(p: *const u8, len: usize) -> bool {
    let head = p.align_offset(16).min(len);
    let byte_zero = |at: usize| {
        // SAFETY: `at < len`, inside the readable range (the caller's contract).
        unsafe { std::ptr::read_volatile(p.add(at)) == 0 }
    };
    if !(0..head).all(byte_zero) {
        return false;
    }
    let blocks = (len - head) / 64;
    for b in 0..blocks {
        // SAFETY: 64 bytes from `head + 64 * b`, 16-aligned, inside the range.
        let q = unsafe { p.add(head + 64 * b) };
        // SAFETY: `q` is 16-aligned with 64 readable bytes, and on x86-64 the SSE2 that
        // `block64_zero` is compiled for is part of the baseline every such CPU has.
        if !unsafe { block64_zero(q) } {
            return false;
        }
    }
    (head + 64 * blocks..len).all(byte_zero)
}

/// # Safety
/// `q` must be 16-aligned with 64 readable bytes (and the CPU must have SSE2).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
unsafe fn block64_zero(q: *const u8) -> bool {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_movemask_epi8, _mm_or_si128, _mm_setzero_si128,
    };
    let v = q.cast::<__m128i>();
    // SAFETY: `q` is 16-aligned and 64 bytes from it are readable (is_zero_volatile).
    let (a, b, c, d) = unsafe {
        (
            std::ptr::read_volatile(v),
            std::ptr::read_volatile(v.add(1)),
            std::ptr::read_volatile(v.add(2)),
            std::ptr::read_volatile(v.add(3)),
        )
    };
    let or = _mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d));
    _mm_movemask_epi8(_mm_cmpeq_epi8(or, _mm_setzero_si128())) == 0xffff
}

/// # Safety
/// `q` must be 16-aligned with 64 readable bytes.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn block64_zero(q: *const u8) -> bool {
    let v = q.cast::<u64>();
    // SAFETY: `q` is 16-aligned and 64 bytes from it are readable (is_zero_volatile).
    (0..8).all(|i| unsafe { std::ptr::read_volatile(v.add(i)) } == 0)
}

/// Writes the `len` bytes at `p` to `file` at `off` with pwrite(2): the kernel reads them
/// from the mapping, no Rust reference is made (the guest may be writing them).
///
/// `p .. p + len` must be readable (a vm-memory `VolatileSlice`'s range).
pub(crate) fn pwrite_all_volatile(
    file: &std::fs::File,
    p: *const u8,
    len: usize,
    off: u64,
) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        let at = libc::off_t::try_from(off + done as u64)
            .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: the kernel reads `len - done` bytes from inside the readable range (the
        // caller's contract) into the file; no memory of ours is written.
        let n = unsafe { libc::pwrite(file.as_raw_fd(), p.add(done).cast(), len - done, at) };
        match n {
            n if n > 0 => done += usize::try_from(n).unwrap_or(0),
            0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod volatile_tests {
    use super::*;

    #[test]
    fn volatile_zero_check_agrees_with_a_plain_one() {
        let mut buf = vec![0u8; 4096 + 64];
        for start in [0usize, 1, 7, 16, 33] {
            for len in [0usize, 1, 15, 64, 100, 4096] {
                let p = buf[start..].as_ptr();
                assert!(is_zero_volatile(p, len), "zeros at {start}+{len}");
                for hit in [0, len / 2, len.saturating_sub(1)] {
                    if hit >= len {
                        continue;
                    }
                    buf[start + hit] = 0x80;
                    assert!(
                        !is_zero_volatile(buf[start..].as_ptr(), len),
                        "{start}+{len} at {hit}"
                    );
                    buf[start + hit] = 0;
                }
            }
        }
    }

    #[test]
    fn pwrite_writes_every_byte() {
        let f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        pwrite_all_volatile(&f, data.as_ptr(), data.len(), 4096).unwrap();
        let mut back = vec![0u8; data.len()];
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
    }
}
