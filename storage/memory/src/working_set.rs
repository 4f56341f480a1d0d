//! The recorded working set: memory pages in the order a restored guest first
//! touched them, saved next to the snapshot and prefetched on later restores.
//!
//! File: magic "GROVEWS1" (8), version u32 (1), page size u32, head layer id (16),
//! count u64, count x page u64, crc32 of everything before it (u32).

use std::path::{Path, PathBuf};

use super::{LayerError, LayerId};

const MAGIC: [u8; 8] = *b"GROVEWS1";
const VERSION: u32 = 1;
const FIXED: usize = 8 + 4 + 4 + 16 + 8;
/// Most pages a working-set file may list (1 TiB of 4 KiB pages).
pub const MAX_PAGES: u64 = 1 << 28;

/// Memory pages in first-touch order, for the snapshot whose head layer is `head`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    /// Head layer of the chain the pages refer to.
    pub head: LayerId,
    /// Page size.
    pub page_size: u32,
    /// Memory pages, first touch first, no duplicates.
    pub pages: Vec<u64>,
}

impl WorkingSet {
    /// The conventional place for the working set of a snapshot whose head layer
    /// file is `head_layer`: the same path with `.ws` appended.
    pub fn default_path(head_layer: impl AsRef<Path>) -> PathBuf {
        let mut s = head_layer.as_ref().as_os_str().to_owned();
        s.push(".ws");
        PathBuf::from(s)
    }

    /// Encodes the file contents.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(FIXED + self.pages.len() * 8 + 4);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.page_size.to_le_bytes());
        b.extend_from_slice(&self.head.0.to_le_bytes());
        b.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for p in &self.pages {
            b.extend_from_slice(&p.to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates file contents.
    pub fn decode(b: &[u8]) -> Result<Self, LayerError> {
        if b.len() < FIXED + 4 {
            return Err(LayerError::Truncated {
                expected: (FIXED + 4) as u64,
                actual: b.len() as u64,
            });
        }
        if b[0..8] != MAGIC {
            return Err(LayerError::BadMagic);
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(LayerError::UnsupportedVersion(version));
        }
        let count = u64_at(32);
        if count > MAX_PAGES {
            return Err(LayerError::Invalid("working set too large"));
        }
        let expected = FIXED as u64 + count * 8 + 4;
        if (b.len() as u64) < expected {
            return Err(LayerError::Truncated { expected, actual: b.len() as u64 });
        }
        if (b.len() as u64) > expected {
            return Err(LayerError::TrailingData { expected, actual: b.len() as u64 });
        }
        let body = b.len() - 4;
        let stored = u32_at(body);
        let computed = crc32fast::hash(&b[..body]);
        if stored != computed {
            return Err(LayerError::IndexChecksum { stored, computed });
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[16..32]);
        let pages = b[FIXED..body].chunks_exact(8).map(u64_at_slice).collect();
        Ok(Self { head: LayerId(u128::from_le_bytes(id)), page_size: u32_at(12), pages })
    }

    /// Writes the file atomically (temporary name, then rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), LayerError> {
        let path = path.as_ref();
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, self.encode()).map_err(|e| LayerError::io("write", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            LayerError::io("rename", path, e)
        })
    }

    /// Reads and validates a file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, LayerError> {
        let path = path.as_ref();
        let (file, size) = crate::layer::open_regular(path)?;
        // Bounded by the size fstat gave (a file growing meanwhile is cut there; decode
        // checks the length against the header).
        let mut b = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        std::io::Read::read_to_end(&mut std::io::Read::take(file, size), &mut b)
            .map_err(|e| LayerError::io("read", path, e))?;
        Self::decode(&b)
    }

    /// Checks that this working set belongs to a chain with head `head`, page size
    /// `page_size` and `mem_pages` pages.
    pub fn check(&self, head: LayerId, page_size: u32, mem_pages: u64) -> Result<(), LayerError> {
        if self.head != head {
            return Err(LayerError::WorkingSetMismatch {
                expected: head.to_string(),
                found: self.head.to_string(),
            });
        }
        if self.page_size != page_size {
            return Err(LayerError::PageSizeMismatch {
                layer: self.page_size,
                expected: page_size,
            });
        }
        if self.pages.iter().any(|&p| p >= mem_pages) {
            return Err(LayerError::Invalid("working-set page beyond guest memory"));
        }
        Ok(())
    }
}

fn u64_at_slice(c: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(c);
    u64::from_le_bytes(a)
}
