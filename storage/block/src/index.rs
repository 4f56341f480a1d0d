//! The chunk index of a layer: which chunks the layer owns.
//!
//! One file per layer, `L<id>.idx`, all integers little endian:
//!
//! ```text
//! header page (4096 bytes)
//!      0  8  magic "GRVBLIDX"
//!      8  4  format version (1)
//!     12  4  chunk size in bytes (power of two, 4 KiB ..= 1 MiB)
//!     16  8  layer id
//!     24  8  disk size in bytes (multiple of 512)
//!     32  8  chunk count = ceil(disk size / chunk size)
//!     40  8  bitmap bytes = ceil(chunk count / 64) * 8
//!     48  4  CRC-32 of bytes 0..48
//! pages = ceil(bitmap bytes / 4096); table = pages * 4 bytes rounded up to 4096
//! slot i at 4096 + i * slot_len; slot_len = 4096 + table + pages * 4096
//!   slot header page
//!      0  8  magic "GRVBSLOT"
//!      8  8  generation (0 = never written)
//!     16  4  CRC-32 of the page table (pages * 4 bytes)
//!     20  4  CRC-32 of bytes 0..20
//!   page table: CRC-32 of each 4096-byte bitmap page (zero padded)
//!   bitmap pages: bit c of word c/64 set = chunk c is owned by this layer
//! ```
//!
//! A commit writes into the slot that does not hold the newest valid generation:
//! the bitmap pages changed since that slot was last written, their checksums in
//! the page table, the table, then the slot header with generation + 1, then one
//! fdatasync. Its cost grows with the pages changed, not with the disk size. A
//! torn commit leaves that slot failing a checksum, and the loader takes the other
//! one, so the index on disk is always a state that was committed whole. A new
//! index has both slots valid (generations 1 and 2, empty bitmaps).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Index magic.
pub const MAGIC: [u8; 8] = *b"GRVBLIDX";
/// Slot magic.
pub const SLOT_MAGIC: [u8; 8] = *b"GRVBSLOT";
/// Index format version.
pub const VERSION: u32 = 1;
/// Page size of the index layout.
pub const PAGE: u64 = 4096;
/// Smallest and largest chunk sizes.
pub const MIN_CHUNK: u32 = 4096;
pub const MAX_CHUNK: u32 = 1 << 20;
/// Largest disk the index accepts (16 TiB).
pub const MAX_DISK: u64 = 16 << 40;

/// Why an index file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("I/O on the index")]
    Io(#[from] std::io::Error),
    #[error("index truncated: {found} bytes, need {need}")]
    Truncated { found: u64, need: u64 },
    #[error("bad index magic")]
    BadMagic,
    #[error("unknown index version {0}")]
    UnknownVersion(u32),
    #[error("index header checksum mismatch")]
    BadHeaderChecksum,
    #[error("bad index geometry: {0}")]
    BadGeometry(String),
    #[error("index belongs to layer {found}, expected {expected}")]
    WrongLayer { found: u64, expected: u64 },
    #[error("no valid index slot (both torn or corrupt)")]
    NoValidSlot,
}

/// The fixed header of an index file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub chunk_size: u32,
    pub layer: u64,
    pub disk_size: u64,
    pub chunks: u64,
    pub bitmap_bytes: u64,
}

impl Header {
    /// The header for a layer of `disk_size` bytes in chunks of `chunk_size`.
    pub fn new(layer: u64, disk_size: u64, chunk_size: u32) -> Result<Self, IndexError> {
        let chunks = disk_size.div_ceil(u64::from(chunk_size));
        let h =
            Self { chunk_size, layer, disk_size, chunks, bitmap_bytes: chunks.div_ceil(64) * 8 };
        h.validate()?;
        Ok(h)
    }

    fn validate(&self) -> Result<(), IndexError> {
        let bad = |m: &str| Err(IndexError::BadGeometry(m.into()));
        if !self.chunk_size.is_power_of_two()
            || self.chunk_size < MIN_CHUNK
            || self.chunk_size > MAX_CHUNK
        {
            return bad("chunk size");
        }
        if self.disk_size == 0 || !self.disk_size.is_multiple_of(512) || self.disk_size > MAX_DISK {
            return bad("disk size");
        }
        if self.chunks != self.disk_size.div_ceil(u64::from(self.chunk_size)) {
            return bad("chunk count");
        }
        if self.bitmap_bytes != self.chunks.div_ceil(64) * 8 {
            return bad("bitmap size");
        }
        Ok(())
    }

