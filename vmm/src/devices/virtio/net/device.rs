//! The virtio-net device: feature negotiation, configuration space, the transmit path (guest
//! chains to the backend) and the receive path (backend frames into guest chains, merged
//! across several when MRG_RXBUF was negotiated).

use std::sync::Arc;
use std::time::Instant;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1 as F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::frame::{
    check_tx_header, fix_rx_header, parse_rx_chain, read_tx_chain, FrameError, VnetHeader,
};
use super::metrics::NetMetrics;
use super::rate_limiter::RateLimiter;
use super::tap::{Backend, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN};
use super::{
    NetConfig, RateLimit, BUDGET, DEFAULT_QUEUE_SIZE, MAX_BUFFER_LEN, RX_QUEUE, TX_QUEUE,
    VNET_HDR_LEN,
};
use crate::devices::virtio::{
    device_type, ActivateError, IrqKind, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::memory::{GuestMemory, GuestRam};

const fn bit(f: u32) -> u64 {
    1u64 << f
}

/// Offloads offered with `offload=on`.
const OFFLOAD_FEATURES: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN);

/// What the guest sees of a device and the host limits it runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetParams {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// MTU offered to the guest (VIRTIO_NET_F_MTU), if any.
    pub mtu: Option<u16>,
    /// Size of each queue.
    pub queue_size: u16,
    /// Checksum and segmentation offloads offered.
    pub offload: bool,
    /// Guest-bound limits.
    pub rx: RateLimit,
    /// Guest-sent limits.
    pub tx: RateLimit,
}

impl NetParams {
    /// A fresh boot's parameters from the command line (defaults for what it leaves out).
    pub fn boot(c: &NetConfig) -> Self {
        Self {
            mac: c.boot_mac(),
            mtu: c.mtu,
            queue_size: c.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE),
            offload: c.offload.unwrap_or(true),
            rx: c.rx,
            tx: c.tx,
        }
    }
}

/// What became of a frame offered to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rx {
    /// In the guest's buffers.
    Delivered,
    /// Not enough buffers: the frame waits, the chains stay available.
    NoBuffers,
    /// Dropped (counted).
    Dropped,
}

/// The virtio-net device.
pub struct Net {
    mem: Arc<GuestRam>,
    pub(super) params: NetParams,
    queue_sizes: [u16; 2],
    avail_features: u64,
    pub(super) acked_features: u64,
    pub(super) queues: Vec<Queue>,
    pub(super) queue_evts: [EventFd; 2],
    pub(super) interrupt: Option<Arc<IrqTrigger>>,
    pub(super) backend: Box<dyn Backend>,
    pub(super) rx_limiter: RateLimiter,
    pub(super) tx_limiter: RateLimiter,
    /// A frame read from the backend, header included.
    rx_buf: Vec<u8>,
    /// Length of the frame in `rx_buf` waiting for the guest.
    rx_len: Option<usize>,
    tx_buf: Vec<u8>,
    /// Receive chains held for the waiting frame: their buffers, and per chain (head, first
    /// buffer, end, room).
    rx_bufs: Vec<(GuestAddress, u32)>,
    rx_chains: Vec<(u16, usize, usize, usize)>,
    paused: bool,
    pub(super) metrics: Arc<NetMetrics>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("backend", &self.backend.describe())
            .field("activated", &self.is_activated())
            .finish_non_exhaustive()
    }
}

impl Net {
    /// A device over `mem` with `params`, moving frames through `backend`; not activated.
    pub fn new(
        mem: Arc<GuestRam>,
        params: NetParams,
        backend: Box<dyn Backend>,
    ) -> std::io::Result<Self> {
        let mut avail = VIRTIO_F_VERSION_1
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_RING_F_EVENT_IDX);
        debug_assert_eq!(VIRTIO_F_VERSION_1, bit(F_VERSION_1));
        if params.offload {
            avail |= OFFLOAD_FEATURES;
        }
        if params.mtu.is_some() {
            avail |= bit(VIRTIO_NET_F_MTU);
        }
        let evt = || EventFd::new(libc::EFD_NONBLOCK);
        Ok(Self {
            mem,
            queue_sizes: [params.queue_size; 2],
            avail_features: avail,
            acked_features: 0,
            queues: Vec::new(),
            queue_evts: [evt()?, evt()?],
            interrupt: None,
            backend,
            rx_limiter: RateLimiter::new(params.rx)?,
            tx_limiter: RateLimiter::new(params.tx)?,
            rx_buf: vec![0; MAX_BUFFER_LEN + 64],
            rx_len: None,
            tx_buf: vec![0; MAX_BUFFER_LEN],
            rx_bufs: Vec::new(),
            rx_chains: Vec::new(),
            paused: false,
            metrics: Arc::default(),
            params,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// Guest memory.
    pub fn mem(&self) -> &Arc<GuestRam> {
        &self.mem
    }

    /// What the guest sees and the limits.
    pub fn params(&self) -> &NetParams {
        &self.params
    }

    /// The backend (for its link state).
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// Whether a frame read from the backend waits for guest buffers.
    pub fn has_pending_frame(&self) -> bool {
        self.rx_len.is_some()
    }

    /// The tap offloads matching the receive features the guest accepted.
    pub fn tun_offloads(features: u64) -> u32 {
        let mut f = 0;
        if features & bit(VIRTIO_NET_F_GUEST_CSUM) != 0 {
            f |= TUN_F_CSUM;
            if features & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
                f |= TUN_F_TSO4;
            }
            if features & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
                f |= TUN_F_TSO6;
            }
            if f & (TUN_F_TSO4 | TUN_F_TSO6) != 0 && features & bit(VIRTIO_NET_F_GUEST_ECN) != 0 {
                f |= TUN_F_TSO_ECN;
            }
        }
        f
    }

