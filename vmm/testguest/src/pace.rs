//! How the `T` loop waits between `T`s: busy-waiting on the TSC, or sleeping through
//! grove-vmm's idle port (0x44c), the CPL 3 guest's stand-in for `hlt`.

use crate::bootparams::{Idle, Mode};

/// What a 32-bit read of the idle port gives under grove-vmm ("GROV").
pub const IDLE_MAGIC: u32 = 0x4752_4f56;
/// Longest sleep grove-vmm grants per idle-port write (µs); the guest never asks for more.
pub const IDLE_MAX_US: u32 = 1000;

/// Whether `mode`'s `T` loop sleeps through the idle port: only ready and fork modes (busy
/// mode exists to dirty memory), and with `tg.idle=auto` only if the port read the magic
/// (`port_read`, what a 32-bit IN of port 0x44c returned).
pub fn use_idle_port(idle: Idle, mode: Mode, port_read: u32) -> bool {
    match mode {
        Mode::Ready | Mode::Fork => match idle {
            Idle::Auto => port_read == IDLE_MAGIC,
            Idle::Spin => false,
            Idle::Port => true,
        },
        _ => false,
    }
}

/// Whole microseconds in `ticks_left` TSC ticks at `tsc_khz`, at most [`IDLE_MAX_US`]; 0 means
/// less than 1 µs is left (spin instead).
pub fn sleep_us(ticks_left: u64, tsc_khz: u64) -> u32 {
    let us = ticks_left.saturating_mul(1000) / tsc_khz.max(1);
    u32::try_from(us).unwrap_or(IDLE_MAX_US).min(IDLE_MAX_US)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ready_and_fork_idle_and_auto_needs_the_magic() {
        for mode in [Mode::Ready, Mode::Fork] {
            assert!(use_idle_port(Idle::Auto, mode, IDLE_MAGIC));
            assert!(!use_idle_port(Idle::Auto, mode, 0xffff_ffff), "unknown port (all ones)");
            assert!(!use_idle_port(Idle::Auto, mode, 0));
            assert!(use_idle_port(Idle::Port, mode, 0xffff_ffff), "forced");
            assert!(!use_idle_port(Idle::Spin, mode, IDLE_MAGIC), "forced");
        }
        for mode in [Mode::Busy, Mode::Hello, Mode::Checksum, Mode::TripleFault] {
            for idle in [Idle::Auto, Idle::Spin, Idle::Port] {
                assert!(!use_idle_port(idle, mode, IDLE_MAGIC), "{mode:?} {idle:?}");
            }
        }
        assert_eq!(&IDLE_MAGIC.to_le_bytes(), b"VORG");
    }

    #[test]
    fn sleeps_are_whole_microseconds_and_bounded() {
        let khz = 2_500_000; // 2500 ticks per µs
        assert_eq!(sleep_us(0, khz), 0);
        assert_eq!(sleep_us(2499, khz), 0);
        assert_eq!(sleep_us(2500, khz), 1);
        assert_eq!(sleep_us(50 * 2500 + 10, khz), 50);
        assert_eq!(sleep_us(2500 * 5000, khz), IDLE_MAX_US);
        assert_eq!(sleep_us(u64::MAX, khz), IDLE_MAX_US);
        assert_eq!(sleep_us(u64::MAX, 1), IDLE_MAX_US);
        assert_eq!(sleep_us(5, 0), IDLE_MAX_US, "a zero rate cannot divide by zero");
    }
}
