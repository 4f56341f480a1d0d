//! The memory region the guest writes: from guest-physical 16 MiB upwards along
//! the e820 RAM entries (so it skips the 32-bit MMIO gap), `tg.touch_mib` MiB long.
//!
//! Pattern: the 64-bit little-endian word at guest-physical address `a` is
//! `a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed`.
//! Checksum: FNV-1a 64 over the words in address order, per word
//! `h = (h ^ w).wrapping_mul(0x100_0000_01b3)`, from `0xcbf2_9ce4_8422_2325`.

use crate::bootparams::{E820Entry, E820_MAX, E820_RAM};
use crate::MAPPED_BYTES;

/// Where the region starts (guest physical).
pub const REGION_START: u64 = 16 << 20;
/// Multiplier of the pattern.
pub const PATTERN_MUL: u64 = 0x9E37_79B9_7F4A_7C15;
/// FNV-1a 64 offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64 prime.
pub const FNV_PRIME: u64 = 0x100_0000_01b3;
/// Page size used for the round robin and the fork rewrite.
pub const PAGE: u64 = 4096;

/// The pattern word at guest-physical address `addr`.
#[inline(always)]
pub fn pattern(addr: u64, seed: u64) -> u64 {
    addr.wrapping_mul(PATTERN_MUL) ^ seed
}

/// One FNV-1a step over a 64-bit word.
#[inline(always)]
pub fn fnv_step(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(FNV_PRIME)
}

/// Why a region cannot be laid out.
#[derive(Debug, PartialEq, Eq)]
pub enum RegionError {
    /// Not enough RAM above 16 MiB in the e820 map.
    TooSmall,
    /// The region would reach past the guest's identity map (16 GiB).
    BeyondMap,
}

/// The region as up to [`E820_MAX`] page-aligned chunks, in address order.
pub struct Region {
    chunks: [(u64, u64); E820_MAX],
    n: usize,
}

impl Region {
    /// Lays out `bytes` bytes along the RAM entries of `e820`, from 16 MiB up.
    pub fn layout(e820: &[E820Entry], bytes: u64) -> Result<Self, RegionError> {
        let mut ram = [E820Entry::default(); E820_MAX];
        let mut n_ram = 0;
        for e in e820.iter().filter(|e| e.kind == E820_RAM && e.size != 0).take(E820_MAX) {
            ram[n_ram] = *e;
            n_ram += 1;
        }
        let ram = &mut ram[..n_ram];
        ram.sort_unstable_by_key(|e| e.addr);

        let mut r = Self { chunks: [(0, 0); E820_MAX], n: 0 };
        let mut left = bytes;
        let mut cursor = REGION_START;
        for e in ram.iter() {
            if left == 0 {
                break;
            }
            let end = e.addr.saturating_add(e.size) & !(PAGE - 1);
            let start = e.addr.max(cursor).next_multiple_of(PAGE);
            if start >= end {
                continue;
            }
            let take = (end - start).min(left);
            if start + take > MAPPED_BYTES {
                return Err(RegionError::BeyondMap);
            }
            r.chunks[r.n] = (start, take);
            r.n += 1;
            left -= take;
            cursor = start + take;
        }
        if left != 0 {
            return Err(RegionError::TooSmall);
        }
        Ok(r)
    }

    /// The chunks (guest-physical start, length in bytes), in address order.
    pub fn chunks(&self) -> &[(u64, u64)] {
        &self.chunks[..self.n]
    }

    /// Total bytes.
    pub fn bytes(&self) -> u64 {
        self.chunks().iter().map(|c| c.1).sum()
    }

    /// Writes the pattern with `seed` over the whole region.
    pub fn fill(&self, seed: u64) {
        for &(start, len) in self.chunks() {
            fill_range(start, len, seed);
        }
    }

    /// Writes the pattern with `seed` over the first page of the region.
    pub fn fill_first_page(&self, seed: u64) {
        if let Some(&(start, len)) = self.chunks().first() {
            fill_range(start, len.min(PAGE), seed);
        }
    }

    /// FNV-1a 64 over the region's words in address order.
    pub fn checksum(&self) -> u64 {
        let mut h = FNV_OFFSET;
        for &(start, len) in self.chunks() {
            // SAFETY: `layout` put every chunk inside an e820 RAM entry above 16 MiB
            // (outside this image and the zero page) and below the end of the identity
            // map; the chunk is page aligned and only this program accesses it.
            let words =
                unsafe { core::slice::from_raw_parts(start as *const u64, word_count(len)) };
            for &w in words {
                h = fnv_step(h, w);
            }
        }
        h
    }

