//! ACPI tables, so that a stock kernel (Debian's: `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` off)
//! finds the virtio-mmio devices, the CPUs and interrupt controllers, and can power off.
//!
//! Hardware-reduced ACPI (no PM1 blocks, no SCI, no GPEs), as Firecracker and Cloud
//! Hypervisor use it, built with rust-vmm's `acpi_tables`:
//! - RSDP at [`RSDP_ADDR`] (in the BIOS area Linux scans; also passed in `boot_params`),
//!   pointing to the XSDT;
//! - XSDT: FADT, MADT;
//! - FADT: hardware-reduced, no VGA, no MSI, ASPM off; sleep control/status and reset registers
//!   on the ACPI PM ports ([`ACPI_PM_PORT`]); the DSDT;
//! - MADT: one local APIC per vCPU (APIC id = index), the IOAPIC (GSI base 0), PC-AT
//!   compatible (the in-kernel 8259 PICs exist);
//! - DSDT: `\_S5_` (power-off), COM1 (`PNP0501`), and one `LNRO0005` (virtio-mmio) device
//!   per virtio device with its register page and interrupt line (edge triggered, active
//!   high). The i8042 is not listed, and the FADT does not claim an 8042 either: grove-vmm's
//!   i8042 is there for the reset pulse only (which `reboot=k` writes to port 0x64 without a
//!   driver), so Linux skips probing a keyboard controller that has no keyboard.
//!
//! The tables lie in guest memory from [`RSDP_ADDR`] to [`ACPI_END`], which the e820 map does
//! not report as RAM.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{ACPI_END, ACPI_PM_PORT, APIC_ADDR, IOAPIC_ADDR, MMIO_DEVICE_SIZE, RSDP_ADDR};
use crate::memory::GuestMemory;

/// OEM id in every table.
const OEM_ID: [u8; 6] = *b"GROVE ";
/// OEM revision of every table.
const OEM_REVISION: u32 = 1;
/// FADT hypervisor vendor identity.
const HYPERVISOR_ID: &[u8; 8] = b"GROVEVMM";
/// Linux's ACPI id of a virtio-mmio device.
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// IA-PC boot architecture flags: no VGA (bit 2), no MSI (bit 3), no ASPM control (bit 4).
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 4);
/// MADT flags: PC-AT compatible (dual 8259 present).
const MADT_PCAT_COMPAT: u8 = 1;

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit the area reserved for them.
    #[error("ACPI tables of {0} bytes do not fit below {ACPI_END:#x}")]
    TooLarge(u64),
    /// Guest memory does not cover the area.
    #[error("cannot write ACPI table at {0:#x}")]
    GuestWrite(u64),
    /// More vCPUs than the MADT's 8-bit APIC ids allow.
    #[error("{0} vCPUs do not fit the MADT")]
    TooManyCpus(usize),
}

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Register page.
    pub base: u64,
    /// Interrupt line (GSI).
    pub gsi: u32,
}

/// An AML sink into a byte vector.
#[derive(Default)]
struct Sink(Vec<u8>);

impl AmlSink for Sink {
    fn byte(&mut self, b: u8) {
        self.0.push(b);
    }
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut s = Sink::default();
    t.to_aml_bytes(&mut s);
    s.0
}

fn checksum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x)).wrapping_neg()
}

/// AML already serialised (so trees are built bottom-up without borrowed temporaries).
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// `Device(NAME) { _HID, [_UID], [_CCA], _CRS }` with the given resources.
fn device(name: &str, hid: &dyn Aml, uid: Option<u32>, cca: bool, resources: &[&dyn Aml]) -> Raw {
    let crs = aml::ResourceTemplate::new(resources.to_vec());
    let mut names = vec![aml::Name::new("_HID".into(), hid)];
    if let Some(u) = uid {
        names.push(aml::Name::new("_UID".into(), &u));
    }
    if cca {
        names.push(aml::Name::new("_CCA".into(), &aml::ONE));
    }
    names.push(aml::Name::new("_CRS".into(), &crs));
    let children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    Raw(bytes_of(&aml::Device::new(name.into(), children)))
}

