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
//! slot 0 at 4096, slot 1 at 4096 + slot_len; slot_len = 4096 + bitmap bytes rounded up to 4096
//!   slot header page
//!      0  8  magic "GRVBSLOT"
//!      8  8  generation (0 = never written)
//!     16  4  CRC-32 of the bitmap
//!     20  4  CRC-32 of bytes 0..20
//!   bitmap pages: bit c of word c/64 set = chunk c is owned by this layer
//! ```
//!
//! A commit writes the bitmap into the slot that does not hold the newest valid
//! generation (only the bitmap pages changed since that slot was last written),
//! then its slot header with generation + 1, then fdatasyncs. A torn commit
//! leaves that slot failing its checksum, and the loader takes the other one, so
//! the index on disk is always a state that was committed whole.

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

    /// Bytes of one slot (header page + bitmap pages).
    pub fn slot_len(&self) -> u64 {
        PAGE + self.bitmap_bytes.div_ceil(PAGE) * PAGE
    }

    /// Offset of slot `i`.
    pub fn slot_offset(&self, i: usize) -> u64 {
        PAGE + if i == 0 { 0 } else { self.slot_len() }
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
    pub bitmap_crc: u32,
}

impl SlotHeader {
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&SLOT_MAGIC);
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16..20].copy_from_slice(&self.bitmap_crc.to_le_bytes());
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
        let bitmap_crc = u32::from_le_bytes(b[16..20].try_into().ok()?);
        (generation > 0).then_some(Self { generation, bitmap_crc })
    }
}

