//! The I/O bus: port (PIO) and MMIO address ranges mapped to devices, on rust-vmm's
//! `vm-device` `IoManager`. vCPU threads dispatch their exits here. Ports where no device is
//! read all ones and ignore writes (what absent ISA hardware does; Linux probes many); MMIO
//! where no device is is an error the vCPU turns into a VM exit.

use std::sync::Arc;

use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};

/// Errors of the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A range that is empty or overflows.
    #[error("bad bus range {base:#x}+{len:#x}")]
    Range {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps a registered device, or the access hits none.
    #[error("bus")]
    Bus(#[source] vm_device::bus::Error),
}

/// A port device.
pub type PioDevice = Arc<dyn DevicePio + Send + Sync>;
/// An MMIO device.
pub type MmioDevice = Arc<dyn DeviceMmio + Send + Sync>;

/// The VM's port and MMIO buses.
#[derive(Default)]
pub struct IoBus {
    io: IoManager,
}

impl std::fmt::Debug for IoBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBus").finish_non_exhaustive()
    }
}

impl IoBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps ports `base .. base + len` to `dev`.
    pub fn register_pio(&mut self, base: u16, len: u16, dev: PioDevice) -> Result<(), BusError> {
        let range = PioRange::new(PioAddress(base), len)
            .map_err(|_| BusError::Range { base: u64::from(base), len: u64::from(len) })?;
        self.io.register_pio(range, dev).map_err(BusError::Bus)
    }

    /// Maps MMIO `base .. base + len` to `dev`.
    pub fn register_mmio(&mut self, base: u64, len: u64, dev: MmioDevice) -> Result<(), BusError> {
        let range =
            MmioRange::new(MmioAddress(base), len).map_err(|_| BusError::Range { base, len })?;
        self.io.register_mmio(range, dev).map_err(BusError::Bus)
    }

    /// A port read: the device's answer, or all ones where no device is.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.io.pio_read(PioAddress(port), data).is_err() {
            data.fill(0xff);
        }
    }

    /// A port write; ignored where no device is.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        let _ = self.io.pio_write(PioAddress(port), data);
    }

    /// An MMIO read; an error where no device is (or the access straddles its end).
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        self.io.mmio_read(MmioAddress(addr), data).map_err(BusError::Bus)
    }

    /// An MMIO write; an error where no device is.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        self.io.mmio_write(MmioAddress(addr), data).map_err(BusError::Bus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_device::bus::{MmioAddressOffset, PioAddressOffset};
    use vm_device::{MutDeviceMmio, MutDevicePio};

    /// Records the last access: (base, offset, value).
    #[derive(Default)]
    struct Probe {
        last: Option<(u64, u64, u8)>,
    }

    impl MutDevicePio for Probe {
        fn pio_read(&mut self, _: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap());
        }
        fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
            self.last = Some((u64::from(base.0), u64::from(offset), data[0]));
        }
    }

    impl MutDeviceMmio for Probe {
        fn mmio_read(&mut self, _: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap());
        }
        fn mmio_write(&mut self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
            self.last = Some((base.0, offset, data[0]));
        }
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset() {
        let mut bus = IoBus::new();
        let p = Arc::new(Mutex::new(Probe::default()));
        bus.register_pio(0x3f8, 8, p.clone()).unwrap();
        bus.register_mmio(0xd000_0000, 0x1000, p.clone()).unwrap();
        let mut b = [0u8; 1];
        bus.pio_read(0x3fa, &mut b);
        assert_eq!(b, [2]);
        bus.pio_write(0x3ff, &[9]);
        assert_eq!(p.lock().unwrap().last, Some((0x3f8, 7, 9)));
        let mut w = [0u8; 4];
        bus.mmio_read(0xd000_0070, &mut w).unwrap();
        assert_eq!(w, [0x70; 4]);
        bus.mmio_write(0xd000_0ffc, &[5, 0, 0, 0]).unwrap();
        assert_eq!(p.lock().unwrap().last, Some((0xd000_0000, 0xffc, 5)));
    }

    #[test]
    fn holes_and_overlaps() {
        let mut bus = IoBus::new();
        let p = Arc::new(Mutex::new(Probe::default()));
        bus.register_mmio(0xd000_0000, 0x1000, p.clone()).unwrap();
        // Absent ports read all ones; writes there vanish.
        let mut b = [0u8; 2];
        bus.pio_read(0x80, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        bus.pio_write(0x80, &[1]);
        // MMIO outside any device, or straddling a device's end, is an error.
        assert!(bus.mmio_write(0xe000_0000, &[1]).is_err());
        assert!(bus.mmio_read(0xd000_0ffe, &mut [0u8; 4]).is_err());
        // Overlapping registrations are refused.
        assert!(bus.register_mmio(0xd000_0800, 0x1000, p.clone()).is_err());
        assert!(bus.register_pio(0x60, 0, p).is_err());
    }
}
