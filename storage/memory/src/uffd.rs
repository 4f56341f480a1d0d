//! `uffd` restore mode: anonymous guest memory registered with userfaultfd
//! (missing-page mode) and a page-server thread that fills each page on first touch
//! from the layer chain: `UFFDIO_COPY` for pages some layer has, `UFFDIO_ZEROPAGE`
//! for the rest. Faults are served in clusters (up to [`UffdOptions::cluster_pages`]
//! pages of the same segment), the order of first touches is recorded, and a
//! recorded [`WorkingSet`] can be prefetched before the vCPUs run or in the
//! background while they run (faults always go first).
//!
//! Failure: if a page cannot be served (a read error, a truncated layer, a bad
//! fault address, a panic), the server stores the error, marks every region
//! `PROT_NONE`, wakes all waiting faults and signals [`UffdMemory::failure_fd`].
//! The woken accesses then fail: `KVM_RUN` returns `EFAULT` to the vCPU thread, a
//! kernel copy (e.g. `write(2)` from guest memory) returns `EFAULT`, a plain load
//! or store raises `SIGSEGV`. Nothing waits forever for a page that will not come.
//! (Closing the uffd instead would not do: the kernel then fills missing pages
//! with zeros, silently.)

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::chain::Chain;
use super::sys::{self, Mapping, RestoredRegion, Uffd, UFFD_NEEDED_IOCTLS};
use super::working_set::WorkingSet;
use super::LayerError;

/// Errors of the `uffd` restore mode and its page server.
#[derive(Debug, thiserror::Error)]
pub enum PageServerError {
    /// Reading the chain failed (or it does not fit this host).
    #[error("layer chain")]
    Layer(#[source] LayerError),
    /// A userfaultfd operation failed.
    #[error("userfaultfd {op} failed")]
    Uffd {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel does not offer the ioctls the page server needs on guest memory.
    #[error(
        "userfaultfd register: the kernel offers ioctls {0:#x}, copy, zeropage and wake needed"
    )]
    MissingIoctls(u64),
    /// A system call failed.
    #[error("{op} failed")]
    Sys {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A fault outside the registered guest memory.
    #[error("fault at {0:#x} outside guest memory")]
    OutOfRange(usize),
    /// A region does not fit in the address space.
    #[error("region of {0} bytes does not fit the address space")]
    TooLarge(u64),
    /// The page-server thread panicked.
    #[error("page server thread panicked")]
    Panicked,
    /// The page server was stopped; pages not served by then are inaccessible.
    #[error("page server stopped")]
    Stopped,
}

/// When to prefetch a recorded working set.
#[derive(Debug, Clone, Default)]
pub enum Prefetch {
    /// Serve faults only.
    #[default]
    None,
    /// Populate the working set in [`UffdMemory::start`], before it returns (so
    /// before the vCPUs run).
    BeforeStart(WorkingSet),
    /// Populate the working set from the page-server thread while the vCPUs run;
    /// faults are served first.
    Background(WorkingSet),
}

/// Options of the `uffd` restore mode.
#[derive(Debug, Clone)]
pub struct UffdOptions {
    /// Prefetch a recorded working set.
    pub prefetch: Prefetch,
    /// Most pages served per fault (same segment, not yet present). Default 16.
    pub cluster_pages: usize,
    /// Called first thing on the page-server thread (grove-vmm installs its seccomp filter
    /// there). Default none.
    pub thread_start: Option<fn()>,
}

impl Default for UffdOptions {
    fn default() -> Self {
        Self { prefetch: Prefetch::None, cluster_pages: 16, thread_start: None }
    }
}

/// Counters of a page server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageServerStats {
    /// Page faults served.
    pub faults: u64,
    /// Pages filled with UFFDIO_COPY (data from a layer).
    pub pages_copied: u64,
    /// Pages filled with UFFDIO_ZEROPAGE (no layer has them).
    pub pages_zeroed: u64,
    /// Pages filled by prefetching.
    pub pages_prefetched: u64,
}

#[derive(Debug, Default)]
struct State {
    failure: Option<Arc<PageServerError>>,
    stats: PageServerStats,
    prefetched: Vec<u64>,
    touched: Vec<u64>,
}

