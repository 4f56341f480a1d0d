//! virtio-net parses what the guest writes (descriptor tables, rings, transmit chains and
//! their virtio-net headers) and what the tap hands it (frames with a header). Any memory
//! contents, queue settings, negotiated features and backend frames must give sent, delivered,
//! dropped or refused frames, never a panic or a hang.
#![no_main]
use std::sync::{Arc, OnceLock};

use grove_vmm::devices::virtio::net::device::{Net, NetParams};
use grove_vmm::devices::virtio::net::frame::{check_tx_header, VnetHeader};
use grove_vmm::devices::virtio::net::tap::SocketBackend;
use grove_vmm::devices::virtio::net::{RateLimit, DEFAULT_MAC};
use grove_vmm::devices::virtio::{IrqTrigger, QueueSaved, VirtioDevice};
use grove_vmm::memory::GuestRam;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory the fuzz input is copied into (descriptors, rings, buffers).
const FUZZ_MEM: usize = 64 * 1024;

fn queue(size: u16, base: u64, next_avail: u8, event_idx: bool) -> QueueSaved {
    QueueSaved {
        max_size: 256,
        size,
        ready: true,
        desc_table: base,
        avail_ring: base + 0x1000,
        used_ring: base + 0x2000,
        next_avail: u16::from(next_avail),
        next_used: 0,
        event_idx,
    }
}

fuzz_target!(|data: &[u8]| {
    static RAM: OnceLock<Arc<GuestRam>> = OnceLock::new();
    let ram = RAM.get_or_init(|| Arc::new(GuestRam::new_anonymous(8 << 20).expect("guest memory")));
    let Some((head, body)) = data.split_first_chunk::<16>() else { return };
    // The header parser and checker alone, on the first bytes.
    if let Some(h) = VnetHeader::parse(body) {
        let _ = check_tx_header(
            &h,
            usize::from(head[0]) << 8,
            u64::from_le_bytes(head[8..16].try_into().unwrap()),
        );
    }
    let mem = ram.mem();
    mem.write_slice(&[0u8; FUZZ_MEM], GuestAddress(0)).expect("zero");
    mem.write_slice(&body[..body.len().min(FUZZ_MEM)], GuestAddress(0)).expect("copy");
    let size = 1u16 << (head[0] % 9);
    let event_idx = head[3] & 1 == 1;
    let Ok(rxq) = queue(size, 0x3000, head[1], event_idx).to_queue() else { return };
    let Ok(txq) = queue(size, 0, head[2], event_idx).to_queue() else { return };
    let Ok((backend, peer)) = SocketBackend::pair() else { return };
    let params = NetParams {
        mac: DEFAULT_MAC,
        mtu: None,
        queue_size: 256,
        offload: head[4] & 1 == 1,
        rx: RateLimit::default(),
        tx: RateLimit::default(),
    };
    let Ok(mut net) = Net::new(ram.clone(), params, Box::new(backend)) else { return };
    net.set_acked_features(u64::from_le_bytes(head[8..16].try_into().unwrap()));
    let Ok(evt) = EventFd::new(libc::EFD_NONBLOCK) else { return };
    if net.activate(vec![rxq, txq], Arc::new(IrqTrigger::new(evt, 0))).is_err() {
        return;
    }
    // Frames from the "tap": slices of the input, header included, any length up to 9000.
    let n = usize::from(head[5] % 4);
    for i in 0..n {
        let start = (usize::from(head[6]) * 64 + i * 997) % body.len().max(1);
        let len = (usize::from(head[7]) * 37 * (i + 1)) % 9000;
        let end = (start + len).min(body.len());
        let _ = peer.send(&body[start..end]);
    }
    // Each pass handles at most a budget of chains and frames: it returns, whatever the rings
    // hold.
    net.serve_tx();
    net.serve_rx();
    net.serve_rx();
    let mut b = vec![0u8; 70_000];
    while peer.recv(&mut b).is_ok() {}
});