    /// A cursor over the region's pages, from the first.
    pub fn page_cursor(&self) -> PageCursor {
        PageCursor { chunk: 0, off: 0 }
    }
}

/// Walks the region's pages round robin.
pub struct PageCursor {
    chunk: usize,
    off: u64,
}

impl PageCursor {
    /// The next page's guest-physical address, wrapping around at the end; `None`
    /// for an empty region.
    pub fn next(&mut self, region: &Region) -> Option<u64> {
        let chunks = region.chunks();
        let &(start, len) = chunks.get(self.chunk)?;
        let addr = start + self.off;
        self.off += PAGE;
        if self.off >= len {
            self.off = 0;
            self.chunk = (self.chunk + 1) % chunks.len();
        }
        Some(addr)
    }
}

fn word_count(len: u64) -> usize {
    // The region is below 16 GiB, so the count fits any usize of this 64-bit target.
    usize::try_from(len / 8).unwrap_or(0)
}

fn fill_range(start: u64, len: u64, seed: u64) {
    let mut p = start as *mut u64;
    let mut addr = start;
    for _ in 0..word_count(len) {
        // SAFETY: [start, start + len) is a region chunk (see `Region::checksum`);
        // `p` stays inside it and is 8-byte aligned.
        unsafe {
            p.write_volatile(pattern(addr, seed));
            p = p.add(1);
        }
        addr += 8;
    }
}

/// Writes `value` into the first word of the page at `addr` (busy mode).
pub fn poke_page(addr: u64, value: u64) {
    // SAFETY: `addr` comes from a `PageCursor` over a region chunk (see
    // `Region::checksum`): page aligned, inside RAM this program owns.
    unsafe { (addr as *mut u64).write_volatile(value) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn ram(addr: u64, size: u64) -> E820Entry {
        E820Entry { addr, size, kind: E820_RAM }
    }

    #[test]
    fn region_starts_at_16_mib_and_skips_the_gap() {
        let map = [ram(4 * GIB, GIB), ram(0, 0x9fc00), ram(MIB, 3 * GIB - MIB)];
        let r = Region::layout(&map, 3100 * MIB).unwrap();
        assert_eq!(r.chunks(), &[(16 * MIB, 3 * GIB - 16 * MIB), (4 * GIB, 44 * MIB)]);
        assert_eq!(r.bytes(), 3100 * MIB);
        let r = Region::layout(&map, 0).unwrap();
        assert!(r.chunks().is_empty());
    }

    #[test]
    fn region_ignores_non_ram_and_overlaps_and_reports_misfits() {
        let reserved = E820Entry { addr: 16 * MIB, size: GIB, kind: 2 };
        let map = [reserved, ram(0, 64 * MIB), ram(32 * MIB, 64 * MIB)];
        let r = Region::layout(&map, 80 * MIB).unwrap();
        assert_eq!(r.chunks(), &[(16 * MIB, 48 * MIB), (64 * MIB, 32 * MIB)]);
        assert_eq!(Region::layout(&map, 81 * MIB).err(), Some(RegionError::TooSmall));
        let big = [ram(0, 20 * GIB)];
        assert_eq!(Region::layout(&big, 16 * GIB).err(), Some(RegionError::BeyondMap));
        assert_eq!(Region::layout(&[], MIB).err(), Some(RegionError::TooSmall));
    }

    #[test]
    fn page_cursor_wraps_around_the_chunks() {
        let map = [ram(MIB, 16 * MIB + 2 * PAGE - MIB), ram(4 * GIB, PAGE)];
        let r = Region::layout(&map, 3 * PAGE).unwrap();
        let mut c = r.page_cursor();
        let seq: Vec<u64> = (0..4).map(|_| c.next(&r).unwrap()).collect();
        assert_eq!(seq, [16 * MIB, 16 * MIB + PAGE, 4 * GIB, 16 * MIB]);
        let empty = Region::layout(&map, 0).unwrap();
        assert_eq!(empty.page_cursor().next(&empty), None);
    }

    #[test]
    fn pattern_and_fnv_match_the_contract() {
        assert_eq!(pattern(0, 0), 0);
        assert_eq!(pattern(8, 1), 8u64.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 1);
        let mut h = FNV_OFFSET;
        for a in (16 * MIB..17 * MIB).step_by(8) {
            h = fnv_step(h, pattern(a, 0));
        }
        // Same value as vmm/tests/boot.rs and an independent Python computation.
        assert_eq!(h, 0xa810_9e07_e0f2_2325);
    }
}
