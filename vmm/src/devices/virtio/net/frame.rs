//! What virtio-net parses from the guest: the virtio-net header ([`VnetHeader`]) and the
//! descriptor chains of both queues. Everything here is guest-controlled and checked before
//! use; the parsers are fuzzed (`vmm/fuzz`, target `virtio_net`).

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{MAX_BUFFER_LEN, VNET_HDR_LEN};
use crate::memory::GuestMemory;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at csum_start + csum_offset is to be filled in.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum was checked (device to driver only).
pub const F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP`.
pub const GSO_UDP: u8 = 3;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_ECN` (a flag on the GSO type).
pub const GSO_ECN: u8 = 0x80;
/// Ethernet header length: a frame is at least this long.
pub const ETH_HLEN: usize = 14;

fn bit(f: u32) -> u64 {
    1u64 << f
}

/// The virtio-net header (`virtio_net_hdr_v1`, 12 bytes, little-endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHeader {
    /// `F_*` flags.
    pub flags: u8,
    /// `GSO_*` type (with [`GSO_ECN`]).
    pub gso_type: u8,
    /// Length of the headers (a hint).
    pub hdr_len: u16,
    /// MSS of a GSO packet.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where, after csum_start, the checksum goes.
    pub csum_offset: u16,
    /// Buffers a received frame spans (MRG_RXBUF; 1 otherwise).
    pub num_buffers: u16,
}

