//! The i8042 keyboard controller at 0x60/0x64, as much of it as a Linux guest's probe needs
//! to finish at once (vm-superio's device reads 0 for everything, so Linux waits ~2 s for the
//! command byte and logs "Can't read CTR"): the status register, the controller command byte
//! (CTR, commands 0x20/0x60), the self-test (0xAA answers 0x55), and an AUX port that fails
//! its tests at once (loopback data without the AUX flag, 0xA9 answers "clock line stuck").
//! 0xFE written to the command port is the CPU reset pulse, which ends the VM with
//! [`VmExit::Reset`] (grove-vmm exits 0). No keyboard or mouse is behind it: data written to
//! 0x60 outside a command is dropped. Not saved in snapshots: a guest touches it only while
//! booting and rebooting.

use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::exit::{ExitSignal, VmExit};

/// Data port.
pub const I8042_DATA: u16 = 0x60;
/// Command/status port.
pub const I8042_CMD: u16 = 0x64;

/// The i8042 on the port bus (registered at both ports).
#[derive(Debug)]
pub struct I8042 {
    exit: Arc<ExitSignal>,
    ctr: u8,
    out: Option<u8>,
    /// The command whose parameter byte the next write to 0x60 is.
    pending: Option<u8>,
    last_was_cmd: bool,
}

impl I8042 {
    const STR_OBF: u8 = 0x01;
    const STR_SYS: u8 = 0x04;
    const STR_CMDDAT: u8 = 0x08;
    const STR_KEYLOCK: u8 = 0x10;

    /// The controller; a reset pulse is recorded in `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        // Keyboard interrupt on, system flag set, translation on: what firmware leaves.
        Self { exit, ctr: 0x45, out: None, pending: None, last_was_cmd: false }
    }

    /// An IN from 0x60 (data: takes the output byte) or 0x64 (status).
    fn read(&mut self, port: u16) -> u8 {
        if port == I8042_DATA {
            return self.out.take().unwrap_or(0);
        }
        let mut st = Self::STR_SYS | Self::STR_KEYLOCK;
        if self.out.is_some() {
            st |= Self::STR_OBF;
        }
        if self.last_was_cmd {
            st |= Self::STR_CMDDAT;
        }
        st
    }

    /// An OUT to 0x60 or 0x64; true when the guest asked for a CPU reset.
    fn write(&mut self, port: u16, v: u8) -> bool {
        if port == I8042_DATA {
            self.last_was_cmd = false;
            match self.pending.take() {
                Some(0x60) => self.ctr = v,
                // AUX loopback: the byte comes back without the AUX flag (no AUX port).
                Some(0xd3) => self.out = Some(v),
                _ => {}
            }
            return false;
        }
        self.last_was_cmd = true;
        self.pending = None;
        match v {
            0x20 => self.out = Some(self.ctr),
            0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.pending = Some(v),
            0xaa => self.out = Some(0x55),
            0xa9 => self.out = Some(0x01),
            0xab => self.out = Some(0x00),
            0xfe => return true,
            _ => {}
        }
        false
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let v = self.read(base.0.wrapping_add(offset));
        data.fill(v);
    }

    fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(&b) = data.first() else { return };
        if self.write(base.0.wrapping_add(offset), b) {
            self.exit.request(VmExit::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inb(d: &mut I8042, port: u16) -> u8 {
        let mut b = [0u8];
        d.pio_read(PioAddress(port), 0, &mut b);
        b[0]
    }

    fn outb(d: &mut I8042, port: u16, v: u8) {
        d.pio_write(PioAddress(port), 0, &[v]);
    }

    #[test]
    fn reset_pulse_ends_the_vm_once() {
        let exit = ExitSignal::new().unwrap();
        let mut d = I8042::new(exit.clone());
        outb(&mut d, I8042_CMD, 0x01);
        outb(&mut d, I8042_DATA, 0xfe);
        assert!(!exit.requested(), "0xFE to the data port is not a reset");
        outb(&mut d, I8042_CMD, 0xfe);
        assert!(matches!(exit.take(), Some(VmExit::Reset)));
        assert_eq!(inb(&mut d, I8042_DATA), 0);
    }

    #[test]
    fn answers_linux_probe() {
        let exit = ExitSignal::new().unwrap();
        let mut d = I8042::new(exit.clone());
        assert_eq!(inb(&mut d, I8042_CMD) & 1, 0, "output buffer empty: the flush ends at once");
        outb(&mut d, I8042_CMD, 0x20);
        assert_eq!(inb(&mut d, I8042_CMD) & 1, 1);
        let ctr = inb(&mut d, I8042_DATA);
        assert_eq!(inb(&mut d, I8042_CMD) & 1, 0);
        outb(&mut d, I8042_CMD, 0x60);
        outb(&mut d, I8042_DATA, ctr & !0x03);
        outb(&mut d, I8042_CMD, 0x20);
        assert_eq!(inb(&mut d, I8042_DATA), ctr & !0x03, "the written CTR reads back");
        outb(&mut d, I8042_CMD, 0xaa);
        assert_eq!(inb(&mut d, I8042_DATA), 0x55);
        // AUX loopback: the byte comes back, without the AUX data flag (0x20).
        outb(&mut d, I8042_CMD, 0xd3);
        outb(&mut d, I8042_DATA, 0x5a);
        assert_eq!(inb(&mut d, I8042_CMD) & 0x21, 0x01);
        assert_eq!(inb(&mut d, I8042_DATA), 0x5a);
        outb(&mut d, I8042_CMD, 0xa9);
        assert_ne!(inb(&mut d, I8042_DATA), 0, "AUX interface test fails");
        // Keyboard bytes outside a command go nowhere.
        outb(&mut d, I8042_DATA, 0xf2);
        assert_eq!(inb(&mut d, I8042_CMD) & 1, 0);
        assert!(!exit.requested());
    }
}
