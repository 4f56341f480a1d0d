//! virtio-rng counters (monotonic, never reset; read with [`RngMetrics::snapshot`]).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Counters of one virtio-rng device.
#[derive(Debug, Default)]
pub struct RngMetrics {
    /// Requests served with bytes.
    pub requests: AtomicU64,
    /// Random bytes written into guest memory.
    pub bytes: AtomicU64,
    /// Requests refused (malformed chains).
    pub bad_requests: AtomicU64,
    /// Host entropy reads that failed.
    pub entropy_errors: AtomicU64,
    /// Used-ring writes that failed (the queue then stops until reset).
    pub queue_errors: AtomicU64,
}

/// The counters' values at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RngMetricsSnapshot {
    /// See [`RngMetrics::requests`].
    pub requests: u64,
    /// See [`RngMetrics::bytes`].
    pub bytes: u64,
    /// See [`RngMetrics::bad_requests`].
    pub bad_requests: u64,
    /// See [`RngMetrics::entropy_errors`].
    pub entropy_errors: u64,
    /// See [`RngMetrics::queue_errors`].
    pub queue_errors: u64,
}

impl RngMetrics {
    /// Adds `n` to `c`.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The values now.
    pub fn snapshot(&self) -> RngMetricsSnapshot {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RngMetricsSnapshot {
            requests: v(&self.requests),
            bytes: v(&self.bytes),
            bad_requests: v(&self.bad_requests),
            entropy_errors: v(&self.entropy_errors),
            queue_errors: v(&self.queue_errors),
        }
    }
}