#[derive(Debug)]
struct Shared {
    chain: Arc<Chain>,
    uffd: Uffd,
    maps: Vec<Mapping>,
    regions: Vec<RestoredRegion>,
    first_pages: Vec<u64>,
    failed_fd: OwnedFd,
    stop_fd: OwnedFd,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records `err` and makes every waiting or future access fail.
    fn fail(&self, err: PageServerError) {
        {
            let mut st = self.state();
            if st.failure.is_some() {
                return;
            }
            st.failure = Some(Arc::new(err));
        }
        for m in &self.maps {
            // Protect first, then wake: a woken access retries and finds PROT_NONE.
            let _ = m.protect_none();
            let _ = self.uffd.wake(m.addr(), m.len());
        }
        sys::eventfd_signal(&self.failed_fd);
    }
}

/// Guest memory restored in `uffd` mode, with its page-server thread. Dropping it
/// stops the thread and unmaps the memory: drop it only after every user (vCPU,
/// device) of the memory is gone.
#[derive(Debug)]
pub struct UffdMemory {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The page server proper: owned by its thread (or by `start` while prefetching).
struct Server {
    sh: Arc<Shared>,
    ps: usize,
    cluster: usize,
    populated: Vec<u64>,
    buf: Vec<u8>,
    prefetch: Vec<u64>,
    prefetch_pos: usize,
    /// Background prefetch: position of each working-set page in `prefetch`, so a
    /// fault inside the working set moves prefetching ahead of the guest.
    ws_index: HashMap<u64, usize>,
}

fn uffd_err(op: &'static str) -> impl Fn(std::io::Error) -> PageServerError {
    move |source| PageServerError::Uffd { op, source }
}

fn errno_of(e: &std::io::Error) -> Option<i32> {
    e.raw_os_error()
}

impl Server {
    fn is_populated(&self, page: u64) -> bool {
        let p = usize::try_from(page).unwrap_or(usize::MAX);
        self.populated.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0)
    }

    fn set_populated(&mut self, page: u64, n: u64) {
        for p in page..page + n {
            let p = usize::try_from(p).unwrap_or(usize::MAX);
            if let Some(w) = self.populated.get_mut(p / 64) {
                *w |= 1 << (p % 64);
            }
        }
    }

    /// Region index and host address of memory page `page`.
    fn locate_page(&self, page: u64) -> (usize, usize) {
        let ri = self.sh.first_pages.partition_point(|&f| f <= page) - 1;
        let off = usize::try_from(page - self.sh.first_pages[ri]).unwrap_or(usize::MAX);
        (ri, self.sh.regions[ri].host_addr + off * self.ps)
    }

    /// Memory page of a host address.
    fn page_of(&self, addr: usize) -> Option<u64> {
        let ri = self
            .sh
            .regions
            .iter()
            .position(|r| addr >= r.host_addr && addr - r.host_addr < r.len)?;
        let r = &self.sh.regions[ri];
        Some(self.sh.first_pages[ri] + ((addr - r.host_addr) / self.ps) as u64)
    }

    /// The largest run from `page` (at most `max` pages) that stays in one region,
    /// one owner class (data of one segment, or a gap) and not yet populated.
    fn cluster_at(&self, page: u64, max: usize) -> (u64, bool) {
        let (ri, _) = self.locate_page(page);
        let r = &self.sh.regions[ri];
        let region_end = self.sh.first_pages[ri] + (r.len / self.ps) as u64;
        let mut end = region_end.min(page + max as u64);
        let segs = self.sh.chain.segments();
        let i = segs.partition_point(|s| s.end() <= page);
        let data = match segs.get(i) {
            Some(s) if s.start <= page => {
                end = end.min(s.end());
                true
            }
            Some(s) => {
                end = end.min(s.start);
                false
            }
            None => false,
        };
        let mut n = 1;
        while page + n < end && !self.is_populated(page + n) {
            n += 1;
        }
        (n, data)
    }

