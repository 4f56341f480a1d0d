//! A mock vsock driver for the device's tests: guest memory with the three queues (built with
//! virtio-queue's mock module), receive buffers shaped like Linux 6.1's (a 44-byte header
//! buffer chained to a 4 KiB data buffer), transmit chains with the header and the payload in
//! separate buffers, and a temporary directory for the VM's socket.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::device::{Vsock, VsockConfig};
use super::packet::{op, Header, HDR_LEN, HOST_CID, TYPE_STREAM};
use super::{EVENT_QUEUE, NUM_QUEUES, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::{IrqTrigger, VirtioDevice};
use crate::memory::{GuestMemory, GuestRam};

pub(crate) const MIB: u64 = 1 << 20;
/// The mock guest's cid.
pub(crate) const CID: u64 = 3;
/// Queue size of the mock driver.
pub(crate) const QSIZE: u16 = 256;
/// Receive data buffer size (Linux 6.1's VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE).
pub(crate) const RX_BUF: u32 = 4096;
const QUEUE_BASE: u64 = MIB;
const HEAP_START: u64 = 2 * MIB;
const MEM: u64 = 32 * MIB;

/// A guest-side header to the host (`buf_alloc` 256 KiB, `fwd_cnt` 0 unless set).
pub(crate) fn to_host(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

fn raw(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, u16::try_from(flags).unwrap(), next))
}

/// A mock driver with an activated device.
pub(crate) struct MockGuest {
    pub ram: Arc<GuestRam>,
    pub dev: Vsock,
    pub irq: Arc<IrqTrigger>,
    pub uds: PathBuf,
    pub dir: tempfile::TempDir,
    /// The guest's cid (its packets' source).
    pub cid: u64,
    next_desc: [u16; NUM_QUEUES],
    seen_used: [u16; NUM_QUEUES],
    heap: u64,
    /// Receive chains posted: head -> (header buffer, data buffer).
    rx_bufs: HashMap<u16, (u64, u64)>,
    /// Event buffers posted: head -> address.
    ev_bufs: HashMap<u16, u64>,
}

pub(crate) fn queue_addr(q: usize) -> GuestAddress {
    GuestAddress(QUEUE_BASE + q as u64 * 0x1_0000)
}

