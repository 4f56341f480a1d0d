//! The guest's decoder of untrusted host input: split a byte stream into frames and decode
//! each as a Request (grove_proto::frame::decode_stream; the same path the unit test
//! `frame::tests::garbage_does_not_decode_or_panic` exercises).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = grove_proto::frame::decode_stream(data);
    let _ = grove_proto::frame::decode_request(data);
    let _ = grove_proto::frame::split_frames(data);
});