    /// Fills `n` pages from `page` (not populated yet) and wakes their waiters.
    fn populate(&mut self, page: u64, n: u64, data: bool) -> Result<(), PageServerError> {
        let (_, dst) = self.locate_page(page);
        let len = usize::try_from(n).unwrap_or(usize::MAX) * self.ps;
        // Count before the ioctl wakes the faulting thread, so that what it observes
        // afterwards includes this fill.
        {
            let mut st = self.sh.state();
            if data {
                st.stats.pages_copied += n;
            } else {
                st.stats.pages_zeroed += n;
            }
        }
        if data {
            if self.buf.len() < len {
                self.buf.resize(len, 0);
            }
            let mut buf = std::mem::take(&mut self.buf);
            let res =
                self.sh.chain.read_pages(page, &mut buf[..len]).map_err(PageServerError::Layer);
            let res = res.and_then(|()| self.copy(&buf[..len], dst));
            self.buf = buf;
            res?;
        } else {
            self.zero(dst, len)?;
        }
        self.set_populated(page, n);
        Ok(())
    }

    fn copy(&self, src: &[u8], dst: usize) -> Result<(), PageServerError> {
        let mut done = 0usize;
        let mut retries = 0;
        while done < src.len() {
            let rest = src.len() - done;
            // SAFETY: `src[done..]` is a live buffer of `rest` bytes; `dst + done ..
            // + rest` lies inside a registered guest region (computed from the
            // region table); UFFDIO_COPY only fills missing pages there atomically.
            let r = unsafe { self.sh.uffd.copy(src[done..].as_ptr(), dst + done, rest) };
            match r {
                Ok(c) if c > 0 && c <= rest => done += c,
                Err(ref e) if errno_of(e) == Some(libc::EEXIST) => {
                    // Some page is already there (a racing fill): go page by page.
                    for off in (done..src.len()).step_by(self.ps) {
                        // SAFETY: as above, one page.
                        let r =
                            unsafe { self.sh.uffd.copy(src[off..].as_ptr(), dst + off, self.ps) };
                        match r {
                            Ok(_) => {}
                            Err(ref e) if errno_of(e) == Some(libc::EEXIST) => {
                                self.wake(dst + off, self.ps)?;
                            }
                            Err(e) => return Err(uffd_err("copy")(e)),
                        }
                    }
                    return Ok(());
                }
                Ok(_) => {
                    retries += 1;
                    if retries > 10_000 {
                        return Err(PageServerError::Sys {
                            op: "copy (no progress)",
                            source: std::io::Error::from_raw_os_error(libc::EAGAIN),
                        });
                    }
                }
                Err(e) => return Err(uffd_err("copy")(e)),
            }
        }
        Ok(())
    }

    fn zero(&self, dst: usize, len: usize) -> Result<(), PageServerError> {
        // SAFETY: `dst .. dst + len` lies inside a registered guest region;
        // UFFDIO_ZEROPAGE only maps the zero page where pages are missing.
        let r = unsafe { self.sh.uffd.zeropage(dst, len) };
        match r {
            Ok(_) => Ok(()),
            Err(ref e)
                if errno_of(e) == Some(libc::EEXIST) || errno_of(e) == Some(libc::EAGAIN) =>
            {
                // Partly present already: page by page, waking what exists.
                for off in (0..len).step_by(self.ps) {
                    // SAFETY: as above, one page.
                    let r = unsafe { self.sh.uffd.zeropage(dst + off, self.ps) };
                    match r {
                        Ok(_) => {}
                        Err(ref e) if errno_of(e) == Some(libc::EEXIST) => {
                            self.wake(dst + off, self.ps)?;
                        }
                        Err(e) => return Err(uffd_err("zeropage")(e)),
                    }
                }
                Ok(())
            }
            Err(e) => Err(uffd_err("zeropage")(e)),
        }
    }

    fn wake(&self, addr: usize, len: usize) -> Result<(), PageServerError> {
        self.sh.uffd.wake(addr, len).map_err(uffd_err("wake"))
    }

    fn serve_fault(&mut self, addr: usize) -> Result<(), PageServerError> {
        let page = self.page_of(addr).ok_or(PageServerError::OutOfRange(addr))?;
        self.sh.state().stats.faults += 1;
        if self.is_populated(page) {
            // Served already (a duplicate fault of a racing thread), or dropped by
            // madvise(MADV_DONTNEED), after which private memory reads zero.
            let (_, host) = self.locate_page(page);
            return self.zero(host, self.ps);
        }
        let (n, data) = self.cluster_at(page, self.cluster);
        self.sh.state().touched.extend(page..page + n);
        self.populate(page, n, data)?;
        self.follow(page);
        Ok(())
    }

