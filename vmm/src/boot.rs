//! Kernel, initrd, command line and `boot_params` (the Linux x86-64 64-bit boot protocol).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::input::{self, Accept};
use crate::layout::{
    CMDLINE_ADDR, CMDLINE_MAX, EBDA_START, HIMEM_START, PAGE_SIZE, ZERO_PAGE_ADDR,
};
use crate::memory::{GuestMemory, GuestRam, RamRegion};

/// Default command line when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// Appended to every command line: asks guest-init for its boot-timer port write (0x440).
pub const BOOT_TIMER_ARG: &str = "grove.boot_timer=1";

const E820_RAM: u32 = 1;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BOOT_FLAG: u16 = 0xaa55;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
const XLF_KERNEL_64: u16 = 1;
/// Offset of the 64-bit entry point from the protected-mode kernel's load address (bzImage).
const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;
const E820_MAX: usize = 128;

/// Errors from loading the kernel and writing the boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {path}")]
    KernelFile {
        /// The path given.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel path names something other than a readable regular file.
    #[error("kernel {path}")]
    KernelInput {
        /// The path given.
        path: String,
        /// Why it was refused.
        #[source]
        source: crate::input::InputError,
    },
    /// Neither an ELF nor a bzImage.
    #[error("{path} is not a kernel: neither an x86-64 ELF nor a bzImage")]
    NotAKernel {
        /// The path given.
        path: String,
    },
    /// A bzImage without the 64-bit entry point.
    #[error("{path}: bzImage has no 64-bit entry point (XLF_KERNEL_64)")]
    No64BitEntry {
        /// The path given.
        path: String,
    },
    /// linux-loader refused the image.
    #[error("cannot load kernel {path}")]
    Load {
        /// The path given.
        path: String,
        /// The loader's reason.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initrd path names something other than a readable regular file.
    #[error("initrd {path}")]
    InitrdInput {
        /// The path given.
        path: String,
        /// Why it was refused.
        #[source]
        source: crate::input::InputError,
    },
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error("initrd of {size} bytes does not fit in guest memory (kernel ends at {kernel_end:#x}, low RAM ends at {limit:#x})")]
    InitrdTooBig {
        /// Initrd size.
        size: u64,
        /// End of the kernel image.
        kernel_end: u64,
        /// Highest address usable.
        limit: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error("bad command line: {len} bytes, at most {max} allowed")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line holds a byte that is not printable ASCII.
    #[error("bad command line: byte {0:#04x} is not printable ASCII")]
    CmdlineByte(u8),
    /// Writing into guest memory failed (guest too small for the layout).
    #[error("guest memory too small for the boot structures at {0:#x}")]
    GuestWrite(u64),
}

/// What kind of image a kernel file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF vmlinux (or the test guest).
    Elf,
    /// A bzImage with a setup header.
    BzImage,
}

/// Result of loading a kernel.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Format detected.
    pub format: KernelFormat,
    /// 64-bit entry point (guest physical; paging is identity).
    pub entry: u64,
    /// End of the loaded image.
    pub kernel_end: u64,
    /// The bzImage setup header, copied into `boot_params.hdr`.
    pub setup_header: Option<setup_header>,
}

/// Detects the kernel format from the first bytes of the file.
pub fn detect(file: &mut File, path: &str) -> Result<KernelFormat, BootError> {
    let io = |source| BootError::KernelFile { path: path.to_string(), source };
    let mut head = [0u8; 0x208];
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]).map_err(io)? {
            0 => break,
            n => got += n,
        }
    }
    // ELF64, little endian, x86-64 (e_machine 62).
    if got >= 20 && head[..4] == *b"\x7fELF" && head[4] == 2 && head[5] == 1 && head[18] == 62 {
        return Ok(KernelFormat::Elf);
    }
    if got >= 0x206
        && u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]]) == HDRS_MAGIC
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::NotAKernel { path: path.to_string() })
}

