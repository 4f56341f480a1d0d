//! The block-store API and its backends.
//!
//! A virtio-blk device calls a [`BlockDevice`] from its I/O thread: reads and writes
//! at sector offsets, flush, discard, write-zeroes, size, and `snapshot` (freeze the
//! current writable layer and continue on a new one). A [`BlockStore`] owns the
//! layers: it imports base images, clones writable disks over frozen chains,
//! flattens chains and collects layers that nothing refers to.
//!
//! Backends:
//! - [`layered`]: the default, a chain of sparse files with a crash-safe chunk index
//!   per writable layer, metadata in the sled [`catalog`](crate::catalog);
//! - [`dmthin`]: thin volumes and thin snapshots of a device-mapper thin pool (only
//!   where the kernel has dm-thin).
//!
//! [`conformance`] is one test suite, generic over the traits, run against every
//! backend the host can run.

pub mod conformance;
pub mod dmthin;
pub mod layered;

use std::path::Path;

/// Size of a sector, the unit of every offset in this API.
pub const SECTOR_SIZE: u64 = 512;

/// A layer, a thin volume or a disk, named by the store that made it.
pub type LayerId = u64;

/// Errors of the block store and its backends.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// An I/O call on a layer file or device failed.
    #[error("{op} failed")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The request reaches past the end of the disk or is not sector-sized.
    #[error("request out of range: sector {sector}, {len} bytes, disk of {size} bytes")]
    OutOfRange { sector: u64, len: u64, size: u64 },
    /// The request is malformed (unaligned length, zero size, bad chunk size...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The disk or filesystem is full; data written before is intact.
    #[error("no space left on the device")]
    NoSpace(#[source] std::io::Error),
    /// The layer is not known to the store.
    #[error("unknown layer {0}")]
    UnknownLayer(LayerId),
    /// The operation needs a frozen layer (or a writable one) and got the other.
    #[error("layer {0} is in the wrong state: {1}")]
    WrongState(LayerId, &'static str),
    /// An index or header file is corrupt or truncated.
    #[error("layer {layer} index {path}")]
    Index {
        layer: LayerId,
        path: String,
        #[source]
        source: layered::index::IndexError,
    },
    /// The catalog failed.
    #[error("catalog")]
    Catalog(#[from] crate::catalog::CatalogError),
    /// The device-mapper backend failed.
    #[error("device-mapper: {0}")]
    DeviceMapper(String),
    /// The backend cannot run on this host.
    #[error("unsupported here: {0}")]
    Unsupported(String),
    /// A failpoint fired (crash-consistency tests only).
    #[error("failpoint {0}")]
    Failpoint(String),
}

impl BlockError {
    /// Wraps an I/O error, mapping ENOSPC and EDQUOT to [`BlockError::NoSpace`].
    pub fn io(op: &'static str, source: std::io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => BlockError::NoSpace(source),
            _ => BlockError::Io { op, source },
        }
    }
}

/// One writable disk, as seen by a virtio-blk I/O thread.
///
/// Offsets are in sectors of [`SECTOR_SIZE`] bytes; buffer lengths are multiples of
/// it. Every method takes `&self`: reads may run concurrently with each other, with
/// writes, and with a snapshot (which waits for in-flight requests and briefly
/// holds new ones back).
pub trait BlockDevice: Send + Sync {
    /// Size of the disk in bytes (a multiple of [`SECTOR_SIZE`]).
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes starting at `sector`.
    fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError>;
    /// Writes `buf` starting at `sector`. Durable after the next [`flush`](Self::flush).
    fn write(&self, sector: u64, buf: &[u8]) -> Result<(), BlockError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), BlockError>;
    /// Discards `sectors` sectors; they read back as zeroes afterwards.
    fn discard(&self, sector: u64, sectors: u64) -> Result<(), BlockError>;
    /// Writes zeroes to `sectors` sectors without transferring a buffer.
    fn write_zeroes(&self, sector: u64, sectors: u64) -> Result<(), BlockError>;
    /// The current writable layer (or thin volume).
    fn layer(&self) -> LayerId;
    /// Freezes the current writable layer and continues on a new one over it.
    /// Returns the frozen layer, now held by the caller (release it with
    /// [`BlockStore::release`]). O(1) in the disk size.
    fn snapshot(&self) -> Result<LayerId, BlockError>;
}

/// Space used by a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Usage {
    /// Bytes allocated for layer data.
    pub used_bytes: u64,
    /// Bytes the store may use in total (filesystem or pool size).
    pub total_bytes: u64,
    /// Number of layers (or thin volumes) alive.
    pub layers: u64,
}

/// A store of layers: the owner of base images, frozen chains and writable disks.
///
/// Layers are refcounted: a layer lives while something holds it (a snapshot, a
/// template, a sandbox: [`hold`](Self::hold)/[`release`](Self::release)) or a
/// layer above it still exists. A release that leaves nothing referring to a
/// layer collects it, and then its parent if that was its last reference.
pub trait BlockStore: Send + Sync {
    /// The disk handle this backend hands out.
    type Disk: BlockDevice;

    /// Creates a frozen base layer of `size` bytes (a multiple of [`SECTOR_SIZE`]),
    /// with the contents of `image` (a raw image, shorter or equal) or zeroes.
    /// The caller holds it.
    fn create_base(&self, size: u64, image: Option<&Path>) -> Result<LayerId, BlockError>;
    /// A new writable disk over the frozen `layer` (O(1)). The caller holds it.
    fn clone_disk(&self, layer: LayerId) -> Result<Self::Disk, BlockError>;
    /// Opens an existing writable layer again (after a restart).
    fn open_disk(&self, layer: LayerId) -> Result<Self::Disk, BlockError>;
    /// Adds a hold on a layer.
    fn hold(&self, layer: LayerId) -> Result<(), BlockError>;
    /// Drops a hold; collects what nothing refers to any more. Deleting a disk is
    /// releasing its writable layer (close the handle first).
    fn release(&self, layer: LayerId) -> Result<(), BlockError>;
    /// A new frozen layer with the same contents as the frozen `layer` and a chain
    /// of depth at most 2 (itself over the base). Everything that referred to
    /// `layer` refers to the new one afterwards, and `layer` is collected if
    /// nothing else holds it.
    fn flatten(&self, layer: LayerId) -> Result<LayerId, BlockError>;
    /// The chain under `layer`, `layer` first, the base last.
    fn chain(&self, layer: LayerId) -> Result<Vec<LayerId>, BlockError>;
    /// Space used by the store.
    fn usage(&self) -> Result<Usage, BlockError>;
}

/// Validates a sector-addressed request against a disk of `size` bytes and
/// returns its byte offset.
pub fn check_range(sector: u64, len: u64, size: u64) -> Result<u64, BlockError> {
    let bad = || BlockError::OutOfRange { sector, len, size };
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(bad());
    }
    let off = sector.checked_mul(SECTOR_SIZE).ok_or_else(bad)?;
    let end = off.checked_add(len).ok_or_else(bad)?;
    if end > size {
        return Err(bad());
    }
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks_reject_overflow_and_unaligned() {
        assert_eq!(check_range(1, 512, 4096).unwrap(), 512);
        assert!(check_range(7, 1024, 4096).is_err());
        assert!(check_range(0, 100, 4096).is_err());
        assert!(check_range(u64::MAX, 512, 4096).is_err());
        assert!(check_range(u64::MAX / 512, 1024, u64::MAX).is_err());
        assert!(matches!(
            BlockError::io("x", std::io::Error::from_raw_os_error(libc::ENOSPC)),
            BlockError::NoSpace(_)
        ));
    }
}