    /// Number of bitmap pages.
    pub fn pages(&self) -> u64 {
        self.bitmap_bytes.div_ceil(PAGE)
    }

    /// Bytes of the page table region of a slot.
    pub fn table_len(&self) -> u64 {
        (self.pages() * 4).div_ceil(PAGE) * PAGE
    }

    /// Bytes of one slot (header page + page table + bitmap pages).
    pub fn slot_len(&self) -> u64 {
        PAGE + self.table_len() + self.pages() * PAGE
    }

    /// Offset of slot `i`.
    pub fn slot_offset(&self, i: usize) -> u64 {
        PAGE + if i == 0 { 0 } else { self.slot_len() }
    }

    /// Offset of slot `i`'s page table.
    pub fn table_offset(&self, i: usize) -> u64 {
        self.slot_offset(i) + PAGE
    }

    /// Offset of slot `i`'s first bitmap page.
    pub fn bitmap_offset(&self, i: usize) -> u64 {
        self.slot_offset(i) + PAGE + self.table_len()
    }

    /// Size of the whole index file.
    pub fn file_len(&self) -> u64 {
        PAGE + 2 * self.slot_len()
    }

    /// The encoded header page prefix.
    pub fn encode(&self) -> [u8; 52] {
        let mut b = [0u8; 52];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.layer.to_le_bytes());
        b[24..32].copy_from_slice(&self.disk_size.to_le_bytes());
        b[32..40].copy_from_slice(&self.chunks.to_le_bytes());
        b[40..48].copy_from_slice(&self.bitmap_bytes.to_le_bytes());
        let crc = crc32fast::hash(&b[0..48]);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and validates a header (untrusted bytes).
    pub fn parse(b: &[u8]) -> Result<Self, IndexError> {
        if b.len() < 52 {
            return Err(IndexError::Truncated { found: b.len() as u64, need: 52 });
        }
        if b[0..8] != MAGIC {
            return Err(IndexError::BadMagic);
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(IndexError::UnknownVersion(version));
        }
        if crc32fast::hash(&b[0..48]) != u32_at(48) {
            return Err(IndexError::BadHeaderChecksum);
        }
        let h = Self {
            chunk_size: u32_at(12),
            layer: u64_at(16),
            disk_size: u64_at(24),
            chunks: u64_at(32),
            bitmap_bytes: u64_at(40),
        };
        h.validate()?;
        Ok(h)
    }
}

/// A slot header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotHeader {
    pub generation: u64,
    pub table_crc: u32,
}

impl SlotHeader {
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&SLOT_MAGIC);
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16..20].copy_from_slice(&self.table_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[0..20]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a slot header; `None` if it is not a valid, written slot.
    pub fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < 24 || b[0..8] != SLOT_MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[20..24].try_into().ok()?);
        if crc32fast::hash(&b[0..20]) != crc {
            return None;
        }
        let generation = u64::from_le_bytes(b[8..16].try_into().ok()?);
        let table_crc = u32::from_le_bytes(b[16..20].try_into().ok()?);
        (generation > 0).then_some(Self { generation, table_crc })
    }
}

/// Checks one slot: header, page table, every bitmap page. `table` holds at
/// least `pages * 4` bytes, `bitmap` exactly `pages * 4096`. Returns the slot's
/// generation and page table.
pub fn check_slot(
    hdr: &[u8],
    table: &[u8],
    bitmap: &[u8],
    pages: usize,
) -> Option<(u64, Vec<u32>)> {
    let sh = SlotHeader::parse(hdr)?;
    let table = table.get(..pages.checked_mul(4)?)?;
    if crc32fast::hash(table) != sh.table_crc || bitmap.len() != pages.checked_mul(4096)? {
        return None;
    }
    let crcs: Vec<u32> =
        table.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
    let ok = bitmap.chunks_exact(4096).zip(&crcs).all(|(page, &crc)| crc32fast::hash(page) == crc);
    ok.then_some((sh.generation, crcs))
}

/// The newest valid slot of two checked ones: (slot, generation).
fn newest(slots: &[Option<(u64, Vec<u32>)>; 2]) -> Result<(usize, u64), IndexError> {
    let mut best: Option<(usize, u64)> = None;
    for (i, s) in slots.iter().enumerate() {
        if let Some((g, _)) = s {
            if best.is_none_or(|(_, bg)| *g > bg) {
                best = Some((i, *g));
            }
        }
    }
    best.ok_or(IndexError::NoValidSlot)
}

