//! The virtio-rng device: request parsing ([`parse_request`]) and serving.

use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::metrics::RngMetrics;
use super::{MAX_REQUEST_BYTES, QUEUE_SIZE};
use crate::devices::virtio::queues::Queues;
use crate::devices::virtio::{
    device_type, ActivateError, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::{GuestMemory, GuestRam};

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The chain has no buffer (or its first descriptor is unreadable).
    #[error("empty descriptor chain")]
    Empty,
    /// A buffer the device may only read: the guest must give writable buffers.
    #[error("descriptor {0} is device-readable")]
    ReadOnly(usize),
    /// A buffer outside guest memory.
    #[error("descriptor {index}: {addr:#x}+{len} is not guest memory")]
    OutOfRange {
        /// Position in the chain.
        index: usize,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The chain does not end: it loops, runs past the queue size, or names a descriptor
    /// outside the table.
    #[error("descriptor chain does not end (loop, too long, or bad next index)")]
    Unterminated,
    /// The host's entropy source failed.
    #[error("getrandom failed")]
    Entropy(#[source] std::io::Error),
}

/// The guest buffers of one request, checked: (address, bytes to write) each.
pub type Buffers = Vec<(GuestAddress, u32)>;

/// Checks a request's chain and returns the buffers to fill, at most [`MAX_REQUEST_BYTES`] in
/// all (later buffers, or the end of one, are left unwritten). The whole chain is checked
/// before anything is written.
pub fn parse_request<M>(mem: &GuestMemory, chain: DescriptorChain<M>) -> Result<Buffers, RngError>
where
    M: std::ops::Deref<Target = GuestMemory>,
{
    let mut out = Vec::new();
    let mut room = MAX_REQUEST_BYTES;
    let mut last_has_next = false;
    let mut count = 0usize;
    for (index, d) in chain.enumerate() {
        count = index + 1;
        last_has_next = d.has_next();
        if !d.is_write_only() {
            return Err(RngError::ReadOnly(index));
        }
        let len = d.len();
        let end = d.addr().0.checked_add(u64::from(len));
        if end.is_none() || !GuestMemoryBackend::check_range(mem, d.addr(), len as usize) {
            return Err(RngError::OutOfRange { index, addr: d.addr().0, len });
        }
        let take = len.min(room);
        if take > 0 {
            out.push((d.addr(), take));
            room -= take;
        }
    }
    if count == 0 {
        return Err(RngError::Empty);
    }
    // virtio-queue's iterator stops silently at a loop (after the queue size), a next index
    // outside the table, or an unreadable descriptor: the last one still says "next".
    if last_has_next {
        return Err(RngError::Unterminated);
    }
    Ok(out)
}

/// Fills `buf` from the host's getrandom(2).
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most `buf.len() - done` bytes into the live buffer `buf[done..]`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        done += usize::try_from(n).unwrap_or(0);
    }
    Ok(())
}

/// The virtio-rng device.
pub struct Rng {
    mem: Arc<GuestRam>,
    pub(super) acked_features: u64,
    pub(super) q: Queues,
    pub(super) metrics: Arc<RngMetrics>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng").field("activated", &self.is_activated()).finish_non_exhaustive()
    }
}

