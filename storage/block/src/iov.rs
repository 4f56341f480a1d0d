//! Scatter-gather I/O over volatile slices.
//!
//! A request's buffers ([`Bufs`]) are a list of [`VolatileSlice`]s seen as one byte range
//! `0..len`. Layer code reads file ranges into parts of it (`preadv`), writes parts of it to
//! files (`pwritev`), zero-fills parts, or copies a part out (only to merge a partial first
//! write with a chunk's old contents). Whatever is written into the slices is marked dirty in
//! their bitmaps: the kernel's `preadv` writes around vm-memory, so this module marks the
//! bytes itself.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// Most iovecs one `preadv`/`pwritev` takes (Linux's `IOV_MAX`).
pub const IOV_MAX: usize = 1024;

static ZEROES: [u8; 4096] = [0; 4096];

/// A volatile slice over `buf`, for the write path, which only reads through it.
///
/// The write path never writes through the returned slice (it only hands its address to
/// `pwritev` and copies out of it), so the shared borrow is respected.
pub fn read_only_slice(buf: &[u8]) -> VolatileSlice<'_, ()> {
    // SAFETY: `buf` is valid for `buf.len()` bytes for the returned lifetime. The slice is
    // used only by write paths, which read from it (pwritev, copy_to); nothing writes
    // through it, so the shared borrow is not violated.
    unsafe { VolatileSlice::new(buf.as_ptr().cast_mut(), buf.len()) }
}

/// A request's buffers, seen as one byte range `0..len()`.
pub struct Bufs<'s, 'a, B: BitmapSlice> {
    bufs: &'s [VolatileSlice<'a, B>],
    len: u64,
}

impl<B: BitmapSlice> Clone for Bufs<'_, '_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: BitmapSlice> Copy for Bufs<'_, '_, B> {}

impl<'s, 'a, B: BitmapSlice> Bufs<'s, 'a, B> {
    /// The buffers, in order.
    pub fn new(bufs: &'s [VolatileSlice<'a, B>]) -> Self {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        Self { bufs, len }
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there is no byte at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The sub-slices covering bytes `lo..hi` of the request.
    fn range(&self, lo: u64, hi: u64) -> io::Result<Vec<VolatileSlice<'a, B>>> {
        let bad = || io::Error::new(io::ErrorKind::InvalidInput, "range outside the buffers");
        if lo > hi || hi > self.len {
            return Err(bad());
        }
        let mut out = Vec::new();
        let mut start = 0u64;
        for b in self.bufs {
            let end = start + b.len() as u64;
            if end > lo && start < hi {
                let from = lo.max(start) - start;
                let to = hi.min(end) - start;
                let from = usize::try_from(from).map_err(|_| bad())?;
                let count = usize::try_from(to).map_err(|_| bad())? - from;
                out.push(b.subslice(from, count).map_err(|_| bad())?);
            }
            if end >= hi {
                break;
            }
            start = end;
        }
        Ok(out)
    }

    /// Reads `hi - lo` bytes of `f` at `off` into bytes `lo..hi`; bytes past the end of
    /// the file read as zeroes.
    pub fn read_from(&self, f: &File, off: u64, lo: u64, hi: u64) -> io::Result<()> {
        let mut parts = self.range(lo, hi)?;
        let r = preadv_all(f, off, &mut parts);
        for p in self.range(lo, hi)? {
            p.bitmap().mark_dirty(0, p.len());
        }
        r
    }

    /// Writes bytes `lo..hi` to `f` at `off`.
    pub fn write_to(&self, f: &File, off: u64, lo: u64, hi: u64) -> io::Result<()> {
        let mut parts = self.range(lo, hi)?;
        pwritev_all(f, off, &mut parts)
    }

    /// Fills bytes `lo..hi` with zeroes.
    pub fn zero(&self, lo: u64, hi: u64) -> io::Result<()> {
        zero_fill(&self.range(lo, hi)?);
        Ok(())
    }

    /// Copies bytes `lo..lo + dst.len()` into `dst`.
    pub fn copy_out(&self, lo: u64, dst: &mut [u8]) -> io::Result<()> {
        let mut at = 0;
        for p in self.range(lo, lo + dst.len() as u64)? {
            at += p.copy_to(&mut dst[at..]);
        }
        Ok(())
    }
}

