//! Memory snapshot layers: full and diff layer files, chains, merging, and the two
//! restore modes (`mmap` and `uffd`). File formats and design: `docs/snapshotting.md`.
//!
//! # API overview (for the VMM)
//!
//! Guest memory is described by a [`MemoryLayout`]: the page size and the guest
//! regions (guest physical address + length, sorted, e.g. split around the 3 GiB
//! MMIO gap). Pages are numbered as "memory pages": the regions laid end to end.
//!
//! **Snapshot**: guest memory is read through vm-memory `VolatileSlice`s (volatile loads
//! and pwrite(2), no Rust reference), so a pre-copy may run while the guest does; pages it
//! writes meanwhile may be torn and must be written again from the next dirty log:
//! ```text
//! use grove_memory::*;
//! let regions = [RegionMemory { gpa: 0, mem: low_volatile_slice, dirty: None },
//!                RegionMemory::from_slice(1 << 32, high_plain_slice, None)];
//! let base: LayerInfo = write_full(dir.join("0000.mlayer"), &regions, &WriteOptions::default())?;
//! // later: one KVM dirty bitmap (KVM_GET_DIRTY_LOG, one u64 word per 64 pages) per region
//! let regions = [RegionMemory { gpa: 0, mem: low_volatile_slice, dirty: Some(&bitmap0) }, ...];
//! let d1 = write_diff(dir.join("0001.mlayer"), &base, &regions, &WriteOptions::default())?;
//! ```
//! For the first full layer of a freshly booted guest whose RAM is private anonymous
//! memory, set `WriteOptions::skip_unpopulated`: never-touched pages are skipped by
//! `/proc/self/pagemap` instead of being read (4 GiB: ~1 s → ~22 ms here). Never set
//! it for restored memory (file-backed or uffd-served).
//! Files are written to a temporary name, fsynced (unless `WriteOptions::fsync` is
//! false; then [`sync_layer`] can make it durable later, e.g. after a fork resumed
//! the parent) and renamed into place. Full layers skip zero pages; diff layers write the
//! dirty pages (dirty zero pages become holes but still override the parent).
//!
//! **Open** a chain base ← diff ← diff …: [`Chain::open`] (paths, base first) or
//! [`Chain::open_dir`] (every `*.mlayer` in a directory, ordered by parent links).
//! Every file is validated (magic, version, header and index checksums, exact
//! length, page size, parent links, identical layouts): errors are [`LayerError`].
//! [`Chain::merge`] / [`Chain::flatten`] write one layer for a chain (or its top).
//!
//! **Restore**, either mode gives [`RestoredRegion`]s (gpa, host address, length)
//! to register as KVM user memory regions / vm-memory `GuestRegionMmap`s (e.g.
//! `MmapRegion::build_raw`, which does not own the mapping): keep the returned owner
//! alive as long as the VM runs; dropping it unmaps the memory.
//! - [`restore_mmap`] → [`MappedMemory`]: the base file mapped `MAP_PRIVATE` over each
//!   region and every run owned by a diff layer mapped `MAP_PRIVATE|MAP_FIXED` on top.
//!   No thread; clean pages are shared through the page cache. Mapping budget:
//!   [`MmapOptions::max_mappings`]; beyond it the smallest runs are copied instead.
//!   [`plan_mmap`] tells the count beforehand.
//! - [`UffdMemory::start`]: anonymous memory registered with userfaultfd and a
//!   page-server thread that serves faults from the chain, records the first-touch
//!   order ([`UffdMemory::save_working_set`], default path
//!   [`WorkingSet::default_path`]) and prefetches a recorded [`WorkingSet`] before
//!   returning ([`Prefetch::BeforeStart`]) or in the background. If the server cannot
//!   serve a page, it records the error ([`UffdMemory::failure`], and
//!   [`UffdMemory::failure_fd`] becomes readable), makes the guest memory
//!   inaccessible and wakes every waiter: a vCPU gets `EFAULT` from `KVM_RUN`, a
//!   host thread's kernel access (e.g. `write(2)` from it) gets `EFAULT`, a plain
//!   user-space access gets `SIGSEGV`. It never leaves a faulting thread waiting.
//!   [`UffdMemory::stop_server`] (or drop) ends the thread the same way.
//!
//! Errors: [`LayerError`] (files, chains, working sets), [`RestoreError`] (`mmap`
//! mode), [`PageServerError`] (`uffd` mode). Layer files are immutable once written:
//! never truncate or rewrite one that a restored VM may map. Naming convention in a
//! snapshot directory: `NNNN.mlayer` (base `0000`), working set `NNNN.mlayer.ws`.

mod chain;
pub mod format;
mod layer;
mod mmap;
mod sys;
mod uffd;
mod working_set;
mod writer;

pub use chain::{Chain, Segment, LAYER_EXT};
pub use format::{LayerHeader, LayerKind, Run};
pub use layer::{Layer, LayerInfo};
pub use mmap::{plan_mmap, restore_mmap, MappedMemory, MmapOptions, MmapPlan, RestoreError};
pub use sys::{map_file_fixed, Mapping, RestoredRegion};
pub use uffd::{PageServerError, PageServerStats, Prefetch, UffdMemory, UffdOptions};
pub use working_set::WorkingSet;
pub use writer::{sweep_stale_tmp, sync_layer, write_diff, write_full, RegionMemory, WriteOptions};

use std::path::PathBuf;