    /// The guest faulted on working-set page `page`: continue prefetching after it,
    /// so prefetching runs ahead of the guest instead of racing it over the same
    /// pages; the entries jumped over are moved to the end of the list.
    fn follow(&mut self, page: u64) {
        let Some(&k) = self.ws_index.get(&page) else {
            return;
        };
        if k < self.prefetch_pos || k >= self.prefetch.len() {
            return;
        }
        let skipped: Vec<u64> = self.prefetch[self.prefetch_pos..k].to_vec();
        self.prefetch_pos = k + 1;
        self.prefetch.extend(skipped);
    }

    /// Prefetches the next batch of the working set; false when done.
    fn prefetch_step(&mut self) -> Result<bool, PageServerError> {
        while self.prefetch_pos < self.prefetch.len() {
            let page = self.prefetch[self.prefetch_pos];
            self.prefetch_pos += 1;
            if self.is_populated(page) {
                continue;
            }
            // Extend over following working-set entries that continue the run.
            let (max, data) = self.cluster_at(page, 64);
            let mut n = 1;
            while n < max && self.prefetch.get(self.prefetch_pos).is_some_and(|&p| p == page + n) {
                n += 1;
                self.prefetch_pos += 1;
            }
            {
                let mut st = self.sh.state();
                st.stats.pages_prefetched += n;
                st.prefetched.extend(page..page + n);
            }
            self.populate(page, n, data)?;
            return Ok(true);
        }
        Ok(false)
    }

    fn run(&mut self) -> Result<(), PageServerError> {
        let fds: [RawFd; 2] = [self.sh.uffd.as_raw_fd(), self.sh.stop_fd.as_raw_fd()];
        let mut addrs = Vec::new();
        loop {
            let pending = self.prefetch_pos < self.prefetch.len();
            let ready = sys::poll_readable(&fds, if pending { 0 } else { -1 })
                .map_err(|source| PageServerError::Sys { op: "poll", source })?;
            if ready[1] {
                return Ok(());
            }
            if ready[0] {
                addrs.clear();
                self.sh.uffd.read_faults(&mut addrs).map_err(uffd_err("read"))?;
                for &a in &addrs {
                    self.serve_fault(a)?;
                }
            } else if pending {
                self.prefetch_step()?;
            }
        }
    }
}

/// Fails the memory if the server thread unwinds.
struct PanicGuard(Arc<Shared>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail(PageServerError::Panicked);
        }
    }
}

