//! Chains of layers (base ← diff ← diff …): validation, page ownership, merging.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::os::unix::fs::FileExt;

use super::format::{self, LayerHeader, LayerKind, Run};
use super::layer::{Layer, LayerInfo};
use super::writer::{is_zero, NewLayer, WriteOptions};
use super::{LayerError, LayerId, MemoryLayout};

/// File extension of layer files in a snapshot directory ([`Chain::open_dir`]).
pub const LAYER_EXT: &str = "mlayer";

/// Bytes read per step when merging.
const MERGE_CHUNK: usize = 1 << 20;

/// Deepest chain accepted.
pub const MAX_DEPTH: usize = 4096;

/// A run of memory pages owned by one layer of a chain (the latest layer that has them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First memory page.
    pub start: u64,
    /// Number of pages.
    pub count: u64,
    /// Index of the owning layer in the chain (0 = base).
    pub layer: usize,
}

impl Segment {
    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.start + self.count
    }
}

/// A validated chain of layers and the resolved owner of every present page.
#[derive(Debug)]
pub struct Chain {
    layers: Vec<Layer>,
    segments: Vec<Segment>,
}

fn push_merge(out: &mut Vec<Segment>, s: Segment) {
    if s.count == 0 {
        return;
    }
    match out.last_mut() {
        Some(l) if l.layer == s.layer && l.end() == s.start => l.count += s.count,
        _ => out.push(s),
    }
}

/// Paints `top` (sorted, non-overlapping runs of layer `layer`) over `base`
/// (sorted, non-overlapping segments): the result has `top` wherever it is present.
pub(crate) fn overlay(base: &[Segment], top: &[Run], layer: usize) -> Vec<Segment> {
    let mut out = Vec::with_capacity(base.len() + top.len());
    let mut it = base.iter().copied();
    let mut cur = it.next();
    for r in top {
        // Base pieces entirely before the run.
        while let Some(c) = cur {
            if c.end() <= r.start {
                push_merge(&mut out, c);
                cur = it.next();
            } else {
                break;
            }
        }
        // The part of the current piece before the run.
        if let Some(c) = cur.as_mut() {
            if c.start < r.start {
                push_merge(
                    &mut out,
                    Segment { start: c.start, count: r.start - c.start, layer: c.layer },
                );
                c.count -= r.start - c.start;
                c.start = r.start;
            }
        }
        push_merge(&mut out, Segment { start: r.start, count: r.count, layer });
        // Skip what the run covers.
        while let Some(c) = cur.as_mut() {
            if c.end() <= r.end() {
                cur = it.next();
            } else {
                if c.start < r.end() {
                    c.count -= r.end() - c.start;
                    c.start = r.end();
                }
                break;
            }
        }
    }
    if let Some(c) = cur {
        push_merge(&mut out, c);
    }
    for c in it {
        push_merge(&mut out, c);
    }
    out
}

