//! virtio-net (virtio 1.2 §5.1) on a tap device: one receive and one transmit queue.
//!
//! The host side is a tap (normally a netd slot's `tap0`, opened inside the slot's network
//! namespace, [`tap`]) with `IFF_VNET_HDR`: every frame carries the 12-byte virtio-net header
//! both ways, so checksum and segmentation offloads pass through untouched. The guest's
//! transmit offloads (CSUM, HOST_TSO4/6, HOST_ECN) need nothing from the tap; the receive
//! offloads the guest accepts (GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN) are given to the tap with
//! `TUNSETOFFLOAD` when the driver starts the device, and only those.
//!
//! Features offered: VERSION_1, MAC, STATUS (link always up), MRG_RXBUF, RING_EVENT_IDX, and
//! with `offload=on` (default) CSUM, GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN, HOST_TSO4/6, HOST_ECN;
//! MTU when `mtu=` is given. Not offered: UFO/USO, the control queue and so multiqueue (one
//! queue pair per device), VLAN filtering, announce.
//!
//! Untrusted input and its bounds ([`frame`]): a transmit chain must be device-readable,
//! inside guest memory, terminated, at least a header long and at most
//! [`MAX_BUFFER_LEN`] bytes; its header must only use what was negotiated (NEEDS_CSUM with
//! CSUM, a GSO type with its HOST_ feature and a non-zero gso_size, checksum offsets inside the
//! frame). Anything else is dropped and counted, and the chain returned. A receive chain must
//! be device-writable and inside guest memory; a bad one is returned empty. At most
//! [`BUDGET`] frames per direction are handled per event-loop wake-up, the rest on the next.
//!
//! Rates ([`rate_limiter`]): a token bucket per direction for bytes and one for frames, from
//! the command line (not saved: a host policy). A frame the bucket cannot pay for waits on a
//! timer; nothing is dropped for rate (the tap's own queue holds what the guest is not given
//! yet, the guest's ring what it sends).
//!
//! Snapshots ([`persist`]): features, queues, MAC, MTU, queue size and offload setting. A
//! frame read from the tap but not delivered yet is not saved: a restored or forked guest
//! never sees it (the original VM delivers it on). The restored device applies the saved
//! offloads to its new tap; the builder waits for the tap to be running before the guest
//! resumes (see docs/networking.md).
//!
//! Shape: [`device`], [`event_handler`], [`persist`], [`metrics`], plus [`tap`],
//! [`frame`] (header and chain parsing, fuzzed) and [`rate_limiter`].

use std::path::PathBuf;

pub mod device;
pub mod event_handler;
pub mod frame;
pub mod metrics;
pub mod persist;
pub mod rate_limiter;
pub mod tap;

/// Receive queue index.
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;
/// Default queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Smallest and largest queue size `queue-size=` accepts.
pub const QUEUE_SIZE_RANGE: (u16, u16) = (16, 1024);
/// The virtio-net header of a VERSION_1 device (`virtio_net_hdr_v1`, with num_buffers).
pub const VNET_HDR_LEN: usize = 12;
/// Largest Ethernet frame (a 64 KiB GSO packet with an Ethernet and a VLAN header).
pub const MAX_FRAME_LEN: usize = 65_535 + 14 + 4;
/// Largest header + frame, either way.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Frames handled per direction per event-loop wake-up.
pub const BUDGET: usize = 64;
/// The guest's MAC address when `mac=` is not given (netd's default guest MAC).
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0x67, 0x72, 0x00, 0x00, 0x02];
/// Largest rate `*-rate=` accepts (bytes per second).
pub const MAX_RATE: u64 = 100_000_000_000;
/// Largest frame rate `*-pps=` accepts.
pub const MAX_PPS: u64 = 100_000_000;
/// Largest bucket size.
pub const MAX_BURST: u64 = 1 << 30;

/// Why a `--net` value is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    /// A key this option does not know.
    #[error("unknown key {0:?} (tap, netns, mac, queue-size, offload, mtu, rx-rate, rx-burst, rx-pps, tx-rate, tx-burst, tx-pps)")]
    UnknownKey(String),
    /// A key given twice.
    #[error("{0} given twice")]
    Twice(String),
    /// `key=value` expected.
    #[error("{0:?} is not key=value")]
    NotKeyValue(String),
    /// `tap=` is required.
    #[error("tap=NAME is required")]
    NoTap,
    /// A value that does not parse or is out of range.
    #[error("{key}={value}: {why}")]
    BadValue {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Why.
        why: String,
    },
}

/// A token bucket's setting: `rate` units per second, at most `burst` saved up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Units per second.
    pub rate: u64,
    /// Bucket size (units).
    pub burst: u64,
}

/// One direction's limits: bytes and frames per second (either, both or none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Bytes (whole frames, without the virtio-net header).
    pub bytes: Option<Bucket>,
    /// Frames.
    pub frames: Option<Bucket>,
}

