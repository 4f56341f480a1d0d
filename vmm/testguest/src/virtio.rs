//! The guest side of a virtio 1.x split virtqueue, as far as the test guest drives one
//! (virtio-rng, one buffer per request; virtio-blk, one three-descriptor request at a time):
//! where the rings and buffers live and what the driver writes.
//! Register access is the binary's (`main.rs`), through volatile MMIO at CPL 3.

/// virtio-mmio register offsets (virtio 1.2 §4.2.2).
pub mod reg {
    pub const MAGIC: u64 = 0x00;
    pub const VERSION: u64 = 0x04;
    pub const DEVICE_ID: u64 = 0x08;
    pub const DEVICE_FEATURES: u64 = 0x10;
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    pub const DRIVER_FEATURES: u64 = 0x20;
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    pub const QUEUE_SEL: u64 = 0x30;
    pub const QUEUE_NUM_MAX: u64 = 0x34;
    pub const QUEUE_NUM: u64 = 0x38;
    pub const QUEUE_READY: u64 = 0x44;
    pub const QUEUE_NOTIFY: u64 = 0x50;
    pub const STATUS: u64 = 0x70;
    pub const QUEUE_DESC_LOW: u64 = 0x80;
    pub const QUEUE_DESC_HIGH: u64 = 0x84;
    pub const QUEUE_DRIVER_LOW: u64 = 0x90;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x94;
    pub const QUEUE_DEVICE_LOW: u64 = 0xa0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0xa4;
}

/// "virt".
pub const MAGIC: u32 = 0x7472_6976;
/// virtio-rng's device id.
pub const DEVICE_RNG: u32 = 4;
/// virtio-blk's device id.
pub const DEVICE_BLOCK: u32 = 2;
/// Status bits.
pub const ACKNOWLEDGE: u32 = 1;
pub const DRIVER: u32 = 2;
pub const DRIVER_OK: u32 = 4;
pub const FEATURES_OK: u32 = 8;
/// VIRTIO_F_VERSION_1 is bit 0 of the high feature word.
pub const VERSION_1_HIGH: u32 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the chain goes on at `next`.
pub const DESC_F_NEXT: u16 = 1;

/// Queue size the test guest uses.
pub const QUEUE_SIZE: u16 = 16;
/// Guest-physical placement of the queue and the request buffer: below the region (which
/// starts at 16 MiB), above the image. The buffer page is written by the device only.
pub const DESC_TABLE: u64 = 0x80_0000;
pub const AVAIL_RING: u64 = 0x80_1000;
pub const USED_RING: u64 = 0x80_2000;
pub const BUFFER: u64 = 0x80_3000;
/// Bytes asked for per request.
pub const REQUEST_BYTES: u32 = 32;

/// virtio-blk: the request header (16 bytes) and status byte live in the buffer page; the
/// data of a write and of a read in the two pages above it.
pub const BLK_HEADER: u64 = BUFFER;
pub const BLK_STATUS: u64 = BUFFER + 0x800;
pub const BLK_WRITE_DATA: u64 = 0x80_4000;
pub const BLK_READ_DATA: u64 = 0x80_5000;
/// Bytes per virtio-blk request (one page, 8 sectors).
pub const BLK_BYTES: u32 = 4096;
/// The sector the guest writes its identity's pattern to (and reads back).
pub const BLK_SECTOR: u64 = 8;
/// virtio-blk request types.
pub const BLK_T_IN: u32 = 0;
pub const BLK_T_OUT: u32 = 1;
pub const BLK_T_FLUSH: u32 = 4;

/// Byte `i` of the block the guest with identity `id` writes.
pub fn blk_pattern(id: u32, i: usize) -> u8 {
    (i as u32).wrapping_mul(31).wrapping_add(id.wrapping_mul(97)).wrapping_add(1) as u8
}

/// FNV-1a of `len` bytes given by `byte(i)` (the guest prints it for blocks it read or wrote).
pub fn fnv(len: usize, byte: impl Fn(usize) -> u8) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for i in 0..len {
        h ^= u64::from(byte(i));
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Address of descriptor `i` (16 bytes: addr u64, len u32, flags u16, next u16).
pub fn desc_addr(i: u16) -> u64 {
    DESC_TABLE + 16 * u64::from(i % QUEUE_SIZE)
}

/// Address of available-ring entry for the `idx`-th request.
pub fn avail_entry(idx: u16) -> u64 {
    AVAIL_RING + 4 + 2 * u64::from(idx % QUEUE_SIZE)
}

/// Address of used-ring element for the `idx`-th completion (8 bytes: id u32, len u32).
pub fn used_elem(idx: u16) -> u64 {
    USED_RING + 4 + 8 * u64::from(idx % QUEUE_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_do_not_overlap_and_fit_their_pages() {
        assert_eq!(desc_addr(QUEUE_SIZE), DESC_TABLE);
        assert!(desc_addr(QUEUE_SIZE - 1) + 16 <= AVAIL_RING);
        assert!(avail_entry(QUEUE_SIZE - 1) + 2 + 2 <= USED_RING);
        assert!(used_elem(QUEUE_SIZE - 1) + 8 + 2 <= BUFFER);
        assert!(BUFFER + u64::from(REQUEST_BYTES) <= 16 << 20, "below the region");
        assert_eq!(used_elem(17), used_elem(1));
        assert!(BLK_STATUS + 1 <= BLK_WRITE_DATA && BLK_HEADER + 16 <= BLK_STATUS);
        assert!(BLK_READ_DATA + u64::from(BLK_BYTES) <= 16 << 20, "below the region");
    }

    #[test]
    fn block_patterns_differ_by_identity_and_hash_as_fnv() {
        let sum = |id| fnv(4096, |i| blk_pattern(id, i));
        assert_ne!(sum(0), sum(1));
        assert_ne!(sum(1), sum(2));
        assert_eq!(fnv(0, |_| 0), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv(1, |_| b'a'), 0xaf63_dc4c_8601_ec8c);
    }
}
