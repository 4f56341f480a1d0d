//! `#[repr(C)]` mirrors of the structs in `bpf/slot.h`, checked for size at
//! compile time, and the constants shared with the programs.

/// Egress: guest -> world.
pub const DIR_EGRESS: u8 = 0;
/// Ingress: world -> guest.
pub const DIR_INGRESS: u8 = 1;
/// Number of drop reasons.
pub const NUM_REASONS: usize = 8;
/// u64 counters per direction: packets, bytes, drops[reason].
pub const STRIDE: usize = 2 + NUM_REASONS;
/// Index of the lost-denial-events counter.
pub const C_LOG_LOST: usize = 2 * STRIDE;
/// Number of counters.
pub const NUM_COUNTERS: usize = 2 * STRIDE + 1;
/// Rule id of the default action.
pub const RULE_DEFAULT: u32 = 0;
/// Rule id of "DNS only to the slot's resolver".
pub const RULE_DNS: u32 = 0xffff_fff0;
/// Deny.
pub const ACT_DENY: u8 = 0;
/// Allow.
pub const ACT_ALLOW: u8 = 1;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotCfg {
    pub guest_ip: u32,
    pub slot_ip: u32,
    pub gw_ip: u32,
    pub tap_ifindex: u32,
    pub veth_ifindex: u32,
    pub guest_mac: [u8; 6],
    pub tap_mac: [u8; 6],
    pub veth_mac: [u8; 6],
    pub host_mac: [u8; 6],
    pub default_allow: u8,
    pub enabled: u8,
    pub pad: [u8; 6],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CidrVal {
    pub rule_id: u32,
    pub action: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DynVal {
    pub expires_ns: u64,
    pub rule_id: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub proto: u8,
    pub pad: u8,
    /// Network byte order.
    pub port: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortVal {
    /// Network byte order.
    pub port: u16,
    pub pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    /// `struct bpf_spin_lock`: the kernel skips it when userspace writes a value.
    pub lock: u32,
    pub pad: u32,
    pub rate_bps: u64,
    pub burst: u64,
    /// Bytes x 1e9 (refills between close packets are not truncated).
    pub tokens: u64,
    pub last_ns: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DenialRaw {
    pub ts_ns: u64,
    pub addr: u32,
    pub rule_id: u32,
    pub port: u16,
    pub proto: u8,
    pub reason: u8,
    pub dir: u8,
    pub pad: [u8; 3],
}

const _: () = assert!(std::mem::size_of::<SlotCfg>() == 52);
const _: () = assert!(std::mem::size_of::<CidrVal>() == 8);
const _: () = assert!(std::mem::size_of::<DynVal>() == 16);
const _: () = assert!(std::mem::size_of::<PortKey>() == 4);
const _: () = assert!(std::mem::size_of::<PortVal>() == 4);
const _: () = assert!(std::mem::size_of::<Bucket>() == 40);
const _: () = assert!(std::mem::size_of::<DenialRaw>() == 24);

// SAFETY (all impls below): each type is #[repr(C)], Copy, made only of integers
// and byte arrays with explicit padding fields, so every bit pattern is valid and
// there are no implicit padding bytes (the size asserts above match the C layout).
macro_rules! pod {
    ($($t:ty),*) => {$(
        // SAFETY: see the comment above the macro.
        unsafe impl aya::Pod for $t {}
    )*};
}
pod!(SlotCfg, CidrVal, DynVal, PortKey, PortVal, Bucket);

impl DenialRaw {
    /// Reads an event from the ring buffer's bytes (`None` if too short).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < 24 {
            return None;
        }
        let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        Some(Self {
            ts_ns: u64::from_ne_bytes(b[0..8].try_into().ok()?),
            addr: u32_at(8),
            rule_id: u32_at(12),
            port: u16::from_ne_bytes([b[16], b[17]]),
            proto: b[18],
            reason: b[19],
            dir: b[20],
            pad: [0; 3],
        })
    }
}