/// Chooses the newest slot whose header and bitmap checksums hold. `slots` are
/// (slot header bytes, bitmap bytes). Returns (slot index, generation).
pub fn choose_slot(slots: [(&[u8], &[u8]); 2]) -> Result<(usize, u64), IndexError> {
    let mut best: Option<(usize, u64)> = None;
    for (i, (hdr, bitmap)) in slots.iter().enumerate() {
        let Some(sh) = SlotHeader::parse(hdr) else { continue };
        if crc32fast::hash(bitmap) != sh.bitmap_crc {
            continue;
        }
        if best.is_none_or(|(_, g)| sh.generation > g) {
            best = Some((i, sh.generation));
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
    let bm = usize::try_from(h.bitmap_bytes).map_err(|_| IndexError::BadGeometry("size".into()))?;
    let slot = |i: usize| {
        let o = usize::try_from(h.slot_offset(i)).unwrap_or(usize::MAX);
        let p = usize::try_from(PAGE).unwrap_or(4096);
        (&b[o..o + 24], &b[o + p..o + p + bm])
    };
    let (i, generation) = choose_slot([slot(0), slot(1)])?;
    let bitmap = Bitmap::from_bytes(slot(i).1, h.chunks);
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
    pub fn new(chunks: u64) -> Self {
        let n = usize::try_from(chunks.div_ceil(64)).expect("bitmap fits in memory");
        let mut words = Vec::with_capacity(n);
        words.resize_with(n, || AtomicU64::new(0));
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

/// Creates the index file of a new, empty layer: header, slot 0 valid with an
/// empty bitmap (generation 1), slot 1 never written. Sparse: O(1) in the disk
/// size apart from the bitmap checksum.
pub fn create(file: &File, h: &Header) -> Result<(), IndexError> {
    file.set_len(h.file_len())?;
    file.write_all_at(&h.encode(), 0)?;
    let zeros_crc = crc_of_zeros(h.bitmap_bytes);
    let sh = SlotHeader { generation: 1, bitmap_crc: zeros_crc };
    file.write_all_at(&sh.encode(), h.slot_offset(0))?;
    Ok(())
}

fn crc_of_zeros(len: u64) -> u32 {
    let block = [0u8; 64 * 1024];
    let mut hasher = crc32fast::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(block.len() as u64)).unwrap_or(block.len());
        hasher.update(&block[..n]);
        left -= n as u64;
    }
    hasher.finalize()
}

/// An open index file: loads the newest slot and commits new states.
#[derive(Debug)]
pub struct IndexFile {
    file: File,
    header: Header,
    /// Slot holding the newest committed state.
    current: usize,
    generation: u64,
}

impl IndexFile {
    /// Opens an index, checking it belongs to `layer`; returns it and the bitmap.
    pub fn open(file: File, layer: u64) -> Result<(Self, Bitmap), IndexError> {
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
        let bm =
            usize::try_from(h.bitmap_bytes).map_err(|_| IndexError::BadGeometry("size".into()))?;
        let mut slots = [(vec![0u8; 24], vec![0u8; bm]), (vec![0u8; 24], vec![0u8; bm])];
        for (i, (sh, b)) in slots.iter_mut().enumerate() {
            file.read_exact_at(sh, h.slot_offset(i))?;
            file.read_exact_at(b, h.slot_offset(i) + PAGE)?;
        }
        let (current, generation) =
            choose_slot([(&slots[0].0, &slots[0].1), (&slots[1].0, &slots[1].1)])?;
        let bitmap = Bitmap::from_bytes(&slots[current].1, h.chunks);
        Ok((Self { file, header: h, current, generation }, bitmap))
    }

    /// Opens the index of a spare layer, known to be as [`create`] left it
    /// (spares are never written to): checks the header, skips reading the empty
    /// bitmap. O(1) in the disk size.
    pub fn open_fresh(file: File, expect: &Header) -> Result<(Self, Bitmap), IndexError> {
        let mut hb = [0u8; 52];
        file.read_exact_at(&mut hb, 0)?;
        let h = Header::parse(&hb)?;
        if h != *expect {
            return Err(IndexError::WrongLayer { found: h.layer, expected: expect.layer });
        }
        let bitmap = Bitmap::new(h.chunks);
        Ok((Self { file, header: h, current: 0, generation: 1 }, bitmap))
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The slot the next commit writes.
    pub fn target(&self) -> usize {
        1 - self.current
    }

    /// Commits `bytes` (the whole bitmap) into the target slot, writing only the
    /// bitmap pages listed in `pages` (those changed since the target slot was
    /// last written), then the slot header, then fdatasync.
    pub fn commit(&mut self, bytes: &[u8], pages: &[u64]) -> Result<(), IndexError> {
        let t = self.target();
        let base = self.header.slot_offset(t) + PAGE;
        for &p in pages {
            let start = usize::try_from(p * PAGE).unwrap_or(usize::MAX);
            if start >= bytes.len() {
                continue;
            }
            let end = (start + 4096).min(bytes.len());
            self.file.write_all_at(&bytes[start..end], base + p * PAGE)?;
        }
        let sh = SlotHeader { generation: self.generation + 1, bitmap_crc: crc32fast::hash(bytes) };
        self.file.write_all_at(&sh.encode(), self.header.slot_offset(t))?;
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

    #[test]
    fn create_open_commit_and_torn_commit() {
        let h = Header::new(7, 1 << 30, 4096).unwrap();
        let f = tempfile::tempfile().unwrap();
        create(&f, &h).unwrap();
        let (mut idx, bm) = IndexFile::open(f.try_clone().unwrap(), 7).unwrap();
        assert_eq!(bm.count(), 0);
        bm.set(5);
        bm.set(100_000);
        let bytes = bm.to_bytes();
        let all: Vec<u64> = (0..h.bitmap_bytes.div_ceil(PAGE)).collect();
        idx.commit(&bytes, &all).unwrap();
        let (_, bm2) = IndexFile::open(f.try_clone().unwrap(), 7).unwrap();
        assert!(bm2.get(5) && bm2.get(100_000) && !bm2.get(6));
        // A torn second commit: bitmap page written, slot header not.
        bm.set(6);
        let t = idx.target();
        f.write_all_at(&bm.to_bytes()[..4096], h.slot_offset(t) + PAGE).unwrap();
        f.write_all_at(&[0xAA; 24], h.slot_offset(t)).unwrap();
        let (_, bm3) = IndexFile::open(f.try_clone().unwrap(), 7).unwrap();
        assert!(bm3.get(5) && !bm3.get(6), "falls back to the last whole commit");
        assert!(matches!(IndexFile::open(f, 8), Err(IndexError::WrongLayer { found: 7, .. })));
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
        let mut b = good.clone();
        let o = usize::try_from(h.slot_offset(0)).unwrap();
        b[o + 9] ^= 1;
        assert!(matches!(parse_image(&b), Err(IndexError::NoValidSlot)));
        let mut b = good;
        let o = usize::try_from(h.slot_offset(0) + PAGE).unwrap();
        b[o] = 1; // bitmap no longer matches its checksum
        assert!(matches!(parse_image(&b), Err(IndexError::NoValidSlot)));
        // Geometry that lies.
        let mut hb = Header::new(1, 1 << 20, 4096).unwrap();
        hb.chunks = 1 << 40;
        let enc = hb.encode();
        assert!(matches!(Header::parse(&enc), Err(IndexError::BadGeometry(_))));
    }
}
