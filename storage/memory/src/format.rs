//! The on-disk layout of a memory layer file (pure encode/decode, no I/O).
//!
//! ```text
//! offset 0      header block (HEADER_SIZE = 4096 bytes, little endian)
//!   0  magic  "GROVEMEM"            8
//!   8  format version (1)           u32
//!  12  page size                    u32
//!  16  kind (1 = full, 2 = diff)    u32
//!  20  region count                 u32
//!  24  layer id                     16 bytes
//!  40  parent layer id (0 = none)   16 bytes
//!  56  guest memory size (bytes)    u64  (sum of the region lengths)
//!  64  present pages                u64
//!  72  run count                    u64
//!  80  index offset (= 4096)        u64
//!  88  index length (= runs * 16)   u64
//!  96  data offset                  u64  (index end rounded up to the page size)
//! 104  file length                  u64  (= data offset + guest memory size)
//! 112  crc32 of the index           u32
//! 116  reserved (0)                 u32
//! 120  regions: count x (guest physical address u64, length u64)
//! 4092 crc32 of bytes 0..4092       u32
//! offset 4096   page index: run count x (first page u64, page count u64), sorted,
//!               non-overlapping, non-empty
//! data offset   page data, identity layout: memory page `p` lives at
//!               `data offset + p * page size`.
//! ```
//!
//! "Memory pages" number the pages of the guest's regions laid end to end in
//! guest-physical order (region 0 first), so the 3 GiB MMIO gap costs nothing.
//! Pages that are not present, and present pages whose content is zero, are
//! never written: the file is sparse and holes read as zero.

use super::{LayerError, LayerId, MemoryLayout, Region};

/// Magic at offset 0 of every layer file.
pub const MAGIC: [u8; 8] = *b"GROVEMEM";
/// The only format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Size of the header block; the index starts right after it.
pub const HEADER_SIZE: usize = 4096;
/// Most regions a layer can describe.
pub const MAX_REGIONS: usize = 64;
/// Bytes per index entry.
pub const RUN_SIZE: usize = 16;
/// Smallest and largest accepted page sizes.
pub const MIN_PAGE_SIZE: u32 = 4096;
/// See [`MIN_PAGE_SIZE`].
pub const MAX_PAGE_SIZE: u32 = 1 << 21;

const HEADER_CRC_OFF: usize = HEADER_SIZE - 4;
const REGIONS_OFF: usize = 120;

/// Full (self-contained) or diff (on top of a parent) layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Every non-zero page; absent pages are zero. Has no parent.
    Full,
    /// The pages written since the parent layer; absent pages come from the parent.
    Diff,
}

impl LayerKind {
    fn code(self) -> u32 {
        match self {
            Self::Full => 1,
            Self::Diff => 2,
        }
    }
}

/// A run of present memory pages: `start .. start + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First memory page of the run.
    pub start: u64,
    /// Number of pages (never 0 in a valid index).
    pub count: u64,
}

impl Run {
    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.start + self.count
    }
}

/// The decoded, validated header of a layer file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerHeader {
    /// Full or diff.
    pub kind: LayerKind,
    /// This layer's id.
    pub id: LayerId,
    /// The layer this one sits on (diff layers only).
    pub parent: Option<LayerId>,
    /// Guest memory regions and page size.
    pub layout: MemoryLayout,
    /// Pages listed in the index.
    pub present_pages: u64,
    /// Entries in the index.
    pub run_count: u64,
    /// Offset of the page data (page aligned).
    pub data_offset: u64,
    /// Exact file length.
    pub file_len: u64,
    /// crc32 of the index bytes.
    pub index_crc: u32,
}

fn rd_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn rd_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn rd_id(b: &[u8], off: usize) -> LayerId {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[off..off + 16]);
    LayerId(u128::from_le_bytes(a))
}

fn invalid(what: &'static str) -> LayerError {
    LayerError::Invalid(what)
}

/// Where the page data starts for an index of `run_count` entries.
pub fn data_offset_for(run_count: u64, page_size: u32) -> Option<u64> {
    let end = run_count.checked_mul(RUN_SIZE as u64)?.checked_add(HEADER_SIZE as u64)?;
    let ps = u64::from(page_size);
    end.checked_add(ps - 1).map(|v| v / ps * ps)
}

