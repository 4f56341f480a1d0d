//! virtio-rng requests come from the guest: descriptor tables, rings and chains are whatever
//! the guest wrote. Any memory contents and queue settings must give served or refused
//! requests, never a panic or a hang.
#![no_main]

mod common;

use grove_vmm::devices::virtio::rng::device::Rng;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut rng) = Rng::new(common::ram().clone()) else { return };
    if !common::activate(&mut rng, data) {
        return;
    }
    // At most one queue's worth per call: it returns, whatever the rings hold.
    rng.process_queue();
    rng.process_queue();
});
