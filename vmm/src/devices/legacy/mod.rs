//! Legacy port devices, each an `Arc<Mutex<_>>` on the port bus:
//!
//! | ports         | device                                                        |
//! |---------------|---------------------------------------------------------------|
//! | 0x3f8-0x3ff   | COM1 8250 UART, IRQ 4 through an irqfd ([`serial`])           |
//! | 0x60, 0x64    | i8042 ([`i8042`]): 0xFE to 0x64 resets the guest; CTR, self-test |
//! | 0x440         | boot timer: byte 123 logs the time since VMM start ([`ports`]) |
//! | 0x444         | Grove identity (32-bit IN), from the config, 0 on fresh boot  |
//! | 0x448         | Grove restore generation (32-bit IN), +1 on every restore     |
//! | 0x70-0x71     | CMOS: reads 0 ([`ports`])                                     |
//! | 0x600         | ACPI sleep control/status and reset register ([`acpi_pm`])    |
//! | anything else | reads all ones, writes ignored (0x80, 0xed, 0xcf8-0xcff, ...) |
//!
//! The idle port 0x44c belongs to the vCPU threads ([`crate::vstate::vcpu`]). The PIC, PIT
//! and IOAPIC are KVM's in-kernel ones, so their ports never exit here.

pub mod acpi_pm;
pub mod i8042;
pub mod ports;
pub mod serial;