impl LayerHeader {
    /// Builds a header for a layer with the given index.
    pub fn new(
        kind: LayerKind,
        id: LayerId,
        parent: Option<LayerId>,
        layout: MemoryLayout,
        runs: &[Run],
        index_bytes: &[u8],
    ) -> Result<Self, LayerError> {
        let run_count = runs.len() as u64;
        let data_offset = data_offset_for(run_count, layout.page_size)
            .ok_or(LayerError::Input("index too large".into()))?;
        let file_len = data_offset
            .checked_add(layout.mem_size())
            .ok_or(LayerError::Input("guest memory too large".into()))?;
        Ok(Self {
            kind,
            id,
            parent,
            present_pages: runs.iter().map(|r| r.count).sum(),
            run_count,
            data_offset,
            file_len,
            index_crc: crc32fast::hash(index_bytes),
            layout,
        })
    }

    /// Offset in the file of memory page `page`.
    pub fn page_offset(&self, page: u64) -> u64 {
        self.data_offset + page * u64::from(self.layout.page_size)
    }

    /// Length of the index in bytes.
    pub fn index_len(&self) -> u64 {
        self.run_count * RUN_SIZE as u64
    }

    /// Encodes the header block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.layout.page_size.to_le_bytes());
        b[16..20].copy_from_slice(&self.kind.code().to_le_bytes());
        // At most MAX_REGIONS (checked by MemoryLayout::new).
        #[allow(clippy::cast_possible_truncation)]
        let nreg = self.layout.regions.len() as u32;
        b[20..24].copy_from_slice(&nreg.to_le_bytes());
        b[24..40].copy_from_slice(&self.id.0.to_le_bytes());
        b[40..56].copy_from_slice(&self.parent.map_or(0, |p| p.0).to_le_bytes());
        b[56..64].copy_from_slice(&self.layout.mem_size().to_le_bytes());
        b[64..72].copy_from_slice(&self.present_pages.to_le_bytes());
        b[72..80].copy_from_slice(&self.run_count.to_le_bytes());
        b[80..88].copy_from_slice(&(HEADER_SIZE as u64).to_le_bytes());
        b[88..96].copy_from_slice(&self.index_len().to_le_bytes());
        b[96..104].copy_from_slice(&self.data_offset.to_le_bytes());
        b[104..112].copy_from_slice(&self.file_len.to_le_bytes());
        b[112..116].copy_from_slice(&self.index_crc.to_le_bytes());
        for (i, r) in self.layout.regions.iter().enumerate() {
            let o = REGIONS_OFF + i * 16;
            b[o..o + 8].copy_from_slice(&r.gpa.to_le_bytes());
            b[o + 8..o + 16].copy_from_slice(&r.len.to_le_bytes());
        }
        let crc = crc32fast::hash(&b[..HEADER_CRC_OFF]);
        b[HEADER_CRC_OFF..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header block. `bytes` may be longer than the header.
    pub fn decode(bytes: &[u8]) -> Result<Self, LayerError> {
        if bytes.len() < HEADER_SIZE {
            return Err(LayerError::Truncated {
                expected: HEADER_SIZE as u64,
                actual: bytes.len() as u64,
            });
        }
        let b = &bytes[..HEADER_SIZE];
        if b[0..8] != MAGIC {
            return Err(LayerError::BadMagic);
        }
        let version = rd_u32(b, 8);
        if version != VERSION {
            return Err(LayerError::UnsupportedVersion(version));
        }
        let stored = rd_u32(b, HEADER_CRC_OFF);
        let computed = crc32fast::hash(&b[..HEADER_CRC_OFF]);
        if stored != computed {
            return Err(LayerError::HeaderChecksum { stored, computed });
        }
        let page_size = rd_u32(b, 12);
        if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(invalid("page size is not a power of two between 4 KiB and 2 MiB"));
        }
        let kind = match rd_u32(b, 16) {
            1 => LayerKind::Full,
            2 => LayerKind::Diff,
            _ => return Err(invalid("unknown layer kind")),
        };
        let nreg = rd_u32(b, 20) as usize;
        if nreg == 0 || nreg > MAX_REGIONS {
            return Err(invalid("region count out of range"));
        }
        let id = rd_id(b, 24);
        let parent = match rd_id(b, 40) {
            LayerId(0) => None,
            p => Some(p),
        };
        match (kind, parent) {
            (LayerKind::Full, Some(_)) => return Err(invalid("a full layer has a parent")),
            (LayerKind::Diff, None) => return Err(invalid("a diff layer has no parent")),
            _ => {}
        }
        if id.0 == 0 {
            return Err(invalid("layer id is zero"));
        }
        let regions = (0..nreg)
            .map(|i| {
                let o = REGIONS_OFF + i * 16;
                Region { gpa: rd_u64(b, o), len: rd_u64(b, o + 8) }
            })
            .collect();
        let layout = MemoryLayout::new(page_size, regions)?;
        if rd_u64(b, 56) != layout.mem_size() {
            return Err(invalid("memory size does not match the regions"));
        }
        let run_count = rd_u64(b, 72);
        if run_count > layout.mem_pages() {
            return Err(invalid("more runs than memory pages"));
        }
        if rd_u64(b, 80) != HEADER_SIZE as u64 {
            return Err(invalid("index offset"));
        }
        if Some(rd_u64(b, 88)) != run_count.checked_mul(RUN_SIZE as u64) {
            return Err(invalid("index length"));
        }
        let data_offset = rd_u64(b, 96);
        if Some(data_offset) != data_offset_for(run_count, page_size) {
            return Err(invalid("data offset"));
        }
        let file_len = rd_u64(b, 104);
        if Some(file_len) != data_offset.checked_add(layout.mem_size()) {
            return Err(invalid("file length"));
        }
        let present_pages = rd_u64(b, 64);
        if present_pages > layout.mem_pages() {
            return Err(invalid("more present pages than memory pages"));
        }
        Ok(Self {
            kind,
            id,
            parent,
            layout,
            present_pages,
            run_count,
            data_offset,
            file_len,
            index_crc: rd_u32(b, 112),
        })
    }
}

