//! The virtio-blk device: configuration space, feature set, serving requests.

use std::sync::Arc;

use grove_block::BlockIo;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::queues::Queues;

use super::disk::Disk;
use super::metrics::BlockMetrics;
use super::request::{parse_request, Kind, Parsed, Request, Seg};
use super::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, QUEUE_SIZE, SEG_MAX, SIZE_MAX};
use crate::devices::virtio::{
    device_type, ActivateError, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::{GuestMemory, GuestRam};

/// Length of the configuration space (`struct virtio_blk_config` up to the write-zeroes
/// fields).
pub const CONFIG_LEN: usize = 60;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// The virtio-blk device.
pub struct Block {
    mem: Arc<GuestRam>,
    pub(super) disk: Disk,
    pub(super) acked_features: u64,
    pub(super) q: Queues,
    pub(super) metrics: Arc<BlockMetrics>,
    config: [u8; CONFIG_LEN],
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("disk", &self.disk)
            .field("activated", &self.is_activated())
            .finish_non_exhaustive()
    }
}

/// The configuration space of a disk (little endian).
fn config_space(disk: &Disk) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let chunk_sectors = disk.chunk() / 512;
    let put =
        |c: &mut [u8; CONFIG_LEN], at: usize, b: &[u8]| c[at..at + b.len()].copy_from_slice(b);
    put(&mut c, 0, &(disk.size() / 512).to_le_bytes()); // capacity
    put(&mut c, 8, &SIZE_MAX.to_le_bytes());
    put(&mut c, 12, &SEG_MAX.to_le_bytes());
    put(&mut c, 20, &512u32.to_le_bytes()); // blk_size: 512-byte logical blocks
                                            // Topology: physical blocks of one chunk (aligned writes of a chunk never copy up).
    c[24] = u8::try_from(chunk_sectors.trailing_zeros()).unwrap_or(0);
    put(&mut c, 26, &u16::try_from(chunk_sectors).unwrap_or(8).to_le_bytes());
    put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(&mut c, 40, &MAX_DISCARD_SEG.to_le_bytes());
    put(&mut c, 44, &chunk_sectors.to_le_bytes());
    put(&mut c, 48, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(&mut c, 52, &MAX_DISCARD_SEG.to_le_bytes());
    c[56] = 1; // write_zeroes_may_unmap
    c
}

/// Writes `bytes` across `segs` (in order, as far as they reach); returns the bytes written.
fn scatter(mem: &GuestMemory, segs: &[Seg], bytes: &[u8]) -> u32 {
    let mut at = 0usize;
    for s in segs {
        let n = (s.len as usize).min(bytes.len() - at);
        if n == 0 || mem.write_slice(&bytes[at..at + n], s.addr).is_err() {
            break;
        }
        at += n;
    }
    u32::try_from(at).unwrap_or(0)
}

