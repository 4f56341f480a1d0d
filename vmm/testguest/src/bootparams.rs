//! Reading the Linux boot_params ("zero page") the loader left in RSI, and the
//! `tg.*` keys of the kernel command line.
//!
//! Everything read here was written by the VMM: offsets and counts are bounded
//! before use (at most 128 e820 entries, a cmdline of at most 4 KiB inside the
//! identity-mapped range).

use crate::MAPPED_BYTES;

/// `boot_params.e820_entries` (u8).
const E820_ENTRIES: u64 = 0x1e8;
/// `boot_params.hdr.cmd_line_ptr` (u32).
const CMD_LINE_PTR: u64 = 0x228;
/// `boot_params.e820_table`: 20-byte entries {u64 addr, u64 size, u32 type}.
const E820_TABLE: u64 = 0x2d0;
/// Entries the zero page has room for.
pub const E820_MAX: usize = 128;
/// Size of the zero page.
const ZERO_PAGE_SIZE: u64 = 4096;
/// Longest command line read.
const CMDLINE_MAX: usize = 4096;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

/// One e820 entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The zero page at a checked guest-physical (= virtual, identity-mapped) address.
pub struct BootParams {
    base: u64,
}

impl BootParams {
    /// Checks that the zero page lies inside the identity map.
    pub fn new(base: u64) -> Result<Self, &'static str> {
        if base == 0 || base.checked_add(ZERO_PAGE_SIZE).is_none_or(|end| end > MAPPED_BYTES) {
            return Err("boot_params pointer (RSI) is null or outside the mapped range");
        }
        Ok(Self { base })
    }

    fn read<T: Copy>(&self, off: u64) -> T {
        let addr = self.base + off;
        // SAFETY: `new` checked that the 4 KiB zero page lies inside the identity map
        // (present, user-accessible pages), every offset used here is inside it, and
        // an unaligned read of a plain integer type is valid for any bit pattern.
        unsafe { core::ptr::read_unaligned(addr as *const T) }
    }

    /// The kernel command line (up to its NUL, at most 4 KiB), empty if the
    /// pointer is null or out of range.
    pub fn cmdline(&self) -> &'static [u8] {
        let ptr = u64::from(self.read::<u32>(CMD_LINE_PTR));
        if ptr == 0 || ptr + CMDLINE_MAX as u64 > MAPPED_BYTES {
            return &[];
        }
        // SAFETY: [ptr, ptr + 4 KiB) lies inside the identity map (checked above); the
        // VMM wrote the command line there before entry and nothing writes it later.
        let window = unsafe { core::slice::from_raw_parts(ptr as *const u8, CMDLINE_MAX) };
        let len = window.iter().position(|&b| b == 0).unwrap_or(CMDLINE_MAX);
        &window[..len]
    }

    /// The e820 map (at most [`E820_MAX`] entries), in table order.
    pub fn e820(&self, out: &mut [E820Entry; E820_MAX]) -> usize {
        let n = usize::from(self.read::<u8>(E820_ENTRIES)).min(E820_MAX);
        for (i, e) in out.iter_mut().enumerate().take(n) {
            let off = E820_TABLE + 20 * i as u64;
            *e = E820Entry {
                addr: self.read::<u64>(off),
                size: self.read::<u64>(off + 8),
                kind: self.read::<u32>(off + 16),
            };
        }
        n
    }
}

/// What the guest does after boot (`tg.mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Hello,
    Ready,
    Checksum,
    Fork,
    Busy,
    TripleFault,
}

/// How the `T` loop of ready and fork modes waits between `T`s (`tg.idle`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idle {
    /// Use the idle port if it reads the Grove magic, else spin (the default).
    Auto,
    /// Busy-wait on the TSC.
    Spin,
    /// Sleep through the idle port (0x44c) whatever it reads.
    Port,
}

