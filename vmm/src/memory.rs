//! Guest RAM: where it sits in guest physical space, what backs it, how it is mapped.
//!
//! RAM is one linear byte range of `size` bytes ("RAM offset" 0..size). It is placed in guest
//! physical space below the 32-bit MMIO gap and, for the part that does not fit, from 4 GiB on.
//! Every region records its RAM offset, which is also its offset in the backing file: a memfd for
//! a fresh boot, a snapshot layer file (MAP_PRIVATE) or anonymous memory (userfaultfd) on restore.
//!
//! The vm-memory view carries an [`AtomicBitmap`] per region: every write the VMM makes into
//! guest memory through vm-memory (a device filling a buffer, a virtqueue's used ring) marks
//! its page. KVM's dirty log only sees the guest's own writes, so a snapshot ORs the two
//! ([`GuestRam::take_vmm_dirty`]) and the next diff layer includes what devices wrote.

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START, PAGE_SIZE};

/// Guest memory as the VMM's devices and loaders see it: vm-memory regions whose writes are
/// tracked per page.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Errors from setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is not a positive multiple of the page size.
    #[error("guest memory size {0:#x} is not a positive multiple of 4 KiB")]
    BadSize(u64),
    /// memfd_create or ftruncate failed.
    #[error("cannot create the guest memory file")]
    Memfd(#[source] std::io::Error),
    /// mmap failed.
    #[error("cannot map {len} bytes of guest memory")]
    Mmap {
        /// Length asked for.
        len: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// One mapping per region is needed.
    #[error("{mappings} mappings for {regions} RAM regions")]
    MappingCount {
        /// Regions.
        regions: usize,
        /// Mappings given.
        mappings: usize,
    },
    /// A mapping's length differs from its region's.
    #[error("mapping of {mapping} bytes for a region of {region}")]
    MappingSize {
        /// Mapping length.
        mapping: usize,
        /// Region length.
        region: u64,
    },
    /// vm-memory refused a region's mapping.
    #[error("cannot describe guest memory at {gpa:#x} to vm-memory")]
    Region {
        /// Start of the region.
        gpa: u64,
        /// vm-memory's reason.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// Regions overlap or overflow the address space.
    #[error("cannot build the guest memory map")]
    Map(#[source] vm_memory::GuestRegionCollectionError),
    /// A guest physical range is not RAM.
    #[error("guest range {gpa:#x}+{len:#x} is not RAM")]
    NotRam {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
}

/// One contiguous piece of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RamRegion {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the first byte in linear RAM (and in the backing file).
    pub ram_offset: u64,
}

impl RamRegion {
    /// One past the last guest physical address.
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }
}

/// Splits `size` bytes of RAM around the 32-bit MMIO gap `[3 GiB, 4 GiB)`.
pub fn ram_regions(size: u64) -> Result<Vec<RamRegion>, MemoryError> {
    if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::BadSize(size));
    }
    let low = size.min(MMIO_GAP_START);
    let mut regions = vec![RamRegion { gpa: 0, size: low, ram_offset: 0 }];
    if size > low {
        regions.push(RamRegion { gpa: MMIO_GAP_END, size: size - low, ram_offset: low });
    }
    Ok(regions)
}

/// Guest physical address of a RAM offset, if it is inside `regions`.
pub fn ram_offset_to_gpa(regions: &[RamRegion], off: u64) -> Option<u64> {
    regions
        .iter()
        .find(|r| off >= r.ram_offset && off < r.ram_offset + r.size)
        .map(|r| r.gpa + (off - r.ram_offset))
}