impl MockGuest {
    /// A device bound in a fresh directory, activated over three mock queues.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let ram = Arc::new(GuestRam::new_anonymous(MEM).unwrap());
        let mut dev = Vsock::new(ram.clone(), &VsockConfig { cid: CID, uds: uds.clone() }).unwrap();
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), 0));
        let queues: Vec<Queue> = (0..NUM_QUEUES)
            .map(|q| {
                MockSplitQueue::create(ram.mem(), queue_addr(q), QSIZE).create_queue().unwrap()
            })
            .collect();
        dev.activate(queues, irq.clone()).unwrap();
        Self::with(ram, dev, irq, uds, dir)
    }

    /// Wraps an existing device (e.g. a restored one) over the same queues.
    pub fn with(
        ram: Arc<GuestRam>,
        dev: Vsock,
        irq: Arc<IrqTrigger>,
        uds: PathBuf,
        dir: tempfile::TempDir,
    ) -> Self {
        let mut g = Self {
            ram,
            cid: dev.cid(),
            dev,
            irq,
            uds,
            dir,
            next_desc: [0; NUM_QUEUES],
            seen_used: [0; NUM_QUEUES],
            heap: HEAP_START,
            rx_bufs: HashMap::new(),
            ev_bufs: HashMap::new(),
        };
        for q in 0..NUM_QUEUES {
            let (_, avail, used) = g.rings(q);
            g.next_desc[q] = g.read16(avail + 2);
            g.seen_used[q] = g.read16(used + 2);
        }
        g
    }

    pub fn mem(&self) -> &GuestMemory {
        self.ram.mem()
    }

    /// Queue `q`'s ring addresses: (descriptor table, available ring, used ring).
    fn rings(&self, q: usize) -> (u64, u64, u64) {
        let queue = &self.dev.queues()[q];
        (queue.desc_table(), queue.avail_ring(), queue.used_ring())
    }

    fn read16(&self, a: u64) -> u16 {
        self.mem().read_obj::<u16>(GuestAddress(a)).unwrap()
    }

    /// Guest buffer space (wraps around; tests never hold that much at once).
    pub fn alloc(&mut self, len: u64) -> u64 {
        let len = len.div_ceil(64) * 64;
        if self.heap + len > MEM {
            self.heap = HEAP_START;
        }
        let a = self.heap;
        self.heap += len;
        a
    }

    /// Adds one chain of (address, length, device-writable) buffers to queue `q`; returns
    /// its head.
    pub fn add_chain(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let n = u16::try_from(bufs.len()).unwrap();
        let (desc, avail, _) = self.rings(q);
        // Chains never wrap the table here: restart at 0 when one would.
        let head =
            if self.next_desc[q] % QSIZE + n > QSIZE { 0 } else { self.next_desc[q] % QSIZE };
        for (&(a, l, w), i) in bufs.iter().zip(0u16..) {
            let mut flags = if w { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < n {
                flags |= VRING_DESC_F_NEXT;
            }
            let d = raw(a, l, flags, head + i + 1);
            self.mem().write_obj(d, GuestAddress(desc + u64::from(head + i) * 16)).unwrap();
        }
        let idx = self.read16(avail + 2);
        self.mem().write_obj(head, GuestAddress(avail + 4 + u64::from(idx % QSIZE) * 2)).unwrap();
        self.mem().write_obj(idx.wrapping_add(1), GuestAddress(avail + 2)).unwrap();
        self.next_desc[q] = head + n;
        head
    }

    /// Takes over the buffers `parent` posted (a child restored from a copy of its memory).
    pub fn adopt_buffers(&mut self, parent: &MockGuest) {
        self.rx_bufs = parent.rx_bufs.clone();
        self.ev_bufs = parent.ev_bufs.clone();
        self.heap = parent.heap;
        self.next_desc = parent.next_desc;
    }

    /// Posts `n` receive buffers.
    pub fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let h = self.alloc(HDR_LEN as u64);
            let d = self.alloc(u64::from(RX_BUF));
            let head = self.add_chain(RX_QUEUE, &[(h, HDR_LEN as u32, true), (d, RX_BUF, true)]);
            self.rx_bufs.insert(head, (h, d));
        }
    }

    /// Posts an event buffer.
    pub fn post_event(&mut self) {
        let a = self.alloc(8);
        self.mem().write_slice(&[0xffu8; 8], GuestAddress(a)).unwrap();
        let head = self.add_chain(EVENT_QUEUE, &[(a, 8, true)]);
        self.ev_bufs.insert(head, a);
    }

    /// Transmits a packet (header and payload in separate buffers, like Linux 6.1) and lets
    /// the device serve its transmit queue, then its receive queue.
    pub fn send(&mut self, h: Header, payload: &[u8]) {
        self.queue_tx(h, payload);
        self.dev.serve(|d| d.process_tx() | d.process_rx());
    }

    /// Puts a packet on the transmit queue without serving it.
    pub fn queue_tx(&mut self, mut h: Header, payload: &[u8]) {
        h.len = u32::try_from(payload.len()).unwrap();
        let ha = self.alloc(HDR_LEN as u64);
        self.mem().write_slice(&h.to_bytes(), GuestAddress(ha)).unwrap();
        if payload.is_empty() {
            self.add_chain(TX_QUEUE, &[(ha, HDR_LEN as u32, false)]);
        } else {
            let pa = self.alloc(payload.len() as u64);
            self.mem().write_slice(payload, GuestAddress(pa)).unwrap();
            self.add_chain(
                TX_QUEUE,
                &[(ha, HDR_LEN as u32, false), (pa, u32::try_from(payload.len()).unwrap(), false)],
            );
        }
    }

    /// Lets the device serve its host sockets.
    pub fn host_events(&mut self) {
        self.dev.serve(Vsock::process_backend);
    }

    /// New used entries of queue `q`: (head, length).
    pub fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let (_, _, used) = self.rings(q);
        let idx = self.read16(used + 2);
        let mut out = Vec::new();
        while self.seen_used[q] != idx {
            let at = used + 4 + u64::from(self.seen_used[q] % QSIZE) * 8;
            let id = self.mem().read_obj::<u32>(GuestAddress(at)).unwrap();
            let len = self.mem().read_obj::<u32>(GuestAddress(at + 4)).unwrap();
            out.push((u16::try_from(id).unwrap(), len));
            self.seen_used[q] = self.seen_used[q].wrapping_add(1);
        }
        out
    }

    /// Packets the device put into receive buffers since the last call.
    pub fn rx(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.used(RX_QUEUE)
            .into_iter()
            .map(|(head, len)| {
                let (h, d) = self.rx_bufs.remove(&head).expect("a posted receive buffer");
                if len == 0 {
                    return (Header::default(), Vec::new());
                }
                let mut b = [0u8; HDR_LEN];
                self.mem().read_slice(&mut b, GuestAddress(h)).unwrap();
                let hdr = Header::from_bytes(&b);
                assert_eq!(u64::from(len), HDR_LEN as u64 + u64::from(hdr.len), "used length");
                let mut p = vec![0u8; hdr.len as usize];
                self.mem().read_slice(&mut p, GuestAddress(d)).unwrap();
                (hdr, p)
            })
            .collect()
    }

    /// Events the device delivered since the last call (their ids).
    pub fn events(&mut self) -> Vec<Option<u32>> {
        self.used(EVENT_QUEUE)
            .into_iter()
            .map(|(head, len)| {
                let a = self.ev_bufs.remove(&head).expect("a posted event buffer");
                (len == 4).then(|| self.mem().read_obj::<u32>(GuestAddress(a)).unwrap())
            })
            .collect()
    }

    /// The ops of `rx()`'s packets.
    pub fn rx_ops(&mut self) -> Vec<u16> {
        self.rx().iter().map(|(h, _)| h.op).collect()
    }

    /// Receives exactly one packet and checks its op.
    pub fn expect_one(&mut self, want: u16) -> (Header, Vec<u8>) {
        let mut got = self.rx();
        assert_eq!(got.iter().map(|(h, _)| h.op).collect::<Vec<_>>(), vec![want], "{got:?}");
        got.remove(0)
    }

    /// A host-initiated connection to guest port `port`, answered: (host stream, host port).
    pub fn host_connect(&mut self, port: u32) -> (std::os::unix::net::UnixStream, u32) {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.uds).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.post_rx(4);
        self.host_events();
        let (req, _) = self.expect_one(op::REQUEST);
        assert_eq!((req.src_cid, req.dst_cid, req.dst_port), (HOST_CID, self.cid, port));
        let resp = Header { src_cid: self.cid, ..to_host(op::RESPONSE, port, req.src_port) };
        self.send(resp, &[]);
        let mut line = [0u8; 64];
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let n = s.read(&mut line).unwrap();
        assert_eq!(std::str::from_utf8(&line[..n]).unwrap(), format!("OK {}\n", req.src_port));
        (s, req.src_port)
    }
}
