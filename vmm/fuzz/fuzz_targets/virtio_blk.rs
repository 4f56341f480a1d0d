//! virtio-blk requests come from the guest: descriptor tables, rings, headers, data and
//! discard segments are whatever the guest wrote. Any memory contents and queue settings must
//! give served or refused requests (a status byte, or a chain returned untouched), never a
//! panic, a hang or an access outside the disk.
#![no_main]

mod common;

use std::sync::{Mutex, OnceLock};

use grove_vmm::devices::virtio::block::device::Block;
use grove_vmm::devices::virtio::block::disk::{Disk, DiskSpec};
use libfuzzer_sys::fuzz_target;

/// One device for the whole run: a 1 MiB image under a writable layer in a temporary
/// directory (requests may write anything into the layer; the image is never written).
fn device() -> &'static Mutex<Block> {
    static DEV: OnceLock<Mutex<Block>> = OnceLock::new();
    DEV.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("grove-fuzz-blk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let img = dir.join("base.img");
        std::fs::write(&img, vec![0x5a; 1 << 20]).expect("image");
        let spec = format!("{},layer={},id=fuzz", img.display(), dir.join("layer").display());
        let disk = Disk::open(&DiskSpec::parse(&spec, 0).expect("spec")).expect("disk");
        Mutex::new(Block::new(common::ram().clone(), disk).expect("device"))
    })
}

fuzz_target!(|data: &[u8]| {
    let mut blk = device().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !common::activate(&mut *blk, data) {
        return;
    }
    // At most one queue's worth per call: it returns, whatever the rings hold.
    blk.process_queue();
    blk.process_queue();
});