/// Parses a whole index file image (untrusted bytes): header, both slots, the
/// newest valid bitmap. The fuzz target calls this.
pub fn parse_image(b: &[u8]) -> Result<(Header, usize, u64, Bitmap), IndexError> {
    let h = Header::parse(b)?;
    let need = h.file_len();
    if (b.len() as u64) < need {
        return Err(IndexError::Truncated { found: b.len() as u64, need });
    }
    let big = |_| IndexError::BadGeometry("size".into());
    let pages = usize::try_from(h.pages()).map_err(big)?;
    let at = |o: u64| usize::try_from(o).unwrap_or(usize::MAX);
    let slot = |i: usize| {
        let bo = at(h.bitmap_offset(i));
        (
            &b[at(h.slot_offset(i))..at(h.slot_offset(i)) + 24],
            &b[at(h.table_offset(i))..at(h.table_offset(i) + h.table_len())],
            &b[bo..bo + pages * 4096],
        )
    };
    let checked = [0, 1].map(|i| {
        let (hd, t, bm) = slot(i);
        check_slot(hd, t, bm, pages)
    });
    let (i, generation) = newest(&checked)?;
    let bm = usize::try_from(h.bitmap_bytes).map_err(big)?;
    let bitmap = Bitmap::from_bytes(&slot(i).2[..bm], h.chunks);
    Ok((h, i, generation, bitmap))
}

/// A bitmap of owned chunks, readable without locks.
#[derive(Debug)]
pub struct Bitmap {
    words: Vec<AtomicU64>,
    chunks: u64,
}

impl Bitmap {
    /// All chunks unowned.
    ///
    /// O(1) in practice: the words come from a zeroed allocation (fresh pages from
    /// mmap for large bitmaps) and are not touched here, so making the top layer of
    /// a 20 GiB disk costs no page faults until chunks are written.
    pub fn new(chunks: u64) -> Self {
        const _: () = assert!(
            std::mem::size_of::<u64>() == std::mem::size_of::<AtomicU64>()
                && std::mem::align_of::<u64>() == std::mem::align_of::<AtomicU64>()
        );
        let n = usize::try_from(chunks.div_ceil(64)).expect("bitmap fits in memory");
        let mut zeroed = std::mem::ManuallyDrop::new(vec![0u64; n]);
        // SAFETY: AtomicU64 has the same size and bit validity as u64 and, as the
        // assertion above checks, the same alignment here; so the allocation of
        // `zeroed` (length and capacity unchanged, all words initialised to 0) is a
        // valid Vec<AtomicU64>. Ownership moves to the new Vec; `zeroed` is never
        // used or dropped again (ManuallyDrop).
        let words = unsafe {
            Vec::from_raw_parts(
                zeroed.as_mut_ptr().cast::<AtomicU64>(),
                zeroed.len(),
                zeroed.capacity(),
            )
        };
        Self { words, chunks }
    }

    /// From little-endian words.
    pub fn from_bytes(b: &[u8], chunks: u64) -> Self {
        let words = b
            .chunks_exact(8)
            .map(|w| AtomicU64::new(u64::from_le_bytes(w.try_into().expect("8 bytes"))))
            .collect();
        Self { words, chunks }
    }

    /// Little-endian words.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for w in &self.words {
            out.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        out
    }

    /// Bitmap page `p` as stored on disk: 4096 bytes, zero padded.
    pub fn page_bytes(&self, p: u64) -> Vec<u8> {
        let mut out = vec![0u8; 4096];
        let first = usize::try_from(p * 512).unwrap_or(usize::MAX);
        for (i, w) in self.words.iter().skip(first).take(512).enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        out
    }

    /// Whether chunk `c` is owned.
    pub fn get(&self, c: u64) -> bool {
        let Ok(i) = usize::try_from(c / 64) else { return false };
        self.words.get(i).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (c % 64)) != 0)
    }

    /// Marks chunk `c` owned; returns whether it changed.
    pub fn set(&self, c: u64) -> bool {
        let Ok(i) = usize::try_from(c / 64) else { return false };
        let Some(w) = self.words.get(i) else { return false };
        let bit = 1 << (c % 64);
        w.fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Number of chunks covered.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Number of owned chunks.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.load(Ordering::Acquire).count_ones())).sum()
    }
}

