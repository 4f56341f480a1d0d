//! virtio-blk (virtio 1.2 §5.2): one request queue; each request is a descriptor chain with a
//! header, data buffers and a status byte. Served synchronously on the event loop thread from
//! a grove-block layer chain ([`disk`]): reads and writes go straight between the layer files
//! and guest memory (`preadv`/`pwritev` over vm-memory volatile slices), so a request is never
//! copied through a bounce buffer.
//!
//! Requests: IN (read), OUT (write), FLUSH (fdatasync + index commit of the writable layer),
//! GET_ID (the disk id, at most 20 bytes), DISCARD and WRITE_ZEROES (whole chunks punched
//! and marked owned in the top layer, partial ones written with zeroes: both read back as
//! zeroes). A read-only disk offers `VIRTIO_BLK_F_RO` and answers writes, discards and
//! write-zeroes with `IOERR`.
//!
//! Untrusted input and its bounds: every chain is checked whole before anything is read or
//! written ([`request`]); at most [`MAX_DESCRIPTORS`] descriptors (indirect tables included),
//! [`SEG_MAX`] data segments of at most [`SIZE_MAX`] bytes, [`MAX_REQUEST_BYTES`] of data,
//! [`MAX_DISCARD_SEG`] discard segments of at most [`MAX_DISCARD_SECTORS`] sectors; sectors
//! are checked against the disk size with overflow checks; at most one queue's worth of
//! chains is served per wake-up, the rest on the next.
//!
//! Snapshots: requests are served synchronously, so when the vCPUs are paused and
//! [`VirtioDevice::process_pending`](super::VirtioDevice::process_pending) has run, nothing is
//! in flight; the disk's writable layer is then frozen into the snapshot directory and the VM
//! continues on a new one ([`disk`], docs/snapshotting.md).
//!
//! Shape: [`device`] (the device, serving requests), [`request`] (parsing), [`disk`] (the
//! layer files, snapshots, saved chain), [`event_handler`] (the event-loop subscriber),
//! [`persist`] (saved state), [`metrics`] (counters).

pub mod device;
pub mod disk;
pub mod event_handler;
pub mod metrics;
pub mod persist;
pub mod request;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments in one request (`seg_max`).
pub const SEG_MAX: u32 = 128;
/// Largest data segment (`size_max`).
pub const SIZE_MAX: u32 = 64 * 1024;
/// Most data bytes in one request: `SEG_MAX * SIZE_MAX`, what a driver that honours both can
/// send.
pub const MAX_REQUEST_BYTES: u32 = SEG_MAX * SIZE_MAX;
/// Most descriptors in one chain: the data segments plus a header and a status, each of which
/// may be split once.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 4;
/// Most segments in one discard or write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Most sectors in one discard or write-zeroes segment (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
