//! virtio-vsock (virtio 1.2 §5.10), served in userspace (no vhost-vsock on these hosts) with
//! Firecracker's hybrid unix-socket convention on the host side:
//!
//! - **Host to guest**: a host program connects to the VM's socket (`--vsock-uds PATH`),
//!   writes `CONNECT <port>\n` and reads `OK <host port>\n` once the guest accepted on
//!   `<port>`; from then on the stream is the connection. A refused connection (no listener
//!   in the guest, the connection limit, a malformed line, the driver not ready) is closed
//!   without an `OK`.
//! - **Guest to host**: a guest connection to host (cid 2) port `P` reaches the unix socket
//!   `PATH_P` (non-blocking connect; refused with a RST when nothing listens there).
//!
//! Queues: receive (0, device to guest), transmit (1), event (2: the transport-reset event a
//! restored device sends, after which the guest drops its connections and re-reads its cid).
//!
//! Untrusted input and its bounds: every transmit chain is parsed and every header field
//! checked ([`packet`]); a malformed packet gets a RST (and ends its connection) when it names
//! a guest source, and is dropped otherwise. Per connection, guest-to-host data waits in at
//! most [`CONN_BUF`] bytes (the credit the device advertises: more is a protocol violation and
//! gets a RST) and host-to-guest data is read only as far as the guest's credit, at most
//! [`STAGE_LEN`] at a time. At most [`MAX_CONNECTIONS`] connections and
//! [`MAX_HANDSHAKES`] host streams still sending their `CONNECT` line exist at once; RSTs
//! for unknown connections wait in at most [`MAX_ORPHAN_RSTS`] slots (beyond that they are
//! dropped: the guest's own timeouts end those connections). One wake-up serves at most one
//! queue's worth of chains and [`EVENTS_PER_WAKE`] host events: the event loop is never held
//! by a flooding guest or a busy host peer. Host sockets are non-blocking, so a host peer
//! that never reads stalls only its own connection. Timeouts: [`HANDSHAKE_TIMEOUT`] for the
//! `CONNECT` line, [`CONNECT_TIMEOUT`] for the guest's answer, [`CLOSE_TIMEOUT`] for a
//! closing connection, [`LINGER_TIMEOUT`] for one whose host peer is gone. Data a guest sends
//! to a host peer that is gone is dropped and not credited: the guest stops when its credit
//! is spent, and learns of the end from the SHUTDOWN that follows.
//!
//! Snapshots: connections are not saved. A VM restored from a snapshot sends the guest a
//! transport-reset event (its connected sockets get ECONNRESET, listeners stay), and host
//! programs connect again. The VM that was snapshotted keeps its connections: the pause
//! finishes the queued work and stops nothing else.
//!
//! Shape: [`device`] (the device), [`packet`] (header and chain parsing),
//! [`connection`] (one connection's state and credit), [`backend`] (the unix sockets),
//! [`event_handler`] (the event-loop subscriber), [`persist`] (saved state), [`metrics`].

use std::time::Duration;

pub mod backend;
pub mod connection;
pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod packet;
pub mod persist;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indexes.
pub const RX_QUEUE: usize = 0;
/// Transmit queue.
pub const TX_QUEUE: usize = 1;
/// Event queue.
pub const EVENT_QUEUE: usize = 2;
/// Number of queues.
pub const NUM_QUEUES: usize = 3;

/// Buffer space advertised per connection (`buf_alloc`): the most guest-to-host data the
/// device holds for one connection.
pub const CONN_BUF: u32 = 256 * 1024;
/// Free space (in bytes) after which a credit update is sent unasked.
pub const CREDIT_THRESHOLD: u32 = 64 * 1024;
/// Most host-to-guest bytes read ahead per connection.
pub const STAGE_LEN: usize = 64 * 1024;
/// Most connections at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Most accepted host streams that have not finished their `CONNECT` line.
pub const MAX_HANDSHAKES: usize = 32;
/// Longest `CONNECT <port>\n` line.
pub const MAX_CONNECT_LINE: usize = 32;
/// Most RSTs for unknown connections waiting for a receive buffer.
pub const MAX_ORPHAN_RSTS: usize = 256;
/// Most host events handled per wake-up.
pub const EVENTS_PER_WAKE: usize = 256;
/// First host port handed to host-initiated connections.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How long a host stream has to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest has to answer a host-initiated connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection may take to flush or to get the guest's RST.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection whose host peer is gone may take to hand the guest the host's
/// last bytes.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(10);
/// The transport-reset event id (virtio 1.2 §5.10.6.5).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Lowest context id a guest may have (0-2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;
/// Highest context id a guest may have (Linux keeps cids in 32 bits; `u32::MAX` is
/// VMADDR_CID_ANY).
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

#[cfg(test)]
pub(crate) mod test_utils;
#[cfg(test)]
mod tests;