impl Block {
    /// A device serving `disk` from guest memory `mem`, not activated.
    pub fn new(mem: Arc<GuestRam>, disk: Disk) -> std::io::Result<Self> {
        let config = config_space(&disk);
        Ok(Self {
            mem,
            disk,
            acked_features: 0,
            q: Queues::new(&[QUEUE_SIZE])?,
            metrics: Arc::default(),
            config,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// The disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// The disk, for snapshots (freezing its layer).
    pub fn disk_mut(&mut self) -> &mut Disk {
        &mut self.disk
    }

    /// Serves a checked request; returns the status and the bytes written into the chain's
    /// writable buffers (data and status).
    fn serve(&self, r: &Request) -> (u32, u32) {
        let mem = self.mem.mem();
        let io = self.disk.io();
        let m = &self.metrics;
        let slices = || {
            r.data
                .iter()
                .flat_map(|s| mem.get_slices(s.addr, s.len as usize))
                .collect::<Result<Vec<_>, _>>()
        };
        let ok = |res: Result<(), grove_block::BlockError>| match res {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(_) => {
                BlockMetrics::add(&m.io_errors, 1);
                VIRTIO_BLK_S_IOERR
            }
        };
        let writable = !self.disk.read_only();
        let refused = || {
            BlockMetrics::add(&m.io_errors, 1);
            (VIRTIO_BLK_S_IOERR, 1)
        };
        match &r.kind {
            Kind::In => {
                let Ok(s) = slices() else { return refused() };
                let st = ok(io.read_vectored(r.sector, &s));
                if st == VIRTIO_BLK_S_OK {
                    BlockMetrics::add(&m.reads, 1);
                    BlockMetrics::add(&m.read_bytes, u64::from(r.data_len));
                }
                // The data buffers may have been written even on an error.
                (st, r.data_len.saturating_add(1))
            }
            Kind::Out if writable => {
                let Ok(s) = slices() else { return refused() };
                let st = ok(io.write_vectored(r.sector, &s));
                if st == VIRTIO_BLK_S_OK {
                    BlockMetrics::add(&m.writes, 1);
                    BlockMetrics::add(&m.write_bytes, u64::from(r.data_len));
                }
                (st, 1)
            }
            Kind::Flush => {
                BlockMetrics::add(&m.flushes, 1);
                (ok(io.flush()), 1)
            }
            Kind::GetId => {
                BlockMetrics::add(&m.get_ids, 1);
                // At most 20 bytes, NUL-padded (no NUL when the id fills all 20).
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let b = self.disk.id().as_bytes();
                let n = b.len().min(id.len());
                id[..n].copy_from_slice(&b[..n]);
                let len = (r.data_len as usize).min(id.len());
                (VIRTIO_BLK_S_OK, scatter(mem, &r.data, &id[..len]) + 1)
            }
            Kind::Discard(ranges) | Kind::WriteZeroes(ranges) if writable => {
                let discard = matches!(r.kind, Kind::Discard(_));
                let res = ranges.iter().try_for_each(|&(s, n)| {
                    if discard {
                        io.discard(s, u64::from(n))
                    } else {
                        io.write_zeroes(s, u64::from(n))
                    }
                });
                let st = ok(res);
                if st == VIRTIO_BLK_S_OK {
                    BlockMetrics::add(&m.zeroes, 1);
                }
                (st, 1)
            }
            // Writes, discards and write-zeroes to a read-only disk.
            Kind::Out | Kind::Discard(_) | Kind::WriteZeroes(_) => refused(),
        }
    }

    /// Serves the chains the driver made available, at most one queue's worth; returns
    /// whether any was served. More left: the queue's eventfd is signalled again, so the
    /// event loop comes back after serving other events.
    pub fn process_queue(&mut self) -> bool {
        let Some(q) = self.q.queues.first_mut() else { return false };
        let budget = q.size();
        let mem = self.mem.clone();
        let capacity = self.disk.size() / 512;
        let mut served = false;
        for _ in 0..budget {
            let Some(chain) = self.q.queues[0].pop_descriptor_chain(mem.mem()) else { break };
            let head = chain.head_index();
            let len = match parse_request(mem.mem(), chain, capacity) {
                Ok(Parsed::Ok(r)) => {
                    let (status, len) = self.serve(&r);
                    let status = u8::try_from(status).unwrap_or(1);
                    // The status write marks its page dirty for the next diff.
                    match mem.mem().write_obj(status, r.status) {
                        Ok(()) => len,
                        Err(_) => 0,
                    }
                }
                Ok(Parsed::Refused { status, why }) => {
                    BlockMetrics::add(&self.metrics.bad_requests, 1);
                    match mem.mem().write_obj(why.status(), status) {
                        Ok(()) => 1,
                        Err(_) => 0,
                    }
                }
                Err(_) => {
                    BlockMetrics::add(&self.metrics.bad_requests, 1);
                    0
                }
            };
            if self.q.queues[0].add_used(mem.mem(), head, len).is_err() {
                BlockMetrics::add(&self.metrics.queue_errors, 1);
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

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn avail_features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_TOPOLOGY);
        if self.disk.read_only() {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
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

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(off) = usize::try_from(offset) else { return };
        if off < CONFIG_LEN {
            let n = data.len().min(CONFIG_LEN - off);
            data[..n].copy_from_slice(&self.config[off..off + n]);
        }
    }

    fn write_config(&mut self, _: u64, _: &[u8]) {
        // No writable field (no VIRTIO_BLK_F_CONFIG_WCE).
    }

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
    use std::path::Path;

    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    };
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use super::super::disk::DiskSpec;
    use super::super::{MAX_DESCRIPTORS, MAX_REQUEST_BYTES};
    use super::*;
    use crate::devices::virtio::IrqKind;

    pub(crate) const MIB: u64 = 1 << 20;
    /// Disk size in the tests.
    pub(crate) const DISK: u64 = 8 * MIB;
    /// Where request headers go.
    const HDR: u64 = 2 * MIB;
    /// Where status bytes go.
    const STATUS: u64 = 3 * MIB;
    /// Where data buffers go.
    const DATA: u64 = 4 * MIB;
    /// Status byte filler: a refused chain leaves it.
    const UNTOUCHED: u8 = 0xaa;

    /// The base image's byte at `off`.
    pub(crate) fn pat(off: u64) -> u8 {
        ((off / 512) as u8).wrapping_mul(13) ^ (off % 251) as u8
    }

    /// A base image (the pattern) and a device over it; `ro` or writing into `dir/layer`.
    pub(crate) fn device(dir: &Path, ro: bool) -> (Arc<GuestRam>, Block) {
        let img = dir.join("base.img");
        if !img.exists() {
            std::fs::write(&img, (0..DISK).map(pat).collect::<Vec<u8>>()).unwrap();
        }
        let spec = if ro {
            format!("{},ro,id=root", img.display())
        } else {
            format!("{},layer={},id=root", img.display(), dir.join("layer").display())
        };
        let disk = Disk::open(&DiskSpec::parse(&spec, 0).unwrap()).unwrap();
        let ram = Arc::new(GuestRam::new_anonymous(64 * MIB).unwrap());
        let blk = Block::new(ram.clone(), disk).unwrap();
        (ram, blk)
    }

    pub(crate) fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, 0))
    }
    /// A device-readable buffer.
    pub(crate) fn r(addr: u64, len: u32) -> RawDescriptor {
        desc(addr, len, 0)
    }
    /// A device-writable buffer.
    pub(crate) fn w(addr: u64, len: u32) -> RawDescriptor {
        desc(addr, len, VRING_DESC_F_WRITE)
    }

    /// Writes a request header at `at`; returns its descriptor.
    pub(crate) fn hdr(ram: &GuestRam, at: u64, ty: u32, sector: u64) -> RawDescriptor {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        ram.mem().write_slice(&h, GuestAddress(at)).unwrap();
        r(at, 16)
    }

    /// Links `descs`, placed from table index `offset`, into one chain.
    fn link(descs: &[RawDescriptor], offset: u16) -> Vec<RawDescriptor> {
        let n = descs.len();
        descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let s = SplitDescriptor::from(*d);
                let last = i + 1 == n;
                let flags = if last { s.flags() } else { s.flags() | VRING_DESC_F_NEXT as u16 };
                let next = if last { 0 } else { offset + u16::try_from(i + 1).unwrap() };
                RawDescriptor::from(SplitDescriptor::new(s.addr().0, s.len(), flags, next))
            })
            .collect()
    }

    /// Offers `chains` to the device through a mock driver's queue at 1 MiB and serves them;
    /// returns each used element (head, length).
    pub(crate) fn run(
        ram: &GuestRam,
        blk: &mut Block,
        chains: &[Vec<RawDescriptor>],
    ) -> Vec<(u32, u32)> {
        let mq = MockSplitQueue::create(ram.mem(), GuestAddress(MIB), QUEUE_SIZE);
        let mut off = 0u16;
        for c in chains {
            mq.add_desc_chains(&link(c, off), off).unwrap();
            off += u16::try_from(c.len()).unwrap();
        }
        blk.reset();
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), 0));
        blk.activate(vec![mq.create_queue().unwrap()], irq.clone()).unwrap();
        blk.process_queue();
        let n = mq.used().idx().load();
        assert_eq!(usize::from(n), chains.len(), "every chain is returned");
        assert_eq!(irq.status(), IrqKind::Vring as u32, "and the driver interrupted");
        (0..n)
            .map(|i| {
                let e = mq.used().ring().ref_at(usize::from(i)).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    pub(crate) fn bytes(ram: &GuestRam, addr: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        ram.mem().read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    pub(crate) fn fill(ram: &GuestRam, addr: u64, n: usize, v: u8) {
        ram.mem().write_slice(&vec![v; n], GuestAddress(addr)).unwrap();
    }

    fn status(ram: &GuestRam, i: u64) -> u8 {
        bytes(ram, STATUS + i, 1)[0]
    }

    fn base(off: u64, n: usize) -> Vec<u8> {
        (off..off + n as u64).map(pat).collect()
    }

    /// One request: header at HDR + 64*i, status at STATUS + i.
    fn req(
        ram: &GuestRam,
        i: u64,
        ty: u32,
        sector: u64,
        data: &[RawDescriptor],
    ) -> Vec<RawDescriptor> {
        fill(ram, STATUS + i, 1, UNTOUCHED);
        let mut c = vec![hdr(ram, HDR + 64 * i, ty, sector)];
        c.extend_from_slice(data);
        c.push(w(STATUS + i, 1));
        c
    }

    #[test]
    fn reads_fill_guest_buffers_and_mark_them_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let (ram, mut blk) = device(dir.path(), false);
        fill(&ram, DATA, 8192, 0xee);
        ram.take_vmm_dirty(0);
        // Two sectors at sector 3, into segments of 1000 and 24 bytes.
        let c = req(&ram, 0, VIRTIO_BLK_T_IN, 3, &[w(DATA, 1000), w(DATA + 5000, 24)]);
        assert_eq!(run(&ram, &mut blk, &[c]), vec![(0, 1025)]);
        assert_eq!(status(&ram, 0), 0);
        let got = [bytes(&ram, DATA, 1000), bytes(&ram, DATA + 5000, 24)].concat();
        assert_eq!(got, base(3 * 512, 1024));
        assert_eq!(bytes(&ram, DATA + 1000, 8), vec![0xee; 8], "nothing past a segment");
        let dirty = ram.take_vmm_dirty(0);
        let page = |a: u64| dirty[(a / 4096 / 64) as usize] & (1 << (a / 4096 % 64)) != 0;
        assert!(page(DATA) && page(DATA + 5000) && page(STATUS), "device writes are dirty");
        assert!(!page(DATA + 8192), "untouched pages are not");
        let m = blk.metrics().snapshot();
        assert_eq!((m.reads, m.read_bytes, m.bad_requests), (1, 1024, 0));
    }

    #[test]
    fn writes_go_to_the_layer_and_read_back_across_any_framing() {
        let dir = tempfile::tempdir().unwrap();
        let (ram, mut blk) = device(dir.path(), false);
        let data: Vec<u8> = (0..3 * 512u32).map(|i| (i % 7) as u8 + 1).collect();
        ram.mem().write_slice(&data, GuestAddress(DATA)).unwrap();
        // Segments of 100, 1000 and 436 bytes, the first chunk written partially.
        let c = req(
            &ram,
            0,
            VIRTIO_BLK_T_OUT,
            5,
            &[r(DATA, 100), r(DATA + 100, 1000), r(DATA + 1100, 436)],
        );
        let f = req(&ram, 1, VIRTIO_BLK_T_FLUSH, 0, &[]);
        assert_eq!(run(&ram, &mut blk, &[c, f]), vec![(0, 1), (5, 1)]);
        assert_eq!((status(&ram, 0), status(&ram, 1)), (0, 0));
        // Read back sectors 4..9 with the header and data in one descriptor and the data and
        // status in one: no framing is assumed.
        hdr(&ram, HDR, VIRTIO_BLK_T_IN, 4);
        let mut hd = [0u8; 16];
        ram.mem().read_slice(&mut hd, GuestAddress(HDR)).unwrap();
        ram.mem().write_slice(&hd[..8], GuestAddress(HDR + 256)).unwrap();
        ram.mem().write_slice(&hd[8..], GuestAddress(HDR + 512)).unwrap();
        fill(&ram, DATA + MIB, 5 * 512 + 1, 0xee);
        let c = vec![r(HDR + 256, 8), r(HDR + 512, 8), w(DATA + MIB, 5 * 512 + 1)];
        assert_eq!(run(&ram, &mut blk, &[c]), vec![(0, 5 * 512 + 1)]);
        let got = bytes(&ram, DATA + MIB, 5 * 512 + 1);
        assert_eq!(got[5 * 512], 0, "status: the last writable byte");
        let mut expect = base(4 * 512, 5 * 512);
        expect[512..512 + data.len()].copy_from_slice(&data);
        assert_eq!(&got[..5 * 512], &expect[..]);
        // The image was never written; the layer owns the chunk.
        let img = std::fs::read(dir.path().join("base.img")).unwrap();
        assert_eq!(&img[..8192], &base(0, 8192)[..]);
        assert_eq!(blk.disk().io().top_owned_chunks(), 1);
        let m = blk.metrics().snapshot();
        assert_eq!((m.writes, m.write_bytes, m.flushes, m.reads), (1, 1536, 1, 1));
    }

    #[test]
    fn get_id_discard_and_write_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let (ram, mut blk) = device(dir.path(), false);
        fill(&ram, DATA, 64, 0xee);
        let id20 = req(&ram, 0, VIRTIO_BLK_T_GET_ID, 0, &[w(DATA, 20)]);
        let id3 = req(&ram, 1, VIRTIO_BLK_T_GET_ID, 0, &[w(DATA + 32, 3)]);
        assert_eq!(run(&ram, &mut blk, &[id20, id3]), vec![(0, 21), (3, 4)]);
        assert_eq!(bytes(&ram, DATA, 21), [b"root".as_slice(), &[0; 16], &[0xee]].concat());
        assert_eq!(bytes(&ram, DATA + 32, 4), b"roo\xee");
        // Discard sectors 1..3 and 20..36, write zeroes (may unmap) to 100..101.
        let seg = |at: u64, s: u64, n: u32, flags: u32| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&s.to_le_bytes());
            b[8..12].copy_from_slice(&n.to_le_bytes());
            b[12..].copy_from_slice(&flags.to_le_bytes());
            ram.mem().write_slice(&b, GuestAddress(at)).unwrap();
        };
        seg(DATA + 1024, 1, 2, 0);
        seg(DATA + 1040, 20, 16, 0);
        seg(DATA + 2048, 100, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let d = req(&ram, 0, VIRTIO_BLK_T_DISCARD, 0, &[r(DATA + 1024, 32)]);
        let z = req(&ram, 1, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[r(DATA + 2048, 16)]);
        assert_eq!(run(&ram, &mut blk, &[d, z]), vec![(0, 1), (3, 1)]);
        assert_eq!((status(&ram, 0), status(&ram, 1)), (0, 0));
        let mut b = vec![0u8; 120 * 512];
        blk.disk().io().read(0, &mut b).unwrap();
        let mut expect = base(0, 120 * 512);
        for (s, n) in [(1, 2), (20, 16), (100, 1)] {
            expect[s * 512..(s + n) * 512].fill(0);
        }
        assert_eq!(b, expect);
        // Refused: the unmap flag on a discard, an unknown flag, a range past the end, too
        // many segments, a payload that is not whole segments.
        seg(DATA + 3072, 0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        seg(DATA + 3088, 0, 1, 4);
        seg(DATA + 3104, DISK / 512 - 1, 2, 0);
        let bad = [
            req(&ram, 0, VIRTIO_BLK_T_DISCARD, 0, &[r(DATA + 3072, 16)]),
            req(&ram, 1, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[r(DATA + 3088, 16)]),
            req(&ram, 2, VIRTIO_BLK_T_DISCARD, 0, &[r(DATA + 3104, 16)]),
            req(&ram, 3, VIRTIO_BLK_T_DISCARD, 0, &[r(DATA + 1024, 16 * (MAX_DISCARD_SEG + 1))]),
            req(&ram, 4, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[r(DATA + 1024, 24)]),
        ];
        let used = run(&ram, &mut blk, &bad);
        assert!(used.iter().all(|&(_, len)| len == 1));
        let st: Vec<u8> = (0..5).map(|i| status(&ram, i)).collect();
        let (io, un) = (VIRTIO_BLK_S_IOERR as u8, VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(st, vec![un, un, io, io, io]);
        let mut after = vec![0u8; 120 * 512];
        blk.disk().io().read(0, &mut after).unwrap();
        assert_eq!(after, expect, "refused requests change nothing");
        let m = blk.metrics().snapshot();
        assert_eq!((m.get_ids, m.zeroes, m.bad_requests), (2, 2, 5));
    }

    #[test]
    fn a_read_only_disk_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (ram, mut blk) = device(dir.path(), true);
        let f = blk.avail_features();
        assert!(f & bit(VIRTIO_BLK_F_RO) != 0 && f & bit(VIRTIO_BLK_F_DISCARD) == 0);
        fill(&ram, DATA, 512, 9);
        let seg = [0u8; 16];
        ram.mem().write_slice(&seg, GuestAddress(DATA + 4096)).unwrap();
        let chains = [
            req(&ram, 0, VIRTIO_BLK_T_OUT, 0, &[r(DATA, 512)]),
            req(&ram, 1, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[r(DATA + 4096, 16)]),
            req(&ram, 2, VIRTIO_BLK_T_FLUSH, 0, &[]),
            req(&ram, 3, VIRTIO_BLK_T_IN, 0, &[w(DATA + 8192, 512)]),
        ];
        let used = run(&ram, &mut blk, &chains);
        assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), vec![1, 1, 1, 513]);
        let st: Vec<u8> = (0..4).map(|i| status(&ram, i)).collect();
        assert_eq!(st, vec![1, 1, 0, 0]);
        assert_eq!(bytes(&ram, DATA + 8192, 512), base(0, 512), "the image as it was");
        assert_eq!(blk.metrics().snapshot().io_errors, 2);
    }

    #[test]
    fn malformed_chains_are_returned_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let (ram, mut blk) = device(dir.path(), false);
        fill(&ram, DATA, 4096, 0xee);
        let h = hdr(&ram, HDR, VIRTIO_BLK_T_IN, 0);
        let many: Vec<RawDescriptor> = std::iter::once(h)
            .chain((0..MAX_DESCRIPTORS).map(|i| w(DATA + 512 * i as u64, 512)))
            .collect();
        let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
            ("data outside guest memory", vec![h, w(64 * MIB - 256, 512), w(STATUS, 1)]),
            ("in the MMIO gap", vec![h, w(0xc000_0000, 512), w(STATUS, 1)]),
            ("overflowing address", vec![h, w(u64::MAX - 100, 512), w(STATUS, 1)]),
            ("readable after writable", vec![h, w(DATA, 512), r(DATA + 512, 16), w(STATUS, 1)]),
            ("no status byte", vec![h, r(DATA, 512)]),
            ("too many descriptors", many),
        ];
        for (what, c) in cases {
            fill(&ram, STATUS, 1, UNTOUCHED);
            assert_eq!(run(&ram, &mut blk, &[c]), vec![(0, 0)], "{what}");
            assert_eq!(status(&ram, 0), UNTOUCHED, "{what}: no status written");
            assert_eq!(bytes(&ram, DATA, 4096), vec![0xee; 4096], "{what}: no data written");
        }
        assert_eq!(blk.metrics().snapshot().bad_requests, 6);
    }

    #[test]
    fn loops_and_bad_next_indexes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ram, mut blk) = device(dir.path(), false);
        fill(&ram, STATUS, 4, UNTOUCHED);
        let mq = MockSplitQueue::create(ram.mem(), GuestAddress(MIB), QUEUE_SIZE);
        let t = mq.desc_table();
        let n = |d: RawDescriptor, next: u16| {
            let s = SplitDescriptor::from(d);
            RawDescriptor::from(SplitDescriptor::new(
                s.addr().0,
                s.len(),
                s.flags() | VRING_DESC_F_NEXT as u16,
                next,
            ))
        };
        // 0 -> 1 -> 0: a loop. 2 -> 999: outside the table. 3 -> 4: fine.
        let h = hdr(&ram, HDR, VIRTIO_BLK_T_FLUSH, 0);
        t.store(0, n(h, 1)).unwrap();
        t.store(1, n(w(STATUS, 1), 0)).unwrap();
        t.store(2, n(h, 999)).unwrap();
        t.store(3, n(h, 4)).unwrap();
        t.store(4, w(STATUS + 3, 1)).unwrap();
        for (i, head) in [0u16, 2, 3].iter().enumerate() {
            mq.avail().ring().ref_at(i).unwrap().store(*head);
        }
        mq.avail().idx().store(3);
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), 0));
        blk.activate(vec![mq.create_queue().unwrap()], irq).unwrap();
        assert!(blk.process_queue());
        let used = |i| mq.used().ring().ref_at(i).unwrap().load();
        assert_eq!(mq.used().idx().load(), 3, "every chain is returned");
        assert_eq!((used(0).id(), used(0).len()), (0, 0), "the loop is refused");
        assert_eq!((used(1).id(), used(1).len()), (2, 0), "the bad next index is refused");
        assert_eq!((used(2).id(), used(2).len()), (3, 1));
        assert_eq!(status(&ram, 0), UNTOUCHED, "refused chains write nothing");
        assert_eq!(status(&ram, 3), 0);
    }

    #[test]
    fn bad_requests_get_an_error_status_and_no_data() {
        let dir = tempfile::tempdir().unwrap();
        let (ram, mut blk) = device(dir.path(), false);
        let cap = DISK / 512;
        let big = MAX_REQUEST_BYTES + 512;
        let segs: Vec<RawDescriptor> =
            (0..=u64::from(SEG_MAX)).map(|i| w(DATA + 512 * i, 512)).collect();
        let (io, un) = (VIRTIO_BLK_S_IOERR as u8, VIRTIO_BLK_S_UNSUPP as u8);
        // Each case's header at HDR + 64 * k, its status at STATUS + k.
        let q =
            |k: u64, ty: u32, sector: u64, data: &[RawDescriptor]| req(&ram, k, ty, sector, data);
        let (tin, tout) = (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT);
        let cases: Vec<(&str, Vec<RawDescriptor>, u8)> = vec![
            ("short header", vec![r(HDR + 64 * 40, 8), w(DATA, 512), w(STATUS, 1)], io),
            ("read with readable data", q(1, tin, 0, &[r(DATA, 512)]), io),
            ("write with writable data", q(2, tout, 0, &[w(DATA, 512)]), io),
            ("flush with data", q(3, VIRTIO_BLK_T_FLUSH, 0, &[w(DATA, 512)]), io),
            ("not whole sectors", q(4, tin, 0, &[w(DATA, 100)]), io),
            ("too much data", q(5, tin, 0, &[w(DATA, big)]), io),
            ("a segment over size_max", q(6, tin, 0, &[w(DATA, 2 * SIZE_MAX)]), io),
            ("too many segments", q(7, tin, 0, &segs), io),
            ("past the end", q(8, tin, cap, &[w(DATA, 512)]), io),
            ("across the end", q(9, tin, cap - 1, &[w(DATA, 1024)]), io),
            ("sector overflow", q(10, tin, u64::MAX / 512 + 1, &[w(DATA, 512)]), io),
            ("write past the end", q(11, tout, u64::MAX, &[r(DATA, 512)]), io),
            ("SCSI command", q(12, 2, 0, &[w(DATA, 512)]), un),
            ("unknown type", q(13, 99, 0, &[]), un),
        ];
        for (k, (what, c, want)) in cases.into_iter().enumerate() {
            let k = k as u64;
            let st = if k == 0 { 0 } else { k };
            fill(&ram, DATA, 4096, 0xee);
            fill(&ram, STATUS + st, 1, UNTOUCHED);
            assert_eq!(run(&ram, &mut blk, &[c]), vec![(0, 1)], "{what}");
            assert_eq!(status(&ram, st), want, "{what}");
            assert_eq!(bytes(&ram, DATA, 4096), vec![0xee; 4096], "{what}: no data read");
        }
        let mut b = vec![0u8; 4096];
        blk.disk().io().read(cap - 8, &mut b).unwrap();
        assert_eq!(b, base(DISK - 4096, 4096), "nothing written");
        assert_eq!(blk.disk().io().top_owned_chunks(), 0);
    }

    #[test]
    fn indirect_descriptors_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let (ram, mut blk) = device(dir.path(), false);
        assert!(blk.avail_features() & bit(VIRTIO_RING_F_INDIRECT_DESC) != 0);
        // An indirect table at 5 MiB: header, two data buffers, status.
        let table = 5 * MIB;
        let h = hdr(&ram, HDR, VIRTIO_BLK_T_IN, 8);
        fill(&ram, STATUS, 1, UNTOUCHED);
        let entries = [h, w(DATA, 512), w(DATA + 4096, 512), w(STATUS, 1)];
        for (i, e) in link(&entries, 0).iter().enumerate() {
            let s = SplitDescriptor::from(*e);
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&s.addr().0.to_le_bytes());
            raw[8..12].copy_from_slice(&s.len().to_le_bytes());
            raw[12..14].copy_from_slice(&s.flags().to_le_bytes());
            raw[14..].copy_from_slice(&s.next().to_le_bytes());
            ram.mem().write_slice(&raw, GuestAddress(table + 16 * i as u64)).unwrap();
        }
        let ind = desc(table, 64, VRING_DESC_F_INDIRECT);
        assert_eq!(run(&ram, &mut blk, &[vec![ind]]), vec![(0, 1025)]);
        assert_eq!(status(&ram, 0), 0);
        let got = [bytes(&ram, DATA, 512), bytes(&ram, DATA + 4096, 512)].concat();
        assert_eq!(got, base(8 * 512, 1024));
    }

    #[test]
    fn configuration_space_describes_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (_, blk) = device(dir.path(), false);
        let rd = |off: u64, n: usize| {
            let mut b = vec![0xffu8; n];
            blk.read_config(off, &mut b);
            b
        };
        let u32_at = |off| u32::from_le_bytes(rd(off, 4).try_into().unwrap());
        assert_eq!(u64::from_le_bytes(rd(0, 8).try_into().unwrap()), DISK / 512);
        assert_eq!((u32_at(8), u32_at(12), u32_at(20)), (SIZE_MAX, SEG_MAX, 512));
        assert_eq!(rd(24, 1), vec![3], "physical block: 2^3 sectors (one 4 KiB chunk)");
        assert_eq!((u32_at(36), u32_at(40), u32_at(44)), (MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 8));
        assert_eq!(rd(56, 1), vec![1]);
        // Any width and offset, zeroes past the end.
        assert_eq!(rd(1, 2), (DISK / 512).to_le_bytes()[1..3].to_vec());
        assert_eq!(rd(58, 8), vec![0; 8]);
        assert_eq!(rd(4096, 4), vec![0; 4]);
        assert_eq!(rd(u64::MAX, 4), vec![0; 4]);
    }
}
