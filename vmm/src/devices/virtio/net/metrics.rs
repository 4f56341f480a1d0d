//! virtio-net counters (monotonic, never reset; read with [`NetMetrics::snapshot`]).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! net_metrics {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Counters of one virtio-net device.
        #[derive(Debug, Default)]
        pub struct NetMetrics {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// The counters' values at one moment.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        pub struct NetMetricsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl NetMetrics {
            /// The values now.
            pub fn snapshot(&self) -> NetMetricsSnapshot {
                NetMetricsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

net_metrics! {
    /// Frames delivered to the guest.
    rx_frames,
    /// Bytes delivered to the guest (frames, without the virtio-net header).
    rx_bytes,
    /// Frames from the tap dropped: larger than the guest's buffers (no MRG_RXBUF).
    rx_too_big,
    /// Frames from the tap dropped: a header the guest did not negotiate, or shorter than one.
    rx_bad_frames,
    /// Frames dropped because a receive chain was refused in the middle of a merged frame.
    rx_dropped,
    /// Receive chains refused (returned empty).
    rx_bad_chains,
    /// Tap read errors other than "nothing to read".
    rx_tap_errors,
    /// Times a received frame waited for the rate limiter.
    rx_throttled,
    /// Frames sent by the guest to the tap.
    tx_frames,
    /// Bytes sent (frames, without the virtio-net header).
    tx_bytes,
    /// Transmit chains refused (malformed chain or header).
    tx_bad_chains,
    /// Frames the tap refused.
    tx_tap_errors,
    /// Times a sent frame waited for the rate limiter.
    tx_throttled,
    /// Used-ring writes that failed (the queue then stops until reset).
    queue_errors,
    /// TUNSETOFFLOAD failures (the guest then gets no receive offloads).
    offload_errors,
}

impl NetMetrics {
    /// Adds `n` to `c`.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}
