//! Grove's copy-on-write storage engine.
//!
//! - [`memory`]: memory snapshot layers (full and diff), chains, merging, and the
//!   userfaultfd page server used by lazy restore.
//! - [`block`]: the block-store API and its backends (layered sparse files, dm-thin).
//! - [`catalog`]: the crash-safe catalog in sled.

pub mod block;
pub mod catalog;
pub mod memory;
