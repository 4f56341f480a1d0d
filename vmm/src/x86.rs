//! x86-64 vCPU boot state: GDT, identity page tables, registers, FPU, MSRs, LAPIC, MP table.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

use crate::layout::{
    BOOT_STACK_POINTER, EBDA_START, GDT_ADDR, IDT_ADDR, PDE_ADDR, PDPTE_ADDR, PML4_ADDR,
    ZERO_PAGE_ADDR,
};

/// Errors from writing x86 boot structures.
#[derive(Debug, thiserror::Error)]
pub enum X86Error {
    /// Guest memory does not cover the boot structures.
    #[error("cannot write boot structure at {0:#x}")]
    GuestWrite(u64),
    /// Too many vCPUs for the MP table.
    #[error("{0} vCPUs do not fit the MP table")]
    TooManyCpus(u8),
}

/// Packs a GDT entry from flags (access byte + flags nibble, as in Linux's GDT_ENTRY), base, limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The kvm_segment that matches a GDT entry at `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    #[allow(clippy::cast_possible_truncation, reason = "each field is masked to its width")]
    let seg = kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let l = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
            if (entry >> 55) & 1 == 1 {
                (l << 12) | 0xfff
            } else {
                l
            }
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    };
    seg
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    0,
    // CODE: present, DPL0, code exec/read, accessed; L=1, G=1.
    0x00af_9b00_0000_ffff,
    // DATA: present, DPL0, data read/write, accessed; DB=1, G=1.
    0x00cf_9300_0000_ffff,
    // TSS: present, 64-bit busy TSS.
    0x008f_8b00_0000_ffff,
];

/// Writes the GDT, an empty IDT and identity page tables for the first 1 GiB (2 MiB pages).
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), X86Error> {
    let w = |v: u64, a: u64| mem.write_obj(v, GuestAddress(a)).map_err(|_| X86Error::GuestWrite(a));
    for (i, e) in BOOT_GDT.iter().enumerate() {
        w(*e, GDT_ADDR + 8 * i as u64)?;
    }
    w(0, IDT_ADDR)?;
    w(PDPTE_ADDR | 0x03, PML4_ADDR)?;
    w(PDE_ADDR | 0x03, PDPTE_ADDR)?;
    let mut pd = [0u8; 4096];
    for (i, chunk) in pd.chunks_exact_mut(8).enumerate() {
        // Present, writable, 2 MiB page.
        let e = ((i as u64) << 21) | 0x83;
        chunk.copy_from_slice(&e.to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PDE_ADDR)).map_err(|_| X86Error::GuestWrite(PDE_ADDR))
}

/// Long-mode special registers on top of KVM's defaults.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = u16::try_from(BOOT_GDT.len() * 8 - 1).unwrap_or(u16::MAX);
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers at entry: RIP = entry, RSI = zero page, interrupts off.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// FPU at reset: default control word and MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// MSR indices used at boot.
pub mod msr {
    /// IA32_SYSENTER_CS.
    pub const SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const SYSENTER_EIP: u32 = 0x176;
    /// STAR.
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR.
    pub const LSTAR: u32 = 0xc000_0082;
    /// CSTAR.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SYSCALL_MASK.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// KERNEL_GS_BASE.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// IA32_TSC.
    pub const TSC: u32 = 0x10;
    /// IA32_MISC_ENABLE.
    pub const MISC_ENABLE: u32 = 0x1a0;
    /// MTRRdefType.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
}

/// Boot MSR values (as Firecracker): syscall MSRs cleared, fast strings on, MTRRs enabled with
/// write-back default.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    vec![
        e(msr::SYSENTER_CS, 0),
        e(msr::SYSENTER_ESP, 0),
        e(msr::SYSENTER_EIP, 0),
        e(msr::STAR, 0),
        e(msr::CSTAR, 0),
        e(msr::KERNEL_GS_BASE, 0),
        e(msr::SYSCALL_MASK, 0),
        e(msr::LSTAR, 0),
        e(msr::TSC, 0),
        e(msr::MISC_ENABLE, 1),
        e(msr::MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    #[allow(clippy::cast_sign_loss, reason = "c_char register bytes reinterpreted as u8")]
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        #[allow(clippy::cast_possible_wrap, reason = "register bytes stored as c_char")]
        {
            l.regs[off + i] = *byte as _;
        }
    }
}

/// LINT0 = ExtINT (the PIC), LINT1 = NMI.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let set_mode = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let l0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, set_mode(l0, APIC_MODE_EXTINT));
    let l1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, set_mode(l1, APIC_MODE_NMI));
}

/// Reads LVT LINT0/LINT1 (for tests).
pub fn lint_modes(lapic: &kvm_lapic_state) -> (u32, u32) {
    ((lapic_reg(lapic, APIC_LVT0) >> 8) & 7, (lapic_reg(lapic, APIC_LVT1) >> 8) & 7)
}

