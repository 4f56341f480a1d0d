//! The host's decoder of guest-controlled input (agentd reading a guest's responses).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = grove_proto::frame::decode_response(data);
    let mut cur = std::io::Cursor::new(data);
    while let Ok(p) = grove_proto::frame::read_frame(&mut cur) {
        let _ = grove_proto::frame::decode_response(&p);
    }
});
