//! Control-socket request lines come from whoever can reach the socket.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = grove_vmm::api_server::parse(line);
    }
});
