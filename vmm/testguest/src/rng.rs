//! A polling virtio-rng driver over virtio-mmio, run at CPL 3 (no interrupts: the guest
//! polls the used ring). Enough to drive grove-vmm's device end to end: the register file's
//! state machine, a queue the device reads and writes, the QueueNotify ioeventfd, and the
//! buffer the device fills (a page the guest itself never writes).

use grove_testguest::virtio::{self, reg};

use crate::io::{mmio_write32, rdtsc, shared};

/// The driver's state (in guest memory, so it survives snapshot, restore and fork).
pub struct RngDriver {
    base: u64,
    /// Requests made so far (the available ring's index).
    next: u16,
}

impl RngDriver {
    fn w(&self, off: u64, v: u32) {
        mmio_write32(self.base + off, v);
    }

    /// Finds and sets up the device at `base` (virtio 1.2 §3.1.1).
    pub fn init(base: u64) -> Result<Self, &'static str> {
        crate::blk::setup(base, virtio::DEVICE_RNG)?;
        Ok(Self { base, next: 0 })
    }

    /// One request of [`virtio::REQUEST_BYTES`] into the buffer page; returns the length the
    /// device reports and, if `read_back`, the bytes (else the guest never touches the
    /// buffer page: only the device writes it). Gives up after `timeout_ticks` of TSC.
    pub fn request(
        &mut self,
        timeout_ticks: u64,
        read_back: bool,
    ) -> Result<(u32, Option<[u8; 32]>), &'static str> {
        let n = self.next;
        let head = n % virtio::QUEUE_SIZE;
        let d = virtio::desc_addr(head);
        shared::write::<u64>(d, virtio::BUFFER);
        shared::write::<u32>(d + 8, virtio::REQUEST_BYTES);
        shared::write::<u16>(d + 12, virtio::DESC_F_WRITE);
        shared::write::<u16>(d + 14, 0);
        shared::write::<u16>(virtio::avail_entry(n), head);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        self.next = n.wrapping_add(1);
        shared::write::<u16>(virtio::AVAIL_RING + 2, self.next);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        self.w(reg::QUEUE_NOTIFY, 0);
        let start = rdtsc();
        while shared::read::<u16>(virtio::USED_RING + 2) != self.next {
            if rdtsc().wrapping_sub(start) > timeout_ticks {
                return Err("virtio-rng did not answer");
            }
            core::hint::spin_loop();
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        let e = virtio::used_elem(n);
        if shared::read::<u32>(e) != u32::from(head) {
            return Err("virtio-rng returned another descriptor");
        }
        let len = shared::read::<u32>(e + 4);
        if !read_back {
            return Ok((len, None));
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = shared::read::<u8>(virtio::BUFFER + i as u64);
        }
        Ok((len, Some(out)))
    }
}

/// Prints `RNG n=<len>`, then ` <64 hex digits>` if the bytes were read back.
pub fn print_result(len: u32, bytes: Option<&[u8; 32]>) {
    crate::print!("RNG n={}", len);
    if let Some(bytes) = bytes {
        crate::print!(" ");
        for b in bytes {
            crate::print!("{:02x}", b);
        }
    }
    crate::print!("\n");
}
