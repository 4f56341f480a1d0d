//! Slot record decoding: corrupt or truncated files give an error, never a
//! panic; whatever decodes re-encodes to the same record.
#![no_main]

use grove_netd::record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.slot");
    if let Ok(r) = record::decode(data, path) {
        let again = record::decode(&record::encode(&r), path).expect("re-encoded record decodes");
        assert_eq!(again, r);
    }
});