/// Errors of memory layer files, chains and working-set files.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// A system call on a layer file failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A directory, FIFO, device... where a layer file is meant (refused before reading:
    /// a FIFO would block, a device would be read without end).
    #[error("{path} is not a regular file")]
    NotRegular {
        /// The file.
        path: PathBuf,
    },
    /// The file does not start with the layer (or working-set) magic.
    #[error("not a Grove memory layer (bad magic)")]
    BadMagic,
    /// A format version this code does not know.
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u32),
    /// The header checksum does not match.
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderChecksum {
        /// Stored in the file.
        stored: u32,
        /// Computed from the file.
        computed: u32,
    },
    /// The index (or working-set entries) checksum does not match.
    #[error("index checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    IndexChecksum {
        /// Stored in the file.
        stored: u32,
        /// Computed from the file.
        computed: u32,
    },
    /// The file is shorter than its header says.
    #[error("truncated file: expected {expected} bytes, found {actual}")]
    Truncated {
        /// Length the header implies.
        expected: u64,
        /// Actual length.
        actual: u64,
    },
    /// The file is longer than its header says.
    #[error("trailing data: expected {expected} bytes, found {actual}")]
    TrailingData {
        /// Length the header implies.
        expected: u64,
        /// Actual length.
        actual: u64,
    },
    /// A header field is out of range or inconsistent.
    #[error("invalid layer: {0}")]
    Invalid(&'static str),
    /// The layer's page size is not the one required.
    #[error("page size mismatch: layer has {layer}, expected {expected}")]
    PageSizeMismatch {
        /// In the file.
        layer: u32,
        /// Required.
        expected: u32,
    },
    /// A diff layer does not sit on the layer before it in the chain.
    #[error("parent mismatch in chain at layer {index}: expects parent {expected}, found {found}")]
    ParentMismatch {
        /// Position in the chain.
        index: usize,
        /// The parent id the layer names.
        expected: String,
        /// The id of the layer below it (or "none").
        found: String,
    },
    /// Layers of one chain describe different guest memory layouts.
    #[error("memory layout mismatch at layer {index}")]
    LayoutMismatch {
        /// Position in the chain.
        index: usize,
    },
    /// The chain is empty, does not start with a full layer, or is not linear.
    #[error("bad chain: {0}")]
    BadChain(String),
    /// A working-set file belongs to another snapshot.
    #[error("working set was recorded for layer {found}, chain head is {expected}")]
    WorkingSetMismatch {
        /// Head of the chain.
        expected: String,
        /// Layer named in the file.
        found: String,
    },
    /// Caller input the writer rejects (sizes, alignment, bitmaps).
    #[error("bad input: {0}")]
    Input(String),
}

impl LayerError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { op, path: path.into(), source }
    }
}

/// The id of a layer: 128 random bits (never zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerId(pub u128);

impl LayerId {
    /// A fresh random id (from the kernel's random source).
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        loop {
            if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
                use std::io::Read;
                if f.read_exact(&mut b).is_ok() && b != [0u8; 16] {
                    return Self(u128::from_le_bytes(b));
                }
            }
            // Fall back to time and pid mixing if /dev/urandom is unavailable.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let v = t ^ (u128::from(std::process::id()) << 96) ^ 0x9e37_79b9_7f4a_7c15;
            if v != 0 {
                return Self(v);
            }
        }
    }
}

impl std::fmt::Display for LayerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Largest guest memory a layer may describe (1 TiB).
pub const MAX_GUEST_MEMORY: u64 = 1 << 40;

/// One guest memory region: guest physical address and length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Guest physical address (page aligned).
    pub gpa: u64,
    /// Length in bytes (a non-zero multiple of the page size).
    pub len: u64,
}

/// The guest memory a layer describes: page size and regions in guest-physical order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    /// Page size in bytes (4096 on x86-64 hosts).
    pub page_size: u32,
    /// Regions, sorted by address, not overlapping.
    pub regions: Vec<Region>,
}

impl MemoryLayout {
    /// Validates and builds a layout.
    pub fn new(page_size: u32, regions: Vec<Region>) -> Result<Self, LayerError> {
        if !page_size.is_power_of_two()
            || !(format::MIN_PAGE_SIZE..=format::MAX_PAGE_SIZE).contains(&page_size)
        {
            return Err(LayerError::Invalid("page size"));
        }
        if regions.is_empty() || regions.len() > format::MAX_REGIONS {
            return Err(LayerError::Invalid("region count out of range"));
        }
        let ps = u64::from(page_size);
        let mut prev_end = 0u64;
        let mut total = 0u64;
        for (i, r) in regions.iter().enumerate() {
            if r.len == 0 || r.gpa % ps != 0 || r.len % ps != 0 {
                return Err(LayerError::Invalid("region not page aligned or empty"));
            }
            let end = r.gpa.checked_add(r.len).ok_or(LayerError::Invalid("region overflows"))?;
            if i > 0 && r.gpa < prev_end {
                return Err(LayerError::Invalid("regions not sorted or overlapping"));
            }
            prev_end = end;
            total = total.checked_add(r.len).ok_or(LayerError::Invalid("memory size overflows"))?;
        }
        // Bound guest memory (and so every index, bitmap and page number derived
        // from a file) to 1 TiB.
        if total > MAX_GUEST_MEMORY {
            return Err(LayerError::Invalid("guest memory larger than 1 TiB"));
        }
        Ok(Self { page_size, regions })
    }

    /// Total guest memory in bytes.
    pub fn mem_size(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Total guest memory in pages.
    pub fn mem_pages(&self) -> u64 {
        self.mem_size() / u64::from(self.page_size)
    }

    /// The first memory page of each region.
    pub fn region_first_pages(&self) -> Vec<u64> {
        let ps = u64::from(self.page_size);
        let mut acc = 0;
        self.regions
            .iter()
            .map(|r| {
                let first = acc;
                acc += r.len / ps;
                first
            })
            .collect()
    }
}

/// The host's page size.
pub fn host_page_size() -> u32 {
    sys::page_size()
}

#[cfg(test)]
mod tests;
