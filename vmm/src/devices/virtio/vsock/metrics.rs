//! virtio-vsock counters (monotonic, never reset; read with [`VsockMetrics::snapshot`]).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Counters of one virtio-vsock device.
        #[derive(Debug, Default)]
        pub struct VsockMetrics {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// The counters' values at one moment.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        pub struct VsockMetricsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl VsockMetrics {
            /// The values now.
            pub fn snapshot(&self) -> VsockMetricsSnapshot {
                VsockMetricsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Packets the guest transmitted that were well formed.
    tx_packets,
    /// Payload bytes the guest transmitted.
    tx_bytes,
    /// Packets put into the guest's receive buffers.
    rx_packets,
    /// Payload bytes put into the guest's receive buffers.
    rx_bytes,
    /// Transmit chains or headers refused (malformed).
    malformed,
    /// Receive buffers refused (malformed chains: returned unused).
    bad_rx_buffers,
    /// RSTs sent to the guest.
    rsts_sent,
    /// RSTs for unknown connections dropped because their queue was full.
    rsts_dropped,
    /// Connections the host opened (CONNECT accepted by the guest).
    host_connections,
    /// Connections the guest opened to a host socket.
    guest_connections,
    /// Connections refused: no host listener, the guest's RST, the limit, a bad CONNECT line.
    refused,
    /// Connections ended by a protocol violation of the guest (credit, state).
    violations,
    /// Connections or handshakes that timed out.
    timeouts,
    /// Connections ended (any way).
    closed,
    /// Transport-reset events delivered.
    resets,
    /// Used-ring writes that failed (the queue then stops until reset).
    queue_errors,
}

impl VsockMetrics {
    /// Adds `n` to `c`.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one to `c`.
    pub fn inc(c: &AtomicU64) {
        Self::add(c, 1);
    }
}
