//! What the virtio fuzz targets share: guest memory holding the fuzz input, and a queue over
//! it whose size and ring indexes come from the input's first bytes.

use std::sync::{Arc, OnceLock};

use grove_vmm::devices::virtio::{IrqTrigger, QueueSaved, VirtioDevice};
use grove_vmm::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory the fuzz input is copied into (descriptors, rings, buffers).
pub const FUZZ_MEM: usize = 64 * 1024;

/// 8 MiB of guest memory, shared by every run.
pub fn ram() -> &'static Arc<GuestRam> {
    static RAM: OnceLock<Arc<GuestRam>> = OnceLock::new();
    RAM.get_or_init(|| Arc::new(GuestRam::new_anonymous(8 << 20).expect("guest memory")))
}

/// Copies `data` (after its 4-byte head) into guest memory and activates `dev` with one
/// queue: size 1..=256 (powers of two), the descriptor table at 0 and the rings right after
/// it, ring indexes and event-idx from the head. False if the input is too short or the queue is
/// refused.
pub fn activate(dev: &mut dyn VirtioDevice, data: &[u8]) -> bool {
    let Some((head, body)) = data.split_first_chunk::<4>() else { return false };
    let mem = ram().mem();
    mem.write_slice(&[0u8; FUZZ_MEM], GuestAddress(0)).expect("zero");
    mem.write_slice(&body[..body.len().min(FUZZ_MEM)], GuestAddress(0)).expect("copy");
    // The rings packed right after the descriptor table, so that short inputs reach the
    // available ring.
    let size = 1u16 << (head[0] % 9);
    let avail = 16 * u64::from(size);
    let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
    let q = QueueSaved {
        max_size: 256,
        size,
        ready: true,
        desc_table: 0,
        avail_ring: avail,
        used_ring: used,
        next_avail: u16::from(head[1]),
        next_used: u16::from(head[2]),
        event_idx: head[3] & 1 == 1,
    };
    let Ok(queue) = q.to_queue() else { return false };
    let Ok(evt) = EventFd::new(libc::EFD_NONBLOCK) else { return false };
    dev.reset();
    dev.activate(vec![queue], Arc::new(IrqTrigger::new(evt, 0))).is_ok()
}
