//! The block-store API and its backends.
//!
//! The I/O part lives in the `grove-block` crate (no catalog, no device-mapper: the VMM
//! links it alone) and is re-exported here: [`BlockIo`] (reads and writes at sector
//! offsets, scatter-gather over vm-memory [`VolatileSlice`]s so a virtio-blk request is
//! served without a bounce buffer, flush, discard, write-zeroes, size), the chunk
//! [`index`](layered::index) and the layer chains ([`chain`]).
//!
//! A [`BlockDevice`] is one writable disk of a store: its I/O plus `layer` and `snapshot`
//! (freeze the current writable layer and continue on a new one). A [`BlockStore`] owns the
//! layers: it imports base images, clones writable disks over frozen chains, flattens
//! chains and collects layers that nothing refers to.
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

pub use grove_block::{
    chain, check_range, check_sectors, iov, BitmapSlice, BlockError, BlockIo, LayerId,
    VolatileSlice, SECTOR_SIZE,
};

impl From<crate::catalog::CatalogError> for BlockError {
    fn from(e: crate::catalog::CatalogError) -> Self {
        BlockError::Catalog(Box::new(e))
    }
}

/// One writable disk of a store, as seen by a virtio-blk I/O thread: its I/O
/// ([`BlockIo`]) plus the layer it writes and snapshots.
///
/// Every method takes `&self`: reads may run concurrently with each other, with
/// writes, and with a snapshot (which waits for in-flight requests and briefly
/// holds new ones back).
pub trait BlockDevice: BlockIo {
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
