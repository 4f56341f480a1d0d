//! Building and checking Ethernet/IPv4/UDP/TCP/ICMP frames: what the userspace
//! peer (standing in for the guest) sends and reads, and what the BPF unit tests
//! feed the programs. Checksums are computed here independently of the kernel.

use std::net::Ipv4Addr;

/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// IP protocol numbers.
pub const PROTO_ICMP: u8 = 1;
/// TCP.
pub const PROTO_TCP: u8 = 6;
/// UDP.
pub const PROTO_UDP: u8 = 17;

/// One's-complement sum of `data` (16-bit big-endian words), not yet folded.
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        acc += u32::from(*b) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // `acc` is at most 0xffff after folding.
    #[allow(clippy::cast_possible_truncation)]
    let v = acc as u16;
    v
}

/// The Internet checksum of `data` (what goes in the header field).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut p = [0u8; 12];
    p[..4].copy_from_slice(&src.octets());
    p[4..8].copy_from_slice(&dst.octets());
    p[9] = proto;
    p[10..12].copy_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
    sum16(&p, 0)
}

/// The TCP/UDP checksum of `segment` (its checksum field zeroed or not: pass the
/// segment as sent to verify; a valid one gives 0).
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    !fold(sum16(segment, pseudo_sum(src, dst, proto, segment.len())))
}

/// Ethernet addresses and the IPv4 header fields a frame is built with.
#[derive(Debug, Clone, Copy)]
pub struct Endpoints {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
}

/// Builds an Ethernet + IPv4 frame around `l4` (whose checksum the caller set).
/// `frag` is the IPv4 flags/fragment-offset field (0 for an unfragmented packet).
pub fn ipv4_frame(e: &Endpoints, proto: u8, l4: &[u8], frag: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(34 + l4.len());
    f.extend_from_slice(&e.dst_mac);
    f.extend_from_slice(&e.src_mac);
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    let tot = u16::try_from(20 + l4.len()).expect("frame fits an IPv4 packet");
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&tot.to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[6..8].copy_from_slice(&frag.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&e.src_ip.octets());
    ip[16..20].copy_from_slice(&e.dst_ip.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(l4);
    f
}

/// A UDP frame with a valid checksum.
pub fn udp_frame(e: &Endpoints, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("UDP payload fits");
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut c = l4_checksum(e.src_ip, e.dst_ip, PROTO_UDP, &u);
    if c == 0 {
        c = 0xffff;
    }
    u[6..8].copy_from_slice(&c.to_be_bytes());
    ipv4_frame(e, PROTO_UDP, &u, 0)
}

/// A TCP frame (no options) with a valid checksum.
pub fn tcp_frame(
    e: &Endpoints,
    sport: u16,
    dport: u16,
    seq: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(payload);
    let c = l4_checksum(e.src_ip, e.dst_ip, PROTO_TCP, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    ipv4_frame(e, PROTO_TCP, &t, 0)
}

/// An ICMP echo request frame.
pub fn icmp_echo_frame(e: &Endpoints, id: u16, seq: u16) -> Vec<u8> {
    let mut i = vec![8u8, 0, 0, 0];
    i.extend_from_slice(&id.to_be_bytes());
    i.extend_from_slice(&seq.to_be_bytes());
    i.extend_from_slice(b"grove-ping");
    let c = checksum(&i);
    i[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4_frame(e, PROTO_ICMP, &i, 0)
}

/// What [`parse`] found in a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ethertype: u16,
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub proto: u8,
    /// IPv4 header checksum verifies.
    pub ip_csum_ok: bool,
    /// TCP/UDP: source and destination ports.
    pub ports: Option<(u16, u16)>,
    /// TCP/UDP/ICMP checksum verifies (UDP without checksum counts as valid).
    pub l4_csum_ok: bool,
    /// Raw UDP checksum field (0 = none).
    pub udp_csum_field: Option<u16>,
    /// TCP/UDP payload, or the ICMP message after its 4-byte header.
    pub payload: Vec<u8>,
}

/// Parses an Ethernet/IPv4 frame; `None` for anything else or a truncated one.
pub fn parse(frame: &[u8]) -> Option<Parsed> {
    if frame.len() < 34 {
        return None;
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype != ETH_P_IP {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < 20 || tot < ihl || tot > ip.len() {
        return None;
    }
    let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let proto = ip[9];
    let l4 = &ip[ihl..tot];
    let (ports, l4_csum_ok, udp_csum_field, payload) = match proto {
        PROTO_UDP if l4.len() >= 8 => {
            let field = u16::from_be_bytes([l4[6], l4[7]]);
            let ok = field == 0 || l4_checksum(src_ip, dst_ip, proto, l4) == 0;
            (Some(ports_of(l4)), ok, Some(field), l4[8..].to_vec())
        }
        PROTO_TCP if l4.len() >= 20 => {
            let off = usize::from(l4[12] >> 4) * 4;
            let ok = l4_checksum(src_ip, dst_ip, proto, l4) == 0;
            (Some(ports_of(l4)), ok, None, l4.get(off..).unwrap_or(&[]).to_vec())
        }
        PROTO_ICMP if l4.len() >= 4 => (None, checksum(l4) == 0, None, l4[4..].to_vec()),
        _ => (None, false, None, Vec::new()),
    };
    let mut dst_mac = [0u8; 6];
    let mut src_mac = [0u8; 6];
    dst_mac.copy_from_slice(&frame[0..6]);
    src_mac.copy_from_slice(&frame[6..12]);
    Some(Parsed {
        dst_mac,
        src_mac,
        ethertype,
        src_ip,
        dst_ip,
        proto,
        ip_csum_ok: checksum(&ip[..ihl]) == 0,
        ports,
        l4_csum_ok,
        udp_csum_field,
        payload,
    })
}

fn ports_of(l4: &[u8]) -> (u16, u16) {
    (u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends() -> Endpoints {
        Endpoints {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: Ipv4Addr::new(10, 0, 0, 1),
            dst_ip: Ipv4Addr::new(10, 0, 0, 2),
        }
    }

    #[test]
    fn built_frames_parse_back_with_valid_checksums() {
        let f = udp_frame(&ends(), 1000, 2000, b"hello");
        let p = parse(&f).unwrap();
        assert!(p.ip_csum_ok && p.l4_csum_ok);
        assert_eq!(p.ports, Some((1000, 2000)));
        assert_eq!(p.payload, b"hello");
        let t = parse(&tcp_frame(&ends(), 1, 2, 7, 0x02, b"x")).unwrap();
        assert!(t.ip_csum_ok && t.l4_csum_ok && t.payload == b"x");
        let i = parse(&icmp_echo_frame(&ends(), 1, 2)).unwrap();
        assert!(i.ip_csum_ok && i.l4_csum_ok);
    }

    #[test]
    fn a_flipped_byte_breaks_the_checksums() {
        let mut f = udp_frame(&ends(), 1000, 2000, b"hello");
        let n = f.len();
        f[n - 1] ^= 0xff;
        assert!(!parse(&f).unwrap().l4_csum_ok);
        f[14 + 8] ^= 1; // TTL
        assert!(!parse(&f).unwrap().ip_csum_ok);
        assert!(parse(&f[..30]).is_none());
    }
}