impl Rng {
    /// A device over `mem`, not activated.
    pub fn new(mem: Arc<GuestRam>) -> std::io::Result<Self> {
        Ok(Self {
            mem,
            acked_features: 0,
            q: Queues::new(&[QUEUE_SIZE])?,
            metrics: Arc::default(),
            buf: Vec::new(),
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<RngMetrics> {
        self.metrics.clone()
    }

    /// Guest memory.
    pub fn mem(&self) -> &Arc<GuestRam> {
        &self.mem
    }

    /// Serves one checked request; returns the bytes written.
    fn serve(&mut self, bufs: &Buffers) -> Result<u32, RngError> {
        let total: u32 = bufs.iter().map(|&(_, n)| n).sum();
        self.buf.resize(total as usize, 0);
        getrandom(&mut self.buf).map_err(RngError::Entropy)?;
        let mut at = 0usize;
        for &(addr, n) in bufs {
            let n = n as usize;
            // Checked by parse_request; the write marks the pages dirty for the next diff.
            self.mem
                .mem()
                .write_slice(&self.buf[at..at + n], addr)
                .map_err(|_| RngError::OutOfRange { index: 0, addr: addr.0, len: n as u32 })?;
            at += n;
        }
        Ok(total)
    }

    /// Serves the chains the driver made available, at most one queue's worth; returns
    /// whether any was served. More left: the queue's eventfd is signalled again, so the
    /// event loop comes back after serving other events.
    pub fn process_queue(&mut self) -> bool {
        let Some(q) = self.q.queues.first_mut() else { return false };
        let budget = q.size();
        let mem = self.mem.clone();
        let mut served = false;
        for _ in 0..budget {
            let Some(chain) = self.q.queues[0].pop_descriptor_chain(mem.mem()) else { break };
            let head = chain.head_index();
            let len = match parse_request(mem.mem(), chain) {
                Ok(bufs) => match self.serve(&bufs) {
                    Ok(n) => {
                        RngMetrics::add(&self.metrics.requests, 1);
                        RngMetrics::add(&self.metrics.bytes, u64::from(n));
                        n
                    }
                    Err(_) => {
                        RngMetrics::add(&self.metrics.entropy_errors, 1);
                        0
                    }
                },
                Err(_) => {
                    RngMetrics::add(&self.metrics.bad_requests, 1);
                    0
                }
            };
            if self.q.queues[0].add_used(mem.mem(), head, len).is_err() {
                RngMetrics::add(&self.metrics.queue_errors, 1);
                break;
            }
            served = true;
        }
        if served {
            self.q.served(mem.mem(), 0);
        }
        served
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.q.max_sizes()
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.q.evts
    }

    fn read_config(&self, _: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, _: u64, _: &[u8]) {}

    fn activate(
        &mut self,
        queues: Vec<Queue>,
        interrupt: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError> {
        self.q.activate(self.mem.mem(), queues, interrupt)
    }

    fn is_activated(&self) -> bool {
        self.q.is_activated()
    }

    fn queues(&self) -> &[Queue] {
        &self.q.queues
    }

    fn reset(&mut self) {
        self.q.reset();
    }

    fn process_pending(&mut self) {
        // Requests are served synchronously: none is ever in flight. Serve what the guest
        // notified and the event loop has not seen yet.
        while self.q.take_event(0) && self.process_queue() {}
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::IrqKind;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    pub(crate) const MIB: u64 = 1 << 20;

    /// Guest memory for mock-driver tests.
    pub(crate) fn ram() -> Arc<GuestRam> {
        Arc::new(GuestRam::new_anonymous(4 * MIB).unwrap())
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    fn w(addr: u64, len: u32) -> RawDescriptor {
        desc(addr, len, VRING_DESC_F_WRITE, 0)
    }

    /// Links `descs` (placed from table index 0) into one chain: NEXT on all but the last.
    fn chain(descs: &[RawDescriptor]) -> Vec<RawDescriptor> {
        let n = descs.len();
        descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let s = SplitDescriptor::from(*d);
                let (flags, next) = if i + 1 < n {
                    (u32::from(s.flags()) | VRING_DESC_F_NEXT, u16::try_from(i + 1).unwrap())
                } else {
                    (u32::from(s.flags()), 0)
                };
                desc(s.addr().0, s.len(), flags, next)
            })
            .collect()
    }

    /// An activated device over a mock driver's queue at 1 MiB, with `descs` as one chain
    /// (their `next` fields linked by `add_desc_chains`).
    fn run(descs: &[RawDescriptor]) -> (Arc<GuestRam>, Rng, u32, u16) {
        let ram = ram();
        let mq = MockSplitQueue::create(ram.mem(), GuestAddress(MIB), QUEUE_SIZE);
        mq.add_desc_chains(&chain(descs), 0).unwrap();
        let q: Queue = mq.create_queue().unwrap();
        let mut rng = Rng::new(ram.clone()).unwrap();
        rng.set_acked_features(VIRTIO_F_VERSION_1);
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), 0));
        rng.activate(vec![q], irq.clone()).unwrap();
        rng.process_queue();
        let used = mq.used().ring().ref_at(0).unwrap().load();
        let idx = mq.used().idx().load();
        drop(mq);
        (ram, rng, used.len(), idx)
    }

    fn bytes(ram: &GuestRam, addr: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        ram.mem().read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    #[test]
    fn a_good_chain_is_filled_and_its_pages_marked_dirty() {
        let (ram, rng, len, idx) = run(&[w(2 * MIB, 100), w(2 * MIB + 8192, 28)]);
        assert_eq!((len, idx), (128, 1));
        let a = bytes(&ram, 2 * MIB, 100);
        assert!(a.iter().any(|&b| b != 0), "random bytes written");
        assert!(bytes(&ram, 2 * MIB + 8192, 28).iter().any(|&b| b != 0));
        assert_eq!(bytes(&ram, 2 * MIB + 100, 16), vec![0; 16], "nothing past the buffer");
        let m = rng.metrics().snapshot();
        assert_eq!((m.requests, m.bytes, m.bad_requests), (1, 128, 0));
        // The VMM wrote those pages (and the used ring): the next diff must include them.
        let dirty = ram.take_vmm_dirty(0);
        let page = |p: u64| dirty[(p / 64) as usize] & (1 << (p % 64)) != 0;
        assert!(page(2 * MIB / 4096) && page(2 * MIB / 4096 + 2));
        assert!(!page(2 * MIB / 4096 + 1), "the page between the buffers is untouched");
    }

    #[test]
    fn a_device_readable_buffer_is_refused_whole() {
        let (ram, rng, len, idx) = run(&[w(2 * MIB, 64), desc(2 * MIB + 4096, 64, 0, 0)]);
        assert_eq!((len, idx), (0, 1), "refused, but the chain is returned");
        assert_eq!(bytes(&ram, 2 * MIB, 64), vec![0; 64], "nothing written");
        assert_eq!(rng.metrics().snapshot().bad_requests, 1);
    }

    #[test]
    fn a_buffer_outside_guest_memory_is_refused() {
        let (_, rng, len, _) = run(&[w(2 * MIB, 64), w(4 * MIB - 16, 64)]);
        assert_eq!(len, 0);
        let (_, _, len, _) = run(&[w(u64::MAX - 8, 64)]);
        assert_eq!(len, 0);
        let (_, _, len, _) = run(&[w(0xc000_0000, 4)]);
        assert_eq!(len, 0, "the MMIO gap is not memory");
        assert_eq!(rng.metrics().snapshot().bad_requests, 1);
    }

    #[test]
    fn an_oversized_request_gets_the_cap() {
        let (ram, rng, len, _) = run(&[w(MIB + 512 * 1024, 3 * MAX_REQUEST_BYTES)]);
        assert_eq!(len, MAX_REQUEST_BYTES);
        let past = u64::from(MAX_REQUEST_BYTES);
        assert_eq!(bytes(&ram, MIB + 512 * 1024 + past, 64), vec![0; 64]);
        assert_eq!(rng.metrics().snapshot().bytes, past);
        // Split over several buffers, the cap holds in all.
        let (_, _, len, _) =
            run(&[w(2 * MIB, 40_000), w(2 * MIB + 40_960, 40_000), w(3 * MIB, 100)]);
        assert_eq!(len, MAX_REQUEST_BYTES);
    }

    #[test]
    fn loops_and_bad_next_indexes_are_refused() {
        let ram = ram();
        let mq = MockSplitQueue::create(ram.mem(), GuestAddress(MIB), QUEUE_SIZE);
        // Descriptor 0 -> 1 -> 0 -> ...: a loop.
        let t = mq.desc_table();
        t.store(0, desc(2 * MIB, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1)).unwrap();
        t.store(1, desc(2 * MIB + 16, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0)).unwrap();
        // Descriptor 2 -> 999 (outside a 256-entry table).
        t.store(2, desc(2 * MIB + 64, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 999)).unwrap();
        // Descriptor 3: fine, alone.
        t.store(3, w(2 * MIB + 128, 16)).unwrap();
        let avail = mq.avail();
        for (i, head) in [0u16, 2, 3].iter().enumerate() {
            avail.ring().ref_at(i).unwrap().store(*head);
        }
        avail.idx().store(3);
        let q: Queue = mq.create_queue().unwrap();
        let mut rng = Rng::new(ram.clone()).unwrap();
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), 0));
        rng.activate(vec![q], irq.clone()).unwrap();
        assert!(rng.process_queue());
        let used = |i| mq.used().ring().ref_at(i).unwrap().load();
        assert_eq!(mq.used().idx().load(), 3, "every chain is returned");
        assert_eq!((used(0).id(), used(0).len()), (0, 0), "the loop is refused");
        assert_eq!((used(1).id(), used(1).len()), (2, 0), "the bad next index is refused");
        assert_eq!((used(2).id(), used(2).len()), (3, 16));
        assert_eq!(bytes(&ram, 2 * MIB, 64), vec![0; 64], "refused chains write nothing");
        assert_eq!(irq.status(), IrqKind::Vring as u32);
        assert_eq!(rng.metrics().snapshot().bad_requests, 2);
    }

    #[test]
    fn activation_checks_and_reset() {
        let ram = ram();
        let mut rng = Rng::new(ram.clone()).unwrap();
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), 0));
        assert!(matches!(
            rng.activate(vec![], irq.clone()),
            Err(ActivateError::QueueCount { got: 0, want: 1 })
        ));
        let not_ready = Queue::new(QUEUE_SIZE).unwrap();
        assert!(matches!(
            rng.activate(vec![not_ready], irq.clone()),
            Err(ActivateError::BadQueue(0))
        ));
        let mq = MockSplitQueue::create(ram.mem(), GuestAddress(MIB), QUEUE_SIZE);
        rng.activate(vec![mq.create_queue().unwrap()], irq.clone()).unwrap();
        assert!(rng.is_activated());
        assert!(matches!(
            rng.activate(vec![mq.create_queue().unwrap()], irq),
            Err(ActivateError::AlreadyActive)
        ));
        rng.reset();
        assert!(!rng.is_activated() && rng.queues().is_empty());
        rng.set_acked_features(u64::MAX);
        assert_eq!(rng.acked_features(), VIRTIO_F_VERSION_1, "only offered features stick");
    }
}
