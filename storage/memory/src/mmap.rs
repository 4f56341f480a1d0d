//! `mmap` restore mode: guest memory built from `MAP_PRIVATE` mappings of the layer
//! files, so clean pages are shared through the page cache by every VM restored
//! from the same layers, and writes stay private (copy-on-write).
//!
//! Per region: one anonymous `MAP_NORESERVE` reservation, the base (full) layer's
//! range mapped over all of it, then each segment owned by a diff layer mapped
//! `MAP_FIXED` on top. Every mapped segment splits the mapping below it, so a
//! region costs up to `1 + 2 x segments` VMAs (vm.max_map_count is 65530 by
//! default). Beyond [`MmapOptions::max_mappings`] the largest segments are mapped
//! and the rest copied into the (then private, unshared) pages; a chain that
//! needs many copies should be flattened ([`super::Chain::merge`]).

use std::os::fd::AsRawFd;

use super::chain::Chain;
use super::sys::{Mapping, RestoredRegion};
use super::LayerError;

/// Errors of the `mmap` restore mode.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The chain does not fit this host (page size).
    #[error("layer chain")]
    Layer(#[source] LayerError),
    /// mmap/mprotect failed.
    #[error("{op} failed")]
    Map {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A region does not fit in this address space.
    #[error("region of {0} bytes does not fit the address space")]
    TooLarge(u64),
}

/// Options of the `mmap` restore mode.
#[derive(Debug, Clone)]
pub struct MmapOptions {
    /// Most VMAs the restored memory may use (default 8192, an eighth of the
    /// kernel's default vm.max_map_count).
    pub max_mappings: usize,
}

impl Default for MmapOptions {
    fn default() -> Self {
        Self { max_mappings: 8192 }
    }
}

/// One piece of a region: a segment of a diff layer, mapped or copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    start: u64,
    count: u64,
    layer: usize,
    map: bool,
}

/// What a restore will do: mappings and copies.
#[derive(Debug, Clone)]
pub struct MmapPlan {
    /// Upper bound of the VMAs the restored memory uses.
    pub mappings: usize,
    /// Segments mapped from diff layers.
    pub mapped_segments: usize,
    /// Pages copied instead of mapped (over the mapping budget).
    pub copied_pages: u64,
    regions: Vec<(u64, u64, Vec<Piece>)>, // (first page, pages, pieces)
}

/// Plans an `mmap` restore of `chain`.
pub fn plan_mmap(chain: &Chain, opts: &MmapOptions) -> MmapPlan {
    let layout = chain.layout();
    let ps = u64::from(layout.page_size);
    let firsts = layout.region_first_pages();
    let segs = chain.segments();
    let mut regions = Vec::new();
    let mut all: Vec<(usize, usize, u64)> = Vec::new(); // (region, piece, count)
    for (ri, r) in layout.regions.iter().enumerate() {
        let (a, b) = (firsts[ri], firsts[ri] + r.len / ps);
        let i0 = segs.partition_point(|s| s.end() <= a);
        let pieces: Vec<Piece> = segs[i0..]
            .iter()
            .take_while(|s| s.start < b)
            .filter(|s| s.layer > 0)
            .map(|s| {
                let (lo, hi) = (s.start.max(a), s.end().min(b));
                Piece { start: lo, count: hi - lo, layer: s.layer, map: true }
            })
            .collect();
        for (pi, p) in pieces.iter().enumerate() {
            all.push((ri, pi, p.count));
        }
        regions.push((a, b - a, pieces));
    }
    let nreg = regions.len();
    let budget = opts.max_mappings.saturating_sub(nreg) / 2;
    let mut copied_pages = 0;
    if all.len() > budget {
        all.sort_by_key(|x| std::cmp::Reverse(x.2));
        for &(ri, pi, count) in &all[budget..] {
            regions[ri].2[pi].map = false;
            copied_pages += count;
        }
    }
    let mapped_segments = all.len().min(budget);
    MmapPlan { mappings: nreg + 2 * mapped_segments, mapped_segments, copied_pages, regions }
}

/// Guest memory restored in `mmap` mode. Unmapped on drop: drop it only after every
/// user (vCPU, device) of the memory is gone.
#[derive(Debug)]
pub struct MappedMemory {
    maps: Vec<Mapping>,
    regions: Vec<RestoredRegion>,
    plan: MmapPlan,
}

/// Restores the memory of `chain` in `mmap` mode.
pub fn restore_mmap(chain: &Chain, opts: &MmapOptions) -> Result<MappedMemory, RestoreError> {
    chain.check_page_size(super::host_page_size()).map_err(RestoreError::Layer)?;
    let plan = plan_mmap(chain, opts);
    let layout = chain.layout();
    let ps = u64::from(layout.page_size);
    let base = &chain.layers()[0];
    let map_err = |op| move |source| RestoreError::Map { op, source };
    let mut maps = Vec::with_capacity(layout.regions.len());
    let mut regions = Vec::with_capacity(layout.regions.len());
    for (r, (first, pages, pieces)) in layout.regions.iter().zip(&plan.regions) {
        let len = usize::try_from(r.len).map_err(|_| RestoreError::TooLarge(r.len))?;
        let m = Mapping::anonymous(len).map_err(map_err("reserve guest memory"))?;
        m.map_file_at(0, len, base.file().as_raw_fd(), base.header().page_offset(*first))
            .map_err(map_err("map base layer"))?;
        for p in pieces.iter().filter(|p| p.map) {
            let layer = &chain.layers()[p.layer];
            // Offsets are below the region length (a usize), so these fit.
            #[allow(clippy::cast_possible_truncation)]
            let (off, plen) = (((p.start - first) * ps) as usize, (p.count * ps) as usize);
            m.map_file_at(off, plen, layer.file().as_raw_fd(), layer.header().page_offset(p.start))
                .map_err(map_err("map diff layer"))?;
        }
        for p in pieces.iter().filter(|p| !p.map) {
            #[allow(clippy::cast_possible_truncation)]
            let (off, plen) = (((p.start - first) * ps) as usize, (p.count * ps) as usize);
            // SAFETY: the range is inside `m` (a piece lies in its region), and `m` is
            // not yet shared with anyone: no other reference to it exists.
            let dst = unsafe { m.slice_mut(off, plen) };
            chain.read_pages(p.start, dst).map_err(RestoreError::Layer)?;
        }
        debug_assert_eq!(*pages * ps, r.len);
        regions.push(RestoredRegion { gpa: r.gpa, host_addr: m.addr(), len: m.len() });
        maps.push(m);
    }
    Ok(MappedMemory { maps, regions, plan })
}

impl MappedMemory {
    /// The restored regions, in guest-physical order.
    pub fn regions(&self) -> &[RestoredRegion] {
        &self.regions
    }

    /// What the restore did (mappings used, pages copied).
    pub fn plan(&self) -> &MmapPlan {
        &self.plan
    }

    /// Gives up ownership: the memory stays mapped for the life of the process.
    pub fn leak(mut self) -> Vec<RestoredRegion> {
        std::mem::forget(std::mem::take(&mut self.maps));
        self.regions.clone()
    }
}
