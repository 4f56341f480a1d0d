//! Tap devices: the persistent tap a slot prepares for its VMM, and [`TapPeer`],
//! a raw-frame endpoint on a tap that stands in for the guest in tests and
//! benchmarks (what the VMM's virtio-net does, without the vnet header).
//!
//! Tap devices cannot be created through rtnetlink (the kernel refuses
//! `IFLA_INFO_KIND` "tun"), hence the `TUNSETIFF` ioctl here, the only `unsafe`
//! of the crate besides the BPF syscall wrapper.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

/// `IFF_TAP`: an Ethernet device.
pub const IFF_TAP: i16 = 0x0002;
/// `IFF_NO_PI`: no packet-information prefix on reads and writes.
pub const IFF_NO_PI: i16 = 0x1000;
/// `IFF_VNET_HDR`: a `virtio_net_hdr` before every frame (offloads).
pub const IFF_VNET_HDR: i16 = 0x4000;
/// `IFF_MULTI_QUEUE`: one queue per open file.
pub const IFF_MULTI_QUEUE: i16 = 0x0100;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

/// Errors of tap operations.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} is invalid (1-15 bytes)")]
    BadName(String),
    #[error("{what} on tap {name}")]
    Io {
        what: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF reads it: the name then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

fn tun_set_iff(file: &File, name: &str, flags: i16) -> Result<(), TapError> {
    if name.is_empty() || name.len() > 15 || name.as_bytes().contains(&0) {
        return Err(TapError::BadName(name.to_string()));
    }
    let mut req = IfReq { name: [0; 16], flags, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads (and may write back the name of) a struct ifreq,
    // which `req` is laid out as (40 bytes, name then flags); `file` is an open
    // /dev/net/tun descriptor for the whole call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, std::ptr::from_mut(&mut req)) };
    if rc < 0 {
        return Err(TapError::Io {
            what: "TUNSETIFF",
            name: name.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn open_tun(name: &str) -> Result<File, TapError> {
    OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(|source| TapError::Io {
        what: "open /dev/net/tun",
        name: name.to_string(),
        source,
    })
}

/// Creates a persistent tap named `name` in the calling thread's namespace
/// (call it inside [`crate::netns::run_in`]). It outlives this call, with no
/// queue attached until a VMM opens it.
pub fn create_persistent(name: &str, multi_queue: bool) -> Result<(), TapError> {
    let file = open_tun(name)?;
    let mut flags = IFF_TAP | IFF_NO_PI;
    if multi_queue {
        flags |= IFF_MULTI_QUEUE;
    }
    tun_set_iff(&file, name, flags)?;
    // SAFETY: TUNSETPERSIST takes an integer argument by value; `file` is an
    // open /dev/net/tun descriptor attached to the tap above.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(TapError::Io {
            what: "TUNSETPERSIST",
            name: name.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const IFF_RUNNING: i16 = 0x40;

/// Waits until `name` (in the calling thread's namespace) is operationally up
/// (`IFF_RUNNING`): after a queue attaches, the kernel's link watch turns the
/// carrier on and restores the qdisc asynchronously, and frames sent to the
/// tap before that are dropped. Returns whether it came up within `timeout`.
pub fn wait_running(name: &str, timeout: std::time::Duration) -> Result<bool, TapError> {
    if name.is_empty() || name.len() > 15 {
        return Err(TapError::BadName(name.to_string()));
    }
    let io = |what, source| TapError::Io { what, name: name.to_string(), source };
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| io("socket", e))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut req = IfReq { name: [0; 16], flags: 0, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into a
        // struct ifreq, which `req` is laid out as; `sock` is an open socket.
        let rc =
            unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFFLAGS, std::ptr::from_mut(&mut req)) };
        if rc < 0 {
            return Err(io("SIOCGIFFLAGS", std::io::Error::last_os_error()));
        }
        if req.flags & IFF_RUNNING != 0 {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A raw Ethernet endpoint on a tap: frames written here enter the slot as if
/// the guest sent them; frames the slot sends to the guest are read here.
#[derive(Debug)]
pub struct TapPeer {
    file: File,
    name: String,
}

impl TapPeer {
    /// Attaches to the existing tap `name` in the calling thread's namespace
    /// (call it inside [`crate::netns::run_in`]); the returned peer can be used
    /// from any thread.
    pub fn attach(name: &str, multi_queue: bool) -> Result<Self, TapError> {
        let file = open_tun(name)?;
        let mut flags = IFF_TAP | IFF_NO_PI;
        if multi_queue {
            flags |= IFF_MULTI_QUEUE;
        }
        tun_set_iff(&file, name, flags)?;
        Ok(Self { file, name: name.to_string() })
    }

    /// Sends one frame.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), TapError> {
        self.file.write_all(frame).map_err(|source| TapError::Io {
            what: "write",
            name: self.name.clone(),
            source,
        })
    }

    /// Receives one frame, waiting at most `timeout`; `None` on timeout.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>, TapError> {
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let mut fds = [nix::poll::PollFd::new(self.file.as_fd(), nix::poll::PollFlags::POLLIN)];
        let ready = nix::poll::poll(
            &mut fds,
            nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX),
        )
        .map_err(|e| TapError::Io {
            what: "poll",
            name: self.name.clone(),
            source: e.into(),
        })?;
        if ready == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; 65536];
        let n = self.file.read(&mut buf).map_err(|source| TapError::Io {
            what: "read",
            name: self.name.clone(),
            source,
        })?;
        buf.truncate(n);
        Ok(Some(buf))
    }

    /// Receives frames until one satisfies `want` or `timeout` passes.
    pub fn recv_matching(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&[u8]) -> bool,
    ) -> Result<Option<Vec<u8>>, TapError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.recv(left)? {
                Some(f) if want(&f) => return Ok(Some(f)),
                Some(_) => {}
                None => return Ok(None),
            }
        }
    }
}
