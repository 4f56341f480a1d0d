//! Fuzzes the memory-layer parsers: a whole layer image (header, index, length)
//! and a working-set file. Neither may panic, and an accepted layer must be
//! self-consistent. Run: `cd storage/fuzz && cargo fuzz run memory_layer`.

#![no_main]

use grove_storage::memory::{format, WorkingSet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, runs)) = format::parse_image(data) {
        let pages: u64 = runs.iter().map(|r| r.count).sum();
        assert_eq!(pages, header.present_pages);
        assert!(runs.iter().all(|r| r.end() <= header.layout.mem_pages()));
        assert!(header.data_offset % u64::from(header.layout.page_size) == 0);
    }
    let _ = WorkingSet::decode(data);
});
