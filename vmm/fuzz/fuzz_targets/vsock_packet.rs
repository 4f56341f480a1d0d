//! virtio-vsock packets come from the guest: descriptor tables, rings, chains, headers and
//! payloads are whatever the guest wrote. Any memory contents and queue settings must give
//! handled, refused or answered packets, never a panic or a hang. The host side's `CONNECT`
//! line parser gets the same bytes.
#![no_main]
use std::sync::{Arc, Mutex, OnceLock};

use grove_vmm::devices::virtio::vsock::backend::parse_connect_line;
use grove_vmm::devices::virtio::vsock::device::{Vsock, VsockConfig};
use grove_vmm::devices::virtio::vsock::packet::{check_header, Header, HDR_LEN};
use grove_vmm::devices::virtio::{IrqTrigger, QueueSaved, VirtioDevice};
use grove_vmm::memory::GuestRam;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory the fuzz input is copied into (descriptors, rings, buffers).
const FUZZ_MEM: usize = 64 * 1024;

struct Fixture {
    ram: Arc<GuestRam>,
    dev: Mutex<Vsock>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let ram = Arc::new(GuestRam::new_anonymous(8 << 20).expect("guest memory"));
        let dir = std::env::temp_dir().join(format!("grove-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let uds = dir.join("v.sock");
        let _ = std::fs::remove_file(&uds);
        let dev = Vsock::new(ram.clone(), &VsockConfig { cid: 3, uds }).expect("vsock device");
        Fixture { ram, dev: Mutex::new(dev) }
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = parse_connect_line(data);
    if let Some(h) = data.first_chunk::<HDR_LEN>() {
        let _ = check_header(&Header::from_bytes(h), 3);
    }
    let Some((head, body)) = data.split_first_chunk::<4>() else { return };
    let f = fixture();
    let mem = f.ram.mem();
    mem.write_slice(&[0u8; FUZZ_MEM], GuestAddress(0)).expect("zero");
    mem.write_slice(&body[..body.len().min(FUZZ_MEM)], GuestAddress(0)).expect("copy");
    // Three queues of 1..=256 entries (powers of two) at fixed places in the fuzzed memory.
    let queue = |i: u64, h: u8| {
        QueueSaved {
            max_size: 256,
            size: 1u16 << (h % 9),
            ready: true,
            desc_table: i * 0x4000,
            avail_ring: i * 0x4000 + 0x1000,
            used_ring: i * 0x4000 + 0x2000,
            next_avail: u16::from(head[3]),
            next_used: u16::from(head[3] / 2),
            event_idx: false,
        }
        .to_queue()
    };
    let (Ok(rx), Ok(tx), Ok(ev)) = (queue(0, head[0]), queue(1, head[1]), queue(2, head[2])) else {
        return;
    };
    let Ok(evt) = EventFd::new(libc::EFD_NONBLOCK) else { return };
    let mut dev = f.dev.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if dev.activate(vec![rx, tx, ev], Arc::new(IrqTrigger::new(evt, 0))).is_err() {
        return;
    }
    // At most one queue's worth per call: they return, whatever the rings hold.
    dev.process_tx();
    dev.process_rx();
    dev.process_event_queue();
    dev.process_tx();
    dev.process_rx();
    dev.reset();
});
