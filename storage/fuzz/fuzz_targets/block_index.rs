//! Fuzzes the block store's on-disk parsers: a whole chunk-index image (header,
//! both slots, bitmap choice) and a catalog record envelope. Neither may panic,
//! and an accepted index must be self-consistent.
//! Run: `cd storage/fuzz && cargo fuzz run block_index`.

#![no_main]

use grove_storage::block::layered::index::{self, Header, SlotHeader};
use grove_storage::catalog::{record, LayerRecord, SnapshotRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((h, slot, generation, bitmap)) = index::parse_image(data) {
        assert!(slot < 2 && generation > 0);
        assert_eq!(bitmap.chunks(), h.chunks);
        assert!(h.file_len() <= data.len() as u64);
        assert_eq!(Header::parse(&h.encode()).ok(), Some(h));
    }
    let _ = SlotHeader::parse(data);
    let _ = record::decode::<LayerRecord>(1, data);
    let _ = record::decode::<SnapshotRecord>(2, data);
});
