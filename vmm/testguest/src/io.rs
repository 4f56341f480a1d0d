//! Port I/O, the serial console, the TSC and CPUID, all used at CPL 3
//! (the boot stub sets RFLAGS.IOPL = 3, so `in`/`out` do not fault).

use core::arch::asm;
use core::fmt;

/// COM1 transmit holding register (8250 UART).
pub const COM1: u16 = 0x3f8;
/// i8042 command port; 0xFE pulses the CPU reset line.
pub const I8042_CMD: u16 = 0x64;
/// Grove boot-timer port: writing [`BOOT_TIMER_MAGIC`] makes the VMM log the time since it started.
pub const BOOT_TIMER: u16 = 0x440;
/// The byte the boot-timer port expects.
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// Grove identity port (32-bit read): 0 on a fresh boot, the child's identity after a restore.
pub const IDENTITY: u16 = 0x444;
/// Grove restore-generation port (32-bit read): 0 on a fresh boot, +1 per restore.
pub const GENERATION: u16 = 0x448;
/// Grove idle port: a 32-bit read gives `pace::IDLE_MAGIC` under grove-vmm; a 32-bit write
/// of N makes the VMM sleep the vCPU N µs (at most 1000) before it resumes the guest.
pub const IDLE: u16 = 0x44c;

/// Writes one byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, val: u8) {
    // SAFETY: the guest runs at CPL 3 with IOPL 3 (set by the boot stub), so `out` is
    // allowed; it touches no memory of this program, only the VMM's device model.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags));
    }
}

/// Writes 32 bits to an I/O port.
#[inline(always)]
pub fn outl(port: u16, val: u32) {
    // SAFETY: as for `outb`: IOPL 3 allows `out` at CPL 3 and it touches no memory.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack, preserves_flags));
    }
}

/// Reads 32 bits from an I/O port.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let val: u32;
    // SAFETY: as for `outb`: IOPL 3 allows `in` at CPL 3 and it touches no memory.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") val, options(nomem, nostack, preserves_flags));
    }
    val
}

/// Writes one byte to an MMIO address in the 32-bit gap (checked by the caller).
pub fn mmio_write8(addr: u64, val: u8) {
    // SAFETY: `Config::parse` only accepts a page-aligned address in [3 GiB, 4 GiB), the
    // MMIO gap, which holds no RAM of this program; the identity map covers it, and the
    // VMM handles (or rejects) the access.
    unsafe { (addr as *mut u8).write_volatile(val) }
}

/// The time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: `rdtsc` only reads the TSC into EDX:EAX (CR4.TSD is clear, so it is
    // allowed at CPL 3; if a hypervisor traps it, it is emulated).
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// CPUID leaf `leaf`, sub-leaf 0: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
    // SAFETY: `cpuid` only writes the four registers named here; RBX is reserved by
    // LLVM, so it is saved in a scratch register and swapped back.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") 0u32 => ecx,
            out("edx") edx,
            options(nomem, nostack, preserves_flags),
        );
    }
    (eax, ebx, ecx, edx)
}

/// The serial console (COM1). Bytes go straight to the transmit register: a
/// VMM's emulated UART always accepts them, so the line status is not polled
/// (each poll would be one more VM exit).
pub struct Serial;

impl Serial {
    /// Writes raw bytes.
    pub fn write_bytes(bytes: &[u8]) {
        for &b in bytes {
            outb(COM1, b);
        }
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        Self::write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::io::Serial, format_args!($($arg)*));
    }};
}

/// Asks the VMM for a reset through the i8042 (grove-vmm and Firecracker exit on
/// it), then waits for the VMM to stop the vCPU.
pub fn reset() -> ! {
    outb(I8042_CMD, 0xfe);
    loop {
        core::hint::spin_loop();
    }
}

/// Triple-faults the vCPU: the IDT has limit 0, so the #UD escalates to #GP, #DF,
/// then a shutdown, which the VMM reports as an error.
pub fn triple_fault() -> ! {
    // SAFETY: `ud2` raises #UD; with the empty IDT the CPU shuts down. Nothing
    // after it runs, and it touches no memory.
    unsafe { asm!("ud2", options(noreturn, nomem, nostack)) }
}

/// TSC frequency in kHz as the (virtual) CPU reports it, if it does:
/// the hypervisor timing leaf 0x4000_0010, then leaf 0x15, then leaf 0x16.
pub fn tsc_khz_from_cpuid() -> Option<u64> {
    let (max_hv, ..) = cpuid(0x4000_0000);
    if (0x4000_0010..0x4000_0100).contains(&max_hv) {
        let (khz, ..) = cpuid(0x4000_0010);
        if khz != 0 {
            return Some(u64::from(khz));
        }
    }
    let (max_std, ..) = cpuid(0);
    if max_std >= 0x15 {
        let (den, num, crystal_hz, _) = cpuid(0x15);
        if den != 0 && num != 0 && crystal_hz != 0 {
            return Some(u64::from(crystal_hz) * u64::from(num) / u64::from(den) / 1000);
        }
    }
    if max_std >= 0x16 {
        let (mhz, ..) = cpuid(0x16);
        if mhz & 0xffff != 0 {
            return Some(u64::from(mhz & 0xffff) * 1000);
        }
    }
    None
}

/// Reads 32 bits of a virtio-mmio register at `addr`.
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: callers pass a register of the device page `Config::parse` accepted (a 4 KiB
    // page in the 32-bit MMIO gap, identity-mapped, no RAM of this program); the access is
    // an aligned 32-bit load the VMM emulates.
    unsafe { (addr as *const u32).read_volatile() }
}

/// Writes 32 bits to a virtio-mmio register at `addr`.
pub fn mmio_write32(addr: u64, val: u32) {
    // SAFETY: as for `mmio_read32`, an aligned 32-bit store to a device register.
    unsafe { (addr as *mut u32).write_volatile(val) }
}

/// Guest memory the device shares (virtqueue rings and buffers): volatile accesses only,
/// since the device (the VMM) writes it concurrently.
pub mod shared {
    /// Stores `val` at `addr`.
    pub fn write<T: Copy>(addr: u64, val: T) {
        // SAFETY: callers pass addresses inside the virtqueue pages of
        // `grove_testguest::virtio` (RAM below the region, identity-mapped, used by
        // nothing else in this program), aligned for `T`.
        unsafe { (addr as *mut T).write_volatile(val) }
    }

    /// Loads the value at `addr`.
    pub fn read<T: Copy>(addr: u64) -> T {
        // SAFETY: as for `write`.
        unsafe { (addr as *const T).read_volatile() }
    }
}