    fn signal_used(&mut self, q: usize) {
        let mem = self.mem.clone();
        let notify = self.queues[q].needs_notification(mem.mem()).unwrap_or(true);
        if let (true, Some(irq)) = (notify, &self.interrupt) {
            let _ = irq.trigger(IrqKind::Vring);
        }
    }

    /// Sends what the guest queued for transmission, at most [`BUDGET`] frames (then it asks
    /// the event loop for another turn); stops while the transmit limiter says wait. Returns
    /// whether any chain was used. Does not look at the pause (the pause path calls it).
    pub fn serve_tx(&mut self) -> bool {
        if !self.is_activated() || self.tx_limiter.is_blocked() {
            return false;
        }
        let mem = self.mem.clone();
        let m = mem.mem();
        let features = self.acked_features;
        let mut used = 0usize;
        // One look again after asking for notifications, per chain taken: a ring whose index
        // the guest made inconsistent gives no chain yet never looks empty.
        let mut rechecked = false;
        loop {
            if used == BUDGET {
                let _ = self.queue_evts[TX_QUEUE].write(1);
                break;
            }
            let Some(chain) = self.queues[TX_QUEUE].pop_descriptor_chain(m) else {
                // Ask for a notification for the next chain; one may have come meanwhile.
                if !rechecked && matches!(self.queues[TX_QUEUE].enable_notification(m), Ok(true)) {
                    rechecked = true;
                    continue;
                }
                break;
            };
            rechecked = false;
            let head = chain.head_index();
            let frame = read_tx_chain(m, chain, &mut self.tx_buf).and_then(|n| {
                let h = VnetHeader::parse(&self.tx_buf[..n]).ok_or(FrameError::Short(n))?;
                check_tx_header(&h, n - VNET_HDR_LEN, features).map(|()| n)
            });
            match frame {
                Ok(n) => {
                    let bytes = (n - VNET_HDR_LEN) as u64;
                    if !self.tx_limiter.check(bytes, Instant::now()) {
                        // Not yet: the chain goes back; the limiter's timer brings us back.
                        self.queues[TX_QUEUE].go_to_previous_position();
                        NetMetrics::add(&self.metrics.tx_throttled, 1);
                        break;
                    }
                    self.tx_limiter.charge(bytes);
                    match self.backend.send(&self.tx_buf[..n]) {
                        Ok(_) => {
                            NetMetrics::add(&self.metrics.tx_frames, 1);
                            NetMetrics::add(&self.metrics.tx_bytes, bytes);
                        }
                        Err(_) => NetMetrics::add(&self.metrics.tx_tap_errors, 1),
                    }
                }
                Err(_) => NetMetrics::add(&self.metrics.tx_bad_chains, 1),
            }
            // The device writes nothing into transmit buffers: used length 0.
            if self.queues[TX_QUEUE].add_used(m, head, 0).is_err() {
                NetMetrics::add(&self.metrics.queue_errors, 1);
                break;
            }
            used += 1;
        }
        if used > 0 {
            self.signal_used(TX_QUEUE);
        }
        used > 0
    }

    /// Offers the frame in `rx_buf[..len]` to the guest: takes as many receive chains as it
    /// needs (one without MRG_RXBUF), fills them and returns them used. When the guest has not
    /// given enough, the chains taken so far are held for this frame (popped, not used: the
    /// guest's next buffers then raise a notification) and the frame waits.
    fn deliver(&mut self, m: &GuestMemory, len: usize) -> Rx {
        let features = self.acked_features;
        let mergeable = features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let Some(mut hdr) = VnetHeader::parse(&self.rx_buf[..len]) else {
            NetMetrics::add(&self.metrics.rx_bad_frames, 1);
            return Rx::Dropped;
        };
        if len < VNET_HDR_LEN + 14 || fix_rx_header(&mut hdr, features).is_err() {
            NetMetrics::add(&self.metrics.rx_bad_frames, 1);
            return Rx::Dropped;
        }
        // The smallest chain worth holding: a header (MRG_RXBUF), else a header and a frame.
        let min = if mergeable { VNET_HDR_LEN } else { VNET_HDR_LEN + 14 };
        let q = &mut self.queues[RX_QUEUE];
        let mut room: usize = self.rx_chains.iter().map(|c| c.3).sum();
        if !mergeable && room > 0 && room < len {
            // The held chain is too small for this frame (it stays for the next one).
            NetMetrics::add(&self.metrics.rx_too_big, 1);
            return Rx::Dropped;
        }
        while room < len {
            let Some(chain) = q.pop_descriptor_chain(m) else {
                return Rx::NoBuffers;
            };
            let head = chain.head_index();
            let first = self.rx_bufs.len();
            match parse_rx_chain(m, chain, &mut self.rx_bufs) {
                // With MRG_RXBUF every buffer holds at least a header (virtio 1.2 §5.1.6.3).
                Ok(n) if n >= min => {
                    self.rx_chains.push((head, first, self.rx_bufs.len(), n));
                    room += n;
                    if !mergeable && n < len {
                        // Larger than this guest's buffers: dropped; the chain is held for the
                        // next frame.
                        NetMetrics::add(&self.metrics.rx_too_big, 1);
                        return Rx::Dropped;
                    }
                }
                _ => {
                    self.rx_bufs.truncate(first);
                    NetMetrics::add(&self.metrics.rx_bad_chains, 1);
                    let mut ok = q.add_used(m, head, 0).is_ok();
                    let dropped = !self.rx_chains.is_empty();
                    if dropped {
                        // The chains held for this frame are not consecutive with the next
                        // ones any more: return them empty and drop the frame.
                        for &(h, ..) in &self.rx_chains {
                            ok &= q.add_used(m, h, 0).is_ok();
                        }
                        self.rx_chains.clear();
                        self.rx_bufs.clear();
                        NetMetrics::add(&self.metrics.rx_dropped, 1);
                    }
                    if !ok {
                        NetMetrics::add(&self.metrics.queue_errors, 1);
                    }
                    if dropped || !ok {
                        return Rx::Dropped;
                    }
                }
            }
        }
        hdr.num_buffers = u16::try_from(self.rx_chains.len()).unwrap_or(u16::MAX);
        hdr.write(&mut self.rx_buf[..VNET_HDR_LEN]);
        let mut off = 0usize;
        for &(head, a, b, cap) in &self.rx_chains {
            let share = (len - off).min(cap);
            let mut done = 0usize;
            for &(addr, blen) in &self.rx_bufs[a..b] {
                if done == share {
                    break;
                }
                let n = (blen as usize).min(share - done);
                let src = &self.rx_buf[off + done..off + done + n];
                if m.write_slice(src, addr).is_err() {
                    NetMetrics::add(&self.metrics.queue_errors, 1);
                }
                done += n;
            }
            off += share;
            let used = u32::try_from(share).unwrap_or(u32::MAX);
            if q.add_used(m, head, used).is_err() {
                NetMetrics::add(&self.metrics.queue_errors, 1);
            }
        }
        self.rx_chains.clear();
        self.rx_bufs.clear();
        NetMetrics::add(&self.metrics.rx_frames, 1);
        NetMetrics::add(&self.metrics.rx_bytes, (len - VNET_HDR_LEN) as u64);
        Rx::Delivered
    }

