//! The host side of a virtio-net device: a [`Backend`] that moves one frame (with its 12-byte
//! virtio-net header) per read or write. [`Tap`] is the real one: a tap opened with
//! `IFF_VNET_HDR` (normally a netd slot's persistent `tap0`, opened inside the slot's network
//! namespace from a short-lived thread that `setns`es there, so the VMM itself may live
//! anywhere). [`SocketBackend`] is a unix datagram socket pair end, for tests and fuzzing.
//!
//! The only `unsafe` of the device: the tun ioctls and `setns`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::VNET_HDR_LEN;

/// `IFF_TAP`.
const IFF_TAP: i16 = 0x0002;
/// `IFF_NO_PI`.
const IFF_NO_PI: i16 = 0x1000;
/// `IFF_VNET_HDR`.
const IFF_VNET_HDR: i16 = 0x4000;
/// `IFF_MULTI_QUEUE`.
const IFF_MULTI_QUEUE: i16 = 0x0100;
/// `IFF_UP` (interface flags).
pub const IFF_UP: i16 = 0x1;
/// `IFF_RUNNING` (interface flags).
pub const IFF_RUNNING: i16 = 0x40;

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;

/// `TUN_F_CSUM`: the reader takes frames with partial checksums.
pub const TUN_F_CSUM: u32 = 0x01;
/// `TUN_F_TSO4`.
pub const TUN_F_TSO4: u32 = 0x02;
/// `TUN_F_TSO6`.
pub const TUN_F_TSO6: u32 = 0x04;
/// `TUN_F_TSO_ECN`.
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// A name the kernel would refuse.
    #[error("tap name {0:?} is invalid (1-15 bytes, no '/', ':', whitespace or NUL)")]
    BadName(String),
    /// The network namespace cannot be opened or entered.
    #[error("network namespace {path}")]
    Netns {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An operation on the tap failed.
    #[error("{what} on tap {name}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The tap.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The thread that opens the tap in its namespace could not run.
    #[error("cannot run the thread that opens tap {0} in its namespace")]
    Thread(String),
}

/// Checks a tap name as the kernel does (`dev_valid_name`), also refusing ':'.
pub fn check_name(name: &str) -> Result<(), TapError> {
    let b = name.as_bytes();
    if b.is_empty()
        || b.len() > 15
        || name == "."
        || name == ".."
        || b.iter().any(|&c| c == b'/' || c == b':' || c == 0 || c.is_ascii_whitespace())
    {
        return Err(TapError::BadName(name.to_string()));
    }
    Ok(())
}

/// What a virtio-net device reads frames from and writes frames to.
pub trait Backend: Send {
    /// The descriptor the event loop waits on (readable: a frame for the guest).
    fn fd(&self) -> RawFd;
    /// Reads one frame with its virtio-net header; `WouldBlock` when there is none.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Writes one frame with its virtio-net header.
    fn send(&mut self, buf: &[u8]) -> std::io::Result<usize>;
    /// Sets the offloads frames to the guest may use (`TUN_F_*`).
    fn set_offload(&mut self, tun_flags: u32) -> std::io::Result<()>;
    /// Whether the link is operational (frames sent to it are delivered).
    fn is_running(&self) -> std::io::Result<bool>;
    /// For messages.
    fn describe(&self) -> String;
}

/// `struct ifreq` as the tun and interface-flag ioctls use it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: i16) -> Self {
        let mut r = Self { name: [0; 16], flags, _pad: [0; 22] };
        let n = name.len().min(15);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }
}

/// A tap queue opened with `IFF_VNET_HDR`, non-blocking, with a socket in the tap's namespace
/// for reading its interface flags.
#[derive(Debug)]
pub struct Tap {
    file: File,
    ctl: OwnedFd,
    name: String,
    netns: Option<PathBuf>,
}

