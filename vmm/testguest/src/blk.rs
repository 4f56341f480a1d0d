//! A polling virtio-blk driver over virtio-mmio, run at CPL 3 (no interrupts: the guest polls
//! the used ring), and the device setup it shares with the virtio-rng driver. One request at
//! a time, three descriptors (header, one data page, status): enough to write a block, flush
//! it and read it back through grove-vmm's device, across snapshot, restore and fork.

use grove_testguest::virtio::{self, reg};

use crate::io::{mmio_read32, mmio_write32, rdtsc, shared};

/// Finds the virtio-mmio device at `base`, checks it is `device_id`, negotiates
/// VIRTIO_F_VERSION_1 only and sets up queue 0 (size [`virtio::QUEUE_SIZE`], rings zeroed) up
/// to DRIVER_OK (virtio 1.2 §3.1.1).
pub fn setup(base: u64, device_id: u32) -> Result<(), &'static str> {
    let r = |off: u64| mmio_read32(base + off);
    let w = |off: u64, v: u32| mmio_write32(base + off, v);
    if r(reg::MAGIC) != virtio::MAGIC || r(reg::VERSION) != 2 {
        return Err("no virtio-mmio 1.x device at the virtio_mmio.device address");
    }
    if r(reg::DEVICE_ID) != device_id {
        return Err("the virtio-mmio device is not of the type asked for (tg.rng / tg.blk)");
    }
    w(reg::STATUS, 0);
    w(reg::STATUS, virtio::ACKNOWLEDGE);
    w(reg::STATUS, virtio::ACKNOWLEDGE | virtio::DRIVER);
    w(reg::DEVICE_FEATURES_SEL, 1);
    if r(reg::DEVICE_FEATURES) & virtio::VERSION_1_HIGH == 0 {
        return Err("the device does not offer VIRTIO_F_VERSION_1");
    }
    w(reg::DRIVER_FEATURES_SEL, 0);
    w(reg::DRIVER_FEATURES, 0);
    w(reg::DRIVER_FEATURES_SEL, 1);
    w(reg::DRIVER_FEATURES, virtio::VERSION_1_HIGH);
    let ok = virtio::ACKNOWLEDGE | virtio::DRIVER | virtio::FEATURES_OK;
    w(reg::STATUS, ok);
    if r(reg::STATUS) & virtio::FEATURES_OK == 0 {
        return Err("the device refused FEATURES_OK");
    }
    w(reg::QUEUE_SEL, 0);
    if r(reg::QUEUE_NUM_MAX) < u32::from(virtio::QUEUE_SIZE) {
        return Err("the device's queue is too small");
    }
    w(reg::QUEUE_NUM, u32::from(virtio::QUEUE_SIZE));
    // Rings start empty (the guest's RAM may hold anything).
    for a in (virtio::DESC_TABLE..virtio::BUFFER).step_by(8) {
        shared::write::<u64>(a, 0);
    }
    let split = |a: u64| (a as u32, (a >> 32) as u32);
    for (lo, hi, addr) in [
        (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, virtio::DESC_TABLE),
        (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, virtio::AVAIL_RING),
        (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, virtio::USED_RING),
    ] {
        let (l, h) = split(addr);
        w(lo, l);
        w(hi, h);
    }
    w(reg::QUEUE_READY, 1);
    w(reg::STATUS, ok | virtio::DRIVER_OK);
    if r(reg::STATUS) & virtio::DRIVER_OK == 0 {
        return Err("the device did not accept DRIVER_OK");
    }
    Ok(())
}

/// The driver's state (in guest memory, so it survives snapshot, restore and fork).
pub struct BlkDriver {
    base: u64,
    /// Requests made so far (the available ring's index).
    next: u16,
}

fn desc(i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let d = virtio::desc_addr(i);
    shared::write::<u64>(d, addr);
    shared::write::<u32>(d + 8, len);
    shared::write::<u16>(d + 12, flags);
    shared::write::<u16>(d + 14, next);
}