fn zero_page_crc() -> u32 {
    crc32fast::hash(&[0u8; 4096])
}

fn table_bytes(crcs: &[u32]) -> Vec<u8> {
    crcs.iter().flat_map(|c| c.to_le_bytes()).collect()
}

/// Creates the index file of a new, empty layer: header, both slots valid with
/// empty bitmaps (generations 1 and 2). Sparse: the bitmap pages are holes; only
/// the page tables (4 bytes per 128 MiB of disk at 4 KiB chunks) are written.
pub fn create(file: &File, h: &Header) -> Result<(), IndexError> {
    file.set_len(h.file_len())?;
    file.write_all_at(&h.encode(), 0)?;
    let pages = usize::try_from(h.pages()).map_err(|_| IndexError::BadGeometry("size".into()))?;
    let table = table_bytes(&vec![zero_page_crc(); pages]);
    let table_crc = crc32fast::hash(&table);
    for (i, generation) in [(0, 1), (1, 2)] {
        file.write_all_at(&table, h.table_offset(i))?;
        file.write_all_at(&SlotHeader { generation, table_crc }.encode(), h.slot_offset(i))?;
    }
    Ok(())
}

/// An open index file: loads the newest slot and commits new states.
#[derive(Debug)]
pub struct IndexFile {
    file: File,
    header: Header,
    /// Slot holding the newest committed state.
    current: usize,
    generation: u64,
    /// Page checksums of each slot as on disk (a slot that failed its checks has
    /// all its pages marked dirty, so its table is rebuilt as they are written).
    tables: [Vec<u32>; 2],
}

impl IndexFile {
    /// Opens an index, checking it belongs to `layer`. Returns it, the bitmap,
    /// and the bitmap pages the next commit must write (those where the target
    /// slot differs from the current one).
    pub fn open(file: File, layer: u64) -> Result<(Self, Bitmap, Vec<bool>), IndexError> {
        let len = file.metadata()?.len();
        let mut hb = [0u8; 52];
        if len < hb.len() as u64 {
            return Err(IndexError::Truncated { found: len, need: hb.len() as u64 });
        }
        file.read_exact_at(&mut hb, 0)?;
        let h = Header::parse(&hb)?;
        if h.layer != layer {
            return Err(IndexError::WrongLayer { found: h.layer, expected: layer });
        }
        if len < h.file_len() {
            return Err(IndexError::Truncated { found: len, need: h.file_len() });
        }
        let big = |_| IndexError::BadGeometry("size".into());
        let pages = usize::try_from(h.pages()).map_err(big)?;
        let tl = usize::try_from(h.table_len()).map_err(big)?;
        let mut regions = Vec::with_capacity(2);
        for i in 0..2 {
            let mut hd = vec![0u8; 24];
            let mut t = vec![0u8; tl];
            let mut bm = vec![0u8; pages * 4096];
            file.read_exact_at(&mut hd, h.slot_offset(i))?;
            file.read_exact_at(&mut t, h.table_offset(i))?;
            file.read_exact_at(&mut bm, h.bitmap_offset(i))?;
            regions.push((hd, t, bm));
        }
        let checked =
            [0, 1].map(|i| check_slot(&regions[i].0, &regions[i].1, &regions[i].2, pages));
        let (current, generation) = newest(&checked)?;
        let target = 1 - current;
        let bm = usize::try_from(h.bitmap_bytes).map_err(big)?;
        let bitmap = Bitmap::from_bytes(&regions[current].2[..bm], h.chunks);
        let [c0, c1] = checked;
        let mut tables = [c0.map(|x| x.1), c1.map(|x| x.1)];
        let dirty: Vec<bool> = match &tables[target] {
            Some(_) => regions[0]
                .2
                .chunks_exact(4096)
                .zip(regions[1].2.chunks_exact(4096))
                .map(|(a, b)| a != b)
                .collect(),
            None => vec![true; pages],
        };
        let tables = [
            tables[0].take().unwrap_or_else(|| vec![0; pages]),
            tables[1].take().unwrap_or_else(|| vec![0; pages]),
        ];
        Ok((Self { file, header: h, current, generation, tables }, bitmap, dirty))
    }