impl Tap {
    /// Opens (attaches a queue to) the tap `name` in the network namespace at `netns` (the
    /// caller's when `None`). A tap that does not exist is created (transient: it goes away
    /// with this VMM); a tap built with `IFF_MULTI_QUEUE` gets one queue.
    pub fn open(name: &str, netns: Option<&Path>) -> Result<Self, TapError> {
        check_name(name)?;
        let Some(path) = netns else { return Self::open_here(name, None) };
        let path = path.to_path_buf();
        let n = name.to_string();
        std::thread::Builder::new()
            .name("tap-open".into())
            .spawn(move || {
                let netns_err = |source| TapError::Netns { path: path.clone(), source };
                let ns = File::open(&path).map_err(netns_err)?;
                // SAFETY: `ns` is an open file for the whole call; CLONE_NEWNET moves only this
                // short-lived thread into that namespace (network namespaces are per thread).
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(netns_err(std::io::Error::last_os_error()));
                }
                Self::open_here(&n, Some(path.clone()))
            })
            .map_err(|_| TapError::Thread(name.to_string()))?
            .join()
            .map_err(|_| TapError::Thread(name.to_string()))?
    }

    fn io(&self, what: &'static str) -> TapError {
        TapError::Io { what, name: self.name.clone(), source: std::io::Error::last_os_error() }
    }

    /// Opens the tap in the calling thread's namespace.
    fn open_here(name: &str, netns: Option<PathBuf>) -> Result<Self, TapError> {
        let err = |what, source| TapError::Io { what, name: name.to_string(), source };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| err("open /dev/net/tun", e))?;
        // SAFETY: socket(2) takes no pointers; the descriptor it returns is owned here.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(err("socket", std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let ctl = unsafe { OwnedFd::from_raw_fd(fd) };
        let tap = Self { file, ctl, name: name.to_string(), netns };
        let base = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if let Err(first) = tap.set_iff(base) {
            // A multi-queue tap (netd's multi_queue_tap) only takes multi-queue attachments.
            if first.raw_os_error() != Some(libc::EINVAL)
                || tap.set_iff(base | IFF_MULTI_QUEUE).is_err()
            {
                return Err(err("TUNSETIFF", first));
            }
        }
        let hdr = libc::c_int::try_from(VNET_HDR_LEN).unwrap_or(12);
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, which points at `hdr`;
        // `file` is an attached tun descriptor.
        if unsafe { libc::ioctl(tap.file.as_raw_fd(), TUNSETVNETHDRSZ, &raw const hdr) } < 0 {
            return Err(tap.io("TUNSETVNETHDRSZ"));
        }
        let mut tap = tap;
        tap.set_offload(0).map_err(|e| err("TUNSETOFFLOAD", e))?;
        Ok(tap)
    }

    fn set_iff(&self, flags: i16) -> std::io::Result<()> {
        let mut req = IfReq::new(&self.name, flags);
        // SAFETY: TUNSETIFF reads (and may write back the name of) a struct ifreq, which `req`
        // is laid out as (40 bytes: name, then flags); `file` is an open /dev/net/tun.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETIFF, &raw mut req) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The interface flags (`IFF_*`).
    pub fn flags(&self) -> Result<i16, TapError> {
        let mut req = IfReq::new(&self.name, 0);
        // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into a struct ifreq,
        // which `req` is laid out as; `ctl` is an open socket.
        if unsafe { libc::ioctl(self.ctl.as_raw_fd(), SIOCGIFFLAGS, &raw mut req) } < 0 {
            return Err(self.io("SIOCGIFFLAGS"));
        }
        Ok(req.flags)
    }

    /// Sets the interface up (netd does this for its slots; for tests and transient taps).
    pub fn set_up(&self) -> Result<(), TapError> {
        let flags = self.flags()?;
        let mut req = IfReq::new(&self.name, flags | IFF_UP);
        // SAFETY: SIOCSIFFLAGS reads a struct ifreq (name and flags), laid out as `req`;
        // `ctl` is an open socket.
        if unsafe { libc::ioctl(self.ctl.as_raw_fd(), SIOCSIFFLAGS, &raw mut req) } < 0 {
            return Err(self.io("SIOCSIFFLAGS"));
        }
        Ok(())
    }

    /// Waits until the tap is operationally up (`IFF_RUNNING`): after a queue attaches, the
    /// kernel's link watch turns the carrier on asynchronously, and frames sent to the tap
    /// before that are dropped. Returns whether it came up within `timeout`.
    pub fn wait_running(&self, timeout: Duration) -> Result<bool, TapError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.flags()? & IFF_RUNNING != 0 {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// The tap's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Backend for Tap {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    fn send(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(buf)
    }

    fn set_offload(&mut self, tun_flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its unsigned int argument by value; `file` is an
        // attached tun descriptor.
        let rc = unsafe {
            libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(tun_flags))
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn is_running(&self) -> std::io::Result<bool> {
        self.flags().map(|f| f & IFF_RUNNING != 0).map_err(|e| match e {
            TapError::Io { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        })
    }

    fn describe(&self) -> String {
        match &self.netns {
            Some(ns) => format!("tap {} in {}", self.name, ns.display()),
            None => format!("tap {}", self.name),
        }
    }
}

/// One end of a unix datagram socket pair standing in for a tap (tests, fuzzing): one
/// datagram per frame, header included, as a tap with `IFF_VNET_HDR` does.
#[derive(Debug)]
pub struct SocketBackend {
    sock: UnixDatagram,
    offload: Arc<AtomicU32>,
}

impl SocketBackend {
    /// A backend and the peer end (non-blocking both).
    pub fn pair() -> std::io::Result<(Self, UnixDatagram)> {
        let (a, b) = UnixDatagram::pair()?;
        a.set_nonblocking(true)?;
        b.set_nonblocking(true)?;
        Ok((Self { sock: a, offload: Arc::default() }, b))
    }

    /// The last offload flags set (what a tap would have been told), readable after the
    /// backend moved into a device.
    pub fn offload(&self) -> Arc<AtomicU32> {
        self.offload.clone()
    }
}

impl Backend for SocketBackend {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.recv(buf)
    }

    fn send(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sock.send(buf)
    }

    fn set_offload(&mut self, tun_flags: u32) -> std::io::Result<()> {
        self.offload.store(tun_flags, Ordering::SeqCst);
        Ok(())
    }

    fn is_running(&self) -> std::io::Result<bool> {
        Ok(true)
    }

    fn describe(&self) -> String {
        "socket pair".into()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["tap0", "a", "gs12-tap_x", "012345678901234"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "0123456789012345", "a/b", "a b", "a:1", ".", "..", "a\0"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    /// Runs `f` on a thread in a fresh network namespace of its own (gone when the thread and
    /// every descriptor made there are), or says why it cannot.
    pub(crate) fn in_private_netns<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        std::thread::spawn(move || {
            // SAFETY: unshare(2) takes no pointers; CLONE_NEWNET affects only this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "unshare(CLONE_NEWNET): {} (needs root)",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| "the namespace thread panicked".to_string())?
    }

    /// Skips (returns true) only where GROVE_ALLOW_SKIP allows it; otherwise a test that
    /// cannot run fails with its reason.
    pub(crate) fn cannot_run(why: &str) -> bool {
        let allowed = std::env::var("GROVE_ALLOW_SKIP").unwrap_or_default();
        if allowed.split(',').any(|s| s == "net" || s == "all") {
            eprintln!("skipped (GROVE_ALLOW_SKIP): {why}");
            return true;
        }
        panic!("{why} (set GROVE_ALLOW_SKIP=net to skip)");
    }

    #[test]
    fn a_transient_tap_opens_and_comes_up_in_its_namespace() {
        if !Path::new("/dev/net/tun").exists() && cannot_run("no /dev/net/tun") {
            return;
        }
        let r = in_private_netns(|| {
            let tap = Tap::open("gvtest0", None).expect("tap opens");
            assert_eq!(tap.flags().unwrap() & IFF_UP, 0, "a new tap is down");
            assert!(!tap.wait_running(Duration::from_millis(1)).unwrap());
            tap.set_up().unwrap();
            assert!(tap.wait_running(Duration::from_secs(5)).unwrap(), "running once up");
            let mut t = tap;
            t.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6).unwrap();
            t.set_offload(0).unwrap();
            let mut buf = [0u8; 64];
            // Nothing queued: a non-blocking read says so.
            let e = t.recv(&mut buf).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
            assert!(t.describe().contains("gvtest0"));
        });
        if let Err(why) = r {
            cannot_run(&why);
        }
    }

    #[test]
    fn a_missing_namespace_is_a_clear_error() {
        let e = Tap::open("t0", Some(Path::new("/run/netns/grove-no-such-ns"))).unwrap_err();
        assert!(matches!(e, TapError::Netns { .. }), "{e}");
        assert!(e.to_string().contains("grove-no-such-ns"));
        assert!(matches!(Tap::open("a/b", None), Err(TapError::BadName(_))));
    }
}
