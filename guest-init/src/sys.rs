//! Thin wrappers over the system calls guest-init needs that std does not offer.
//! All of the crate's `unsafe` lives here.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cpath(p: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Writes byte 123 to the Grove boot-timer port 0x440 (the ports table in docs/vmm.md). Needs CAP_SYS_RAWIO.
pub fn boot_timer_ready() -> io::Result<()> {
    const PORT: u16 = 0x440;
    // SAFETY: ioperm only changes this thread's I/O permission bitmap.
    check(unsafe { libc::ioperm(libc::c_ulong::from(PORT), 1, 1) })?;
    // SAFETY: the port was just made accessible to this thread; writing a byte to an I/O port
    // has no effect on this process's memory. On a VMM without the port the write is ignored.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") PORT, in("al") 123u8, options(nomem, nostack, preserves_flags));
    }
    Ok(())
}

/// Reads one byte from I/O port `port` (the Grove ports: identity 0x444, generation 0x448),
/// for probes on kernels without `/dev/port`. Needs CAP_SYS_RAWIO.
pub fn inb(port: u16) -> io::Result<u8> {
    // SAFETY: ioperm only changes this thread's I/O permission bitmap.
    check(unsafe { libc::ioperm(libc::c_ulong::from(port), 1, 1) })?;
    let v: u8;
    // SAFETY: the port was just made accessible to this thread; reading a byte from an I/O
    // port touches no memory of this process (an absent port reads 0xff).
    unsafe {
        std::arch::asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags));
    }
    Ok(v)
}

/// finit_module(2) on an open module file.
pub fn finit_module(file: &File, params: &str) -> io::Result<()> {
    let p = cstr(params)?;
    // SAFETY: the fd is open for the duration of the call and `p` is a valid C string.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), p.as_ptr(), 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// mount(2).
pub fn mount(
    src: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let (s, t, f, d) = (cstr(src)?, cpath(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings living across the call.
    check(unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            if fstype.is_empty() { std::ptr::null() } else { f.as_ptr() },
            flags,
            if data.is_empty() { std::ptr::null() } else { d.as_ptr().cast() },
        )
    })
    .map(drop)
}

/// umount2(2).
pub fn umount(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let t = cpath(target)?;
    // SAFETY: valid C string.
    check(unsafe { libc::umount2(t.as_ptr(), flags) }).map(drop)
}

/// chroot(2).
pub fn chroot(dir: &Path) -> io::Result<()> {
    let d = cpath(dir)?;
    // SAFETY: valid C string.
    check(unsafe { libc::chroot(d.as_ptr()) }).map(drop)
}

/// sync(2).
pub fn sync() {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::sync() };
}

/// reboot(2) with `LINUX_REBOOT_CMD_*` (only returns on error).
pub fn reboot(cmd: libc::c_int) -> io::Error {
    // SAFETY: the call either does not return or fails without side effects.
    unsafe { libc::reboot(cmd) };
    io::Error::last_os_error()
}