impl BlkDriver {
    /// Finds and sets up the virtio-blk at `base`.
    pub fn init(base: u64) -> Result<Self, &'static str> {
        setup(base, virtio::DEVICE_BLOCK)?;
        Ok(Self { base, next: 0 })
    }

    /// One request of type `ty` at `sector` with one data page at `data` (none for a flush);
    /// returns the status byte the device wrote. Gives up after `timeout_ticks` of TSC.
    pub fn request(
        &mut self,
        ty: u32,
        sector: u64,
        data: u64,
        timeout_ticks: u64,
    ) -> Result<u8, &'static str> {
        shared::write::<u32>(virtio::BLK_HEADER, ty);
        shared::write::<u32>(virtio::BLK_HEADER + 4, 0);
        shared::write::<u64>(virtio::BLK_HEADER + 8, sector);
        shared::write::<u8>(virtio::BLK_STATUS, 0xff);
        let next = virtio::DESC_F_NEXT;
        desc(0, virtio::BLK_HEADER, 16, next, 1);
        let status_at = if ty == virtio::BLK_T_FLUSH {
            1
        } else {
            let f = if ty == virtio::BLK_T_IN { virtio::DESC_F_WRITE | next } else { next };
            desc(1, data, virtio::BLK_BYTES, f, 2);
            2
        };
        desc(status_at, virtio::BLK_STATUS, 1, virtio::DESC_F_WRITE, 0);
        let n = self.next;
        shared::write::<u16>(virtio::avail_entry(n), 0);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        self.next = n.wrapping_add(1);
        shared::write::<u16>(virtio::AVAIL_RING + 2, self.next);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        mmio_write32(self.base + reg::QUEUE_NOTIFY, 0);
        let start = rdtsc();
        while shared::read::<u16>(virtio::USED_RING + 2) != self.next {
            if rdtsc().wrapping_sub(start) > timeout_ticks {
                return Err("virtio-blk did not answer");
            }
            core::hint::spin_loop();
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        if shared::read::<u32>(virtio::used_elem(n)) != 0 {
            return Err("virtio-blk returned another descriptor");
        }
        Ok(shared::read::<u8>(virtio::BLK_STATUS))
    }

    /// Writes identity `id`'s pattern to [`virtio::BLK_SECTOR`], flushes, reads it back and
    /// reads sector 0; prints `BLK id=<id> wrote=0x<fnv> read=0x<fnv> base=0x<fnv>`.
    pub fn exercise(&mut self, id: u32, timeout_ticks: u64) -> Result<(), &'static str> {
        let len = virtio::BLK_BYTES as usize;
        for i in 0..len {
            shared::write::<u8>(virtio::BLK_WRITE_DATA + i as u64, virtio::blk_pattern(id, i));
        }
        let ok = |s: u8| if s == 0 { Ok(()) } else { Err("virtio-blk request failed") };
        let mut req = |ty, sector, data| self.request(ty, sector, data, timeout_ticks).and_then(ok);
        req(virtio::BLK_T_OUT, virtio::BLK_SECTOR, virtio::BLK_WRITE_DATA)?;
        req(virtio::BLK_T_FLUSH, 0, 0)?;
        let sum = |at: u64| virtio::fnv(len, |i| shared::read::<u8>(at + i as u64));
        req(virtio::BLK_T_IN, virtio::BLK_SECTOR, virtio::BLK_READ_DATA)?;
        let read = sum(virtio::BLK_READ_DATA);
        req(virtio::BLK_T_IN, 0, virtio::BLK_READ_DATA)?;
        let base = sum(virtio::BLK_READ_DATA);
        crate::print!(
            "BLK id={} wrote=0x{:016x} read=0x{:016x} base=0x{:016x}\n",
            id,
            sum(virtio::BLK_WRITE_DATA),
            read,
            base
        );
        Ok(())
    }
}
