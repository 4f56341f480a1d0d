//! The data directory: every path agentd writes, relative to one root so the directory can
//! move (records name files relative to it, snapshot state files name layers relative to
//! their own directory).
//!
//! ```text
//! DATA/catalog/            sled catalog (templates, snapshots, layers, sandboxes, ops)
//! DATA/layers/             block-store layer files (L<id>.data, L<id>.idx)
//! DATA/templates/NAME/     kernel (and initrd) copied at registration
//! DATA/snapshots/ID/       vmstate + NNNN.mlayer memory layers of snapshot ID
//! DATA/vmm/VID/            one VMM: api.sock, serial.log, vmm.log, pid, vsock.sock (agent)
//! ```

use std::path::{Path, PathBuf};

/// Longest Unix socket path (sun_path is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Paths under the data directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout under `root` (absolute).
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The sled catalog.
    pub fn catalog(&self) -> PathBuf {
        self.root.join("catalog")
    }
    /// Block-store layer files.
    pub fn layers(&self) -> PathBuf {
        self.root.join("layers")
    }
    /// All templates' files.
    pub fn templates(&self) -> PathBuf {
        self.root.join("templates")
    }
    /// One template's files.
    pub fn template(&self, name: &str) -> PathBuf {
        self.templates().join(name)
    }
    /// All snapshot directories.
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }
    /// One snapshot's directory.
    pub fn snapshot(&self, id: u64) -> PathBuf {
        self.snapshots().join(id.to_string())
    }
    /// The relative name of snapshot `id`'s directory (in op records).
    pub fn snapshot_rel(id: u64) -> String {
        format!("snapshots/{id}")
    }
    /// All VMM directories.
    pub fn vmms(&self) -> PathBuf {
        self.root.join("vmm")
    }
    /// One VMM's directory.
    pub fn vmm(&self, vid: &str) -> PathBuf {
        self.vmms().join(vid)
    }
    /// A VMM's control socket.
    pub fn vmm_sock(&self, vid: &str) -> PathBuf {
        self.vmm(vid).join("api.sock")
    }
    /// A VMM's vsock socket (guests with an agent): `CONNECT 1024` reaches guest-init.
    pub fn vmm_vsock(&self, vid: &str) -> PathBuf {
        self.vmm(vid).join("vsock.sock")
    }
    /// A VMM's guest serial output.
    pub fn vmm_serial(&self, vid: &str) -> PathBuf {
        self.vmm(vid).join("serial.log")
    }
    /// A VMM's stderr (its log and its last error line).
    pub fn vmm_log(&self, vid: &str) -> PathBuf {
        self.vmm(vid).join("vmm.log")
    }
    /// A VMM's pid, written by agentd when it spawns it.
    pub fn vmm_pid(&self, vid: &str) -> PathBuf {
        self.vmm(vid).join("pid")
    }

    /// Creates the directories.
    pub fn create(&self) -> std::io::Result<()> {
        for d in [self.layers(), self.templates(), self.snapshots(), self.vmms()] {
            std::fs::create_dir_all(d)?;
        }
        Ok(())
    }

    /// Whether VMM sockets fit in `sun_path` under this root.
    pub fn check_socket_room(&self) -> Result<(), String> {
        // The vsock socket's per-port listeners (`vsock.sock_PORT`) are the longest.
        let longest =
            PathBuf::from(format!("{}_4294967295", self.vmm_vsock("v0123456789abcdef").display()));
        let n = longest.as_os_str().len();
        if n > MAX_SOCKET_PATH {
            return Err(format!(
                "data directory {} is too long: VMM sockets under it would be {n} bytes (at most {MAX_SOCKET_PATH})",
                self.root.display()
            ));
        }
        Ok(())
    }
}
