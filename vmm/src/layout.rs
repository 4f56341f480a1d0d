//! Guest physical memory layout (x86-64), the same map Firecracker uses for the low megabyte.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)          0x0000_0520  IDT (empty)
//! 0x0000_7000  boot_params (zero page)  0x0000_8ff0  initial stack (grows down)
//! 0x0000_9000  PML4                     0x0000_a000  PDPT
//! 0x0000_b000  PD (first 1 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line (up to CMDLINE_MAX bytes)
//! 0x0009_fc00  EBDA start: MP table     0x000a_0000 .. 0x0010_0000 legacy hole (not RAM in e820)
//! 0x0010_0000  kernel (ELF p_paddr / bzImage code32_start)
//! top of low RAM: initrd (page aligned, below 3 GiB and initrd_addr_max)
//! 0xc000_0000 .. 0x1_0000_0000  32-bit MMIO gap (no RAM)
//! 0x1_0000_0000  RAM above 3 GiB continues here
//! ```

/// GDT location.
pub const GDT_ADDR: u64 = 0x500;
/// IDT location (an empty IDT: interrupts stay off until the guest installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// The zero page (`boot_params`), passed in RSI.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_ADDR: u64 = 0xa000;
/// Page directory (512 x 2 MiB = 1 GiB identity mapped).
pub const PDE_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line accepted (bytes, without the terminating NUL).
pub const CMDLINE_MAX: usize = 4095;
/// Start of the extended BIOS data area; the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte above the legacy hole: the kernel loads here or above.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (RAM resumes here).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Smallest guest accepted: the boot structures plus some room for a kernel (MiB).
pub const MIN_MEM_MIB: u64 = 8;
/// Largest guest accepted (MiB): 1 TiB, far above anything this host can give.
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Most vCPUs accepted (the MP table must fit the 1 KiB EBDA: 37 at most; keep 32).
pub const MAX_VCPUS: u8 = 32;
/// Page size used for memory bookkeeping.
pub const PAGE_SIZE: u64 = 4096;

/// The idle port: a guest that cannot `hlt` (the test guest runs at CPL 3) sleeps here. It is
/// the vCPU thread's own (it sleeps that thread), not a device on the bus.
pub const IDLE_PORT: u16 = 0x44c;
/// What a 32-bit IN from the idle port reads ("GROV"), so a guest can detect it (an unknown
/// port reads all ones in grove-vmm; other VMMs answer something else).
pub const IDLE_MAGIC: u32 = 0x4752_4f56;
/// Longest sleep one OUT to the idle port asks for (microseconds); larger values clamp.
pub const IDLE_MAX_US: u32 = 1000;

/// First address of the window virtio-mmio devices are placed in (inside the 32-bit MMIO gap,
/// where Firecracker puts its devices too).
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// Size of that window: 256 MiB, far more than the interrupt lines allow.
pub const MMIO_DEVICES_SIZE: u64 = 0x1000_0000;
/// Size of one virtio-mmio device's register page.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// IOAPIC interrupt lines (GSIs) given to virtio devices: 5 to 23 (0-4 are the PIT, the
/// keyboard, the cascade and COM1-2's; the IOAPIC has 24 pins).
pub const DEVICE_GSI_FIRST: u32 = 5;
/// Last GSI given to a device.
pub const DEVICE_GSI_LAST: u32 = 23;
/// Local APIC base.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The RSDP, in the BIOS area Linux scans (0xe0000-0xfffff, not RAM in the e820 map); the
/// other ACPI tables follow it there.
pub const RSDP_ADDR: u64 = 0x000e_0000;
/// End of the area the ACPI tables may use.
pub const ACPI_END: u64 = 0x0010_0000;
/// The ACPI power-management port: the FADT's sleep control, sleep status and reset
/// registers (hardware-reduced ACPI).
pub const ACPI_PM_PORT: u16 = 0x600;