fn zero_fill<B: BitmapSlice>(parts: &[VolatileSlice<'_, B>]) {
    for p in parts {
        let mut done = 0;
        while done < p.len() {
            let n = (p.len() - done).min(ZEROES.len());
            if let Ok(s) = p.subslice(done, n) {
                s.copy_from(&ZEROES[..n]); // marks the bytes dirty
            }
            done += n;
        }
    }
}

fn iovecs<B: BitmapSlice>(parts: &[VolatileSlice<'_, B>]) -> Vec<libc::iovec> {
    parts
        .iter()
        .take(IOV_MAX)
        .map(|p| libc::iovec { iov_base: p.ptr_guard_mut().as_ptr().cast(), iov_len: p.len() })
        .collect()
}

/// Drops the first `n` bytes of `parts`.
fn advance<B: BitmapSlice>(parts: &mut Vec<VolatileSlice<'_, B>>, mut n: usize) {
    let mut drop = 0;
    for p in parts.iter_mut() {
        if n >= p.len() {
            n -= p.len();
            drop += 1;
            continue;
        }
        if n > 0 {
            if let Ok(rest) = p.offset(n) {
                *p = rest;
            }
        }
        break;
    }
    parts.drain(..drop);
}

fn off_t(off: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(off).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset"))
}

/// Calls `op` (`preadv` or `pwritev` at an offset) until every byte of `parts` is
/// transferred; true when `op` hit the end of the file (returned 0) first.
fn transfer_all<B: BitmapSlice>(
    mut off: u64,
    parts: &mut Vec<VolatileSlice<'_, B>>,
    op: impl Fn(&[libc::iovec], libc::c_int, libc::off_t) -> isize,
) -> io::Result<bool> {
    parts.retain(|p| !p.is_empty());
    while !parts.is_empty() {
        let iov = iovecs(parts);
        let count = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
        let r = op(&iov, count, off_t(off)?);
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Ok(true);
        }
        let n = r.unsigned_abs();
        off += n as u64;
        advance(parts, n);
    }
    Ok(false)
}

/// `preadv` until `parts` are full; the part past the end of the file is zero-filled.
fn preadv_all<B: BitmapSlice>(
    f: &File,
    off: u64,
    parts: &mut Vec<VolatileSlice<'_, B>>,
) -> io::Result<()> {
    let fd = f.as_raw_fd();
    let eof = transfer_all(off, parts, |iov, count, off| {
        // SAFETY: every iovec points into a live volatile slice of `parts` (borrowed for
        // the call) and is valid for writes of its length; the kernel writes at most that
        // many bytes into each. No Rust reference to those bytes exists.
        unsafe { libc::preadv(fd, iov.as_ptr(), count, off) }
    })?;
    if eof {
        zero_fill(parts);
    }
    Ok(())
}

/// `pwritev` until every byte of `parts` is written.
fn pwritev_all<B: BitmapSlice>(
    f: &File,
    off: u64,
    parts: &mut Vec<VolatileSlice<'_, B>>,
) -> io::Result<()> {
    let fd = f.as_raw_fd();
    let short = transfer_all(off, parts, |iov, count, off| {
        // SAFETY: every iovec points into a live volatile slice of `parts` (borrowed for
        // the call) and is valid for reads of its length; pwritev only reads them.
        unsafe { libc::pwritev(fd, iov.as_ptr(), count, off) }
    })?;
    if short {
        return Err(io::Error::from(io::ErrorKind::WriteZero));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    fn file_with(bytes: &[u8]) -> File {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(bytes, 0).unwrap();
        f
    }

    #[test]
    fn reads_and_writes_span_segments_and_zero_past_eof() {
        let src: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let f = file_with(&src);
        let (mut a, mut b, mut c) = (vec![9u8; 100], vec![9u8; 3000], vec![9u8; 8000]);
        let bufs =
            [VolatileSlice::from(&mut a[..]), VolatileSlice::from(&mut b[..]), (&mut c[..]).into()];
        let r = Bufs::new(&bufs);
        assert_eq!(r.len(), 11_100);
        // Bytes 50..11_100 of the request from file offset 7: crosses all three segments and
        // the end of the file (10_000 bytes).
        r.read_from(&f, 7, 50, 11_100).unwrap();
        r.zero(0, 10).unwrap();
        let mut got = Vec::new();
        got.extend_from_slice(&a);
        got.extend_from_slice(&b);
        got.extend_from_slice(&c);
        assert_eq!(&got[..10], &[0; 10]);
        assert_eq!(&got[10..50], &[9; 40]);
        assert_eq!(&got[50..50 + 9_993], &src[7..]);
        assert!(got[50 + 9_993..].iter().all(|&x| x == 0), "past EOF reads zeroes");
        // Write the middle of the request back elsewhere and copy a piece out.
        let out = tempfile::tempfile().unwrap();
        let bufs =
            [VolatileSlice::from(&mut a[..]), VolatileSlice::from(&mut b[..]), (&mut c[..]).into()];
        let r = Bufs::new(&bufs);
        r.write_to(&out, 4096, 90, 3_200).unwrap();
        let mut back = vec![0u8; 3_110];
        out.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(back, got[90..3_200]);
        let mut piece = vec![0u8; 200];
        r.copy_out(3_000, &mut piece).unwrap();
        assert_eq!(piece, got[3_000..3_200]);
        assert!(r.read_from(&f, 0, 10, 11_101).is_err(), "past the buffers");
    }

    #[test]
    fn many_segments_go_in_several_calls() {
        let src: Vec<u8> = (0..(IOV_MAX as u32 * 2 + 5) * 8).map(|i| (i % 253) as u8).collect();
        let f = file_with(&src);
        let mut bufs: Vec<Vec<u8>> = (0..IOV_MAX * 2 + 5).map(|_| vec![0u8; 8]).collect();
        let slices: Vec<VolatileSlice<'_, ()>> =
            bufs.iter_mut().map(|b| VolatileSlice::from(&mut b[..])).collect();
        let r = Bufs::new(&slices);
        r.read_from(&f, 0, 0, r.len()).unwrap();
        let out = tempfile::tempfile().unwrap();
        r.write_to(&out, 0, 0, r.len()).unwrap();
        drop(slices);
        assert_eq!(bufs.concat(), src);
        let mut back = vec![0u8; src.len()];
        out.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, src);
    }

    #[test]
    fn reads_mark_the_pages_they_fill_dirty() {
        use vm_memory::bitmap::{AtomicBitmap, Bitmap};
        use vm_memory::{
            Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
        };
        let mem: GuestMemoryMmap<AtomicBitmap> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * 4096)]).unwrap();
        let f = file_with(&[7u8; 8192]);
        let s1 = mem.get_slice(GuestAddress(4096 + 100), 200).unwrap();
        let s2 = mem.get_slice(GuestAddress(3 * 4096), 4096).unwrap();
        let bufs = [s1, s2];
        Bufs::new(&bufs).read_from(&f, 0, 0, 4296).unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let dirty = |page: usize| region.bitmap().dirty_at(page * 4096);
        assert!(dirty(1) && dirty(3));
        assert!(!dirty(0) && !dirty(2) && !dirty(4));
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, GuestAddress(3 * 4096 + 4092)).unwrap();
        assert_eq!(b, [7; 4]);
    }
}
