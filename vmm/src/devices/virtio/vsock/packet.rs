//! virtio-vsock packets (virtio 1.2 §5.10.6): the 44-byte header, its validation, and the
//! descriptor chains that carry packets in both directions.
//!
//! Everything here reads guest-controlled data: a transmit chain's descriptors, the header
//! they hold, and the payload length it claims. [`parse_tx`] checks the chain (device-readable
//! buffers inside guest memory, a chain that ends, enough bytes for a header) and
//! [`TxPacket::check`] every header field and the payload length, before the device acts on
//! a packet.
//! Both are what the `vsock_packet` fuzz target drives.

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemory;

/// Header length.
pub const HDR_LEN: usize = 44;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// Largest payload of one packet, in either direction (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// Socket type: stream (the only one offered; SEQPACKET is a feature the device does not
/// offer).
pub const TYPE_STREAM: u16 = 1;

/// Operations.
pub mod op {
    /// Connect.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (refused, or ended abruptly).
    pub const RST: u16 = 3;
    /// The sender will not receive and/or send any more (`flags`).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's buffer space (`buf_alloc`, `fwd_cnt`).
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// The packet header (little endian on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation ([`op`]).
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has taken out of its receive buffer so far (wrapping).
    pub fwd_cnt: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl Header {
    /// Decodes the wire form.
    #[must_use]
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        Self {
            src_cid: le64(b, 0),
            dst_cid: le64(b, 8),
            src_port: le32(b, 16),
            dst_port: le32(b, 20),
            len: le32(b, 24),
            type_: le16(b, 28),
            op: le16(b, 30),
            flags: le32(b, 32),
            buf_alloc: le32(b, 36),
            fwd_cnt: le32(b, 40),
        }
    }

    /// The wire form.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The reply to this packet's sender with `op` (addresses swapped, no payload).
    #[must_use]
    pub fn reply(&self, op: u16) -> Self {
        Self {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

/// Why a packet (or a receive buffer) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The chain has no descriptor (or its first is unreadable).
    #[error("empty descriptor chain")]
    Empty,
    /// A transmit chain with a device-writable buffer, or a receive chain with a
    /// device-readable one.
    #[error("descriptor {0} has the wrong direction")]
    Direction(usize),
    /// A buffer outside guest memory.
    #[error("descriptor {index}: {addr:#x}+{len} is not guest memory")]
    OutOfRange {
        /// Position in the chain.
        index: usize,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The chain loops, runs past the queue size or names a descriptor outside the table.
    #[error("descriptor chain does not end")]
    Unterminated,
    /// Fewer bytes than a header.
    #[error("{0} bytes: shorter than the {HDR_LEN}-byte header")]
    Short(u64),
    /// The header claims more payload than [`MAX_PAYLOAD`].
    #[error("payload length {0} over {MAX_PAYLOAD}")]
    TooLong(u32),
    /// The header claims more payload than the chain carries.
    #[error("payload length {len} but the chain carries {have} bytes after the header")]
    Truncated {
        /// Claimed.
        len: u32,
        /// Carried.
        have: u64,
    },
    /// Not a stream packet.
    #[error("socket type {0} (only stream, 1)")]
    Type(u16),
    /// An unknown operation.
    #[error("operation {0}")]
    Op(u16),
    /// Payload on a packet other than RW.
    #[error("operation {op} with {len} payload bytes")]
    PayloadOnControl {
        /// Operation.
        op: u16,
        /// Payload length.
        len: u32,
    },
    /// Flags on an operation that takes none, or unknown SHUTDOWN flags.
    #[error("operation {op} with flags {flags:#x}")]
    Flags {
        /// Operation.
        op: u16,
        /// Flags.
        flags: u32,
    },
    /// The source is not the guest's context id (dropped without a reply).
    #[error("source cid {0} is not the guest's")]
    SrcCid(u64),
    /// The destination is not the host.
    #[error("destination cid {0} is not the host (2)")]
    DstCid(u64),
}

impl PacketError {
    /// Whether the sender gets a RST for this packet: header errors of a packet whose source
    /// is the guest. Chain errors (no readable header) and foreign sources get nothing.
    #[must_use]
    pub fn answer_with_rst(&self) -> bool {
        matches!(
            self,
            Self::Type(_)
                | Self::Op(_)
                | Self::PayloadOnControl { .. }
                | Self::Flags { .. }
                | Self::DstCid(_)
                | Self::TooLong(_)
                | Self::Truncated { .. }
        )
    }
}

/// A guest buffer: address and length, checked to lie inside guest memory.
pub type Segment = (GuestAddress, u32);

/// Collects a chain's buffers, all of one direction, each inside guest memory, and checks
/// that the chain ends.
fn segments<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
    writable: bool,
) -> Result<Vec<Segment>, PacketError>
where
    M: std::ops::Deref<Target = GuestMemory>,
{
    let mut out = Vec::new();
    let mut open_end = false;
    for (index, d) in chain.enumerate() {
        open_end = d.has_next();
        if d.is_write_only() != writable {
            return Err(PacketError::Direction(index));
        }
        let (addr, len) = (d.addr(), d.len());
        let inside = addr.0.checked_add(u64::from(len)).is_some()
            && GuestMemoryBackend::check_range(mem, addr, len as usize);
        if !inside {
            return Err(PacketError::OutOfRange { index, addr: addr.0, len });
        }
        if len > 0 {
            out.push((addr, len));
        }
    }
    // virtio-queue's iterator stops silently at a loop (after the queue size), a next index
    // outside the table or an unreadable descriptor: the last one then still says "next".
    if open_end {
        return Err(PacketError::Unterminated);
    }
    if out.is_empty() {
        return Err(PacketError::Empty);
    }
    Ok(out)
}

/// Total bytes of `segs`.
fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|&(_, n)| u64::from(n)).sum()
}