/// The `tg.*` settings of the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub mode: Mode,
    /// MiB of the region the guest writes (`tg.touch_mib`).
    pub touch_mib: u64,
    /// Pattern seed (`tg.seed`).
    pub seed: u64,
    /// TSC frequency override in kHz (`tg.tsc_khz`), else CPUID, else a default.
    pub tsc_khz: Option<u64>,
    /// Target interval between `T`s in microseconds (`tg.t_us`, 1..=100, default 50).
    pub t_us: u64,
    /// Print a line with the settings before starting (`tg.verbose=1`).
    pub verbose: bool,
    /// MMIO address of Firecracker's boot timer (`tg.mmio_boot_timer`), also written
    /// with the magic byte before `READY`.
    pub mmio_boot_timer: Option<u64>,
    /// How ready and fork modes wait between `T`s (`tg.idle`; busy mode always spins).
    pub idle: Idle,
    /// Interval between `T`s in microseconds when sleeping through the idle port
    /// (`tg.idle_us`, 1..=1000, default 50 so that `T` keeps the
    /// contract's pace of at least one per 0.1 ms; idle-fleet scenarios ask for 1000).
    pub idle_us: u64,
    /// Drive the virtio-rng at the first `virtio_mmio.device=` of the command line
    /// (`tg.rng=1`): one request at boot, and in fork mode one per identity change.
    pub rng: bool,
    /// Drive a virtio-blk at the first `virtio_mmio.device=` instead (`tg.blk=1`): write the
    /// identity's block, flush, read it back at boot and, in fork mode, at every identity
    /// change.
    pub blk: bool,
    /// Register page of the first `virtio_mmio.device=SIZE@ADDR:IRQ` (the VMM appends
    /// these; Linux kernels read them with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).
    pub virtio_mmio: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Hello,
            touch_mib: 0,
            seed: 0,
            tsc_khz: None,
            t_us: 50,
            verbose: false,
            mmio_boot_timer: None,
            idle: Idle::Auto,
            idle_us: 50,
            rng: false,
            blk: false,
            virtio_mmio: None,
        }
    }
}

/// The register page of a `virtio_mmio.device=` value (`4K@0xd0000000:5`): the address
/// between `@` and `:`, a page in the 32-bit MMIO gap.
pub fn parse_virtio_mmio(val: &[u8]) -> Option<u64> {
    let at = val.iter().position(|&b| b == b'@')?;
    let rest = &val[at + 1..];
    let end = rest.iter().position(|&b| b == b':').unwrap_or(rest.len());
    parse_u64(&rest[..end]).filter(|&a| (0xc000_0000..0x1_0000_0000).contains(&a) && a % 4096 == 0)
}

/// Largest accepted `tg.touch_mib`: the region starts at 16 MiB and the identity
/// map ends at 16 GiB.
const TOUCH_MIB_MAX: u64 = (MAPPED_BYTES >> 20) - 16;

/// Parses a decimal or `0x` hexadecimal u64.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = char::from(c).to_digit(radix)?;
        v = v.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(v)
}

