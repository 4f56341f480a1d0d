//! virtio-rng (virtio 1.2 §5.4): one request queue; each request is a chain of
//! device-writable buffers that the device fills with bytes from the host's `getrandom(2)`.
//!
//! Untrusted input and its bounds: a chain with a device-readable buffer, a buffer outside
//! guest memory, a chain that loops or runs past the queue size, or a broken next index is
//! refused whole (used length 0, nothing written); a chain asking for more than
//! [`MAX_REQUEST_BYTES`] gets that many (the spec lets the device write fewer bytes); at most
//! one queue's worth of chains is served per wake-up, the rest on the next.
//!
//! Shape: [`device`] (the device and its request parsing), [`event_handler`] (the event-loop
//! subscriber), [`persist`] (saved state), [`metrics`] (counters).

pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod persist;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes one request gets.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;