/// A virtio-net device as the command line describes it:
/// `--net tap=NAME[,netns=PATH|NAME][,mac=XX:XX:XX:XX:XX:XX][,queue-size=N][,offload=on|off]
/// [,mtu=N][,rx-rate=B][,rx-burst=B][,rx-pps=N][,tx-rate=B][,tx-burst=B][,tx-pps=N]`.
///
/// `mac`, `queue-size`, `offload` and `mtu` are what the guest sees: on a restore they come
/// from the snapshot, and a value given must match it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap's name (in `netns`).
    pub tap: String,
    /// The network namespace the tap is in (a path; a bare name means `/run/netns/NAME`).
    pub netns: Option<PathBuf>,
    /// The guest's MAC address.
    pub mac: Option<[u8; 6]>,
    /// Size of each queue.
    pub queue_size: Option<u16>,
    /// Offer checksum and segmentation offloads.
    pub offload: Option<bool>,
    /// The MTU the guest is told (VIRTIO_NET_F_MTU).
    pub mtu: Option<u16>,
    /// Guest-bound limits.
    pub rx: RateLimit,
    /// Guest-sent limits.
    pub tx: RateLimit,
}

/// Parses `123`, `10k`, `20M`, `1G` (powers of 1000).
fn parse_amount(v: &str) -> Option<u64> {
    let (num, mult) = match v.char_indices().last()? {
        (i, 'k' | 'K') => (&v[..i], 1_000),
        (i, 'm' | 'M') => (&v[..i], 1_000_000),
        (i, 'g' | 'G') => (&v[..i], 1_000_000_000),
        _ => (v, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Parses a MAC address `xx:xx:xx:xx:xx:xx`; a unicast, non-zero one.
pub fn parse_mac(v: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() != 6 {
        return Err("six hex bytes separated by ':'".into());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err("six hex bytes separated by ':'".into());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| format!("{p:?} is not a hex byte"))?;
    }
    if mac[0] & 1 != 0 {
        return Err("a multicast address".into());
    }
    if mac == [0; 6] {
        return Err("all zeros".into());
    }
    Ok(mac)
}

/// Formats a MAC address.
pub fn format_mac(m: &[u8; 6]) -> String {
    format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
}

impl NetConfig {
    /// A config for `tap` with nothing else set.
    pub fn new(tap: &str) -> Self {
        Self {
            tap: tap.to_string(),
            netns: None,
            mac: None,
            queue_size: None,
            offload: None,
            mtu: None,
            rx: RateLimit::default(),
            tx: RateLimit::default(),
        }
    }

    /// Parses a `--net` value.
    pub fn parse(s: &str) -> Result<Self, NetConfigError> {
        let mut seen: Vec<&str> = Vec::new();
        let mut c = Self::new("");
        let mut rates: [[Option<u64>; 3]; 2] = [[None; 3]; 2];
        for kv in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) =
                kv.split_once('=').ok_or_else(|| NetConfigError::NotKeyValue(kv.into()))?;
            if seen.contains(&k) {
                return Err(NetConfigError::Twice(k.into()));
            }
            seen.push(k);
            let bad = |why: &str| NetConfigError::BadValue {
                key: k.into(),
                value: v.into(),
                why: why.into(),
            };
            match k {
                "tap" => {
                    tap::check_name(v).map_err(|e| bad(&e.to_string()))?;
                    c.tap = v.into();
                }
                "netns" => {
                    if v.is_empty() {
                        return Err(bad("empty"));
                    }
                    c.netns = Some(if v.contains('/') {
                        PathBuf::from(v)
                    } else {
                        PathBuf::from("/run/netns").join(v)
                    });
                }
                "mac" => c.mac = Some(parse_mac(v).map_err(|e| bad(&e))?),
                "queue-size" => {
                    let n: u16 = v.parse().map_err(|_| bad("not a number"))?;
                    let (lo, hi) = QUEUE_SIZE_RANGE;
                    if !n.is_power_of_two() || !(lo..=hi).contains(&n) {
                        return Err(bad(&format!("a power of two in {lo}..={hi}")));
                    }
                    c.queue_size = Some(n);
                }
                "offload" => {
                    c.offload = Some(match v {
                        "on" => true,
                        "off" => false,
                        _ => return Err(bad("on or off")),
                    });
                }
                "mtu" => {
                    let n: u16 = v.parse().map_err(|_| bad("not a number"))?;
                    if n < 68 {
                        return Err(bad("at least 68"));
                    }
                    c.mtu = Some(n);
                }
                "rx-rate" | "rx-burst" | "rx-pps" | "tx-rate" | "tx-burst" | "tx-pps" => {
                    let n = parse_amount(v).ok_or_else(|| bad("a number (k, M, G suffixes)"))?;
                    let dir = usize::from(k.starts_with("tx"));
                    let which = match &k[3..] {
                        "rate" => 0,
                        "burst" => 1,
                        _ => 2,
                    };
                    rates[dir][which] = Some(n);
                }
                _ => return Err(NetConfigError::UnknownKey(k.into())),
            }
        }
        if c.tap.is_empty() {
            return Err(NetConfigError::NoTap);
        }
        c.rx = rate_limit("rx", rates[0])?;
        c.tx = rate_limit("tx", rates[1])?;
        Ok(c)
    }

    /// The MAC the guest gets on a fresh boot.
    pub fn boot_mac(&self) -> [u8; 6] {
        self.mac.unwrap_or(DEFAULT_MAC)
    }
}