/// One host mapping, unmapped on drop when owned.
#[derive(Debug)]
pub struct Mapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; the pointer is only used to build vm-memory regions and
// KVM memory slots, which do their own synchronisation (guest memory is shared with the guest
// by design).
unsafe impl Send for Mapping {}
// SAFETY: as above; `Mapping` has no interior state besides the address and length.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from `offset`, shared (writes reach the file) or private
    /// (copy-on-write). MAP_NORESERVE: guest RAM is committed page by page as it is touched.
    pub fn from_fd(fd: &File, offset: u64, len: u64, shared: bool) -> Result<Self, MemoryError> {
        let flags = if shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE };
        Self::map(fd.as_raw_fd(), offset, len, flags | libc::MAP_NORESERVE)
    }

    /// Anonymous private memory (used with userfaultfd on restore).
    pub fn anonymous(len: u64) -> Result<Self, MemoryError> {
        Self::map(-1, 0, len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
    }

    fn map(fd: i32, offset: u64, len: u64, flags: i32) -> Result<Self, MemoryError> {
        let ulen = usize::try_from(len).map_err(|_| MemoryError::BadSize(len))?;
        let off = libc::off_t::try_from(offset).map_err(|_| MemoryError::BadSize(offset))?;
        // SAFETY: a fresh mapping (no MAP_FIXED) cannot alias any Rust object; the result is
        // checked against MAP_FAILED below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ulen,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                off,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(MemoryError::Mmap { len, source: std::io::Error::last_os_error() });
        }
        Ok(Self { addr: addr.cast(), len: ulen })
    }

    /// Host address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, for a built mapping).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` describe a mapping this object created and nothing else unmaps.
        // vm-memory regions built over it are dropped with the owning `GuestRam` first.
        unsafe {
            libc::munmap(self.addr.cast(), self.len);
        }
    }
}

/// A region's bytes as a volatile slice (with its dirty-page bitmap).
pub type RegionSlice<'a> = vm_memory::VolatileSlice<'a, vm_memory::bitmap::BS<'a, AtomicBitmap>>;

/// Something that keeps restored guest memory mapped (a storage `MappedMemory` or `UffdMemory`).
pub type MemoryOwner = Box<dyn std::any::Any + Send + Sync>;

/// The guest's RAM: the regions, their host mappings and the vm-memory view over them.
pub struct GuestRam {
    // Field order matters: `mem` (which points into the mappings) is dropped first.
    mem: GuestMemory,
    regions: Vec<RamRegion>,
    hosts: Vec<(*mut u8, usize)>,
    mappings: Vec<Mapping>,
    owner: Option<MemoryOwner>,
    file: Option<File>,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam").field("regions", &self.regions).finish_non_exhaustive()
    }
}