impl Config {
    /// Parses the space-separated command line; keys other than `tg.*` ones are
    /// ignored. No `tg.mode` means hello.
    pub fn parse(cmdline: &[u8]) -> Result<Self, &'static str> {
        let mut c = Self::default();
        for word in cmdline.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty()) {
            let Some(eq) = word.iter().position(|&b| b == b'=') else { continue };
            let (key, val) = (&word[..eq], &word[eq + 1..]);
            match key {
                b"tg.mode" => {
                    c.mode = match val {
                        b"hello" => Mode::Hello,
                        b"ready" => Mode::Ready,
                        b"checksum" => Mode::Checksum,
                        b"fork" => Mode::Fork,
                        b"busy" => Mode::Busy,
                        b"triplefault" => Mode::TripleFault,
                        _ => return Err("unknown tg.mode"),
                    }
                }
                b"tg.touch_mib" => {
                    c.touch_mib = parse_u64(val)
                        .filter(|&v| v <= TOUCH_MIB_MAX)
                        .ok_or("tg.touch_mib must be a number of MiB up to 16368")?;
                }
                b"tg.seed" => c.seed = parse_u64(val).ok_or("tg.seed must be a u64")?,
                b"tg.tsc_khz" => {
                    c.tsc_khz = Some(
                        parse_u64(val)
                            .filter(|&v| (1000..=100_000_000).contains(&v))
                            .ok_or("tg.tsc_khz must be 1000..=100000000")?,
                    );
                }
                b"tg.t_us" => {
                    c.t_us = parse_u64(val)
                        .filter(|&v| (1..=100).contains(&v))
                        .ok_or("tg.t_us must be 1..=100")?;
                }
                b"tg.verbose" => c.verbose = val != b"0",
                b"tg.idle_us" => {
                    c.idle_us = parse_u64(val)
                        .filter(|&v| (1..=1000).contains(&v))
                        .ok_or("tg.idle_us must be 1..=1000")?;
                }
                b"tg.idle" => {
                    c.idle = match val {
                        b"auto" => Idle::Auto,
                        b"spin" => Idle::Spin,
                        b"port" => Idle::Port,
                        _ => return Err("tg.idle must be auto, spin or port"),
                    }
                }
                b"tg.rng" => c.rng = val != b"0",
                b"tg.blk" => c.blk = val != b"0",
                b"virtio_mmio.device" if c.virtio_mmio.is_none() => {
                    c.virtio_mmio = Some(
                        parse_virtio_mmio(val)
                            .ok_or("virtio_mmio.device must be SIZE@PAGE:IRQ in [3 GiB, 4 GiB)")?,
                    );
                }
                b"tg.mmio_boot_timer" => {
                    c.mmio_boot_timer = Some(
                        parse_u64(val)
                            .filter(|&a| (0xc000_0000..0x1_0000_0000).contains(&a) && a % 4096 == 0)
                            .ok_or("tg.mmio_boot_timer must be a page in [3 GiB, 4 GiB)")?,
                    );
                }
                _ => {}
            }
        }
        if c.rng && c.blk {
            return Err("tg.rng and tg.blk both want the first virtio_mmio device");
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_parse_in_decimal_and_hex_and_reject_junk() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"4096"), Some(4096));
        assert_eq!(parse_u64(b"0x1F"), Some(31));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        for bad in [&b""[..], b"0x", b"12a", b"-1", b" 1", b"0x1g"] {
            assert_eq!(parse_u64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cmdline_keys_parse_and_others_are_ignored() {
        let c =
            Config::parse(b"console=ttyS0 tg.mode=checksum  tg.touch_mib=64 tg.seed=0x10 noapic")
                .unwrap();
        assert_eq!(c.mode, Mode::Checksum);
        assert_eq!(c.touch_mib, 64);
        assert_eq!(c.seed, 16);
        assert_eq!(Config::parse(b"").unwrap(), Config::default());
        assert_eq!(Config::parse(b"tg.mode=fork\ttg.t_us=20").unwrap().t_us, 20);
        for (m, mode) in [
            ("hello", Mode::Hello),
            ("ready", Mode::Ready),
            ("fork", Mode::Fork),
            ("busy", Mode::Busy),
            ("triplefault", Mode::TripleFault),
        ] {
            assert_eq!(Config::parse(format!("tg.mode={m}").as_bytes()).unwrap().mode, mode);
        }
        let c = Config::parse(b"tg.tsc_khz=2600000 tg.verbose=1 tg.mmio_boot_timer=0xc0000000")
            .unwrap();
        assert_eq!(c.tsc_khz, Some(2_600_000));
        assert!(c.verbose);
        assert_eq!(c.mmio_boot_timer, Some(0xc000_0000));
        assert_eq!(c.idle, Idle::Auto);
        assert_eq!(c.idle_us, 50);
        assert_eq!(Config::parse(b"tg.idle_us=40").unwrap().idle_us, 40);
        for (v, idle) in [("auto", Idle::Auto), ("spin", Idle::Spin), ("port", Idle::Port)] {
            let c = Config::parse(format!("tg.mode=ready tg.idle={v}").as_bytes()).unwrap();
            assert_eq!(c.idle, idle);
        }
    }

    #[test]
    fn virtio_mmio_devices_parse() {
        let c = Config::parse(
            b"tg.rng=1 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6",
        )
        .unwrap();
        assert!(c.rng);
        assert_eq!(c.virtio_mmio, Some(0xd000_0000), "the first one");
        assert_eq!(parse_virtio_mmio(b"4K@0xd0002000"), Some(0xd000_2000));
        assert_eq!(parse_virtio_mmio(b"4K0xd0002000:5"), None);
        assert_eq!(parse_virtio_mmio(b"4K@0x1000:5"), None, "not in the MMIO gap");
        assert!(Config::parse(b"virtio_mmio.device=4K@0xd0000001:5").is_err());
        assert!(!Config::parse(b"tg.mode=hello").unwrap().rng);
    }

    #[test]
    fn bad_cmdline_values_are_errors() {
        for bad in [
            &b"tg.mode=nope"[..],
            b"tg.touch_mib=16369",
            b"tg.touch_mib=lots",
            b"tg.seed=",
            b"tg.t_us=0",
            b"tg.t_us=101",
            b"tg.tsc_khz=5",
            b"tg.mmio_boot_timer=0x1000",
            b"tg.mmio_boot_timer=0xc0000001",
            b"tg.mmio_boot_timer=0x100000000",
            b"tg.idle=",
            b"tg.idle=hlt",
            b"tg.idle=PORT",
            b"tg.idle_us=0",
            b"tg.idle_us=1001",
        ] {
            assert!(Config::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn out_of_range_boot_params_pointer_is_refused() {
        assert!(BootParams::new(0).is_err());
        assert!(BootParams::new(MAPPED_BYTES - 100).is_err());
        assert!(BootParams::new(u64::MAX - 10).is_err());
        assert!(BootParams::new(0x7000).is_ok());
    }
}
