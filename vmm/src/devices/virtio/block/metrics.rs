//! virtio-blk counters (monotonic, never reset; read with [`BlockMetrics::snapshot`]).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Counters of one virtio-blk device.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Reads served.
    pub reads: AtomicU64,
    /// Bytes read into guest memory.
    pub read_bytes: AtomicU64,
    /// Writes served.
    pub writes: AtomicU64,
    /// Bytes written from guest memory.
    pub write_bytes: AtomicU64,
    /// Flushes served.
    pub flushes: AtomicU64,
    /// Discard and write-zeroes requests served.
    pub zeroes: AtomicU64,
    /// GET_ID requests served.
    pub get_ids: AtomicU64,
    /// Chains refused without a status (malformed) or with IOERR/UNSUPP (bad requests).
    pub bad_requests: AtomicU64,
    /// Requests the disk failed (IOERR), writes to a read-only disk included.
    pub io_errors: AtomicU64,
    /// Used-ring writes that failed (the queue then stops until reset).
    pub queue_errors: AtomicU64,
}

/// The counters' values at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BlockMetricsSnapshot {
    /// See [`BlockMetrics::reads`].
    pub reads: u64,
    /// See [`BlockMetrics::read_bytes`].
    pub read_bytes: u64,
    /// See [`BlockMetrics::writes`].
    pub writes: u64,
    /// See [`BlockMetrics::write_bytes`].
    pub write_bytes: u64,
    /// See [`BlockMetrics::flushes`].
    pub flushes: u64,
    /// See [`BlockMetrics::zeroes`].
    pub zeroes: u64,
    /// See [`BlockMetrics::get_ids`].
    pub get_ids: u64,
    /// See [`BlockMetrics::bad_requests`].
    pub bad_requests: u64,
    /// See [`BlockMetrics::io_errors`].
    pub io_errors: u64,
    /// See [`BlockMetrics::queue_errors`].
    pub queue_errors: u64,
}

impl BlockMetrics {
    /// Adds `n` to `c`.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The values now.
    pub fn snapshot(&self) -> BlockMetricsSnapshot {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockMetricsSnapshot {
            reads: v(&self.reads),
            read_bytes: v(&self.read_bytes),
            writes: v(&self.writes),
            write_bytes: v(&self.write_bytes),
            flushes: v(&self.flushes),
            zeroes: v(&self.zeroes),
            get_ids: v(&self.get_ids),
            bad_requests: v(&self.bad_requests),
            io_errors: v(&self.io_errors),
            queue_errors: v(&self.queue_errors),
        }
    }
}
