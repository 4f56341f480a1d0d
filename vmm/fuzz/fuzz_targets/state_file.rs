//! Snapshot state files (`DIR/vmstate`) are read from disk on restore: any bytes must give
//! a state or a clear error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = grove_vmm::state::decode_state(data, "fuzz");
});
