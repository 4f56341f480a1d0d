//! Grove's copy-on-write storage engine.
//!
//! - [`memory`]: memory snapshot layers (full and diff), chains, merging, and the
//!   userfaultfd page server used by lazy restore. It is its own crate, `grove-memory`
//!   (`storage/memory`), re-exported here, so that the VMM links it without sled,
//!   device-mapper or bindgen.
//! - [`block`]: the block-store API and its backends (layered sparse files, dm-thin).
//! - [`catalog`]: the crash-safe catalog in sled.

pub mod block;
pub mod catalog;
pub use grove_memory as memory;
