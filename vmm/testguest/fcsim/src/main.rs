//! `fcsim GUEST [CMDLINE] [MEM_MIB]`: boots the test guest the way Firecracker sets a
//! vCPU up for an ELF kernel, without Firecracker (which is not installed on the
//! project's hosts), to check that the guest does not depend on anything grove-vmm
//! does differently. Reproduced from Firecracker's x86_64 setup:
//! - PT_LOAD segments copied (p_filesz bytes) to p_paddr; entry = e_entry;
//! - boot_params at 0x7000 with `hdr.cmd_line_ptr` = 0x20000 and an e820 map of
//!   [0, 0x9fc00) and [1 MiB, RAM end) split at the 0xc000_0000 MMIO gap;
//! - GDT at 0x500 (null, code 0x08, data 0x10), IDT at 0x520 (limit 7);
//! - identity page tables for the first 1 GiB only: PML4 0x9000, PDPT 0xa000, PD 0xb000
//!   (2 MiB pages, no U bit);
//! - CR0 |= PE | PG on top of the reset value (so CD/NW stay set), CR4 = PAE,
//!   EFER = LME | LMA; RSP = RBP = 0x8ff0, RSI = 0x7000, RFLAGS = 2;
//!   FPU control word 0x37f, MXCSR 0x1f80; KVM's supported CPUID.
//!
//! Serial bytes (port 0x3f8) go to stdout; a 0xFE write to port 0x64 exits 0; a
//! shutdown exits 3 and any other exit 4. Other port writes are ignored and reads
//! return 0, like an absent device. Firecracker has no ports 0x440/0x444/0x448.

use std::io::Write;

use kvm_bindings::{kvm_fpu, kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};

const MIB: u64 = 1 << 20;
const GAP_START: u64 = 0xc000_0000;
const BOOT_PARAMS: u64 = 0x7000;
const CMDLINE: u64 = 0x20000;

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: fcsim GUEST [CMDLINE] [MEM_MIB]");
        std::process::exit(2);
    };
    let elf = std::fs::read(path).expect("read guest");
    let cmdline = args.get(2).cloned().unwrap_or_default();
    let mem: u64 = args.get(3).map_or(256, |s| s.parse().expect("MEM_MIB")) * MIB;

    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("create VM");
    let low = mem.min(GAP_START);
    let mut regions = vec![(0u64, low)];
    if mem > low {
        regions.push((1 << 32, mem - low));
    }
    let mut host = Vec::new();
    for (slot, &(gpa, size)) in (0u32..).zip(&regions) {
        let len = usize::try_from(size).expect("size");
        // SAFETY: a fresh anonymous private mapping; nothing else refers to it; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap guest RAM");
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: p as u64,
        };
        // SAFETY: the mapping lives until the process exits and is `size` bytes long.
        unsafe { vm.set_user_memory_region(region) }.expect("set memory region");
        host.push(p.cast::<u8>());
    }
    let low_ram = host[0];
    let write = |gpa: u64, data: &[u8]| {
        assert!(gpa + data.len() as u64 <= low, "write below the gap only");
        // SAFETY: [gpa, gpa + len) lies inside the low RAM mapping (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), low_ram.add(gpa as usize), data.len());
        }
    };

    // ELF: PT_LOAD p_filesz bytes at p_paddr, like linux-loader.
    let phoff = usize::try_from(u64_at(&elf, 0x20)).expect("phoff");
    let phnum = usize::from(u16::from_le_bytes([elf[0x38], elf[0x39]]));
    let entry = u64_at(&elf, 0x18);
    for i in 0..phnum {
        let ph = &elf[phoff + i * 56..phoff + (i + 1) * 56];
        if u32::from_le_bytes(ph[0..4].try_into().expect("4 bytes")) != 1 {
            continue;
        }
        let off = usize::try_from(u64_at(ph, 8)).expect("p_offset");
        let filesz = usize::try_from(u64_at(ph, 32)).expect("p_filesz");
        write(u64_at(ph, 24), &elf[off..off + filesz]);
    }

    // boot_params: cmdline pointer and e820.
    write(CMDLINE, cmdline.as_bytes());
    write(BOOT_PARAMS + 0x228, &u32::try_from(CMDLINE).expect("u32").to_le_bytes());
    let mut e820 = vec![(0u64, 0x9fc00u64), (MIB, low - MIB)];
    if mem > low {
        e820.push((1 << 32, mem - low));
    }
    write(BOOT_PARAMS + 0x1e8, &[u8::try_from(e820.len()).expect("few entries")]);
    for (i, (addr, size)) in (0u64..).zip(&e820) {
        let o = BOOT_PARAMS + 0x2d0 + 20 * i;
        write(o, &addr.to_le_bytes());
        write(o + 8, &size.to_le_bytes());
        write(o + 16, &1u32.to_le_bytes());
    }

    // GDT at 0x500, 1 GiB identity map at 0x9000.
    for (i, g) in (0u64..).zip([0u64, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff]) {
        write(0x500 + 8 * i, &g.to_le_bytes());
    }
    write(0x9000, &(0xa000u64 | 3).to_le_bytes());
    write(0xa000, &(0xb000u64 | 3).to_le_bytes());
    for i in 0..512u64 {
        write(0xb000 + i * 8, &((i << 21) | 0x83).to_le_bytes());
    }

    let vcpu = vm.create_vcpu(0).expect("create vCPU");
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).expect("supported CPUID");
    vcpu.set_cpuid2(&cpuid).expect("set CPUID");
    let mut s = vcpu.get_sregs().expect("get sregs");
    let code = kvm_segment {
        base: 0,
        limit: 0xfffff,
        selector: 8,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment { selector: 0x10, type_: 3, l: 0, db: 1, ..code };
    s.cs = code;
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.gdt.base = 0x500;
    s.gdt.limit = 23;
    s.idt.base = 0x520;
    s.idt.limit = 7;
    s.cr0 |= 0x8000_0001;
    s.cr3 = 0x9000;
    s.cr4 |= 0x20;
    s.efer |= 0x500;
    vcpu.set_sregs(&s).expect("set sregs");
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).expect("set FPU");
    let mut r = vcpu.get_regs().expect("get regs");
    (r.rip, r.rsp, r.rbp, r.rsi, r.rflags) = (entry, 0x8ff0, 0x8ff0, BOOT_PARAMS, 2);
    vcpu.set_regs(&r).expect("set regs");

    let mut vcpu = vcpu;
    let mut out = std::io::stdout().lock();
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x3f8, d) => {
                let flush = d[0] == b'\n';
                if out
                    .write_all(&d[..1])
                    .and_then(|()| if flush { out.flush() } else { Ok(()) })
                    .is_err()
                {
                    // The reader went away (e.g. `| head`): stop quietly.
                    std::process::exit(0);
                }
            }
            VcpuExit::IoOut(0x64, [0xfe]) => {
                let _ = out.flush();
                eprintln!("fcsim: i8042 reset");
                std::process::exit(0);
            }
            VcpuExit::IoOut(..) => {}
            VcpuExit::IoIn(_, d) => d.fill(0),
            VcpuExit::Shutdown => {
                let _ = out.flush();
                eprintln!("fcsim: guest shut down (triple fault)");
                std::process::exit(3);
            }
            other => {
                let _ = out.flush();
                eprintln!("fcsim: unexpected exit {other:?}");
                std::process::exit(4);
            }
        }
    }
}