// SAFETY: the raw host pointers refer to mappings owned by this object (or its `owner`),
// which live as long as it does; guest memory is shared with the guest by design and every
// access goes through vm-memory's volatile accessors or KVM.
unsafe impl Send for GuestRam {}
// SAFETY: as above.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Fresh RAM of `size` bytes, backed by a memfd mapped MAP_SHARED (so its pages can later
    /// be written out or handed to another process by fd).
    pub fn new_memfd(size: u64) -> Result<Self, MemoryError> {
        let regions = ram_regions(size)?;
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"grove-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(MemoryError::Memfd)?;
        let mappings = regions
            .iter()
            .map(|r| Mapping::from_fd(&file, r.ram_offset, r.size, true))
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_mappings(regions, mappings, Some(file))
    }

    /// Fresh anonymous private RAM of `size` bytes, with transparent huge pages asked for
    /// (MADV_HUGEPAGE). This is what a fresh boot uses: on this host (nested KVM, shadow
    /// paging) a guest's first touch of a 2 MiB huge page costs about as much as one 4 KiB
    /// page, so a test guest touching 64 MiB reaches READY in ~20-30 ms instead of ~170 ms.
    /// Snapshots read the pages from this mapping; restores map layer files instead.
    pub fn new_anonymous(size: u64) -> Result<Self, MemoryError> {
        let regions = ram_regions(size)?;
        let mappings =
            regions.iter().map(|r| Mapping::anonymous(r.size)).collect::<Result<Vec<_>, _>>()?;
        for m in &mappings {
            // SAFETY: advice on a mapping we own; no memory is changed. Failure (THP compiled
            // out) only loses the speed-up, so the result is ignored.
            unsafe { libc::madvise(m.as_ptr().cast(), m.len(), libc::MADV_HUGEPAGE) };
        }
        Self::from_mappings(regions, mappings, None)
    }

    /// RAM over existing mappings, one per region.
    pub fn from_mappings(
        regions: Vec<RamRegion>,
        mappings: Vec<Mapping>,
        file: Option<File>,
    ) -> Result<Self, MemoryError> {
        let hosts = mappings.iter().map(|m| (m.as_ptr(), m.len())).collect();
        let mut ram = Self::build(regions, hosts, None)?;
        ram.mappings = mappings;
        ram.file = file;
        Ok(ram)
    }

    /// RAM over memory mapped by someone else (`owner` keeps it mapped).
    ///
    /// # Safety
    /// Each `(ptr, len)` must be a live read/write mapping that stays mapped while `owner`
    /// is alive, and nothing else may unmap it.
    pub unsafe fn from_external(
        regions: Vec<RamRegion>,
        hosts: Vec<(*mut u8, usize)>,
        owner: MemoryOwner,
    ) -> Result<Self, MemoryError> {
        Self::build(regions, hosts, Some(owner))
    }

    fn build(
        regions: Vec<RamRegion>,
        hosts: Vec<(*mut u8, usize)>,
        owner: Option<MemoryOwner>,
    ) -> Result<Self, MemoryError> {
        if regions.len() != hosts.len() {
            return Err(MemoryError::MappingCount {
                regions: regions.len(),
                mappings: hosts.len(),
            });
        }
        let page = NonZeroUsize::new(PAGE_SIZE as usize).unwrap_or(NonZeroUsize::MIN);
        let mut vm_regions = Vec::with_capacity(regions.len());
        for (r, &(ptr, len)) in regions.iter().zip(&hosts) {
            if u64::try_from(len).ok() != Some(r.size) {
                return Err(MemoryError::MappingSize { mapping: len, region: r.size });
            }
            // SAFETY: `ptr` is a live mapping of exactly `len` bytes kept alive by the
            // returned `GuestRam` (its mappings or owner), which drops this view first.
            let builder = unsafe {
                MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::new(len, page))
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_raw_mmap_pointer(ptr)
            };
            let region =
                builder.build().map_err(|source| MemoryError::Region { gpa: r.gpa, source })?;
            let region = GuestRegionMmap::new(region, GuestAddress(r.gpa))
                .ok_or(MemoryError::BadSize(r.size))?;
            vm_regions.push(region);
        }
        let mem = GuestMemory::from_regions(vm_regions).map_err(MemoryError::Map)?;
        Ok(Self { mem, regions, hosts, mappings: Vec::new(), owner, file: None })
    }

    /// Whatever keeps restored memory mapped (to query a page server).
    pub fn owner(&self) -> Option<&MemoryOwner> {
        self.owner.as_ref()
    }

    /// Host address and length of each region (same order as [`Self::regions`]).
    pub fn host_regions(&self) -> &[(*mut u8, usize)] {
        &self.hosts
    }

    /// Region `i` as a vm-memory volatile slice: reads through it are sound while the guest
    /// runs (a fork's pre-copy). `None` if there is no region `i`.
    pub fn region_volatile(&self, i: usize) -> Option<RegionSlice<'_>> {
        let region = self.mem.iter().nth(i)?;
        let len = usize::try_from(region.len()).ok()?;
        region.get_slice(vm_memory::MemoryRegionAddress(0), len).ok()
    }

    /// The pages of region `i` the VMM wrote through vm-memory since the last call (one bit
    /// per page, KVM_GET_DIRTY_LOG's layout), and forgets them.
    pub fn take_vmm_dirty(&self, i: usize) -> Vec<u64> {
        self.mem
            .iter()
            .nth(i)
            .map(|r| std::ops::Deref::deref(r).bitmap().get_and_reset())
            .unwrap_or_default()
    }

    /// The vm-memory view (for loaders and device code).
    pub fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    /// The RAM regions, in guest physical order.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The backing file, when RAM is file backed.
    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    /// Total RAM bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Last RAM byte below the MMIO gap, plus one.
    pub fn low_end(&self) -> u64 {
        self.regions[0].end()
    }

    /// Host slice view of guest range (for dumping/inspection); `None` if not inside one region.
    pub fn host_range(&self, gpa: u64, len: u64) -> Result<(*mut u8, usize), MemoryError> {
        for (r, &(ptr, _)) in self.regions.iter().zip(&self.hosts) {
            if gpa >= r.gpa && gpa.checked_add(len).is_some_and(|e| e <= r.end()) {
                let off = usize::try_from(gpa - r.gpa).map_err(|_| MemoryError::BadSize(gpa))?;
                let ulen = usize::try_from(len).map_err(|_| MemoryError::BadSize(len))?;
                // SAFETY: `off + len <= region length` was checked above.
                return Ok((unsafe { ptr.add(off) }, ulen));
            }
        }
        Err(MemoryError::NotRam { gpa, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_ram_is_one_region() {
        let r = ram_regions(256 * MIB).unwrap();
        assert_eq!(r, vec![RamRegion { gpa: 0, size: 256 * MIB, ram_offset: 0 }]);
    }

    #[test]
    fn ram_above_3g_is_split_around_the_gap() {
        let r = ram_regions(5 * GIB).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], RamRegion { gpa: 0, size: 3 * GIB, ram_offset: 0 });
        assert_eq!(r[1], RamRegion { gpa: 4 * GIB, size: 2 * GIB, ram_offset: 3 * GIB });
        // Exactly 3 GiB: nothing above the gap.
        assert_eq!(ram_regions(3 * GIB).unwrap().len(), 1);
        assert_eq!(ram_offset_to_gpa(&r, 3 * GIB), Some(4 * GIB));
        assert_eq!(ram_offset_to_gpa(&r, 5 * GIB), None);
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(ram_regions(0).is_err());
        assert!(ram_regions(4097).is_err());
    }

    #[test]
    fn memfd_ram_is_readable_and_split() {
        let ram = GuestRam::new_memfd(3 * GIB + 8 * MIB).unwrap();
        assert_eq!(ram.regions().len(), 2);
        ram.mem().write_obj(0xdead_beef_u32, GuestAddress(4 * GIB)).unwrap();
        let v: u32 = ram.mem().read_obj(GuestAddress(4 * GIB)).unwrap();
        assert_eq!(v, 0xdead_beef);
        // The gap is not RAM.
        assert!(!ram.mem().address_in_range(GuestAddress(3 * GIB + 4096)));
        assert!(ram.host_range(3 * GIB - 4096, 8192).is_err());
    }

    #[test]
    fn vmm_writes_are_tracked_per_page_and_taken_once() {
        let ram = GuestRam::new_anonymous(64 * MIB).unwrap();
        assert!(ram.take_vmm_dirty(0).iter().all(|&w| w == 0));
        // A device writing 10 bytes across a page boundary dirties both pages.
        ram.mem().write_slice(&[7u8; 10], GuestAddress(5 * 4096 - 4)).unwrap();
        ram.mem().write_obj(1u64, GuestAddress(70 * 4096)).unwrap();
        let words = ram.take_vmm_dirty(0);
        assert_eq!(words.len(), (64 * MIB / 4096 / 64) as usize);
        let set: Vec<usize> =
            (0..words.len() * 64).filter(|&p| words[p / 64] & (1 << (p % 64)) != 0).collect();
        assert_eq!(set, vec![4, 5, 70]);
        assert!(ram.take_vmm_dirty(0).iter().all(|&w| w == 0), "taken once");
        // Reads do not dirty.
        let _: u64 = ram.mem().read_obj(GuestAddress(80 * 4096)).unwrap();
        assert!(ram.take_vmm_dirty(0).iter().all(|&w| w == 0));
        assert!(ram.region_volatile(0).is_some() && ram.region_volatile(1).is_none());
    }
}
