//! virtio-blk request parsing: a descriptor chain the guest made, checked whole before
//! anything is read from the disk or written into guest memory.
//!
//! Layout (virtio 1.2 §5.2.6; no framing is assumed, as the spec requires of devices): the
//! device-readable bytes come first and start with the 16-byte header (type, reserved,
//! sector); for OUT, DISCARD and WRITE_ZEROES the readable bytes after the header are the
//! data. The device-writable bytes follow; their last byte is the status; for IN and GET_ID
//! the writable bytes before it are the data.
//!
//! Two kinds of refusal:
//! - [`ChainError`]: the chain itself cannot be trusted (empty, looping or running past its
//!   table, a buffer outside guest memory, a readable buffer after a writable one, too many
//!   descriptors, no writable byte for the status): it is returned with used length 0 and
//!   nothing is written.
//! - [`Parsed::Refused`]: a well-formed chain with a bad request (short header, data in the
//!   wrong direction, a length that is not whole sectors, too large, sectors past the end of
//!   the disk, bad discard segments, an unknown type): its status byte gets `IOERR` or
//!   `UNSUPP`.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{
    MAX_DESCRIPTORS, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_REQUEST_BYTES, SEG_MAX, SIZE_MAX,
};
use crate::memory::GuestMemory;

/// Size of the request header.
pub const HEADER_LEN: u32 = 16;
/// Size of one discard / write-zeroes segment.
pub const DISCARD_SEG_LEN: u32 = 16;
const SECTOR: u64 = 512;

/// Why a chain is refused without a status (used length 0, nothing written).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// No descriptor (or the first one is unreadable).
    #[error("empty descriptor chain")]
    Empty,
    /// The chain loops, runs past the queue size or names a descriptor outside the table.
    #[error("descriptor chain does not end (loop, too long, or bad next index)")]
    Unterminated,
    /// More descriptors than a request may have.
    #[error("more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
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
    /// A device-readable buffer after a device-writable one.
    #[error("descriptor {0}: device-readable after a device-writable one")]
    ReadableAfterWritable(usize),
    /// No device-writable byte for the status.
    #[error("no device-writable byte for the status")]
    NoStatus,
}

/// Why a well-formed chain's request is refused (with a status byte).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// Fewer than 16 readable bytes.
    #[error("header shorter than {HEADER_LEN} bytes")]
    ShortHeader,
    /// Data buffers in the direction the type does not use.
    #[error("data buffers in the wrong direction for request type {0}")]
    WrongDirection(u32),
    /// A read or write that is not whole sectors.
    #[error("{0} data bytes: not whole sectors")]
    Unaligned(u32),
    /// Too much data or too many segments.
    #[error("request too large: {bytes} bytes in {segments} segments")]
    TooLarge {
        /// Data bytes.
        bytes: u64,
        /// Data segments.
        segments: usize,
    },
    /// Sectors past the end of the disk (or an overflowing range).
    #[error("sectors {sector}+{sectors} are past the end of the disk ({capacity} sectors)")]
    OutOfDisk {
        /// First sector.
        sector: u64,
        /// Sectors.
        sectors: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
    /// Discard / write-zeroes payload that is not whole segments, or too many of them.
    #[error("bad discard or write-zeroes payload ({0} bytes)")]
    BadSegments(u32),
    /// Discard / write-zeroes flags the device does not know.
    #[error("unsupported discard or write-zeroes flags {0:#x}")]
    BadFlags(u32),
    /// A request type the device does not serve.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl RequestError {
    /// The status byte for this refusal.
    pub fn status(&self) -> u8 {
        let s = match self {
            RequestError::Unsupported(_) | RequestError::BadFlags(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        };
        u8::try_from(s).unwrap_or(1)
    }
}

/// A guest buffer (checked to lie in guest memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length.
    pub len: u32,
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Read `sector..` into the data buffers.
    In,
    /// Write the data buffers to `sector..`.
    Out,
    /// Make completed writes durable.
    Flush,
    /// Write the disk id into the data buffers.
    GetId,
    /// Discard these (sector, sectors) ranges.
    Discard(Vec<(u64, u32)>),
    /// Write zeroes to these (sector, sectors) ranges.
    WriteZeroes(Vec<(u64, u32)>),
}

/// A checked request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What it asks for.
    pub kind: Kind,
    /// First sector (IN, OUT).
    pub sector: u64,
    /// The data buffers, in order (writable for IN and GET_ID, readable for OUT).
    pub data: Vec<Seg>,
    /// Their total length.
    pub data_len: u32,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// A parsed chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A request to serve.
    Ok(Request),
    /// A request to refuse: its status byte goes at `status`.
    Refused {
        /// Where the status byte goes.
        status: GuestAddress,
        /// Why.
        why: RequestError,
    },
}

/// Byte range `from..` of `segs` (a suffix, in order).
fn skip(segs: &[Seg], mut from: u32) -> Vec<Seg> {
    let mut out = Vec::new();
    for s in segs {
        if from >= s.len {
            from -= s.len;
            continue;
        }
        out.push(Seg { addr: GuestAddress(s.addr.0 + u64::from(from)), len: s.len - from });
        from = 0;
    }
    out
}

/// The first `len` bytes of `segs` (a prefix, in order).
fn take(segs: &[Seg], mut len: u32) -> Vec<Seg> {
    let mut out = Vec::new();
    for s in segs {
        if len == 0 {
            break;
        }
        let n = s.len.min(len);
        out.push(Seg { addr: s.addr, len: n });
        len -= n;
    }
    out
}

