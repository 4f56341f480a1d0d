//! ACPI power management for a hardware-reduced ACPI guest: the FADT points its sleep
//! control, sleep status and reset registers at three ports from 0x600 (`crate::acpi`).
//!
//! - sleep control (0x600): SLP_EN (bit 5) with SLP_TYP 5 (bits 2-4, the `\_S5_` value the
//!   DSDT gives) powers the VM off: [`VmExit::PowerOff`], grove-vmm exits 0. Other sleep
//!   types are not offered (no `\_S1_`..`\_S4_`) and are ignored.
//! - sleep status (0x601): reads 0.
//! - reset (0x602): [`RESET_VALUE`] resets the VM: [`VmExit::Reset`].

use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::exit::{ExitSignal, VmExit};

/// Ports the device covers (sleep control, sleep status, reset).
pub const ACPI_PM_LEN: u16 = 3;
/// Offset of the sleep control register.
pub const SLEEP_CONTROL: u16 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS: u16 = 1;
/// Offset of the reset register.
pub const RESET: u16 = 2;
/// The value written to the reset register to reset.
pub const RESET_VALUE: u8 = 1;
/// SLP_TYP of S5 (the `\_S5_` package's first element).
pub const S5_SLEEP_TYPE: u8 = 5;
/// SLP_EN in the sleep control register.
const SLP_EN: u8 = 1 << 5;

/// The ACPI power-management ports.
#[derive(Debug)]
pub struct AcpiPm {
    exit: Arc<ExitSignal>,
}

impl AcpiPm {
    /// The device; power-off and reset are recorded in `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl MutDevicePio for AcpiPm {
    fn pio_read(&mut self, _: PioAddress, _: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            SLEEP_CONTROL if v & SLP_EN != 0 && (v >> 2) & 7 == S5_SLEEP_TYPE => {
                self.exit.request(VmExit::PowerOff);
            }
            RESET if v == RESET_VALUE => self.exit.request(VmExit::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_the_reset_register_resets() {
        let base = PioAddress(crate::layout::ACPI_PM_PORT);
        let exit = ExitSignal::new().unwrap();
        let mut pm = AcpiPm::new(exit.clone());
        // Linux's hardware-reduced S5 write: (SLP_TYP << 2) | SLP_EN.
        pm.pio_write(base, SLEEP_CONTROL, &[5 << 2]);
        assert!(!exit.requested(), "no SLP_EN, no sleep");
        pm.pio_write(base, SLEEP_CONTROL, &[(3 << 2) | SLP_EN]);
        assert!(!exit.requested(), "S3 is not offered");
        pm.pio_write(base, SLEEP_CONTROL, &[(5 << 2) | SLP_EN]);
        assert!(matches!(exit.take(), Some(VmExit::PowerOff)));
        pm.pio_write(base, RESET, &[2]);
        assert!(!exit.requested());
        pm.pio_write(base, RESET, &[RESET_VALUE]);
        assert!(matches!(exit.take(), Some(VmExit::Reset)));
        let mut b = [7u8];
        pm.pio_read(base, SLEEP_STATUS, &mut b);
        assert_eq!(b, [0]);
    }
}