    /// Opens the index of a new layer, known to be as [`create`] left it (new
    /// layers and spares are never written before they are opened): checks the
    /// header, skips reading the empty bitmaps. O(1) in the disk size.
    pub fn open_fresh(
        file: File,
        expect: &Header,
    ) -> Result<(Self, Bitmap, Vec<bool>), IndexError> {
        let mut hb = [0u8; 52];
        file.read_exact_at(&mut hb, 0)?;
        let h = Header::parse(&hb)?;
        if h != *expect {
            return Err(IndexError::WrongLayer { found: h.layer, expected: expect.layer });
        }
        let pages =
            usize::try_from(h.pages()).map_err(|_| IndexError::BadGeometry("size".into()))?;
        let bitmap = Bitmap::new(h.chunks);
        let tables = [vec![zero_page_crc(); pages], vec![zero_page_crc(); pages]];
        Ok((
            Self { file, header: h, current: 1, generation: 2, tables },
            bitmap,
            vec![false; pages],
        ))
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The slot the next commit writes.
    pub fn target(&self) -> usize {
        1 - self.current
    }

    /// Commits into the target slot: `pages` are (page number, 4096 bytes) for
    /// every bitmap page changed since the target slot was last written; then the
    /// page table, the slot header, one fdatasync.
    pub fn commit(&mut self, pages: &[(u64, Vec<u8>)]) -> Result<(), IndexError> {
        let t = self.target();
        let h = self.header;
        for (p, bytes) in pages {
            let Some(slot) = usize::try_from(*p).ok().and_then(|i| self.tables[t].get_mut(i))
            else {
                continue;
            };
            *slot = crc32fast::hash(bytes);
            self.file.write_all_at(bytes, h.bitmap_offset(t) + p * PAGE)?;
        }
        let table = table_bytes(&self.tables[t]);
        self.file.write_all_at(&table, h.table_offset(t))?;
        let sh = SlotHeader { generation: self.generation + 1, table_crc: crc32fast::hash(&table) };
        self.file.write_all_at(&sh.encode(), h.slot_offset(t))?;
        self.file.sync_data()?;
        self.current = t;
        self.generation += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(h: &Header) -> Vec<u8> {
        let f = tempfile::tempfile().unwrap();
        create(&f, h).unwrap();
        let mut b = vec![0u8; usize::try_from(h.file_len()).unwrap()];
        f.read_exact_at(&mut b, 0).unwrap();
        b
    }

    fn commit_all(idx: &mut IndexFile, bm: &Bitmap, pages: &[u64]) {
        let data: Vec<(u64, Vec<u8>)> = pages.iter().map(|&p| (p, bm.page_bytes(p))).collect();
        idx.commit(&data).unwrap();
    }

    #[test]
    fn create_open_commit_and_torn_commit() {
        let h = Header::new(7, 1 << 30, 4096).unwrap();
        assert_eq!(h.pages(), 8);
        let f = tempfile::tempfile().unwrap();
        create(&f, &h).unwrap();
        let (mut idx, bm, dirty) = IndexFile::open(f.try_clone().unwrap(), 7).unwrap();
        assert_eq!(bm.count(), 0);
        assert!(dirty.iter().all(|d| !d), "both new slots hold the same empty bitmap");
        bm.set(5);
        bm.set(100_000); // page 3
        commit_all(&mut idx, &bm, &[0, 3]);
        let (_, bm2, dirty) = IndexFile::open(f.try_clone().unwrap(), 7).unwrap();
        assert!(bm2.get(5) && bm2.get(100_000) && !bm2.get(6));
        assert_eq!(dirty, vec![true, false, false, true, false, false, false, false]);
        // The other slot gets the same pages on the next commit.
        bm.set(6);
        commit_all(&mut idx, &bm, &[0, 3]);
        let (_, bm2, dirty) = IndexFile::open(f.try_clone().unwrap(), 7).unwrap();
        assert!(bm2.get(5) && bm2.get(6) && bm2.get(100_000));
        assert_eq!(dirty, vec![true, false, false, false, false, false, false, false]);
        // A torn third commit: a bitmap page written, slot header not.
        bm.set(7);
        let t = idx.target();
        f.write_all_at(&bm.page_bytes(0), h.bitmap_offset(t)).unwrap();
        let (_, bm3, _) = IndexFile::open(f.try_clone().unwrap(), 7).unwrap();
        assert!(bm3.get(6) && !bm3.get(7), "falls back to the last whole commit");
        assert!(matches!(IndexFile::open(f, 8), Err(IndexError::WrongLayer { found: 7, .. })));
    }

    #[test]
    fn reopened_index_rewrites_what_the_stale_slot_lacks() {
        // Commit bits on page 0 and page 5, reopen, commit one more bit on page 1:
        // the stale slot must also get pages 0 and 5, or a reload after that
        // commit would lose them.
        let h = Header::new(9, 4 << 30, 4096).unwrap();
        let f = tempfile::tempfile().unwrap();
        create(&f, &h).unwrap();
        let (mut idx, bm, _) = IndexFile::open(f.try_clone().unwrap(), 9).unwrap();
        bm.set(1);
        bm.set(5 * 32768);
        commit_all(&mut idx, &bm, &[0, 5]);
        drop(idx);
        let (mut idx, bm, dirty) = IndexFile::open(f.try_clone().unwrap(), 9).unwrap();
        let mut pages: Vec<u64> = (0..h.pages()).filter(|&p| dirty[p as usize]).collect();
        bm.set(32768);
        pages.push(1);
        commit_all(&mut idx, &bm, &pages);
        let (_, bm, _) = IndexFile::open(f, 9).unwrap();
        assert!(bm.get(1) && bm.get(32768) && bm.get(5 * 32768));
    }

    /// What the fuzz target does, on a budget: mutated valid images and garbage
    /// never panic, and whatever is accepted is self-consistent.
    #[test]
    fn parser_survives_mutations_and_garbage() {
        let h = Header::new(3, 1 << 20, 4096).unwrap();
        let good = image(&h);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..3000 {
            let mut b = good.clone();
            for _ in 0..1 + next() % 4 {
                let i = usize::try_from(next() % b.len() as u64).unwrap();
                b[i] = next() as u8;
            }
            let cut = usize::try_from(next() % (b.len() as u64 + 1)).unwrap();
            for bytes in [&b[..], &b[..cut]] {
                if let Ok((hh, slot, generation, bm)) = parse_image(bytes) {
                    assert!(slot < 2 && generation > 0);
                    assert_eq!(bm.chunks(), hh.chunks);
                    assert!(hh.file_len() <= bytes.len() as u64);
                }
            }
        }
        for len in [0usize, 1, 51, 52, 4096, 9000] {
            let junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            assert!(parse_image(&junk).is_err());
            assert!(SlotHeader::parse(&junk).is_none() || len >= 24);
        }
    }

    #[test]
    fn corrupt_and_truncated_files_give_clear_errors() {
        let h = Header::new(1, 64 << 20, 65536).unwrap();
        let good = image(&h);
        assert!(parse_image(&good).is_ok());
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(parse_image(&b), Err(IndexError::BadMagic)));
        let mut b = good.clone();
        b[8] = 2;
        assert!(matches!(parse_image(&b), Err(IndexError::UnknownVersion(2))));
        let mut b = good.clone();
        b[20] ^= 1;
        assert!(matches!(parse_image(&b), Err(IndexError::BadHeaderChecksum)));
        assert!(matches!(parse_image(&good[..good.len() - 1]), Err(IndexError::Truncated { .. })));
        assert!(matches!(parse_image(&good[..10]), Err(IndexError::Truncated { .. })));
        let at = |o: u64| usize::try_from(o).unwrap();
        // One slot broken: the other one is used.
        let mut b = good.clone();
        b[at(h.slot_offset(1)) + 9] ^= 1;
        assert_eq!(parse_image(&b).unwrap().1, 0);
        // Both slot headers broken.
        b[at(h.slot_offset(0)) + 9] ^= 1;
        assert!(matches!(parse_image(&b), Err(IndexError::NoValidSlot)));
        // Bitmap pages no longer match their checksums.
        let mut b = good.clone();
        b[at(h.bitmap_offset(0))] = 1;
        b[at(h.bitmap_offset(1)) + 7] = 1;
        assert!(matches!(parse_image(&b), Err(IndexError::NoValidSlot)));
        // Page tables corrupt.
        let mut b = good;
        b[at(h.table_offset(0))] ^= 1;
        b[at(h.table_offset(1))] ^= 1;
        assert!(matches!(parse_image(&b), Err(IndexError::NoValidSlot)));
        // Geometry that lies.
        let mut hb = Header::new(1, 1 << 20, 4096).unwrap();
        hb.chunks = 1 << 40;
        let enc = hb.encode();
        assert!(matches!(Header::parse(&enc), Err(IndexError::BadGeometry(_))));
    }
}