/// Reads `buf.len()` bytes from the start of `segs`.
fn gather(mem: &GuestMemory, segs: &[Seg], buf: &mut [u8]) -> bool {
    let mut at = 0;
    for s in segs {
        if at == buf.len() {
            break;
        }
        let n = (s.len as usize).min(buf.len() - at);
        if mem.read_slice(&mut buf[at..at + n], s.addr).is_err() {
            return false;
        }
        at += n;
    }
    at == buf.len()
}

fn total(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

fn sectors_fit(sector: u64, sectors: u64, capacity: u64) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfDisk { sector, sectors, capacity }),
    }
}

/// Checks a chain and the request in it, against a disk of `capacity` sectors.
pub fn parse_request<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
    capacity: u64,
) -> Result<Parsed, ChainError>
where
    M: Deref<Target = GuestMemory>,
{
    let mut readable: Vec<Seg> = Vec::new();
    let mut writable: Vec<Seg> = Vec::new();
    let mut last_has_next = false;
    let mut count = 0usize;
    for (index, d) in chain.enumerate() {
        count = index + 1;
        if count > MAX_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        last_has_next = d.has_next();
        let (addr, len) = (d.addr(), d.len());
        if addr.0.checked_add(u64::from(len)).is_none()
            || !GuestMemoryBackend::check_range(mem, addr, len as usize)
        {
            return Err(ChainError::OutOfRange { index, addr: addr.0, len });
        }
        if d.is_write_only() {
            if len > 0 {
                writable.push(Seg { addr, len });
            }
        } else if !writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable(index));
        } else if len > 0 {
            readable.push(Seg { addr, len });
        }
    }
    if count == 0 {
        return Err(ChainError::Empty);
    }
    // virtio-queue's iterator stops silently at a loop (after the queue size), a next index
    // outside the table, or an unreadable descriptor: the last one still says "next".
    if last_has_next {
        return Err(ChainError::Unterminated);
    }
    let Some(last) = writable.last() else { return Err(ChainError::NoStatus) };
    let status = GuestAddress(last.addr.0 + u64::from(last.len) - 1);
    let w_total = total(&writable) - 1;
    let writable_data = take(&writable, u32::try_from(w_total).unwrap_or(u32::MAX));
    let refused = |why| Ok(Parsed::Refused { status, why });

    let mut hdr = [0u8; HEADER_LEN as usize];
    if total(&readable) < u64::from(HEADER_LEN) || !gather(mem, &readable, &mut hdr) {
        return refused(RequestError::ShortHeader);
    }
    let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut s8 = [0u8; 8];
    s8.copy_from_slice(&hdr[8..16]);
    let sector = u64::from_le_bytes(s8);
    let readable_data = skip(&readable, HEADER_LEN);
    let (r_len, w_len) = (total(&readable_data), w_total);

    let (data, len) = match ty {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID if r_len > 0 => {
            return refused(RequestError::WrongDirection(ty))
        }
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => (writable_data, w_len),
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if w_len > 0 => {
            return refused(RequestError::WrongDirection(ty))
        }
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            (readable_data, r_len)
        }
        VIRTIO_BLK_T_FLUSH if r_len > 0 || w_len > 0 => {
            return refused(RequestError::WrongDirection(ty))
        }
        VIRTIO_BLK_T_FLUSH => (Vec::new(), 0),
        other => return refused(RequestError::Unsupported(other)),
    };
    if len > u64::from(MAX_REQUEST_BYTES)
        || data.len() > SEG_MAX as usize
        || data.iter().any(|s| s.len > SIZE_MAX)
    {
        return refused(RequestError::TooLarge { bytes: len, segments: data.len() });
    }
    let data_len = u32::try_from(len).unwrap_or(u32::MAX);
    let kind = match ty {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            if !len.is_multiple_of(SECTOR) {
                return refused(RequestError::Unaligned(data_len));
            }
            if let Err(e) = sectors_fit(sector, len / SECTOR, capacity) {
                return refused(e);
            }
            if ty == VIRTIO_BLK_T_IN {
                Kind::In
            } else {
                Kind::Out
            }
        }
        VIRTIO_BLK_T_FLUSH => Kind::Flush,
        VIRTIO_BLK_T_GET_ID => Kind::GetId,
        _ => {
            let n = data_len / DISCARD_SEG_LEN;
            if data_len % DISCARD_SEG_LEN != 0 || n == 0 || n > MAX_DISCARD_SEG {
                return refused(RequestError::BadSegments(data_len));
            }
            let mut raw = vec![0u8; data_len as usize];
            if !gather(mem, &data, &mut raw) {
                return refused(RequestError::BadSegments(data_len));
            }
            let allowed =
                if ty == VIRTIO_BLK_T_DISCARD { 0 } else { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP };
            let mut ranges = Vec::with_capacity(n as usize);
            for r in raw.chunks_exact(DISCARD_SEG_LEN as usize) {
                let mut s8 = [0u8; 8];
                s8.copy_from_slice(&r[..8]);
                let start = u64::from_le_bytes(s8);
                let num = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
                let flags = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
                if flags & !allowed != 0 {
                    return refused(RequestError::BadFlags(flags));
                }
                if num > MAX_DISCARD_SECTORS {
                    return refused(RequestError::TooLarge {
                        bytes: u64::from(num) * SECTOR,
                        segments: 1,
                    });
                }
                if let Err(e) = sectors_fit(start, u64::from(num), capacity) {
                    return refused(e);
                }
                ranges.push((start, num));
            }
            if ty == VIRTIO_BLK_T_DISCARD {
                Kind::Discard(ranges)
            } else {
                Kind::WriteZeroes(ranges)
            }
        }
    };
    let data =
        if matches!(kind, Kind::Discard(_) | Kind::WriteZeroes(_)) { Vec::new() } else { data };
    Ok(Parsed::Ok(Request { kind, sector, data, data_len, status }))
}
