//! Grove's own ports (boot timer, identity, restore generation) and a CMOS stub.
//!
//! - 0x440 boot timer: the byte 123 logs `boot-timer: guest ready X ms after VMM start`.
//! - 0x444 identity (32-bit IN): 0 on a fresh boot; `restore --identity N` sets it.
//! - 0x448 restore generation (32-bit IN): 0 on a fresh boot, saved value + 1 on a restore.
//! - 0x70-0x71 CMOS: reads 0, writes ignored.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::persist::Persist;

/// Boot-timer port (first of Grove's ports).
pub const BOOT_TIMER: u16 = 0x440;
/// The byte the guest writes to the boot-timer port.
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// Identity port.
pub const IDENTITY: u16 = 0x444;
/// Restore-generation port.
pub const GENERATION: u16 = 0x448;
/// Ports Grove's device covers (0x440 to 0x44b; 0x44c is the vCPU's idle port).
pub const GROVE_PORTS_LEN: u16 = 12;
/// CMOS index/data ports.
pub const CMOS: u16 = 0x70;

/// Grove's ports.
#[derive(Debug)]
pub struct GrovePorts {
    start: Instant,
    identity: u32,
    generation: u32,
    /// Time of the first boot-timer write (ms since start).
    boot_timer_ms: Option<f64>,
}

impl GrovePorts {
    /// Fresh ports. `start` is the VMM start time the boot timer measures from.
    pub fn new(start: Instant, identity: u32) -> Self {
        Self { start, identity, generation: 0, boot_timer_ms: None }
    }

    /// The identity returned on port 0x444.
    pub fn identity(&self) -> u32 {
        self.identity
    }

    /// The generation returned on port 0x448.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Sets the generation returned on port 0x448.
    pub fn set_generation(&mut self, v: u32) {
        self.generation = v;
    }

    /// When the guest first wrote the boot-timer byte (ms since VMM start).
    pub fn boot_timer_ms(&self) -> Option<f64> {
        self.boot_timer_ms
    }
}

fn fill_le(data: &mut [u8], v: u32) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = v.to_le_bytes().get(i).copied().unwrap_or(0);
    }
}

impl MutDevicePio for GrovePorts {
    fn pio_read(&mut self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match base.0.wrapping_add(offset) {
            IDENTITY => fill_le(data, self.identity),
            GENERATION => fill_le(data, self.generation),
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if base.0.wrapping_add(offset) == BOOT_TIMER && data.first() == Some(&BOOT_TIMER_MAGIC) {
            let ms = self.start.elapsed().as_secs_f64() * 1000.0;
            crate::errln!("boot-timer: guest ready {ms:.3} ms after VMM start");
            self.boot_timer_ms.get_or_insert(ms);
        }
    }
}

/// Grove's ports' saved state: the generation (the identity is the restore's to give).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortsState {
    /// Restore generation at save time.
    pub generation: u32,
}

/// What restoring the ports needs.
#[derive(Debug, Clone, Copy)]
pub struct PortsArgs {
    /// VMM start time.
    pub start: Instant,
    /// The identity of the restored VM.
    pub identity: u32,
}

impl Persist for GrovePorts {
    type State = PortsState;
    type Args = PortsArgs;
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<PortsState, Self::Error> {
        Ok(PortsState { generation: self.generation })
    }

    /// Restores the generation as saved (the builder bumps it for a restored VM).
    fn restore(args: PortsArgs, state: &PortsState) -> Result<Self, Self::Error> {
        let mut p = Self::new(args.start, args.identity);
        p.generation = state.generation;
        Ok(p)
    }
}

/// CMOS/RTC ports: read 0, writes ignored.
#[derive(Debug, Default)]
pub struct Cmos;

impl MutDevicePio for Cmos {
    fn pio_read(&mut self, _: PioAddress, _: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _: PioAddress, _: PioAddressOffset, _: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_generation_boot_timer_and_round_trip() {
        let mut p = GrovePorts::new(Instant::now(), 7);
        let base = PioAddress(BOOT_TIMER);
        let mut d = [0u8; 4];
        p.pio_read(base, 4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 7);
        p.set_generation(3);
        p.pio_read(base, 8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 3);
        p.pio_read(base, 5, &mut d);
        assert_eq!(d, [0xff; 4], "only the register's first port answers");
        p.pio_write(base, 0, &[1]);
        assert!(p.boot_timer_ms().is_none(), "only the magic byte logs");
        p.pio_write(base, 0, &[BOOT_TIMER_MAGIC]);
        assert!(p.boot_timer_ms().is_some());
        let s = p.save().unwrap();
        let r = GrovePorts::restore(PortsArgs { start: Instant::now(), identity: 9 }, &s).unwrap();
        assert_eq!((r.generation(), r.identity()), (3, 9));
        assert_eq!(r.save().unwrap(), s);
        let mut one = [9u8];
        Cmos.pio_read(PioAddress(CMOS), 1, &mut one);
        assert_eq!(one, [0]);
    }
}