impl VnetHeader {
    /// Reads a header from the first [`VNET_HDR_LEN`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            num_buffers: u(10),
        })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `b` (which must be that long).
    pub fn write(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in [
            (2, self.hdr_len),
            (4, self.gso_size),
            (6, self.csum_start),
            (8, self.csum_offset),
            (10, self.num_buffers),
        ] {
            b[i..i + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Why a chain or a header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The chain has no buffer.
    #[error("empty descriptor chain")]
    Empty,
    /// A transmit buffer the device may write: transmit buffers are device-readable.
    #[error("transmit descriptor {0} is device-writable")]
    WriteOnly(usize),
    /// A receive buffer the device may only read.
    #[error("receive descriptor {0} is device-readable")]
    ReadOnly(usize),
    /// A buffer outside guest memory.
    #[error("descriptor {index}: {addr:#x}+{len} is not guest memory")]
    OutOfRange {
        /// Position in the chain.
        index: usize,
        /// Address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The chain loops, runs past the queue size or names a descriptor outside the table.
    #[error("descriptor chain does not end (loop, too long, or bad next index)")]
    Unterminated,
    /// More than a header and the largest frame.
    #[error("transmit chain longer than {MAX_BUFFER_LEN} bytes")]
    TooLong,
    /// Less than a header and an Ethernet header.
    #[error("transmit chain of {0} bytes: shorter than the virtio-net and Ethernet headers")]
    Short(usize),
    /// Flags other than NEEDS_CSUM from the driver.
    #[error("header flags {0:#x}: only NEEDS_CSUM may be set by the driver")]
    Flags(u8),
    /// NEEDS_CSUM without the CSUM feature.
    #[error("NEEDS_CSUM without VIRTIO_NET_F_CSUM")]
    CsumNotNegotiated,
    /// A checksum position outside the frame.
    #[error("checksum at {start}+{offset} outside a {len}-byte frame")]
    CsumOutside {
        /// csum_start.
        start: u16,
        /// csum_offset.
        offset: u16,
        /// Frame length.
        len: usize,
    },
    /// A GSO type that does not exist or was not negotiated.
    #[error("GSO type {0:#x} not negotiated")]
    Gso(u8),
    /// A GSO packet without NEEDS_CSUM or with a zero segment size.
    #[error("GSO packet without NEEDS_CSUM or with gso_size 0")]
    GsoIncomplete,
    /// A header length beyond the frame.
    #[error("hdr_len {hdr_len} beyond a {len}-byte frame")]
    HdrLen {
        /// hdr_len.
        hdr_len: u16,
        /// Frame length.
        len: usize,
    },
}

/// Checks the header of a frame (`frame_len` bytes after the header) the guest sends, against
/// the negotiated `features` (virtio 1.2 §5.1.6.2 and what the kernel's tap accepts).
pub fn check_tx_header(h: &VnetHeader, frame_len: usize, features: u64) -> Result<(), FrameError> {
    if h.flags & !F_NEEDS_CSUM != 0 {
        return Err(FrameError::Flags(h.flags));
    }
    let csum = h.flags & F_NEEDS_CSUM != 0;
    if csum {
        if features & bit(VIRTIO_NET_F_CSUM) == 0 {
            return Err(FrameError::CsumNotNegotiated);
        }
        let end = usize::from(h.csum_start) + usize::from(h.csum_offset) + 2;
        if end > frame_len {
            return Err(FrameError::CsumOutside {
                start: h.csum_start,
                offset: h.csum_offset,
                len: frame_len,
            });
        }
    }
    if h.gso_type != GSO_NONE {
        let need = match h.gso_type & !GSO_ECN {
            GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
            GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
            _ => return Err(FrameError::Gso(h.gso_type)),
        };
        let ecn_ok = h.gso_type & GSO_ECN == 0 || features & bit(VIRTIO_NET_F_HOST_ECN) != 0;
        if features & bit(need) == 0 || !ecn_ok {
            return Err(FrameError::Gso(h.gso_type));
        }
        if !csum || h.gso_size == 0 {
            return Err(FrameError::GsoIncomplete);
        }
    }
    if usize::from(h.hdr_len) > frame_len {
        return Err(FrameError::HdrLen { hdr_len: h.hdr_len, len: frame_len });
    }
    Ok(())
}

/// Makes the header of a frame from the tap fit what the guest accepted: without GUEST_CSUM
/// no flags (the kernel delivered a complete checksum, as the tap was not told otherwise); a
/// GSO type must be one the guest accepted (the tap is only told those, so anything else is
/// a host bug and the frame is dropped).
pub fn fix_rx_header(h: &mut VnetHeader, features: u64) -> Result<(), FrameError> {
    if features & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
        h.flags = 0;
    }
    h.flags &= F_NEEDS_CSUM | F_DATA_VALID;
    if h.gso_type != GSO_NONE {
        let need = match h.gso_type & !GSO_ECN {
            GSO_TCPV4 => VIRTIO_NET_F_GUEST_TSO4,
            GSO_TCPV6 => VIRTIO_NET_F_GUEST_TSO6,
            _ => return Err(FrameError::Gso(h.gso_type)),
        };
        let ecn_ok = h.gso_type & GSO_ECN == 0 || features & bit(VIRTIO_NET_F_GUEST_ECN) != 0;
        if features & bit(need) == 0 || !ecn_ok {
            return Err(FrameError::Gso(h.gso_type));
        }
    }
    Ok(())
}

fn in_memory(
    mem: &GuestMemory,
    index: usize,
    addr: GuestAddress,
    len: u32,
) -> Result<(), FrameError> {
    let end = addr.0.checked_add(u64::from(len));
    if end.is_none() || !GuestMemoryBackend::check_range(mem, addr, len as usize) {
        return Err(FrameError::OutOfRange { index, addr: addr.0, len });
    }
    Ok(())
}

/// Gathers a transmit chain (header and frame, device-readable buffers) into `buf`, which is
/// at least [`MAX_BUFFER_LEN`] long; returns the length. The whole chain is checked; nothing
/// is sent from a refused one. The header is checked by [`check_tx_header`] separately.
pub fn read_tx_chain<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
    buf: &mut [u8],
) -> Result<usize, FrameError>
where
    M: std::ops::Deref<Target = GuestMemory>,
{
    let mut total = 0usize;
    let mut count = 0usize;
    let mut last_has_next = false;
    for (index, d) in chain.enumerate() {
        count = index + 1;
        last_has_next = d.has_next();
        if d.is_write_only() {
            return Err(FrameError::WriteOnly(index));
        }
        let len = d.len();
        in_memory(mem, index, d.addr(), len)?;
        let end = total + len as usize;
        if end > MAX_BUFFER_LEN || end > buf.len() {
            return Err(FrameError::TooLong);
        }
        mem.read_slice(&mut buf[total..end], d.addr()).map_err(|_| FrameError::OutOfRange {
            index,
            addr: d.addr().0,
            len,
        })?;
        total = end;
    }
    if count == 0 {
        return Err(FrameError::Empty);
    }
    // virtio-queue's iterator stops silently at a loop, a bad next index or an unreadable
    // descriptor: the last one it gave still says "next".
    if last_has_next {
        return Err(FrameError::Unterminated);
    }
    if total < VNET_HDR_LEN + ETH_HLEN {
        return Err(FrameError::Short(total));
    }
    Ok(total)
}

/// Checks a receive chain (device-writable buffers inside guest memory, terminated) and
/// appends its buffers to `out`; returns their total length (capped at [`MAX_BUFFER_LEN`]:
/// more is never written). On error `out` may hold part of the chain: the caller truncates.
pub fn parse_rx_chain<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
    out: &mut Vec<(GuestAddress, u32)>,
) -> Result<usize, FrameError>
where
    M: std::ops::Deref<Target = GuestMemory>,
{
    let mut total = 0usize;
    let mut count = 0usize;
    let mut last_has_next = false;
    for (index, d) in chain.enumerate() {
        count = index + 1;
        last_has_next = d.has_next();
        if !d.is_write_only() {
            return Err(FrameError::ReadOnly(index));
        }
        let len = d.len();
        in_memory(mem, index, d.addr(), len)?;
        let room = MAX_BUFFER_LEN - total;
        let take = (len as usize).min(room);
        if take > 0 {
            out.push((d.addr(), u32::try_from(take).unwrap_or(0)));
            total += take;
        }
    }
    if count == 0 {
        return Err(FrameError::Empty);
    }
    if last_has_next {
        return Err(FrameError::Unterminated);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_TX: u64 = (1 << VIRTIO_NET_F_CSUM)
        | (1 << VIRTIO_NET_F_HOST_TSO4)
        | (1 << VIRTIO_NET_F_HOST_TSO6)
        | (1 << VIRTIO_NET_F_HOST_ECN);

    #[test]
    fn a_header_round_trips_through_bytes() {
        let h = VnetHeader {
            flags: 1,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let mut b = [0u8; VNET_HDR_LEN];
        h.write(&mut b);
        assert_eq!(b, [1, 1, 54, 0, 0xa8, 5, 34, 0, 16, 0, 3, 0]);
        assert_eq!(VnetHeader::parse(&b), Some(h));
        assert_eq!(VnetHeader::parse(&b[..11]), None);
    }

    #[test]
    fn transmit_headers_must_stay_within_what_was_negotiated() {
        let ok = VnetHeader::default();
        check_tx_header(&ok, 60, 0).unwrap();
        let csum = VnetHeader { flags: F_NEEDS_CSUM, csum_start: 34, csum_offset: 6, ..ok };
        check_tx_header(&csum, 60, ALL_TX).unwrap();
        assert_eq!(check_tx_header(&csum, 60, 0), Err(FrameError::CsumNotNegotiated));
        assert!(matches!(check_tx_header(&csum, 41, ALL_TX), Err(FrameError::CsumOutside { .. })));
        check_tx_header(&csum, 42, ALL_TX).unwrap();
        let max = VnetHeader { csum_start: u16::MAX, csum_offset: u16::MAX, ..csum };
        check_tx_header(&max, 140_000, ALL_TX).unwrap();
        assert!(check_tx_header(&max, 60, ALL_TX).is_err(), "no overflow");
        assert_eq!(
            check_tx_header(&VnetHeader { flags: 2, ..ok }, 60, ALL_TX),
            Err(FrameError::Flags(2))
        );
        let tso = VnetHeader { gso_type: GSO_TCPV4, gso_size: 1448, hdr_len: 54, ..csum };
        check_tx_header(&tso, 65_000, ALL_TX).unwrap();
        assert_eq!(
            check_tx_header(&tso, 65_000, ALL_TX & !(1 << VIRTIO_NET_F_HOST_TSO4)),
            Err(FrameError::Gso(1))
        );
        let ecn = VnetHeader { gso_type: GSO_TCPV6 | GSO_ECN, ..tso };
        check_tx_header(&ecn, 65_000, ALL_TX).unwrap();
        assert!(check_tx_header(&ecn, 65_000, ALL_TX & !(1 << VIRTIO_NET_F_HOST_ECN)).is_err());
        assert_eq!(
            check_tx_header(&VnetHeader { gso_type: GSO_UDP, ..tso }, 65_000, ALL_TX),
            Err(FrameError::Gso(3))
        );
        assert_eq!(
            check_tx_header(&VnetHeader { gso_type: 9, ..tso }, 65_000, ALL_TX),
            Err(FrameError::Gso(9))
        );
        assert_eq!(
            check_tx_header(&VnetHeader { gso_size: 0, ..tso }, 65_000, ALL_TX),
            Err(FrameError::GsoIncomplete)
        );
        let no_csum = VnetHeader { flags: 0, ..tso };
        assert_eq!(check_tx_header(&no_csum, 65_000, ALL_TX), Err(FrameError::GsoIncomplete));
        assert!(matches!(
            check_tx_header(&tso, 50, ALL_TX),
            Err(FrameError::HdrLen { .. }) | Err(FrameError::CsumOutside { .. })
        ));
    }

    #[test]
    fn receive_headers_are_fitted_to_the_guest() {
        let guest_all = (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6);
        let mut h = VnetHeader { flags: F_DATA_VALID | 4, ..VnetHeader::default() };
        fix_rx_header(&mut h, guest_all).unwrap();
        assert_eq!(h.flags, F_DATA_VALID, "unknown flags cleared");
        let mut h = VnetHeader { flags: F_DATA_VALID, ..VnetHeader::default() };
        fix_rx_header(&mut h, 0).unwrap();
        assert_eq!(h.flags, 0, "no GUEST_CSUM: no flags");
        let mut tso =
            VnetHeader { flags: 1, gso_type: GSO_TCPV4, gso_size: 1448, ..VnetHeader::default() };
        fix_rx_header(&mut tso, guest_all).unwrap();
        let mut t2 = tso;
        assert!(fix_rx_header(&mut t2, 1 << VIRTIO_NET_F_GUEST_CSUM).is_err());
        let mut ecn = VnetHeader { gso_type: GSO_TCPV4 | GSO_ECN, ..tso };
        assert!(fix_rx_header(&mut ecn, guest_all).is_err(), "GUEST_ECN not accepted");
        let mut udp = VnetHeader { gso_type: GSO_UDP, ..tso };
        assert!(fix_rx_header(&mut udp, guest_all).is_err());
    }
}