/// Encodes an index.
pub fn encode_index(runs: &[Run]) -> Vec<u8> {
    let mut out = Vec::with_capacity(runs.len() * RUN_SIZE);
    for r in runs {
        out.extend_from_slice(&r.start.to_le_bytes());
        out.extend_from_slice(&r.count.to_le_bytes());
    }
    out
}

/// Decodes and validates the index that `header` describes.
pub fn decode_index(header: &LayerHeader, bytes: &[u8]) -> Result<Vec<Run>, LayerError> {
    if bytes.len() as u64 != header.index_len() {
        return Err(LayerError::Truncated {
            expected: header.index_len(),
            actual: bytes.len() as u64,
        });
    }
    let computed = crc32fast::hash(bytes);
    if computed != header.index_crc {
        return Err(LayerError::IndexChecksum { stored: header.index_crc, computed });
    }
    let pages = header.layout.mem_pages();
    let mut runs = Vec::with_capacity(bytes.len() / RUN_SIZE);
    let mut prev_end = 0u64;
    let mut total = 0u64;
    for (i, e) in bytes.chunks_exact(RUN_SIZE).enumerate() {
        let r = Run { start: rd_u64(e, 0), count: rd_u64(e, 8) };
        if r.count == 0 {
            return Err(invalid("empty run in the index"));
        }
        if i > 0 && r.start < prev_end {
            return Err(invalid("index runs are not sorted or overlap"));
        }
        let end = r.start.checked_add(r.count).ok_or(invalid("index run overflows"))?;
        if end > pages {
            return Err(invalid("index run beyond guest memory"));
        }
        prev_end = end;
        total += r.count;
        runs.push(r);
    }
    if total != header.present_pages {
        return Err(invalid("present page count does not match the index"));
    }
    Ok(runs)
}

/// Parses a whole layer image held in memory (header, index and the length of the
/// data): what [`super::Layer::open`] checks, without the file. Used by the fuzz target.
pub fn parse_image(bytes: &[u8]) -> Result<(LayerHeader, Vec<Run>), LayerError> {
    let header = LayerHeader::decode(bytes)?;
    let actual = bytes.len() as u64;
    if actual < header.file_len {
        return Err(LayerError::Truncated { expected: header.file_len, actual });
    }
    if actual > header.file_len {
        return Err(LayerError::TrailingData { expected: header.file_len, actual });
    }
    let start = HEADER_SIZE;
    // index_len <= file_len == bytes.len(), so this fits in usize.
    #[allow(clippy::cast_possible_truncation)]
    let end = start + header.index_len() as usize;
    let runs = decode_index(&header, &bytes[start..end])?;
    Ok((header, runs))
}
