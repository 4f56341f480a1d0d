//! Grove's block layers, without a catalog.
//!
//! - [`BlockIo`]: the I/O a virtio-blk device needs from a disk: reads and writes at
//!   sector offsets, scatter-gather ([`BlockIo::read_vectored`], [`BlockIo::write_vectored`]:
//!   the guest's buffers as vm-memory [`VolatileSlice`]s, so a request is served straight
//!   into and out of guest memory with no bounce buffer), flush, discard, write-zeroes.
//! - [`index`]: the crash-safe chunk index of a layer (which chunks it owns).
//! - [`chain`]: a disk as a chain of layer files: an optional writable top layer over frozen
//!   layers over a base image ([`chain::ChainDisk`]), copy-up on first write, freezing the
//!   top and continuing on a new one.
//! - [`iov`]: the scatter-gather helpers (`preadv`/`pwritev` over volatile slices).
//!
//! grove-storage builds its stores on this crate (the layered store adds the sled catalog,
//! spare layers, refcounts and flatten; the dm-thin store adds device-mapper) and
//! re-exports it as `grove_storage::block`. The VMM links this crate alone: no sled,
//! device-mapper or bindgen.

pub mod chain;
pub mod file;
pub mod index;
pub mod iov;

pub use vm_memory::bitmap::BitmapSlice;
pub use vm_memory::VolatileSlice;

/// Size of a sector, the unit of every offset in this API.
pub const SECTOR_SIZE: u64 = 512;

/// A layer, a thin volume or a disk, named by the store that made it.
pub type LayerId = u64;

/// Errors of the block layer and of the stores built on it.
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
    /// A write to a disk without a writable layer.
    #[error("the disk is read-only")]
    ReadOnly,
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
        source: index::IndexError,
    },
    /// The catalog of a store failed (grove-storage converts its `CatalogError`).
    #[error("catalog")]
    Catalog(#[source] Box<dyn std::error::Error + Send + Sync>),
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

/// The I/O of one disk, as a virtio-blk device (or any other reader and writer) sees it.
///
/// Offsets are in sectors of [`SECTOR_SIZE`] bytes; buffer lengths are multiples of it.
/// Every method takes `&self`: reads may run concurrently with each other and with writes.
///
/// The vectored calls take the request's buffers as volatile slices (guest memory while
/// the guest runs): a read fills them with `preadv` straight from the layer files and
/// marks the bytes it wrote dirty in each slice's bitmap (so pages a device fills on the
/// guest's behalf reach the next memory snapshot); a write sends them with `pwritev`. The
/// only copy is the merge of a partial first write to a chunk with its old contents.
pub trait BlockIo: Send + Sync {
    /// Size of the disk in bytes (a multiple of [`SECTOR_SIZE`]).
    fn size(&self) -> u64;
    /// Reads into `bufs`, in order, starting at `sector` (their total length is the
    /// request's length).
    fn read_vectored<B: BitmapSlice>(
        &self,
        sector: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> Result<(), BlockError>;
    /// Writes `bufs`, in order, starting at `sector`. Durable after the next
    /// [`flush`](Self::flush).
    fn write_vectored<B: BitmapSlice>(
        &self,
        sector: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> Result<(), BlockError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), BlockError>;
    /// Discards `sectors` sectors; they read back as zeroes afterwards.
    fn discard(&self, sector: u64, sectors: u64) -> Result<(), BlockError>;
    /// Writes zeroes to `sectors` sectors without transferring a buffer.
    fn write_zeroes(&self, sector: u64, sectors: u64) -> Result<(), BlockError>;

    /// Reads `buf.len()` bytes starting at `sector`.
    fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.read_vectored(sector, &[VolatileSlice::from(buf)])
    }

    /// Writes `buf` starting at `sector`. Durable after the next [`flush`](Self::flush).
    fn write(&self, sector: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.write_vectored(sector, &[iov::read_only_slice(buf)])
    }
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

/// Validates a request of `sectors` sectors (discard, write-zeroes) and returns its byte
/// offset and length.
pub fn check_sectors(sector: u64, sectors: u64, size: u64) -> Result<(u64, u64), BlockError> {
    let len = sectors.checked_mul(SECTOR_SIZE).ok_or(BlockError::OutOfRange {
        sector,
        len: u64::MAX,
        size,
    })?;
    Ok((check_range(sector, len, size)?, len))
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
        assert_eq!(check_sectors(2, 3, 4096).unwrap(), (1024, 1536));
        assert!(check_sectors(0, u64::MAX / 2, u64::MAX).is_err());
        assert!(check_sectors(7, 2, 4096).is_err());
        assert!(matches!(
            BlockError::io("x", std::io::Error::from_raw_os_error(libc::ENOSPC)),
            BlockError::NoSpace(_)
        ));
    }
}