/// Checks one direction's `rate`, `burst`, `pps`: a burst needs a rate; a byte bucket holds
/// at least one largest frame (else that frame could never pass). Default burst: 50 ms of
/// the rate, at least two largest frames (bytes) or 8 frames.
fn rate_limit(
    dir: &str,
    [rate, burst, pps]: [Option<u64>; 3],
) -> Result<RateLimit, NetConfigError> {
    let bad = |k: &str, v: u64, why: &str| NetConfigError::BadValue {
        key: format!("{dir}-{k}"),
        value: v.to_string(),
        why: why.into(),
    };
    let mut out = RateLimit::default();
    if let Some(r) = rate {
        if r == 0 || r > MAX_RATE {
            return Err(bad("rate", r, &format!("1..={MAX_RATE} bytes/s")));
        }
        let min = MAX_FRAME_LEN as u64;
        let b = burst.unwrap_or_else(|| (r / 20).max(2 * min));
        if !(min..=MAX_BURST).contains(&b) {
            return Err(bad(
                "burst",
                b,
                &format!("{min}..={MAX_BURST} bytes (one largest frame at least)"),
            ));
        }
        out.bytes = Some(Bucket { rate: r, burst: b });
    } else if let Some(b) = burst {
        return Err(bad("burst", b, &format!("needs {dir}-rate")));
    }
    if let Some(p) = pps {
        if p == 0 || p > MAX_PPS {
            return Err(bad("pps", p, &format!("1..={MAX_PPS} frames/s")));
        }
        out.frames = Some(Bucket { rate: p, burst: (p / 20).max(8) });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_net_option_parses() {
        let c = NetConfig::parse(
            "tap=tap0,netns=gs3,mac=02:67:72:00:00:09,queue-size=512,offload=off,mtu=1400,\
             rx-rate=10M,rx-burst=1M,tx-rate=5000000,tx-pps=2k",
        )
        .unwrap();
        assert_eq!(c.tap, "tap0");
        assert_eq!(c.netns.as_deref(), Some(std::path::Path::new("/run/netns/gs3")));
        assert_eq!(c.mac, Some([2, 0x67, 0x72, 0, 0, 9]));
        assert_eq!((c.queue_size, c.offload, c.mtu), (Some(512), Some(false), Some(1400)));
        assert_eq!(c.rx.bytes, Some(Bucket { rate: 10_000_000, burst: 1_000_000 }));
        assert_eq!(c.rx.frames, None);
        assert_eq!(c.tx.bytes, Some(Bucket { rate: 5_000_000, burst: 250_000 }));
        assert_eq!(c.tx.frames, Some(Bucket { rate: 2000, burst: 100 }));
        let p = NetConfig::parse("tap=t,netns=/proc/1/ns/net").unwrap();
        assert_eq!(p.netns.as_deref(), Some(std::path::Path::new("/proc/1/ns/net")));
        assert_eq!(p.boot_mac(), DEFAULT_MAC);
        assert_eq!(p.rx, RateLimit::default());
    }

    #[test]
    fn bad_net_options_are_refused_with_the_key() {
        let err = |s: &str| NetConfig::parse(s).unwrap_err();
        assert_eq!(err("netns=x"), NetConfigError::NoTap);
        assert_eq!(err(""), NetConfigError::NoTap);
        assert!(matches!(err("tap=a,tap=b"), NetConfigError::Twice(_)));
        assert!(matches!(err("tap=a,speed=9"), NetConfigError::UnknownKey(_)));
        assert!(matches!(err("tap=a,mac"), NetConfigError::NotKeyValue(_)));
        for bad in [
            "tap=",
            "tap=a/b",
            "tap=0123456789abcdef",
            "tap=a,mac=03:00:00:00:00:01",
            "tap=a,mac=00:00:00:00:00:00",
            "tap=a,mac=02:00:00:00:00",
            "tap=a,mac=02:00:00:00:00:zz",
            "tap=a,queue-size=100",
            "tap=a,queue-size=2048",
            "tap=a,offload=yes",
            "tap=a,mtu=20",
            "tap=a,rx-rate=0",
            "tap=a,rx-rate=1T",
            "tap=a,tx-burst=100000",
            "tap=a,tx-rate=1M,tx-burst=1000",
            "tap=a,rx-pps=0",
            "tap=a,netns=",
        ] {
            assert!(
                matches!(NetConfig::parse(bad), Err(NetConfigError::BadValue { .. })),
                "{bad} should be refused"
            );
        }
        let e = err("tap=a,tx-rate=1M,tx-burst=1000").to_string();
        assert!(e.contains("tx-burst=1000"), "{e}");
    }

    #[test]
    fn mac_formats_back() {
        let m = parse_mac("02:ab:CD:00:01:ff").unwrap();
        assert_eq!(format_mac(&m), "02:ab:cd:00:01:ff");
    }
}