/// The DSDT's AML body.
pub fn dsdt_aml(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut body = Sink::default();
    // \_S5_: SLP_TYPa = 5 (what the ACPI PM device expects), SLP_TYPb, two reserved.
    let (five, zero) = (crate::devices::legacy::acpi_pm::S5_SLEEP_TYPE, 0u8);
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&five, &zero, &zero, &zero]))
        .to_aml_bytes(&mut body);
    let edge_high = |gsi| aml::Interrupt::new(true, true, false, false, gsi);
    let mut sb: Vec<Raw> = vec![device(
        "COM1",
        &aml::EISAName::new("PNP0501"),
        Some(1),
        false,
        &[&aml::IO::new(0x3f8, 0x3f8, 1, 8), &edge_high(4)],
    )];
    let hid: aml::AmlStr = VIRTIO_MMIO_HID;
    for (i, d) in devices.iter().enumerate() {
        let page = aml::Memory32Fixed::new(true, d.base as u32, MMIO_DEVICE_SIZE as u32);
        let uid = u32::try_from(i).unwrap_or(u32::MAX);
        sb.push(device(&format!("V{i:03X}"), &hid, Some(uid), true, &[&page, &edge_high(d.gsi)]));
    }
    let children: Vec<&dyn Aml> = sb.iter().map(|d| d as &dyn Aml).collect();
    aml::Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut body);
    body.0
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let port = |off: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(ACPI_PM_PORT + off),
        )
    };
    use crate::devices::legacy::acpi_pm::{RESET, RESET_VALUE, SLEEP_CONTROL, SLEEP_STATUS};
    let mut f = FADTBuilder::new(OEM_ID, *b"GROVFACP", OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    f.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    f.sleep_control_reg = port(SLEEP_CONTROL);
    f.sleep_status_reg = port(SLEEP_STATUS);
    f.reset_reg = port(RESET);
    f.reset_value = RESET_VALUE;
    f.hypervisor_vendor_identity = u64::from_le_bytes(*HYPERVISOR_ID).into();
    bytes_of(&f.finalize())
}

fn madt(nvcpus: usize) -> Result<Vec<u8>, AcpiError> {
    let n = u8::try_from(nvcpus).map_err(|_| AcpiError::TooManyCpus(nvcpus))?;
    let mut m =
        MADT::new(OEM_ID, *b"GROVAPIC", OEM_REVISION, LocalInterruptController::Address(APIC_ADDR));
    m.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    for i in 0..n {
        m.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    let mut b = bytes_of(&m);
    // acpi_tables writes flags 0: set PC-AT compatibility and fix the checksum.
    b[40] |= MADT_PCAT_COMPAT;
    b[9] = 0;
    b[9] = checksum(&b);
    Ok(b)
}

fn align8(a: u64) -> u64 {
    (a + 7) & !7
}

/// Writes every table for `nvcpus` vCPUs and `devices` into guest memory; returns the RSDP's
/// address (for `boot_params.acpi_rsdp_addr`).
pub fn write_tables(
    mem: &GuestMemory,
    nvcpus: usize,
    devices: &[MmioDeviceInfo],
) -> Result<u64, AcpiError> {
    let mut at = align8(RSDP_ADDR + Rsdp::len() as u64);
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let addr = at;
        let end = addr + bytes.len() as u64;
        if end > ACPI_END {
            return Err(AcpiError::TooLarge(end - RSDP_ADDR));
        }
        mem.write_slice(bytes, GuestAddress(addr)).map_err(|_| AcpiError::GuestWrite(addr))?;
        at = align8(end);
        Ok(addr)
    };
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"GROVDSDT", OEM_REVISION);
    dsdt.append_slice(&dsdt_aml(devices));
    let dsdt_addr = place(dsdt.as_slice())?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(&madt(nvcpus)?)?;
    let mut xsdt = XSDT::new(OEM_ID, *b"GROVXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&bytes_of(&xsdt))?;
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    mem.write_slice(&rsdp, GuestAddress(RSDP_ADDR))
        .map_err(|_| AcpiError::GuestWrite(RSDP_ADDR))?;
    Ok(RSDP_ADDR)
}

/// A parser of the tables, as a guest reads them: the tests check what was written by
/// reading it back, never by comparing with the writer's own values.
#[cfg(test)]
pub(crate) mod parse;

#[cfg(test)]
mod tests;