/// Loads an ELF vmlinux (PT_LOAD segments at their p_paddr) or a bzImage (protected-mode code
/// at code32_start, entered at its 64-bit entry point).
pub fn load_kernel(mem: &GuestMemory, path: &str) -> Result<LoadedKernel, BootError> {
    let (mut file, _) = input::open(Path::new(path), Accept::Regular)
        .map_err(|source| BootError::KernelInput { path: path.to_string(), source })?;
    let format = detect(&mut file, path)?;
    let load_err =
        |source: linux_loader::loader::Error| BootError::Load { path: path.to_string(), source };
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0,
                kernel_end: r.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let hdr =
                r.setup_header.ok_or_else(|| BootError::NotAKernel { path: path.to_string() })?;
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry { path: path.to_string() });
            }
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0 + BZIMAGE_ENTRY64_OFFSET,
                kernel_end: r.kernel_end,
                setup_header: Some(hdr),
            })
        }
    }
}

/// Highest address (exclusive) an initrd may end at.
pub fn initrd_limit(low_end: u64, hdr: Option<&setup_header>) -> u64 {
    match hdr {
        Some(h) if h.initrd_addr_max != 0 => low_end.min(u64::from(h.initrd_addr_max) + 1),
        _ => low_end,
    }
}

/// Where an initrd of `size` bytes goes: page aligned, as high as possible below `limit`,
/// above the kernel.
pub fn initrd_placement(size: u64, kernel_end: u64, limit: u64) -> Result<u64, BootError> {
    let too_big = BootError::InitrdTooBig { size, kernel_end, limit };
    let start = limit.checked_sub(size).ok_or(too_big)? & !(PAGE_SIZE - 1);
    if start < kernel_end {
        return Err(BootError::InitrdTooBig { size, kernel_end, limit });
    }
    Ok(start)
}

/// Loads the initrd file; returns (address, size).
pub fn load_initrd(
    mem: &GuestMemory,
    path: &str,
    kernel: &LoadedKernel,
    low_end: u64,
) -> Result<(u64, u64), BootError> {
    let (mut file, size) = input::open(Path::new(path), Accept::Regular)
        .map_err(|source| BootError::InitrdInput { path: path.to_string(), source })?;
    let limit = initrd_limit(low_end, kernel.setup_header.as_ref());
    let addr = initrd_placement(size, kernel.kernel_end, limit)?;
    let usize_size = usize::try_from(size).map_err(|_| BootError::GuestWrite(addr))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, usize_size)
        .map_err(|_| BootError::GuestWrite(addr))?;
    Ok((addr, size))
}

/// Validates a command line: printable ASCII, at most `max` bytes.
pub fn validate_cmdline(cmdline: &str, max: usize) -> Result<(), BootError> {
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong { len: cmdline.len(), max });
    }
    if let Some(c) = cmdline.bytes().find(|b| !(0x20..0x7f).contains(b)) {
        return Err(BootError::CmdlineByte(c));
    }
    Ok(())
}

/// Longest command line the kernel accepts.
pub fn cmdline_max(hdr: Option<&setup_header>) -> usize {
    match hdr {
        // cmdline_size excludes the terminating NUL (boot protocol >= 2.06).
        Some(h) if h.version >= 0x206 && h.cmdline_size != 0 => {
            usize::try_from(h.cmdline_size).unwrap_or(CMDLINE_MAX).min(CMDLINE_MAX)
        }
        _ => CMDLINE_MAX,
    }
}