/// The sub-segments of `segs` covering bytes `from..from+len` (which must lie inside).
fn slice_segments(segs: &[Segment], mut from: u64, mut len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for &(addr, n) in segs {
        let n64 = u64::from(n);
        if from >= n64 {
            from -= n64;
            continue;
        }
        if len == 0 {
            break;
        }
        let take = (n64 - from).min(len);
        // take <= n, a u32.
        out.push((GuestAddress(addr.0 + from), u32::try_from(take).unwrap_or(u32::MAX)));
        len -= take;
        from = 0;
    }
    out
}

/// Copies bytes `from..from+buf.len()` of `segs` into `buf`.
fn read_segments(mem: &GuestMemory, segs: &[Segment], from: u64, buf: &mut [u8]) -> bool {
    let mut at = 0usize;
    for (addr, n) in slice_segments(segs, from, buf.len() as u64) {
        let n = n as usize;
        if mem.read_slice(&mut buf[at..at + n], addr).is_err() {
            return false;
        }
        at += n;
    }
    at == buf.len()
}

/// Copies `data` into bytes `from..from+data.len()` of `segs` (which must lie inside).
fn write_segments(mem: &GuestMemory, segs: &[Segment], from: u64, data: &[u8]) -> bool {
    let mut at = 0usize;
    for (addr, n) in slice_segments(segs, from, data.len() as u64) {
        let n = n as usize;
        // The write marks the pages dirty for the next diff snapshot.
        if mem.write_slice(&data[at..at + n], addr).is_err() {
            return false;
        }
        at += n;
    }
    at == data.len()
}

/// A packet the guest transmitted: its header and the bytes after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    /// The header (not yet checked: see [`TxPacket::check`]).
    pub hdr: Header,
    /// The buffers after the header (the payload is the first `hdr.len` bytes).
    pub body: Vec<Segment>,
}

impl TxPacket {
    /// Checks the header ([`check_header`]) and that the chain carries the payload it claims.
    pub fn check(&self, guest_cid: u64) -> Result<(), PacketError> {
        check_header(&self.hdr, guest_cid)?;
        let have = total(&self.body);
        if u64::from(self.hdr.len) > have {
            return Err(PacketError::Truncated { len: self.hdr.len, have });
        }
        Ok(())
    }

    /// Copies the payload (checked by [`TxPacket::check`]) into `out`, resized to `hdr.len`.
    pub fn read_payload(&self, mem: &GuestMemory, out: &mut Vec<u8>) -> bool {
        out.resize(self.hdr.len as usize, 0);
        read_segments(mem, &self.body, 0, out)
    }
}

/// Parses a transmit chain: device-readable buffers inside guest memory, a chain that ends,
/// and at least a header (which may be split across buffers, and share one with the
/// payload). The header's fields are checked by [`TxPacket::check`].
pub fn parse_tx<M>(mem: &GuestMemory, chain: DescriptorChain<M>) -> Result<TxPacket, PacketError>
where
    M: std::ops::Deref<Target = GuestMemory>,
{
    let segs = segments(mem, chain, false)?;
    let have = total(&segs);
    if have < HDR_LEN as u64 {
        return Err(PacketError::Short(have));
    }
    let mut raw = [0u8; HDR_LEN];
    if !read_segments(mem, &segs, 0, &mut raw) {
        return Err(PacketError::Short(have));
    }
    let body = slice_segments(&segs, HDR_LEN as u64, have - HDR_LEN as u64);
    Ok(TxPacket { hdr: Header::from_bytes(&raw), body })
}