impl Chain {
    /// Opens the layer files `paths`, base first.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self, LayerError> {
        let layers = paths.iter().map(Layer::open).collect::<Result<Vec<_>, _>>()?;
        Self::from_layers(layers)
    }

    /// Opens every `*.mlayer` file in `dir` and orders them by their parent links.
    /// The files must form exactly one linear chain.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self, LayerError> {
        let dir = dir.as_ref();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| LayerError::io("read directory", dir, e))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == LAYER_EXT))
            .collect();
        paths.sort();
        let layers = paths.iter().map(Layer::open).collect::<Result<Vec<_>, _>>()?;
        let n = layers.len();
        let mut base = None;
        let mut child_of: HashMap<LayerId, usize> = HashMap::new();
        for (i, l) in layers.iter().enumerate() {
            match l.header.parent {
                None if base.is_none() => base = Some(i),
                None => return Err(LayerError::BadChain("more than one base layer".into())),
                Some(p) => {
                    if child_of.insert(p, i).is_some() {
                        return Err(LayerError::BadChain(format!(
                            "more than one layer on top of {p}"
                        )));
                    }
                }
            }
        }
        let mut order = Vec::with_capacity(n);
        let mut next = base.ok_or_else(|| LayerError::BadChain("no base layer".into()))?;
        loop {
            order.push(next);
            match child_of.get(&layers[next].header.id) {
                Some(&c) if order.len() < n => next = c,
                _ => break,
            }
        }
        if order.len() != n {
            return Err(LayerError::BadChain(format!(
                "{} of {n} layers are not linked to the base",
                n - order.len()
            )));
        }
        let mut slots: Vec<Option<Layer>> = layers.into_iter().map(Some).collect();
        Self::from_layers(order.into_iter().filter_map(|i| slots[i].take()).collect())
    }

    /// Validates `layers` (base first) as a chain.
    pub fn from_layers(layers: Vec<Layer>) -> Result<Self, LayerError> {
        let Some(base) = layers.first() else {
            return Err(LayerError::BadChain("no layers".into()));
        };
        if layers.len() > MAX_DEPTH {
            return Err(LayerError::BadChain(format!("deeper than {MAX_DEPTH} layers")));
        }
        if base.header.kind != LayerKind::Full {
            return Err(LayerError::BadChain("the first layer is not a full layer".into()));
        }
        let layout = &base.header.layout;
        for i in 1..layers.len() {
            let (below, l) = (&layers[i - 1].header, &layers[i].header);
            if l.layout.page_size != layout.page_size {
                return Err(LayerError::PageSizeMismatch {
                    layer: l.layout.page_size,
                    expected: layout.page_size,
                });
            }
            if l.parent != Some(below.id) {
                return Err(LayerError::ParentMismatch {
                    index: i,
                    expected: l.parent.map_or_else(|| "none".into(), |p| p.to_string()),
                    found: below.id.to_string(),
                });
            }
            if l.layout != *layout {
                return Err(LayerError::LayoutMismatch { index: i });
            }
        }
        let mut segments: Vec<Segment> = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            segments = overlay(&segments, &l.runs, i);
        }
        Ok(Self { layers, segments })
    }

    /// Requires the chain's page size to be `page_size`.
    pub fn check_page_size(&self, page_size: u32) -> Result<(), LayerError> {
        let have = self.layout().page_size;
        if have != page_size {
            return Err(LayerError::PageSizeMismatch { layer: have, expected: page_size });
        }
        Ok(())
    }

    /// The layers, base first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The guest memory layout (identical in every layer).
    pub fn layout(&self) -> &MemoryLayout {
        &self.layers[0].header.layout
    }

    /// The topmost layer's id: the id a next diff layer names as its parent.
    pub fn head(&self) -> LayerInfo {
        self.layers[self.layers.len() - 1].info()
    }

    /// Present pages and their owners, sorted; gaps read as zero.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The layer that owns memory page `page`, if any.
    pub fn owner_of(&self, page: u64) -> Option<usize> {
        let i = self.segments.partition_point(|s| s.end() <= page);
        self.segments.get(i).filter(|s| s.start <= page).map(|s| s.layer)
    }

    /// Reads the resolved content of memory pages `page ..` into `buf` (a whole
    /// number of pages): each page from its owner, zero where no layer has it.
    pub fn read_pages(&self, page: u64, buf: &mut [u8]) -> Result<(), LayerError> {
        let ps = self.layout().page_size as usize;
        let n = (buf.len() / ps) as u64;
        let end = page + n;
        let mut i = self.segments.partition_point(|s| s.end() <= page);
        let mut p = page;
        while p < end {
            let at = usize::try_from(p - page).unwrap_or(usize::MAX) * ps;
            match self.segments.get(i) {
                Some(s) if s.start <= p => {
                    let upto = s.end().min(end);
                    let len = usize::try_from(upto - p).unwrap_or(usize::MAX) * ps;
                    self.layers[s.layer].read_pages(p, &mut buf[at..at + len])?;
                    p = upto;
                    i += 1;
                }
                next => {
                    let upto = next.map_or(end, |s| s.start.min(end));
                    let len = usize::try_from(upto - p).unwrap_or(usize::MAX) * ps;
                    buf[at..at + len].fill(0);
                    p = upto;
                }
            }
        }
        Ok(())
    }

    /// Merges layers `from ..` into one layer at `path`: a full layer when `from`
    /// is 0 (flatten), otherwise a diff layer on top of layer `from - 1`.
    /// The result restores to the same memory as this chain. Streams the pages from
    /// their owners in 1 MiB chunks (zero pages stay holes); a flattened layer may
    /// list pages that are zero (as holes), which reads the same.
    pub fn merge(
        &self,
        from: usize,
        path: impl AsRef<Path>,
        opts: &WriteOptions,
    ) -> Result<LayerInfo, LayerError> {
        let path = path.as_ref();
        if from >= self.layers.len() {
            return Err(LayerError::Input(format!(
                "merge from layer {from} of a {}-layer chain",
                self.layers.len()
            )));
        }
        let layout = self.layout().clone();
        let ps = layout.page_size as usize;
        let pieces: Vec<Segment> =
            self.segments.iter().filter(|s| s.layer >= from).copied().collect();
        let mut runs: Vec<Run> = Vec::new();
        for s in &pieces {
            match runs.last_mut() {
                Some(r) if r.end() == s.start => r.count += s.count,
                _ => runs.push(Run { start: s.start, count: s.count }),
            }
        }
        let (kind, parent) = match from {
            0 => (LayerKind::Full, None),
            _ => (LayerKind::Diff, Some(self.layers[from - 1].header.id)),
        };
        let id = opts.id.unwrap_or_else(LayerId::random);
        let index = format::encode_index(&runs);
        let header = LayerHeader::new(kind, id, parent, layout, &runs, &index)?;
        let out = NewLayer::create(path, header.file_len)?;
        let chunk_pages = (MERGE_CHUNK / ps).max(1);
        let mut buf = vec![0u8; chunk_pages * ps];
        let mut data_bytes = 0u64;
        for s in &pieces {
            let mut p = s.start;
            while p < s.end() {
                let n = usize::try_from((s.end() - p).min(chunk_pages as u64)).unwrap_or(1);
                self.layers[s.layer].read_pages(p, &mut buf[..n * ps])?;
                let mut i = 0;
                while i < n {
                    if is_zero(&buf[i * ps..(i + 1) * ps]) {
                        i += 1;
                        continue;
                    }
                    let mut j = i + 1;
                    while j < n && !is_zero(&buf[j * ps..(j + 1) * ps]) {
                        j += 1;
                    }
                    out.file
                        .write_all_at(&buf[i * ps..j * ps], header.page_offset(p + i as u64))
                        .map_err(|e| LayerError::io("write pages", &out.tmp, e))?;
                    data_bytes += ((j - i) * ps) as u64;
                    i = j;
                }
                p += n as u64;
            }
        }
        out.finish(path, &header, &index, opts.fsync)?;
        Ok(LayerInfo {
            path: path.to_path_buf(),
            id,
            parent,
            kind,
            layout: header.layout,
            present_pages: header.present_pages,
            data_bytes,
        })
    }

    /// Merges the whole chain into one full layer at `path`.
    pub fn flatten(
        &self,
        path: impl AsRef<Path>,
        opts: &WriteOptions,
    ) -> Result<LayerInfo, LayerError> {
        self.merge(0, path, opts)
    }
}