/// The e820 map for the given RAM regions: low RAM below the EBDA, RAM from 1 MiB to the top of
/// the low region, and any region above the MMIO gap.
pub fn e820_map(regions: &[RamRegion]) -> Vec<boot_e820_entry> {
    let mut map = vec![boot_e820_entry { addr: 0, size: EBDA_START, r#type: E820_RAM }];
    for r in regions {
        let start = r.gpa.max(HIMEM_START);
        if r.end() > start {
            map.push(boot_e820_entry { addr: start, size: r.end() - start, r#type: E820_RAM });
        }
    }
    map
}

/// Builds the zero page (`rsdp`: where the ACPI tables start, if any).
pub fn build_boot_params(
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    regions: &[RamRegion],
    rsdp: Option<u64>,
) -> Result<boot_params, BootError> {
    let mut params = boot_params { acpi_rsdp_addr: rsdp.unwrap_or(0), ..Default::default() };
    match kernel.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = BOOT_FLAG;
            params.hdr.header = HDRS_MAGIC;
            params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr =
        u32::try_from(CMDLINE_ADDR).map_err(|_| BootError::GuestWrite(CMDLINE_ADDR))?;
    params.hdr.cmdline_size = u32::try_from(cmdline_len + 1)
        .map_err(|_| BootError::CmdlineTooLong { len: cmdline_len, max: CMDLINE_MAX })?;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = u32::try_from(addr).map_err(|_| BootError::GuestWrite(addr))?;
        params.hdr.ramdisk_size = u32::try_from(size).map_err(|_| BootError::InitrdTooBig {
            size,
            kernel_end: kernel.kernel_end,
            limit: addr,
        })?;
    }
    let map = e820_map(regions);
    if map.len() > E820_MAX {
        return Err(BootError::GuestWrite(ZERO_PAGE_ADDR));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    params.e820_entries =
        u8::try_from(map.len()).map_err(|_| BootError::GuestWrite(ZERO_PAGE_ADDR))?;
    Ok(params)
}

/// Writes the command line (NUL terminated) and the zero page into guest memory.
pub fn write_boot_params(
    mem: &GuestMemory,
    params: &boot_params,
    cmdline: &str,
) -> Result<(), BootError> {
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|_| BootError::GuestWrite(CMDLINE_ADDR))?;
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|_| BootError::GuestWrite(ZERO_PAGE_ADDR))?;
    Ok(())
}

/// Loads kernel and initrd and writes the command line and zero page: everything the Linux
/// boot protocol needs in guest memory. Returns the loaded kernel (entry point).
pub fn prepare(
    ram: &GuestRam,
    kernel_path: &str,
    initrd_path: Option<&str>,
    cmdline: &str,
    rsdp: Option<u64>,
) -> Result<LoadedKernel, BootError> {
    let kernel = load_kernel(ram.mem(), kernel_path)?;
    validate_cmdline(cmdline, cmdline_max(kernel.setup_header.as_ref()))?;
    let initrd = match initrd_path {
        Some(p) => Some(load_initrd(ram.mem(), p, &kernel, ram.low_end())?),
        None => None,
    };
    let params = build_boot_params(&kernel, cmdline.len(), initrd, ram.regions(), rsdp)?;
    write_boot_params(ram.mem(), &params, cmdline)?;
    Ok(kernel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ram_regions;
    use vm_memory::ByteValued;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn elf_kernel() -> LoadedKernel {
        LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0x10_0000,
            kernel_end: 0x20_0000,
            setup_header: None,
        }
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn boot_params_layout_matches_the_boot_protocol() {
        let regions = ram_regions(5 * GIB).unwrap();
        let p = build_boot_params(
            &elf_kernel(),
            13,
            Some((0x3000_0000, 0x1234)),
            &regions,
            Some(0xe0000),
        )
        .unwrap();
        let b = p.as_slice();
        assert_eq!(b.len(), 4096);
        assert_eq!(b[0x1e8], 3, "e820_entries");
        assert_eq!(u32_at(b, 0x228), 0x20000, "cmd_line_ptr");
        assert_eq!(u32_at(b, 0x238), 14, "cmdline_size");
        assert_eq!(b[0x210], 0xff, "type_of_loader");
        assert_eq!(u32_at(b, 0x202), HDRS_MAGIC);
        assert_eq!(u16::from_le_bytes([b[0x1fe], b[0x1ff]]), 0xaa55);
        assert_eq!(u32_at(b, 0x218), 0x3000_0000, "ramdisk_image");
        assert_eq!(u32_at(b, 0x21c), 0x1234, "ramdisk_size");
        assert_eq!(u64_at(b, 0x70), 0xe0000, "acpi_rsdp_addr");
        // e820 table at 0x2d0, 20-byte entries.
        let e = |i: usize| {
            let o = 0x2d0 + 20 * i;
            (u64_at(b, o), u64_at(b, o + 8), u32_at(b, o + 16))
        };
        assert_eq!(e(0), (0, EBDA_START, 1));
        assert_eq!(e(1), (HIMEM_START, 3 * GIB - HIMEM_START, 1));
        assert_eq!(e(2), (4 * GIB, 2 * GIB, 1));
    }

    #[test]
    fn e820_for_small_guest_has_no_high_entry() {
        let map = e820_map(&ram_regions(128 * MIB).unwrap());
        assert_eq!(map.len(), 2);
        assert_eq!({ map[1].addr }, HIMEM_START);
        assert_eq!({ map[1].size }, 127 * MIB);
        // Nothing in the legacy hole or the MMIO gap.
        for e in &map {
            let (a, s) = (e.addr, e.size);
            assert!(a + s <= 0xa_0000 || a >= HIMEM_START);
            assert!(a + s <= 3 * GIB || a >= 4 * GIB);
        }
    }

    #[test]
    fn bzimage_header_is_copied() {
        let mut hdr = setup_header {
            version: 0x20f,
            cmdline_size: 2047,
            initrd_addr_max: 0x7fff_ffff,
            header: HDRS_MAGIC,
            setup_sects: 30,
            ..Default::default()
        };
        hdr.xloadflags = 0x7f;
        let k = LoadedKernel {
            format: KernelFormat::BzImage,
            entry: 0x10_0200,
            kernel_end: 0x90_0000,
            setup_header: Some(hdr),
        };
        let p = build_boot_params(&k, 5, None, &ram_regions(64 * MIB).unwrap(), None).unwrap();
        assert_eq!({ p.acpi_rsdp_addr }, 0);
        assert_eq!({ p.hdr.setup_sects }, 30);
        assert_eq!({ p.hdr.version }, 0x20f);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.ramdisk_size }, 0);
        assert_eq!(cmdline_max(Some(&hdr)), 2047);
    }

    #[test]
    fn cmdline_rules() {
        assert!(validate_cmdline("tg.mode=hello console=ttyS0", 100).is_ok());
        assert!(validate_cmdline("a\nb", 100).is_err());
        assert!(validate_cmdline("a\0b", 100).is_err());
        assert!(validate_cmdline(&"x".repeat(101), 100).is_err());
        assert!(validate_cmdline(&"x".repeat(100), 100).is_ok());
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let a = initrd_placement(10_000, 0x20_0000, 64 * MIB).unwrap();
        assert_eq!(a % PAGE_SIZE, 0);
        assert!(a + 10_000 <= 64 * MIB);
        assert!(a >= 64 * MIB - 3 * PAGE_SIZE);
        assert!(initrd_placement(64 * MIB, 0x20_0000, 64 * MIB).is_err());
        let hdr = setup_header { initrd_addr_max: 0x37ff_ffff, ..Default::default() };
        assert_eq!(initrd_limit(2 * GIB, Some(&hdr)), 0x3800_0000);
        assert_eq!(initrd_limit(2 * GIB, None), 2 * GIB);
    }
}

/// The Linux path, without running it: Debian's cloud kernel (scripts/fetch-kernel.sh) loaded
/// as bzImage and as ELF vmlinux, and the zero page checked byte by byte.
#[cfg(test)]
mod linux_images {
    use super::*;
    use std::path::PathBuf;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;

    fn kernel_dir() -> PathBuf {
        std::env::var_os("GROVE_KERNEL_DIR").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build/kernel"),
            PathBuf::from,
        )
    }

    fn image(name: &str) -> Option<String> {
        let p = kernel_dir().join(name);
        if p.is_file() {
            Some(p.to_string_lossy().into_owned())
        } else {
            println!("skipped: no kernel at {}; run scripts/fetch-kernel.sh", p.display());
            None
        }
    }

    fn zero_page(ram: &GuestRam) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        ram.mem().read_slice(&mut b, GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        b
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// A small fake initrd file.
    fn initrd_file() -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, &data).unwrap();
        (f, data)
    }

    fn check_common(ram: &GuestRam, zp: &[u8], cmdline: &str, initrd: &[u8]) {
        assert_eq!(zp[0x210], 0xff, "type_of_loader");
        assert_eq!(u32_at(zp, 0x228), 0x20000, "cmd_line_ptr");
        let mut c = vec![0u8; cmdline.len() + 1];
        ram.mem().read_slice(&mut c, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&c[..cmdline.len()], cmdline.as_bytes());
        assert_eq!(c[cmdline.len()], 0, "NUL terminated");
        let rd_addr = u64::from(u32_at(zp, 0x218));
        let rd_size = u32_at(zp, 0x21c);
        assert_eq!(rd_size as usize, initrd.len());
        assert_eq!(rd_addr % PAGE_SIZE, 0);
        assert!(rd_addr + u64::from(rd_size) <= ram.low_end());
        let mut back = vec![0u8; initrd.len()];
        ram.mem().read_slice(&mut back, GuestAddress(rd_addr)).unwrap();
        assert!(back == initrd, "initrd bytes in guest memory");
        // e820: low RAM, RAM from 1 MiB to the top.
        assert_eq!(zp[0x1e8], 2);
        assert_eq!((u64_at(zp, 0x2d0), u64_at(zp, 0x2d8), u32_at(zp, 0x2e0)), (0, EBDA_START, 1));
        assert_eq!(
            (u64_at(zp, 0x2e4), u64_at(zp, 0x2ec), u32_at(zp, 0x2f4)),
            (HIMEM_START, ram.size() - HIMEM_START, 1)
        );
    }

    #[test]
    fn bzimage_loads_with_its_setup_header() {
        let Some(path) = image("bzImage") else { return };
        let ram = GuestRam::new_anonymous(512 * MIB).unwrap();
        let (rd, rd_data) = initrd_file();
        let cmdline = "console=ttyS0 reboot=k panic=1";
        let k = prepare(&ram, &path, Some(rd.path().to_str().unwrap()), cmdline, None).unwrap();
        assert_eq!(k.format, KernelFormat::BzImage);
        let zp = zero_page(&ram);
        // The setup header (0x1f1..) is the file's, except the fields the loader sets.
        let file = std::fs::read(&path).unwrap();
        let hdr_end = 0x202 + usize::from(file[0x201]); // jump + header length
        for off in 0x1f1..hdr_end {
            let loader_set = (0x210..0x211).contains(&off)  // type_of_loader
                || (0x214..0x218).contains(&off)            // code32_start
                || (0x218..0x220).contains(&off)            // ramdisk
                || (0x228..0x22c).contains(&off)            // cmd_line_ptr
                || (0x238..0x23c).contains(&off); // cmdline_size
            if !loader_set {
                assert_eq!(zp[off], file[off], "setup header byte {off:#x}");
            }
        }
        assert_eq!(u32_at(&zp, 0x202), HDRS_MAGIC);
        assert_ne!(u16::from_le_bytes([zp[0x236], zp[0x237]]) & XLF_KERNEL_64, 0);
        // Protected-mode code loaded at code32_start, entered 0x200 above it.
        let code32 = u64::from(u32_at(&zp, 0x214));
        assert_eq!(k.entry, code32 + 0x200);
        let setup_sects = usize::from(file[0x1f1]).max(4);
        let pm = &file[(setup_sects + 1) * 512..][..4096];
        let mut got = vec![0u8; 4096];
        ram.mem().read_slice(&mut got, GuestAddress(code32)).unwrap();
        assert!(got == pm, "kernel bytes at code32_start");
        check_common(&ram, &zp, cmdline, &rd_data);
    }

    #[test]
    fn vmlinux_loads_at_its_physical_addresses() {
        let Some(path) = image("vmlinux") else { return };
        let ram = GuestRam::new_anonymous(512 * MIB).unwrap();
        let (rd, rd_data) = initrd_file();
        let cmdline = "console=ttyS0 panic=1 root=/dev/vda";
        let k = prepare(&ram, &path, Some(rd.path().to_str().unwrap()), cmdline, None).unwrap();
        assert_eq!(k.format, KernelFormat::Elf);
        assert!(k.setup_header.is_none());
        let file = std::fs::read(&path).unwrap();
        let e_entry = u64_at(&file, 0x18);
        assert_eq!(k.entry, e_entry);
        // The first PT_LOAD segment's bytes are at its p_paddr.
        let phoff = usize::try_from(u64_at(&file, 0x20)).unwrap();
        let phnum = usize::from(u16::from_le_bytes([file[0x38], file[0x39]]));
        let ph = (0..phnum)
            .map(|i| &file[phoff + 56 * i..phoff + 56 * (i + 1)])
            .find(|p| u32_at(p, 0) == 1 && u64_at(p, 32) > 0)
            .expect("a PT_LOAD segment");
        let (off, paddr) = (usize::try_from(u64_at(ph, 8)).unwrap(), u64_at(ph, 24));
        let mut got = vec![0u8; 4096];
        ram.mem().read_slice(&mut got, GuestAddress(paddr)).unwrap();
        assert!(got == file[off..off + 4096], "segment bytes at p_paddr {paddr:#x}");
        let zp = zero_page(&ram);
        assert_eq!(u16::from_le_bytes([zp[0x1fe], zp[0x1ff]]), 0xaa55);
        assert_eq!(u32_at(&zp, 0x202), HDRS_MAGIC);
        check_common(&ram, &zp, cmdline, &rd_data);
    }

    #[test]
    fn a_text_file_is_not_a_kernel() {
        let readme = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let ram = GuestRam::new_anonymous(64 * MIB).unwrap();
        let e = prepare(&ram, readme.to_str().unwrap(), None, "x", None).unwrap_err();
        assert!(matches!(e, BootError::NotAKernel { .. }), "{e}");
    }

    #[test]
    fn special_files_as_kernel_or_initrd_are_refused_clearly() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        crate::input::mkfifo(&fifo);
        let ram = GuestRam::new_anonymous(64 * MIB).unwrap();
        // A FIFO as kernel: refused at once, not a blocking open.
        let e = prepare(&ram, fifo.to_str().unwrap(), None, "x", None).unwrap_err();
        assert!(matches!(e, BootError::KernelInput { .. }), "{e}");
        assert!(crate::one_line(&e).contains("is a FIFO, not a regular file"), "{e}");
        // A directory or a FIFO as initrd: named as such (it was "guest memory too small").
        let mem = ram.mem();
        let loaded = LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0x10_0000,
            kernel_end: 0x20_0000,
            setup_header: None,
        };
        for (p, kind) in [(d.path(), "directory"), (fifo.as_path(), "FIFO")] {
            let e = load_initrd(mem, p.to_str().unwrap(), &loaded, 64 * MIB).unwrap_err();
            assert!(matches!(e, BootError::InitrdInput { .. }), "{e}");
            let msg = crate::one_line(&e);
            assert!(msg.contains(&format!("is a {kind}, not a regular file")), "{msg}");
        }
    }
}