    /// Receive chains popped and held for a waiting frame (not returned to the guest yet).
    pub fn held_rx_chains(&self) -> u16 {
        u16::try_from(self.rx_chains.len()).unwrap_or(u16::MAX)
    }

    /// Moves frames from the backend into the guest, at most [`BUDGET`] per call (then it asks
    /// the event loop for another turn). Stops when the backend has nothing, the guest has no
    /// buffers (the frame waits; the guest's next notification brings us back) or the
    /// receive limiter says wait (its timer brings us back). Does not look at the pause.
    pub fn serve_rx(&mut self) -> bool {
        if !self.is_activated() || self.rx_limiter.is_blocked() {
            return false;
        }
        let mem = self.mem.clone();
        let m = mem.mem();
        let mut delivered = 0usize;
        let mut used_any = false;
        let mut rechecked = false;
        loop {
            if delivered == BUDGET {
                let _ = self.queue_evts[RX_QUEUE].write(1);
                break;
            }
            let len = match self.rx_len {
                Some(l) => l,
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(n) => n.min(MAX_BUFFER_LEN),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        NetMetrics::add(&self.metrics.rx_tap_errors, 1);
                        break;
                    }
                },
            };
            self.rx_len = Some(len);
            let bytes = len.saturating_sub(VNET_HDR_LEN) as u64;
            if !self.rx_limiter.check(bytes, Instant::now()) {
                NetMetrics::add(&self.metrics.rx_throttled, 1);
                break;
            }
            match self.deliver(m, len) {
                Rx::Delivered => {
                    self.rx_limiter.charge(bytes);
                    self.rx_len = None;
                    delivered += 1;
                    used_any = true;
                    rechecked = false;
                }
                Rx::Dropped => {
                    // Counts against the budget too: a guest's bad chains cannot keep us here.
                    self.rx_len = None;
                    delivered += 1;
                    used_any = true;
                    rechecked = false;
                }
                Rx::NoBuffers => {
                    // Ask for a notification when the guest adds buffers (every available chain
                    // is taken, so the next one raises it); it may have added one already. One
                    // look again only: a ring whose index the guest made inconsistent gives no
                    // chain yet never looks empty.
                    if !rechecked
                        && matches!(self.queues[RX_QUEUE].enable_notification(m), Ok(true))
                    {
                        rechecked = true;
                        continue;
                    }
                    break;
                }
            }
        }
        if used_any {
            self.signal_used(RX_QUEUE);
        }
        used_any
    }

    /// Receive work from the event loop: the backend is readable, the guest added buffers, or
    /// the limiter's timer fired. Nothing while the VM is paused.
    pub fn process_rx(&mut self) {
        if !self.paused {
            self.serve_rx();
        }
    }

    /// Transmit work from the event loop; nothing while the VM is paused.
    pub fn process_tx(&mut self) {
        if !self.paused {
            self.serve_tx();
        }
    }

    /// Whether the device is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The queue eventfds (tests).
    pub fn queue_evt(&self, q: usize) -> &EventFd {
        &self.queue_evts[q]
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], status, max_virtqueue_pairs (1), mtu: virtio 1.2 §5.1.4.
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&self.params.mac);
        cfg[6..8].copy_from_slice(&u16::try_from(VIRTIO_NET_S_LINK_UP).unwrap_or(1).to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[10..12].copy_from_slice(&self.params.mtu.unwrap_or(0).to_le_bytes());
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else { return };
        if let Some(src) = cfg.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, _: u64, _: &[u8]) {
        // Read-only for a VERSION_1 device without CTRL_MAC_ADDR.
    }

    fn activate(
        &mut self,
        mut queues: Vec<Queue>,
        interrupt: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError> {
        if self.is_activated() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != 2 {
            return Err(ActivateError::QueueCount { got: queues.len(), want: 2 });
        }
        for (i, q) in queues.iter_mut().enumerate() {
            if !q.is_valid(self.mem.mem()) {
                return Err(ActivateError::BadQueue(i));
            }
            q.set_event_idx(self.acked_features & bit(VIRTIO_RING_F_EVENT_IDX) != 0);
        }
        self.queues = queues;
        self.interrupt = Some(interrupt);
        if self.backend.set_offload(Self::tun_offloads(self.acked_features)).is_err() {
            NetMetrics::add(&self.metrics.offload_errors, 1);
        }
        // Frames may have arrived before: the event loop looks at once.
        let _ = self.queue_evts[RX_QUEUE].write(1);
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.interrupt.is_some()
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn reset(&mut self) {
        self.queues.clear();
        self.interrupt = None;
        self.rx_len = None;
        self.rx_chains.clear();
        self.rx_bufs.clear();
        self.rx_limiter.unblock();
        self.tx_limiter.unblock();
        if self.backend.set_offload(0).is_err() {
            NetMetrics::add(&self.metrics.offload_errors, 1);
        }
        for e in &self.queue_evts {
            let _ = e.read();
        }
    }

    fn process_pending(&mut self) {
        // Everything the guest queued for sending goes out now (or stays queued in its ring,
        // saved with it, while the limiter holds it). A frame read from the backend and not
        // delivered yet stays with this VM only: it is not part of the saved state.
        for e in &self.queue_evts {
            let _ = e.read();
        }
        if self.is_activated() {
            while self.serve_tx() {
                let _ = self.queue_evts[TX_QUEUE].read();
            }
        }
    }

    fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
        if !paused {
            // Work that arrived while paused (edge-triggered backend, notifications).
            for e in &self.queue_evts {
                let _ = e.write(1);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::net::UnixDatagram;
    use std::sync::atomic::{AtomicU32, Ordering};

    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    use super::*;
    use crate::devices::virtio::net::frame::{F_DATA_VALID, F_NEEDS_CSUM, GSO_TCPV4};
    use crate::devices::virtio::net::tap::SocketBackend;
    use crate::devices::virtio::net::{Bucket, DEFAULT_MAC};

    pub(crate) const MIB: u64 = 1 << 20;
    /// Queue size of the mock drivers.
    pub(crate) const QS: u16 = 16;
    /// Where the receive rings are; the transmit rings follow at +64 KiB; buffers from 2 MiB.
    pub(crate) const RX_RINGS: u64 = MIB;
    pub(crate) const TX_RINGS: u64 = MIB + 0x1_0000;

    pub(crate) fn ram() -> Arc<GuestRam> {
        Arc::new(GuestRam::new_anonymous(8 * MIB).unwrap())
    }

    pub(crate) fn params() -> NetParams {
        NetParams {
            mac: DEFAULT_MAC,
            mtu: Some(1500),
            queue_size: QS,
            offload: true,
            rx: RateLimit::default(),
            tx: RateLimit::default(),
        }
    }

    pub(crate) const BASE: u64 = VIRTIO_F_VERSION_1;
    pub(crate) const MRG: u64 = bit(VIRTIO_NET_F_MRG_RXBUF);

    /// A device over a socket-pair backend: (device, the peer end, its interrupt, the offload
    /// flags it gave the backend).
    pub(crate) fn device(
        ram: &Arc<GuestRam>,
        features: u64,
        p: NetParams,
    ) -> (Net, UnixDatagram, Arc<IrqTrigger>, Arc<AtomicU32>) {
        let (b, peer) = SocketBackend::pair().unwrap();
        let off = b.offload();
        let mut n = Net::new(ram.clone(), p, Box::new(b)).unwrap();
        n.set_acked_features(features);
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), 0));
        (n, peer, irq, off)
    }

    /// A mock driver's two queues over `ram`.
    pub(crate) fn rings(
        ram: &GuestRam,
    ) -> (MockSplitQueue<'_, GuestMemory>, MockSplitQueue<'_, GuestMemory>) {
        (
            MockSplitQueue::create(ram.mem(), GuestAddress(RX_RINGS), QS),
            MockSplitQueue::create(ram.mem(), GuestAddress(TX_RINGS), QS),
        )
    }

    pub(crate) fn activate(
        n: &mut Net,
        rx: &MockSplitQueue<'_, GuestMemory>,
        tx: &MockSplitQueue<'_, GuestMemory>,
        irq: &Arc<IrqTrigger>,
    ) {
        n.activate(vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()], irq.clone())
            .unwrap();
    }

    /// Adds one chain of `(address, length, device-writable)` buffers at descriptor-table index
    /// `*next` and makes it available.
    pub(crate) fn add_chain(
        mq: &MockSplitQueue<'_, GuestMemory>,
        next: &mut u16,
        bufs: &[(u64, u32, bool)],
    ) {
        let n = u16::try_from(bufs.len()).unwrap();
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, w))| {
                let i = u16::try_from(i).unwrap();
                let mut flags = if w { VRING_DESC_F_WRITE } else { 0 };
                if i + 1 < n {
                    flags |= VRING_DESC_F_NEXT;
                }
                RawDescriptor::from(SplitDescriptor::new(a, l, flags as u16, *next + i + 1))
            })
            .collect();
        mq.add_desc_chains(&descs, *next).unwrap();
        *next += n;
    }

    /// A header and an Ethernet frame of `len` bytes (a counting pattern after the header).
    pub(crate) fn frame(h: VnetHeader, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; VNET_HDR_LEN + len];
        h.write(&mut v);
        for (i, b) in v[VNET_HDR_LEN..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        v
    }

    fn put(ram: &GuestRam, addr: u64, bytes: &[u8]) {
        ram.mem().write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    pub(crate) fn get(ram: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        ram.mem().read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn used(mq: &MockSplitQueue<'_, GuestMemory>, i: usize) -> (u32, u32) {
        let e = mq.used().ring().ref_at(i).unwrap().load();
        (e.id(), e.len())
    }

    fn recv_all(peer: &UnixDatagram) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut b = vec![0u8; MAX_BUFFER_LEN + 16];
        while let Ok(n) = peer.recv(&mut b) {
            out.push(b[..n].to_vec());
        }
        out
    }

    const B: u64 = 2 * MIB;

    #[test]
    fn transmit_sends_good_frames_and_refuses_malformed_chains() {
        let ram = ram();
        let (rx, tx) = rings(&ram);
        let features = BASE | MRG | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4);
        let (mut n, peer, irq, _) = device(&ram, features, params());
        activate(&mut n, &rx, &tx, &irq);
        let plain = frame(VnetHeader::default(), 60);
        let csum = VnetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..VnetHeader::default()
        };
        let tso = VnetHeader {
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            hdr_len: 54,
            csum_offset: 16,
            ..csum
        };
        let big = frame(tso, 20_000);
        put(&ram, B, &plain);
        put(&ram, B + 0x1000, &big);
        put(
            &ram,
            B + 0x10_000,
            &frame(VnetHeader { flags: F_DATA_VALID, ..VnetHeader::default() }, 60),
        );
        put(
            &ram,
            B + 0x11_000,
            &frame(VnetHeader { gso_type: GSO_TCPV4, ..VnetHeader::default() }, 60),
        );
        let mut next = 0;
        // 0: header and frame in two buffers.
        add_chain(&tx, &mut next, &[(B, 12, false), (B + 12, 60, false)]);
        // 1: a device-writable buffer.
        add_chain(&tx, &mut next, &[(B, 12, false), (B + 12, 60, true)]);
        // 2: outside guest memory (and across the end of it).
        add_chain(&tx, &mut next, &[(B, 12, false), (8 * MIB - 8, 60, false)]);
        // 3: a TSO frame over three buffers.
        add_chain(
            &tx,
            &mut next,
            &[
                (B + 0x1000, 5000, false),
                (B + 0x1000 + 5000, 10_000, false),
                (B + 0x1000 + 15_000, 5012, false),
            ],
        );
        // 4: longer than a header and the largest frame.
        add_chain(&tx, &mut next, &[(B, 40_000, false), (B, 40_000, false)]);
        // 5: flags the driver may not set.
        add_chain(&tx, &mut next, &[(B + 0x10_000, 72, false)]);
        // 6: GSO without NEEDS_CSUM and gso_size.
        add_chain(&tx, &mut next, &[(B + 0x11_000, 72, false)]);
        // 7: shorter than the two headers.
        add_chain(&tx, &mut next, &[(B, 20, false)]);
        assert!(n.serve_tx());
        let sent = recv_all(&peer);
        assert_eq!(sent.len(), 2, "only the two good frames reach the backend");
        assert_eq!(sent[0], plain);
        assert_eq!(sent[1], big);
        assert_eq!(tx.used().idx().load(), 8, "every chain is returned");
        for i in 0..8 {
            assert_eq!(used(&tx, i).1, 0, "transmit chains are returned with length 0");
        }
        let m = n.metrics().snapshot();
        assert_eq!((m.tx_frames, m.tx_bytes, m.tx_bad_chains), (2, 60 + 20_000, 6));
        assert_eq!(irq.status(), IrqKind::Vring as u32);
    }

    #[test]
    fn transmit_refuses_loops_and_bad_next_indexes() {
        let ram = ram();
        let (rx, tx) = rings(&ram);
        let (mut n, peer, irq, _) = device(&ram, BASE, params());
        activate(&mut n, &rx, &tx, &irq);
        put(&ram, B, &frame(VnetHeader::default(), 60));
        let t = tx.desc_table();
        let d = |a, l, f, nx| RawDescriptor::from(SplitDescriptor::new(a, l, f as u16, nx));
        t.store(0, d(B, 36, VRING_DESC_F_NEXT, 1)).unwrap();
        t.store(1, d(B + 36, 36, VRING_DESC_F_NEXT, 0)).unwrap();
        t.store(2, d(B, 36, VRING_DESC_F_NEXT, 999)).unwrap();
        t.store(3, d(B, 72, 0, 0)).unwrap();
        for (i, head) in [0u16, 2, 3].iter().enumerate() {
            tx.avail().ring().ref_at(i).unwrap().store(*head);
        }
        tx.avail().idx().store(3);
        assert!(n.serve_tx());
        assert_eq!(recv_all(&peer).len(), 1, "only the terminated chain is sent");
        assert_eq!(tx.used().idx().load(), 3);
        assert_eq!(n.metrics().snapshot().tx_bad_chains, 2);
    }

    /// A guest that sets an available index more than a queue ahead gives no chain, yet the
    /// ring never looks empty: both paths return (found by the fuzzer as a hang).
    #[test]
    fn an_inconsistent_available_index_does_not_hang() {
        let ram = ram();
        let (rx, tx) = rings(&ram);
        let (mut n, peer, irq, _) = device(&ram, BASE | bit(VIRTIO_RING_F_EVENT_IDX), params());
        activate(&mut n, &rx, &tx, &irq);
        tx.avail().idx().store(QS + 5);
        rx.avail().idx().store(QS + 5);
        assert!(!n.serve_tx());
        peer.send(&frame(VnetHeader::default(), 60)).unwrap();
        assert!(!n.serve_rx());
        assert!(n.has_pending_frame());
        assert_eq!((tx.used().idx().load(), rx.used().idx().load()), (0, 0));
    }

    #[test]
    fn receive_fills_one_chain_without_mrg_rxbuf() {
        let ram = ram();
        let (rx, tx) = rings(&ram);
        let (mut n, peer, irq, off) = device(&ram, BASE, params());
        activate(&mut n, &rx, &tx, &irq);
        assert_eq!(off.load(Ordering::SeqCst), 0, "no receive offloads accepted");
        let mut next = 0;
        add_chain(&rx, &mut next, &[(B, 1526, true)]);
        add_chain(&rx, &mut next, &[(B + 0x1000, 100, true), (B + 0x2000, 1426, true)]);
        let f1 =
            frame(VnetHeader { flags: F_DATA_VALID, num_buffers: 7, ..VnetHeader::default() }, 100);
        let f2 = frame(VnetHeader::default(), 1514);
        peer.send(&f1).unwrap();
        peer.send(&f2).unwrap();
        assert!(n.serve_rx());
        assert_eq!(rx.used().idx().load(), 2);
        assert_eq!(used(&rx, 0), (0, 112));
        assert_eq!(used(&rx, 1), (1, 1526));
        let h = VnetHeader::parse(&get(&ram, B, 12)).unwrap();
        assert_eq!((h.flags, h.num_buffers), (0, 1), "no GUEST_CSUM: flags cleared; one buffer");
        assert_eq!(get(&ram, B + 12, 100), f1[12..]);
        let mut got = get(&ram, B + 0x1000, 100);
        got.extend(get(&ram, B + 0x2000, 1426));
        assert_eq!(got[12..], f2[12..], "split over the chain's two buffers");
        let m = n.metrics().snapshot();
        assert_eq!((m.rx_frames, m.rx_bytes), (2, 1614));
        assert_eq!(irq.status(), IrqKind::Vring as u32);
        // Pages the device wrote are in the VMM's dirty bitmap (the next diff snapshot).
        let dirty = ram.take_vmm_dirty(0);
        let page = |a: u64| dirty[(a / 4096 / 64) as usize] & (1 << ((a / 4096) % 64)) != 0;
        assert!(page(B) && page(B + 0x2000));
    }

    #[test]
    fn a_large_frame_is_merged_over_several_chains_or_waits_for_them() {
        let ram = ram();
        let (rx, tx) = rings(&ram);
        let features = BASE | MRG | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4);
        let (mut n, peer, irq, off) = device(&ram, features, params());
        activate(&mut n, &rx, &tx, &irq);
        assert_eq!(off.load(Ordering::SeqCst), TUN_F_CSUM | TUN_F_TSO4);
        let mut next = 0;
        add_chain(&rx, &mut next, &[(B, 1024, true)]);
        let f = frame(
            VnetHeader {
                flags: F_NEEDS_CSUM,
                csum_start: 34,
                csum_offset: 16,
                ..VnetHeader::default()
            },
            2500,
        );
        peer.send(&f).unwrap();
        assert!(!n.serve_rx(), "one chain is not enough: nothing used");
        assert!(n.has_pending_frame());
        assert_eq!(rx.used().idx().load(), 0);
        assert_eq!(n.held_rx_chains(), 1, "the chain is held for the frame");
        add_chain(&rx, &mut next, &[(B + 0x1000, 1024, true)]);
        add_chain(&rx, &mut next, &[(B + 0x2000, 1024, true)]);
        assert!(n.serve_rx());
        assert!(!n.has_pending_frame());
        assert_eq!(rx.used().idx().load(), 3);
        assert_eq!([used(&rx, 0), used(&rx, 1), used(&rx, 2)], [(0, 1024), (1, 1024), (2, 464)]);
        let h = VnetHeader::parse(&get(&ram, B, 12)).unwrap();
        assert_eq!((h.flags, h.num_buffers, h.csum_start), (F_NEEDS_CSUM, 3, 34));
        let mut got = get(&ram, B, 1024);
        got.extend(get(&ram, B + 0x1000, 1024));
        got.extend(get(&ram, B + 0x2000, 464));
        assert_eq!(got[12..], f[12..]);
    }

    #[test]
    fn bad_receive_chains_are_returned_empty_and_too_big_frames_dropped() {
        let ram = ram();
        let (rx, tx) = rings(&ram);
        let (mut n, peer, irq, _) = device(&ram, BASE, params());
        activate(&mut n, &rx, &tx, &irq);
        let mut next = 0;
        add_chain(&rx, &mut next, &[(B, 1526, false)]); // device-readable
        add_chain(&rx, &mut next, &[(8 * MIB - 100, 1526, true)]); // outside memory
        add_chain(&rx, &mut next, &[(B + 0x1000, 200, true)]); // too small for the next frame
        peer.send(&frame(VnetHeader::default(), 1000)).unwrap();
        peer.send(&frame(VnetHeader::default(), 100)).unwrap();
        peer.send(&[0u8; 5]).unwrap(); // shorter than a header
        assert!(n.serve_rx());
        // The first frame: two bad chains returned empty, then dropped at the small chain,
        // which the second frame then gets.
        assert_eq!(rx.used().idx().load(), 3);
        assert_eq!([used(&rx, 0), used(&rx, 1), used(&rx, 2)], [(0, 0), (1, 0), (2, 112)]);
        let m = n.metrics().snapshot();
        assert_eq!((m.rx_bad_chains, m.rx_too_big, m.rx_frames, m.rx_bad_frames), (2, 1, 1, 1));
        assert!(!n.has_pending_frame());
    }

    #[test]
    fn a_bad_chain_inside_a_merged_frame_drops_the_frame_only() {
        let ram = ram();
        let (rx, tx) = rings(&ram);
        let (mut n, peer, irq, _) = device(&ram, BASE | MRG, params());
        activate(&mut n, &rx, &tx, &irq);
        let mut next = 0;
        add_chain(&rx, &mut next, &[(B, 1024, true)]);
        add_chain(&rx, &mut next, &[(B + 0x1000, 8, true)]); // shorter than a header
        add_chain(&rx, &mut next, &[(B + 0x2000, 1024, true)]);
        peer.send(&frame(VnetHeader::default(), 1500)).unwrap();
        peer.send(&frame(VnetHeader::default(), 60)).unwrap();
        assert!(n.serve_rx());
        assert_eq!(rx.used().idx().load(), 3);
        assert_eq!([used(&rx, 0), used(&rx, 1), used(&rx, 2)], [(1, 0), (0, 0), (2, 72)]);
        let m = n.metrics().snapshot();
        assert_eq!((m.rx_bad_chains, m.rx_dropped, m.rx_frames), (1, 1, 1));
    }

    #[test]
    fn a_frame_rate_limit_holds_transmits_until_its_timer() {
        let ram = ram();
        let (rx, tx) = rings(&ram);
        let mut p = params();
        p.tx.frames = Some(Bucket { rate: 20, burst: 2 });
        let (mut n, peer, irq, _) = device(&ram, BASE, p);
        activate(&mut n, &rx, &tx, &irq);
        put(&ram, B, &frame(VnetHeader::default(), 60));
        let mut next = 0;
        for _ in 0..4 {
            add_chain(&tx, &mut next, &[(B, 72, false)]);
        }
        assert!(n.serve_tx());
        assert_eq!(recv_all(&peer).len(), 2, "the burst");
        assert_eq!(tx.used().idx().load(), 2, "the third chain went back to the ring");
        assert!(!n.serve_tx(), "blocked until the timer fires");
        let mut fds =
            libc::pollfd { fd: n.tx_limiter.timer_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, count 1.
        assert_eq!(unsafe { libc::poll(&raw mut fds, 1, 2000) }, 1);
        assert!(n.tx_limiter.timer_fired());
        assert!(n.serve_tx());
        // 50 ms buy one frame; a slow machine may have taken longer to get here.
        let more = recv_all(&peer).len();
        assert!((1..=2).contains(&more), "{more} frames after the timer");
        assert!(n.metrics().snapshot().tx_throttled >= 1);
    }

    #[test]
    fn a_paused_device_leaves_guest_memory_alone() {
        let ram = ram();
        let (rx, tx) = rings(&ram);
        let (mut n, peer, irq, _) = device(&ram, BASE, params());
        activate(&mut n, &rx, &tx, &irq);
        let mut next = 0;
        add_chain(&rx, &mut next, &[(B, 2048, true)]);
        n.set_paused(true);
        peer.send(&frame(VnetHeader::default(), 60)).unwrap();
        n.process_rx();
        assert_eq!(rx.used().idx().load(), 0);
        let _ = n.queue_evt(RX_QUEUE).read();
        n.set_paused(false);
        assert_eq!(n.queue_evt(RX_QUEUE).read().unwrap(), 1, "resume asks for a turn");
        n.process_rx();
        assert_eq!(rx.used().idx().load(), 1);
    }

    #[test]
    fn config_space_features_and_offloads() {
        let ram = ram();
        let (n, ..) = device(&ram, 0, params());
        let mut c = [0u8; 12];
        n.read_config(0, &mut c);
        assert_eq!(c, [2, 0x67, 0x72, 0, 0, 2, 1, 0, 1, 0, 0xdc, 0x05]);
        let mut tail = [0xffu8; 4];
        n.read_config(10, &mut tail);
        assert_eq!(tail, [0xdc, 0x05, 0, 0], "reads past the end are zero");
        n.read_config(u64::MAX, &mut tail);
        assert_eq!(tail, [0; 4]);
        let f = n.avail_features();
        assert_ne!(f & bit(VIRTIO_NET_F_MTU), 0);
        assert_ne!(f & bit(VIRTIO_NET_F_HOST_TSO4), 0);
        let (plain, ..) = device(&ram, 0, NetParams { offload: false, mtu: None, ..params() });
        let f = plain.avail_features();
        assert_eq!(f & (OFFLOAD_FEATURES | bit(VIRTIO_NET_F_MTU)), 0);
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
        // Receive offloads only with GUEST_CSUM; ECN only with a TSO.
        assert_eq!(Net::tun_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        let all = OFFLOAD_FEATURES;
        assert_eq!(Net::tun_offloads(all), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN);
        let no_tso = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN);
        assert_eq!(Net::tun_offloads(no_tso), TUN_F_CSUM);
    }

    #[test]
    fn activation_checks_reset_and_event_idx() {
        let ram = ram();
        let (rx, tx) = rings(&ram);
        let (mut n, _peer, irq, off) = device(
            &ram,
            BASE | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_NET_F_GUEST_CSUM),
            params(),
        );
        assert!(matches!(
            n.activate(vec![rx.create_queue().unwrap()], irq.clone()),
            Err(ActivateError::QueueCount { got: 1, want: 2 })
        ));
        let not_ready = Queue::new(QS).unwrap();
        assert!(matches!(
            n.activate(vec![rx.create_queue().unwrap(), not_ready], irq.clone()),
            Err(ActivateError::BadQueue(1))
        ));
        activate(&mut n, &rx, &tx, &irq);
        assert!(n.queues().iter().all(QueueT::event_idx_enabled));
        assert_eq!(off.load(Ordering::SeqCst), TUN_F_CSUM);
        assert!(matches!(
            n.activate(vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()], irq),
            Err(ActivateError::AlreadyActive)
        ));
        n.reset();
        assert!(!n.is_activated() && n.queues().is_empty());
        assert_eq!(off.load(Ordering::SeqCst), 0, "offloads withdrawn");
        n.set_acked_features(u64::MAX);
        assert_eq!(n.acked_features(), n.avail_features(), "only offered features stick");
    }

    /// An Ethernet/IPv4/UDP frame from 10.99.0.2:4000 to 10.99.0.1:5000 (IP checksum right,
    /// UDP checksum as given).
    fn udp_frame(dst_mac: [u8; 6], payload: &[u8], udp_csum: u16) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst_mac);
        f.extend_from_slice(&DEFAULT_MAC);
        f.extend_from_slice(&[0x08, 0x00]);
        let total = u16::try_from(20 + 8 + payload.len()).unwrap();
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 99, 0, 2, 10, 99, 0, 1];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let mut sum: u32 = ip.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&4000u16.to_be_bytes());
        f.extend_from_slice(&5000u16.to_be_bytes());
        f.extend_from_slice(&(total - 20).to_be_bytes());
        f.extend_from_slice(&udp_csum.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Sets an IPv4 address/24 on `name` and returns its MAC (SIOCSIFADDR, SIOCSIFNETMASK,
    /// SIOCGIFHWADDR on an AF_INET socket of the calling thread's namespace).
    fn configure(name: &str, ip: [u8; 4]) -> [u8; 6] {
        #[repr(C)]
        struct Req {
            name: [u8; 16],
            data: [u8; 24],
        }
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
        let call = |req: u64, data: [u8; 24]| {
            let mut r = Req { name: [0; 16], data };
            r.name[..name.len()].copy_from_slice(name.as_bytes());
            // SAFETY: the three ioctls read/write a struct ifreq (name, then a 24-byte
            // union), which `r` is laid out as; `fd` is an open socket.
            assert!(unsafe { libc::ioctl(fd, req, &raw mut r) } >= 0, "ioctl {req:#x}");
            r.data
        };
        let sin = |a: [u8; 4]| {
            let mut d = [0u8; 24];
            d[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            d[4..8].copy_from_slice(&a);
            d
        };
        call(0x8916, sin(ip)); // SIOCSIFADDR
        call(0x891c, sin([255, 255, 255, 0])); // SIOCSIFNETMASK
        let hw = call(0x8927, [0; 24]); // SIOCGIFHWADDR
        hw[2..8].try_into().unwrap()
    }

    /// Through a real tap: the kernel honours the virtio-net header the guest sends (a
    /// partial checksum is accepted, a bad full one dropped), and what the kernel sends (here
    /// an ARP request for the guest) reaches the guest's buffers.
    #[test]
    fn a_real_tap_takes_the_header_and_delivers_to_the_guest() {
        use crate::devices::virtio::net::tap::tests::{cannot_run, in_private_netns};
        use crate::devices::virtio::net::tap::Tap;
        if !std::path::Path::new("/dev/net/tun").exists() && cannot_run("no /dev/net/tun") {
            return;
        }
        let r = in_private_netns(|| {
            let tap = Tap::open("gvnet0", None).unwrap();
            tap.set_up().unwrap();
            assert!(tap.wait_running(std::time::Duration::from_secs(5)).unwrap());
            let tap_mac = configure("gvnet0", [10, 99, 0, 1]);
            let server = std::net::UdpSocket::bind("10.99.0.1:5000").unwrap();
            server.set_read_timeout(Some(std::time::Duration::from_millis(500))).unwrap();
            let ram = ram();
            let (rx, tx) = rings(&ram);
            let features = BASE | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM);
            let mut n = Net::new(ram.clone(), params(), Box::new(tap)).unwrap();
            n.set_acked_features(features);
            let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), 0));
            activate(&mut n, &rx, &tx, &irq);
            let partial = VnetHeader {
                flags: F_NEEDS_CSUM,
                csum_start: 34,
                csum_offset: 6,
                ..VnetHeader::default()
            };
            let frames = [
                (partial, udp_frame(tap_mac, b"one", 0xbeef)),
                (VnetHeader::default(), udp_frame(tap_mac, b"two", 0xbeef)),
                (VnetHeader::default(), udp_frame(tap_mac, b"three", 0)),
            ];
            let mut next = 0;
            for (i, (h, f)) in frames.iter().enumerate() {
                let mut b = vec![0u8; VNET_HDR_LEN];
                h.write(&mut b);
                b.extend_from_slice(f);
                let a = B + 0x1000 * i as u64;
                put(&ram, a, &b);
                add_chain(&tx, &mut next, &[(a, u32::try_from(b.len()).unwrap(), false)]);
            }
            assert!(n.serve_tx());
            assert_eq!(n.metrics().snapshot().tx_frames, 3);
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while let Ok((len, from)) = server.recv_from(&mut buf) {
                assert_eq!(from.to_string(), "10.99.0.2:4000");
                got.push(String::from_utf8_lossy(&buf[..len]).to_string());
            }
            assert_eq!(got, ["one", "three"], "partial checksum taken, bad full checksum dropped");
            // The kernel's reply needs the guest's MAC: an ARP request comes to the guest
            // (after whatever IPv6 sends on a new link).
            let mut rnext = 0;
            for i in 0..8 {
                add_chain(&rx, &mut rnext, &[(3 * MIB + 0x1000 * i, 2048, true)]);
            }
            server.send_to(b"reply", "10.99.0.2:4000").unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let arp = loop {
                n.serve_rx();
                let used = usize::from(rx.used().idx().load());
                let found = (0..used).find_map(|i| {
                    let e = rx.used().ring().ref_at(i).unwrap().load();
                    let f = get(&ram, 3 * MIB + 0x1000 * u64::from(e.id()), 12 + 14);
                    (f[24..26] == [0x08, 0x06]).then_some(f)
                });
                if let Some(f) = found {
                    break f;
                }
                assert!(std::time::Instant::now() < deadline, "no ARP request reached the guest");
                std::thread::sleep(std::time::Duration::from_millis(5));
            };
            assert_eq!(&arp[12..18], &[0xff; 6], "broadcast");
            assert_eq!(&arp[18..24], &tap_mac);
            assert_eq!(VnetHeader::parse(&arp).unwrap().num_buffers, 1);
        });
        if let Err(why) = r {
            cannot_run(&why);
        }
    }
}
