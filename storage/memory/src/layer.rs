//! Opening and reading one layer file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::format::{self, LayerHeader, LayerKind, Run, HEADER_SIZE};
use super::{LayerError, LayerId, MemoryLayout};

/// What a caller needs to know about a written or opened layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Where it is.
    pub path: PathBuf,
    /// Its id.
    pub id: LayerId,
    /// Its parent (diff layers).
    pub parent: Option<LayerId>,
    /// Full or diff.
    pub kind: LayerKind,
    /// Guest memory layout.
    pub layout: MemoryLayout,
    /// Pages listed in the index.
    pub present_pages: u64,
    /// Bytes of page data actually written (zero pages are holes).
    pub data_bytes: u64,
}

/// An open, validated layer file.
#[derive(Debug)]
pub struct Layer {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    pub(crate) header: LayerHeader,
    pub(crate) runs: Vec<Run>,
}

/// Opens `path` read-only without blocking (`O_NONBLOCK`: a FIFO must not hang the open)
/// and checks on the descriptor that it is a regular file; returns it with its size.
pub(crate) fn open_regular(path: &Path) -> Result<(File, u64), LayerError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| LayerError::io("open", path, e))?;
    let m = file.metadata().map_err(|e| LayerError::io("stat", path, e))?;
    if !m.file_type().is_file() {
        return Err(LayerError::NotRegular { path: path.to_path_buf() });
    }
    Ok((file, m.len()))
}

impl Layer {
    /// Opens and validates a layer: magic, version, header checksum, fields, exact
    /// file length, index checksum and index consistency.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LayerError> {
        let path = path.as_ref();
        let (file, actual) = open_regular(path)?;
        if actual < HEADER_SIZE as u64 {
            return Err(LayerError::Truncated { expected: HEADER_SIZE as u64, actual });
        }
        let mut hb = vec![0u8; HEADER_SIZE];
        file.read_exact_at(&mut hb, 0).map_err(|e| LayerError::io("read header", path, e))?;
        let header = LayerHeader::decode(&hb)?;
        if actual < header.file_len {
            return Err(LayerError::Truncated { expected: header.file_len, actual });
        }
        if actual > header.file_len {
            return Err(LayerError::TrailingData { expected: header.file_len, actual });
        }
        // index_len < file_len == the file's size, which fits in memory bounds checked below.
        let index_len = usize::try_from(header.index_len())
            .map_err(|_| LayerError::Invalid("index too large"))?;
        let mut ib = vec![0u8; index_len];
        file.read_exact_at(&mut ib, HEADER_SIZE as u64)
            .map_err(|e| LayerError::io("read index", path, e))?;
        let runs = format::decode_index(&header, &ib)?;
        Ok(Self { file, path: path.to_path_buf(), header, runs })
    }

    /// Opens a layer and requires a page size.
    pub fn open_with_page_size(path: impl AsRef<Path>, page_size: u32) -> Result<Self, LayerError> {
        let l = Self::open(path)?;
        if l.header.layout.page_size != page_size {
            return Err(LayerError::PageSizeMismatch {
                layer: l.header.layout.page_size,
                expected: page_size,
            });
        }
        Ok(l)
    }

    /// The validated header.
    pub fn header(&self) -> &LayerHeader {
        &self.header
    }

    /// The runs of present pages.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Summary of this layer.
    pub fn info(&self) -> LayerInfo {
        LayerInfo {
            path: self.path.clone(),
            id: self.header.id,
            parent: self.header.parent,
            kind: self.header.kind,
            layout: self.header.layout.clone(),
            present_pages: self.header.present_pages,
            data_bytes: 0,
        }
    }

    /// Whether memory page `page` is present in this layer.
    pub fn contains(&self, page: u64) -> bool {
        let i = self.runs.partition_point(|r| r.end() <= page);
        self.runs.get(i).is_some_and(|r| r.start <= page)
    }

    /// Reads `buf.len() / page_size` pages starting at memory page `page` from this
    /// file (whatever the index says; absent pages read as holes, i.e. zero).
    pub fn read_pages(&self, page: u64, buf: &mut [u8]) -> Result<(), LayerError> {
        let off = self.header.page_offset(page);
        self.file.read_exact_at(buf, off).map_err(|e| LayerError::io("read pages", &self.path, e))
    }
}