impl UffdMemory {
    /// Maps anonymous memory for every region of `chain`, registers it with a new
    /// userfaultfd, prefetches per `opts` and starts the page-server thread.
    pub fn start(chain: Arc<Chain>, opts: &UffdOptions) -> Result<Self, PageServerError> {
        let page_size = super::host_page_size();
        chain.check_page_size(page_size).map_err(PageServerError::Layer)?;
        let layout = chain.layout().clone();
        let head = chain.head().id;
        let ws = match &opts.prefetch {
            Prefetch::None => None,
            Prefetch::BeforeStart(w) | Prefetch::Background(w) => {
                w.check(head, page_size, layout.mem_pages()).map_err(PageServerError::Layer)?;
                Some(w.pages.clone())
            }
        };
        // Not user-mode only: KVM touches guest memory from the kernel (get_user_pages).
        let uffd = Uffd::new().map_err(uffd_err("create"))?;
        let mut maps = Vec::new();
        let mut regions = Vec::new();
        for r in &layout.regions {
            let len = usize::try_from(r.len).map_err(|_| PageServerError::TooLarge(r.len))?;
            let m = Mapping::anonymous(len)
                .map_err(|source| PageServerError::Sys { op: "reserve guest memory", source })?;
            let ioctls = uffd.register(m.addr(), len).map_err(uffd_err("register"))?;
            if ioctls & UFFD_NEEDED_IOCTLS != UFFD_NEEDED_IOCTLS {
                return Err(PageServerError::MissingIoctls(ioctls));
            }
            regions.push(RestoredRegion { gpa: r.gpa, host_addr: m.addr(), len });
            maps.push(m);
        }
        let shared = Arc::new(Shared {
            first_pages: layout.region_first_pages(),
            chain,
            uffd,
            maps,
            regions,
            failed_fd: sys::eventfd()
                .map_err(|source| PageServerError::Sys { op: "eventfd", source })?,
            stop_fd: sys::eventfd()
                .map_err(|source| PageServerError::Sys { op: "eventfd", source })?,
            state: Mutex::new(State::default()),
        });
        let mem_pages = usize::try_from(layout.mem_pages())
            .map_err(|_| PageServerError::TooLarge(layout.mem_size()))?;
        let mut server = Server {
            sh: shared.clone(),
            ps: page_size as usize,
            cluster: opts.cluster_pages.clamp(1, 512),
            populated: vec![0; mem_pages.div_ceil(64)],
            buf: Vec::new(),
            ws_index: match (&opts.prefetch, &ws) {
                (Prefetch::Background(_), Some(pages)) => {
                    pages.iter().enumerate().map(|(i, &p)| (p, i)).collect()
                }
                _ => HashMap::new(),
            },
            prefetch: ws.unwrap_or_default(),
            prefetch_pos: 0,
        };
        if matches!(opts.prefetch, Prefetch::BeforeStart(_)) {
            while server.prefetch_step()? {}
        }
        let guard = PanicGuard(shared.clone());
        let thread_start = opts.thread_start;
        let thread = std::thread::Builder::new()
            .name("grove-pagesrv".into())
            .spawn(move || {
                let _guard = guard;
                if let Some(f) = thread_start {
                    f();
                }
                if let Err(e) = server.run() {
                    server.sh.fail(e);
                }
            })
            .map_err(|source| PageServerError::Sys { op: "spawn page server", source })?;
        Ok(Self { shared, thread: Some(thread) })
    }

    /// The restored regions, in guest-physical order.
    pub fn regions(&self) -> &[RestoredRegion] {
        &self.shared.regions
    }

    /// The page server's error, once it failed.
    pub fn failure(&self) -> Option<Arc<PageServerError>> {
        self.shared.state().failure.clone()
    }

    /// An eventfd that becomes readable when the page server fails (for the VMM's
    /// event loop).
    pub fn failure_fd(&self) -> RawFd {
        self.shared.failed_fd.as_raw_fd()
    }

    /// Counters so far.
    pub fn stats(&self) -> PageServerStats {
        self.shared.state().stats
    }

    /// The working set so far: prefetched pages (in prefetch order), then pages
    /// served on faults in first-touch order (at cluster granularity).
    pub fn working_set(&self) -> WorkingSet {
        let st = self.shared.state();
        let mut seen = HashSet::with_capacity(st.prefetched.len() + st.touched.len());
        let pages = st
            .prefetched
            .iter()
            .chain(st.touched.iter())
            .copied()
            .filter(|p| seen.insert(*p))
            .collect();
        WorkingSet {
            head: self.shared.chain.head().id,
            page_size: self.shared.chain.layout().page_size,
            pages,
        }
    }

    /// Saves [`Self::working_set`] to `path` (see [`WorkingSet::default_path`]).
    pub fn save_working_set(&self, path: impl AsRef<std::path::Path>) -> Result<(), LayerError> {
        self.working_set().save(path)
    }

    /// Stops the page server (pages not yet served then fail as after a failure)
    /// and returns its counters. The memory stays mapped until `self` is dropped.
    pub fn stop_server(&mut self) -> PageServerStats {
        if let Some(t) = self.thread.take() {
            sys::eventfd_signal(&self.shared.stop_fd);
            let _ = t.join();
            // Nothing serves faults any more: make unserved pages fail, not hang.
            self.shared.fail(PageServerError::Stopped);
        }
        self.stats()
    }

    /// Test hook: makes the page server fail as if a page could not be served.
    #[doc(hidden)]
    pub fn inject_failure(&self) {
        self.shared.fail(PageServerError::Sys {
            op: "injected failure",
            source: std::io::Error::from_raw_os_error(libc::EIO),
        });
    }
}

impl Drop for UffdMemory {
    fn drop(&mut self) {
        self.stop_server();
    }
}
