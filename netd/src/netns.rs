//! Named network namespaces, compatible with `ip netns` (a bind mount of the
//! namespace under `/run/netns/<name>`), and running code inside one.
//!
//! A network namespace is per thread: [`run_in`] runs a closure on a short-lived
//! thread that has entered the namespace, so the caller's threads (tokio workers
//! included) never change namespace. Sockets and netlink connections created there
//! stay bound to that namespace after the thread ends.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Where `ip netns` keeps its namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Errors of namespace operations.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace name {0:?} is invalid (1-64 chars of [A-Za-z0-9_.-])")]
    BadName(String),
    #[error("network namespace {0} already exists")]
    Exists(String),
    #[error("{what} for network namespace {name}")]
    Sys {
        what: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the thread running in network namespace {0} panicked")]
    ThreadPanicked(String),
}

fn sys<'a>(what: &'static str, name: &'a str) -> impl FnOnce(nix::Error) -> NetnsError + 'a {
    move |e| NetnsError::Sys { what, name: name.to_string(), source: e.into() }
}

fn io<'a>(what: &'static str, name: &'a str) -> impl FnOnce(std::io::Error) -> NetnsError + 'a {
    move |source| NetnsError::Sys { what, name: name.to_string(), source }
}

/// Path of the named namespace's bind mount.
pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

fn check_name(name: &str) -> Result<(), NetnsError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(NetnsError::BadName(name.to_string()))
    }
}

/// Makes `/run/netns` a shared mount point, as `ip netns add` does, so the
/// namespace mounts propagate to other mount namespaces.
fn prepare_run_dir() -> Result<(), NetnsError> {
    let dir = Path::new(NETNS_RUN_DIR);
    std::fs::create_dir_all(dir).map_err(io("create /run/netns", ""))?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    if mount(None::<&str>, dir, Some("none"), shared, None::<&str>).is_ok() {
        return Ok(());
    }
    mount(Some(dir), dir, Some("none"), MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
        .map_err(sys("bind-mount /run/netns on itself", ""))?;
    mount(None::<&str>, dir, Some("none"), shared, None::<&str>)
        .map_err(sys("make /run/netns shared", ""))
}

/// Creates the named namespace (fails if it exists).
pub fn create(name: &str) -> Result<(), NetnsError> {
    check_name(name)?;
    prepare_run_dir()?;
    let path = path_of(name);
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(NetnsError::Exists(name.to_string()))
        }
        Err(e) => return Err(io("create the mount point", name)(e)),
    }
    let owned = name.to_string();
    let made = std::thread::spawn(move || -> Result<(), NetnsError> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(sys("unshare(CLONE_NEWNET)", &owned))?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &path_of(&owned),
            Some("none"),
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys("bind-mount the namespace", &owned))
    })
    .join()
    .map_err(|_| NetnsError::ThreadPanicked(name.to_string()))?;
    if made.is_err() {
        let _ = std::fs::remove_file(path_of(name));
    }
    made
}

/// Deletes the named namespace: unmounts and removes its file. The kernel frees
/// the namespace (and the devices left in it) once nothing else holds it.
/// Deleting a namespace that does not exist is not an error.
pub fn delete(name: &str) -> Result<(), NetnsError> {
    check_name(name)?;
    let path = path_of(name);
    if !path.exists() {
        return Ok(());
    }
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL | nix::Error::ENOENT) => {}
        Err(e) => return Err(sys("unmount", name)(e)),
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove the mount point", name)(e)),
    }
}

/// Whether the named namespace exists (its mount point is a namespace file).
pub fn exists(name: &str) -> bool {
    open(name).is_ok()
}

/// Names in `/run/netns` that start with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_RUN_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Opens the named namespace, checking it is one (an unmounted leftover file is not).
pub fn open(name: &str) -> Result<OwnedFd, NetnsError> {
    check_name(name)?;
    let file = File::open(path_of(name)).map_err(io("open", name))?;
    let st = nix::sys::statfs::fstatfs(&file).map_err(sys("statfs", name))?;
    // NSFS_MAGIC: a bind-mounted namespace; a plain file here is a leftover.
    if st.filesystem_type().0 != 0x6e73_6673 {
        return Err(NetnsError::Sys {
            what: "check (not a mounted namespace)",
            name: name.to_string(),
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        });
    }
    Ok(file.into())
}

/// A namespace to run code in: a named one, or the process's own one at the
/// time the handle was made.
#[derive(Debug)]
pub struct NsHandle {
    label: String,
    fd: OwnedFd,
}

impl NsHandle {
    /// The named namespace.
    pub fn named(name: &str) -> Result<Self, NetnsError> {
        Ok(Self { label: name.to_string(), fd: open(name)? })
    }

    /// The namespace the calling thread is in now.
    pub fn current() -> Result<Self, NetnsError> {
        let f = File::open("/proc/thread-self/ns/net").map_err(io("open", "(current)"))?;
        Ok(Self { label: "(current)".to_string(), fd: f.into() })
    }

    /// The label given at creation (a name, or "(current)").
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The namespace fd, for netlink attributes that take one.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }

    /// Runs `f` on a thread inside this namespace and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        run_in(self.fd.as_fd(), &self.label, f)
    }
}

/// Runs `f` on a scoped thread that first enters the namespace `fd`.
pub fn run_in<T: Send>(
    fd: std::os::fd::BorrowedFd<'_>,
    label: &str,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NetnsError> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T, NetnsError> {
            setns(fd, CloneFlags::CLONE_NEWNET).map_err(sys("setns", label))?;
            Ok(f())
        })
        .join()
        .map_err(|_| NetnsError::ThreadPanicked(label.to_string()))?
    })
}

/// Writes a sysctl under `/proc/sys/net/...` as seen from the calling thread's
/// namespace (call it inside [`run_in`]).
pub fn write_net_sysctl(key: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(Path::new("/proc/sys/net").join(key), value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("gv12").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(matches!(check_name(bad), Err(NetnsError::BadName(_))), "{bad:?}");
        }
    }
}