/// sethostname(2).
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`'s bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// Steps CLOCK_REALTIME to `ns` nanoseconds since the Unix epoch.
pub fn set_realtime_ns(ns: i64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000),
    };
    // SAFETY: `ts` is a valid timespec.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(drop)
}

/// kill(2).
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    check(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// Sets this thread's filesystem uid and gid; returns the previous ones. Linux keeps these
/// per thread and clears the filesystem capabilities (CAP_DAC_OVERRIDE, ...) of a thread
/// whose fsuid is not 0, so file operations in this thread get ordinary permission checks.
pub fn set_fs_ids(uid: u32, gid: u32) -> (u32, u32) {
    // SAFETY: setfsgid/setfsuid are raw per-thread syscalls in glibc (no cross-thread
    // broadcast); they only change this thread's credentials.
    let pg = unsafe { libc::setfsgid(gid) };
    // SAFETY: as above.
    let pu = unsafe { libc::setfsuid(uid) };
    (u32::try_from(pu).unwrap_or(0), u32::try_from(pg).unwrap_or(0))
}

/// Opens a new PTY pair with the given window size: (master, slave).
pub fn openpty(rows: u16, cols: u16) -> io::Result<(File, File)> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: out-pointers are valid; name and termios may be null; winsize is valid.
    check(unsafe {
        libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &ws)
    })?;
    // SAFETY: openpty returned two fresh fds that nobody else owns.
    let (m, s) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
    for f in [&m, &s] {
        // SAFETY: setting FD_CLOEXEC on an fd we own.
        check(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) })?;
    }
    Ok((m, s))
}

/// TIOCSWINSZ on a PTY master.
pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    check(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// Credentials a child switches to before exec: supplementary groups, gid, uid.
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// In a forked child before exec: new session, optionally the controlling terminal on fd 0,
/// empty signal mask, then the credentials (groups, gid, uid, in that order: each needs the
/// privileges the next one drops). Only async-signal-safe syscalls; no allocation.
pub fn child_setup(ctty: bool, creds: Option<&Creds>) -> io::Result<()> {
    // SAFETY: setsid has no memory effects.
    check(unsafe { libc::setsid() })?;
    if ctty {
        // SAFETY: TIOCSCTTY with arg 0 on fd 0 (the PTY slave).
        check(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) })?;
    }
    // SAFETY: an empty, initialised sigset is passed to sigprocmask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
    if let Some(c) = creds {
        // SAFETY: `groups` is a valid slice of gid_t (u32) of the given length.
        check(unsafe { libc::setgroups(c.groups.len(), c.groups.as_ptr()) })?;
        // SAFETY: plain syscalls with integer arguments.
        check(unsafe { libc::setgid(c.gid) })?;
        // SAFETY: as above.
        check(unsafe { libc::setuid(c.uid) })?;
    }
    Ok(())
}

/// Waits (blocking) for any child to exit without reaping it; returns its pid, or None when
/// there are no children.
pub fn peek_exited_child() -> io::Result<Option<i32>> {
    loop {
        // SAFETY: siginfo_t is plain data; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid out-pointer; P_ALL ignores the id.
        let r = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ECHILD) => return Ok(None),
                Some(libc::EINTR) => continue,
                _ => return Err(e),
            }
        }
        // SAFETY: waitid succeeded with WEXITED, so si_pid is set.
        return Ok(Some(unsafe { info.si_pid() }));
    }
}

/// Reaps `pid` if it has exited; returns its raw wait status.
pub fn reap(pid: i32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: valid out-pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    (r == pid).then_some(status)
}

/// statvfs(3): (total bytes, free bytes available to unprivileged users).
pub fn statvfs(path: &Path) -> io::Result<(u64, u64)> {
    let p = cpath(path)?;
    // SAFETY: statvfs is plain data.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    check(unsafe { libc::statvfs(p.as_ptr(), &mut s) })?;
    Ok((s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize))
}

/// RNDADDENTROPY with `data` (credited in full), then RNDRESEEDCRNG.
pub fn add_entropy_and_reseed(random: &File, data: &[u8]) -> io::Result<()> {
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let len = i32::try_from(data.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut buf = Vec::with_capacity(8 + data.len());
    buf.extend_from_slice(&(len * 8).to_ne_bytes());
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(data);
    // SAFETY: `buf` is a rand_pool_info header followed by buf_size bytes of data.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, buf.as_ptr()) })?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG, 0) }).map(drop)
}

/// An inotify instance watching one directory.
pub struct Inotify(OwnedFd);

/// One inotify event: (mask, name).
pub type InotifyEvent = (u32, String);

impl Inotify {
    /// Watches `dir` for create/modify/delete/move events.
    pub fn watch_dir(dir: &Path) -> io::Result<Self> {
        // SAFETY: plain syscall.
        let fd = check(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })?;
        // SAFETY: fresh fd owned by nobody else.
        let me = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        let p = cpath(dir)?;
        let mask = libc::IN_CREATE
            | libc::IN_CLOSE_WRITE
            | libc::IN_MODIFY
            | libc::IN_DELETE
            | libc::IN_MOVED_FROM
            | libc::IN_MOVED_TO
            | libc::IN_ONLYDIR;
        // SAFETY: valid fd and path.
        check(unsafe { libc::inotify_add_watch(me.0.as_raw_fd(), p.as_ptr(), mask) })?;
        Ok(me)
    }

    /// Waits up to `timeout_ms` and returns the events read.
    pub fn read_events(&self, timeout_ms: i32) -> io::Result<Vec<InotifyEvent>> {
        let mut pfd = libc::pollfd { fd: self.0.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n <= 0 {
            return Ok(Vec::new());
        }
        let mut buf = [0u8; 8192];
        // SAFETY: reading into a buffer we own of the given length.
        let r = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(Vec::new()) } else { Err(e) };
        }
        let n = usize::try_from(r).unwrap_or(0);
        let hdr = std::mem::size_of::<libc::inotify_event>();
        let mut out = Vec::new();
        let mut pos = 0;
        while pos + hdr <= n {
            // SAFETY: the kernel wrote a full inotify_event header at `pos`; read_unaligned
            // copes with the byte buffer's alignment.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf[pos..].as_ptr().cast()) };
            let name_len = ev.len as usize;
            let end = (pos + hdr + name_len).min(n);
            let name_bytes = &buf[pos + hdr..end];
            let name = CStr::from_bytes_until_nul(name_bytes)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_else(|_| String::from_utf8_lossy(name_bytes).into_owned());
            out.push((ev.mask, name));
            pos = end;
        }
        Ok(out)
    }
}

/// A listening AF_VSOCK stream socket.
pub struct VsockListener(OwnedFd);

impl VsockListener {
    /// Binds to VMADDR_CID_ANY:`port`.
    pub fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: plain syscall.
        let fd = check(unsafe {
            libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain data.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).unwrap_or_default();
        addr.svm_cid = libc::VMADDR_CID_ANY;
        addr.svm_port = port;
        let len =
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>()).unwrap_or_default();
        // SAFETY: addr is a valid sockaddr_vm of `len` bytes.
        check(unsafe { libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) })?;
        // SAFETY: plain syscall on our fd.
        check(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
        Ok(Self(fd))
    }

    /// Accepts one connection (as a File: read/write work on any stream socket).
    pub fn accept(&self) -> io::Result<File> {
        // SAFETY: null address pointers are allowed.
        let fd = check(unsafe {
            libc::accept4(
                self.0.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        })?;
        // SAFETY: fresh fd owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

/// Blocks the signals PID 1 handles in this thread (call before spawning threads, so every
/// thread inherits the mask and only `wait_signal` receives them).
pub fn block_signals(sigs: &[i32]) -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to our set.
    unsafe { libc::sigemptyset(&mut set) };
    for s in sigs {
        // SAFETY: valid pointer to our set.
        unsafe { libc::sigaddset(&mut set, *s) };
    }
    // SAFETY: valid set pointer.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(set)
}

/// sigwait(3) on a set blocked with `block_signals`.
pub fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: valid set and out-pointer.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= req.ifr_name.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(b) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    Ok(req)
}

fn sockaddr_in(ip: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or_default(),
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is the documented way to
    // pass an IPv4 address through the sockaddr-typed ioctl fields.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Brings an interface up (IFF_UP).
pub fn if_up(name: &str) -> io::Result<()> {
    let s = inet_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS fills ifr_flags of a valid ifreq.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: reading and writing the flags member of the union just filled.
    unsafe {
        req.ifr_ifru.ifru_flags |= i16::try_from(libc::IFF_UP).unwrap_or_default();
    }
    // SAFETY: valid ifreq.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) }).map(drop)
}

/// Sets an interface's IPv4 address and netmask.
pub fn if_set_addr(
    name: &str,
    addr: std::net::Ipv4Addr,
    mask: std::net::Ipv4Addr,
) -> io::Result<()> {
    let s = inet_socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    // SAFETY: valid ifreq carrying an AF_INET address.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFADDR, &req) })?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(mask);
    // SAFETY: valid ifreq carrying an AF_INET netmask.
    check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFNETMASK, &req) }).map(drop)
}

/// Adds a default route via `gw` (EEXIST is not an error).
pub fn add_default_route(gw: std::net::Ipv4Addr) -> io::Result<()> {
    let s = inet_socket()?;
    // SAFETY: rtentry is plain data.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(gw);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: valid rtentry.
    match check(unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCADDRT, &rt) }) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r.map(drop),
    }
}

/// True if `fd` is open.
pub fn fd_valid(fd: RawFd) -> bool {
    // SAFETY: F_GETFD on any integer is harmless.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Points fds 0, 1 and 2 at `f` (used for /dev/console).
pub fn redirect_stdio(f: &File) -> io::Result<()> {
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard fds; `f` stays open across the call.
        check(unsafe { libc::dup2(f.as_raw_fd(), fd) })?;
    }
    Ok(())
}

/// Makes Ctrl-Alt-Del send SIGINT to PID 1 instead of rebooting at once.
pub fn disable_cad() -> io::Result<()> {
    // SAFETY: LINUX_REBOOT_CMD_CAD_OFF only changes the kernel's Ctrl-Alt-Del behaviour.
    check(unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_CAD_OFF) }).map(drop)
}

/// execv(2); returns only on failure.
pub fn exec(path: &str, args: &[&str]) -> io::Error {
    let Ok(p) = cstr(path) else {
        return io::Error::from_raw_os_error(libc::EINVAL);
    };
    let owned: Vec<CString> = match args.iter().map(|a| cstr(a)).collect() {
        Ok(v) => v,
        Err(e) => return e,
    };
    let mut ptrs: Vec<*const libc::c_char> = owned.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: `p` and every pointer in the NULL-terminated `ptrs` are valid C strings that
    // outlive the call.
    unsafe { libc::execv(p.as_ptr(), ptrs.as_ptr()) };
    io::Error::last_os_error()
}

fn cname(name: &std::ffi::OsStr) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// openat2(2) relative to `dir` with `resolve` flags (RESOLVE_IN_ROOT etc.); O_CLOEXEC added.
pub fn openat2(
    dir: &impl AsRawFd,
    path: &Path,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    // struct open_how from <linux/openat2.h> (libc's is non-exhaustive).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: u64::try_from(flags | libc::O_CLOEXEC)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        mode: u64::from(mode),
        resolve,
    };
    // SAFETY: `p` is a valid C string and `how` a valid open_how of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            p.as_ptr(),
            std::ptr::addr_of!(how),
            std::mem::size_of::<OpenHow>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: openat2 returned a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// openat(2) of a single name (no '/') in `dir`; O_CLOEXEC added.
pub fn openat(dir: &impl AsRawFd, name: &std::ffi::OsStr, flags: i32) -> io::Result<OwnedFd> {
    let n = cname(name)?;
    // SAFETY: valid C string; the fd is checked below.
    let fd = check(unsafe { libc::openat(dir.as_raw_fd(), n.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: openat returned a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// mkdirat(2).
pub fn mkdirat(dir: &impl AsRawFd, name: &std::ffi::OsStr, mode: u32) -> io::Result<()> {
    let n = cname(name)?;
    // SAFETY: valid C string.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), n.as_ptr(), mode) }).map(drop)
}

/// unlinkat(2); `rmdir` removes a directory.
pub fn unlinkat(dir: &impl AsRawFd, name: &std::ffi::OsStr, rmdir: bool) -> io::Result<()> {
    let n = cname(name)?;
    let flags = if rmdir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid C string.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), n.as_ptr(), flags) }).map(drop)
}

/// renameat(2).
pub fn renameat(
    from_dir: &impl AsRawFd,
    from: &std::ffi::OsStr,
    to_dir: &impl AsRawFd,
    to: &std::ffi::OsStr,
) -> io::Result<()> {
    let (f, t) = (cname(from)?, cname(to)?);
    // SAFETY: valid C strings.
    check(unsafe {
        libc::renameat(from_dir.as_raw_fd(), f.as_ptr(), to_dir.as_raw_fd(), t.as_ptr())
    })
    .map(drop)
}

/// The target of the symlink `fd` was opened on (O_PATH | O_NOFOLLOW).
pub fn readlink_fd(fd: &impl AsRawFd) -> io::Result<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: an empty path with the link's own fd reads that link; buf is writable.
    let r = unsafe {
        libc::readlinkat(fd.as_raw_fd(), c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(usize::try_from(r).unwrap_or(0));
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// A path naming an open fd (for APIs that only take paths: read_dir, inotify_add_watch).
pub fn fd_path(fd: &impl AsRawFd) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}