/// Checks every header field of a packet from the guest whose context id is `guest_cid`.
pub fn check_header(h: &Header, guest_cid: u64) -> Result<(), PacketError> {
    if h.src_cid != guest_cid {
        return Err(PacketError::SrcCid(h.src_cid));
    }
    if h.dst_cid != HOST_CID {
        return Err(PacketError::DstCid(h.dst_cid));
    }
    if h.type_ != TYPE_STREAM {
        return Err(PacketError::Type(h.type_));
    }
    if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&h.op) {
        return Err(PacketError::Op(h.op));
    }
    if h.op != op::RW && h.len != 0 {
        return Err(PacketError::PayloadOnControl { op: h.op, len: h.len });
    }
    if h.len > MAX_PAYLOAD {
        return Err(PacketError::TooLong(h.len));
    }
    let flags_ok = match h.op {
        op::SHUTDOWN => h.flags != 0 && h.flags & !SHUTDOWN_BOTH == 0,
        _ => h.flags == 0,
    };
    if !flags_ok {
        return Err(PacketError::Flags { op: h.op, flags: h.flags });
    }
    Ok(())
}

/// A receive buffer the guest made available: device-writable buffers of at least a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxBuffer {
    segs: Vec<Segment>,
    total: u64,
}

impl RxBuffer {
    /// Checks a receive chain.
    pub fn parse<M>(mem: &GuestMemory, chain: DescriptorChain<M>) -> Result<Self, PacketError>
    where
        M: std::ops::Deref<Target = GuestMemory>,
    {
        let segs = segments(mem, chain, true)?;
        let total = total(&segs);
        if total < HDR_LEN as u64 {
            return Err(PacketError::Short(total));
        }
        Ok(Self { segs, total })
    }

    /// Payload bytes that fit after the header (at most [`MAX_PAYLOAD`]).
    #[must_use]
    pub fn room(&self) -> usize {
        let r = (self.total - HDR_LEN as u64).min(u64::from(MAX_PAYLOAD));
        usize::try_from(r).unwrap_or(0)
    }

    /// Writes `hdr` (its `len` set to `payload.len()`) and the payload; returns the bytes
    /// written (the used length). `payload` must fit ([`RxBuffer::room`]).
    pub fn write(&self, mem: &GuestMemory, hdr: &Header, payload: &[u8]) -> Option<u32> {
        if payload.len() > self.room() {
            return None;
        }
        let hdr = Header { len: u32::try_from(payload.len()).ok()?, ..*hdr };
        // The payload first, then the header: a driver that looks at the header sees a
        // complete packet either way (it reads nothing before the used ring says so).
        if !write_segments(mem, &self.segs, HDR_LEN as u64, payload)
            || !write_segments(mem, &self.segs, 0, &hdr.to_bytes())
        {
            return None;
        }
        u32::try_from(HDR_LEN + payload.len()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr() -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 1024,
            len: 0,
            type_: TYPE_STREAM,
            op: op::REQUEST,
            flags: 0,
            buf_alloc: 262_144,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_little_endian() {
        let h = Header { len: 5, op: op::RW, src_cid: 0x0102_0304_0506_0708, ..hdr() };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[30..32], &[5, 0], "op at offset 30");
        assert_eq!(Header::from_bytes(&b), h);
        let r = h.reply(op::RST);
        assert_eq!(
            (r.src_cid, r.dst_cid, r.src_port, r.dst_port),
            (HOST_CID, h.src_cid, 1024, 1234)
        );
        assert_eq!((r.op, r.len, r.type_), (op::RST, 0, TYPE_STREAM));
    }

    #[test]
    fn every_field_is_checked() {
        assert_eq!(check_header(&hdr(), 3), Ok(()));
        assert_eq!(check_header(&hdr(), 4), Err(PacketError::SrcCid(3)));
        assert_eq!(check_header(&Header { dst_cid: 3, ..hdr() }, 3), Err(PacketError::DstCid(3)));
        assert_eq!(check_header(&Header { type_: 2, ..hdr() }, 3), Err(PacketError::Type(2)));
        for bad in [0, 8, 0xffff] {
            assert_eq!(check_header(&Header { op: bad, ..hdr() }, 3), Err(PacketError::Op(bad)));
        }
        assert!(matches!(
            check_header(&Header { len: 1, ..hdr() }, 3),
            Err(PacketError::PayloadOnControl { .. })
        ));
        assert_eq!(check_header(&Header { op: op::RW, len: 1, ..hdr() }, 3), Ok(()));
        assert_eq!(
            check_header(&Header { op: op::RW, len: MAX_PAYLOAD + 1, ..hdr() }, 3),
            Err(PacketError::TooLong(MAX_PAYLOAD + 1))
        );
        let sd = |flags| Header { op: op::SHUTDOWN, flags, ..hdr() };
        assert_eq!(check_header(&sd(SHUTDOWN_BOTH), 3), Ok(()));
        assert!(check_header(&sd(0), 3).is_err(), "a shutdown of nothing");
        assert!(check_header(&sd(4), 3).is_err(), "unknown shutdown flag");
        assert!(check_header(&Header { flags: 1, ..hdr() }, 3).is_err(), "flags on a request");
        assert!(PacketError::Op(9).answer_with_rst());
        assert!(!PacketError::SrcCid(9).answer_with_rst());
        assert!(!PacketError::Unterminated.answer_with_rst());
    }
}