const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_FEATURES: u32 = 0x600;
const FEATURE_FLAGS: u32 = 0x201; // FPU + APIC
const IRQ_COUNT: u8 = 24;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// Builds the Intel MP table (floating pointer + configuration table) for `nvcpus` vCPUs
/// placed at `base`: CPUs (APIC id = index), an ISA bus, one IOAPIC, 24 ISA interrupts routed
/// 1:1, LINT0 ExtINT and LINT1 NMI.
pub fn mptable_bytes(base: u64, nvcpus: u8) -> Result<Vec<u8>, X86Error> {
    if nvcpus == 0 || nvcpus >= 0xfe {
        return Err(X86Error::TooManyCpus(nvcpus));
    }
    let table_addr = u32::try_from(base + 16).map_err(|_| X86Error::GuestWrite(base))?;
    let mut t: Vec<u8> = Vec::new();
    // Configuration table header (44 bytes); length and checksum patched below.
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&[0, 0, 4, 0]);
    t.extend_from_slice(b"GROVE   ");
    t.extend_from_slice(b"GROVE VM    ");
    t.extend_from_slice(&0u32.to_le_bytes()); // oem table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // oem table size
    t.extend_from_slice(&0u16.to_le_bytes()); // entry count, patched
    t.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    let mut count: u16 = 0;
    for cpu in 0..nvcpus {
        let flags = 1 | if cpu == 0 { 2 } else { 0 }; // enabled, BSP
        t.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        t.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        t.extend_from_slice(&FEATURE_FLAGS.to_le_bytes());
        t.extend_from_slice(&[0; 8]);
        count += 1;
    }
    t.extend_from_slice(&[1, 0]);
    t.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic_id = nvcpus + 1;
    t.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    t.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    count += 1;
    for irq in 0..IRQ_COUNT {
        // type 3 (I/O interrupt), mp_INT, conforming polarity/trigger, bus 0.
        t.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT to LINT0 of every CPU, NMI to LINT1 of every CPU.
    t.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    t.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;
    let len = u16::try_from(t.len()).map_err(|_| X86Error::TooManyCpus(nvcpus))?;
    t[4..6].copy_from_slice(&len.to_le_bytes());
    t[34..36].copy_from_slice(&count.to_le_bytes());
    t[7] = checksum(&t);
    // Floating pointer structure (16 bytes).
    let mut f = Vec::with_capacity(16 + t.len());
    f.extend_from_slice(b"_MP_");
    f.extend_from_slice(&table_addr.to_le_bytes());
    f.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    f[10] = checksum(&f[..16]);
    f.extend_from_slice(&t);
    Ok(f)
}

/// Writes the MP table at the EBDA.
pub fn write_mptable(mem: &GuestMemory, nvcpus: u8) -> Result<(), X86Error> {
    let bytes = mptable_bytes(EBDA_START, nvcpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START)).map_err(|_| X86Error::GuestWrite(EBDA_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_long_mode_segments() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), BOOT_GDT[1]);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), BOOT_GDT[2]);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), BOOT_GDT[3]);
        let cs = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!((cs.selector, cs.l, cs.db, cs.present, cs.type_, cs.s), (8, 1, 0, 1, 0xb, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!((ds.selector, ds.l, ds.db, ds.type_), (16, 0, 1, 3));
        let tr = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!((tr.selector, tr.s, tr.type_), (24, 0, 0xb));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn sregs_enable_long_mode_with_paging() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.cr3, PML4_ADDR);
        assert_ne!(s.cr0 & 1, 0);
        assert_ne!(s.cr0 & (1 << 31), 0);
        assert_ne!(s.cr4 & (1 << 5), 0);
        assert_eq!(s.efer & 0x500, 0x500);
        let r = boot_regs(0x10_0000);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x10_0000, ZERO_PAGE_ADDR, 2));
    }

    #[test]
    fn lint_modes_are_extint_and_nmi() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0700);
        set_lint(&mut l);
        assert_eq!(lint_modes(&l), (7, 4));
        // Mask bit untouched.
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x0001_0700);
    }

    #[test]
    fn mptable_is_well_formed() {
        let b = mptable_bytes(EBDA_START, 4).unwrap();
        assert_eq!(&b[..4], b"_MP_");
        assert_eq!(checksum(&b[..16]), 0);
        let addr = u32::from_le_bytes(b[4..8].try_into().unwrap());
        assert_eq!(u64::from(addr), EBDA_START + 16);
        let t = &b[16..];
        assert_eq!(&t[..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([t[4], t[5]]));
        assert_eq!(len, t.len());
        assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let count = u16::from_le_bytes([t[34], t[35]]);
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
        // CPU entries: APIC ids 0..4, BSP flag only on the first.
        for cpu in 0..4u8 {
            let e = &t[44 + 20 * usize::from(cpu)..];
            assert_eq!((e[0], e[1]), (0, cpu));
            assert_eq!(e[3] & 2 != 0, cpu == 0);
        }
        assert!(mptable_bytes(EBDA_START, 0).is_err());
        // Fits below the legacy hole.
        assert!(EBDA_START + b.len() as u64 <= 0xa_0000);
    }
}
