//! The test guest's pure logic, shared by the guest binary and host unit tests:
//! boot_params and command-line parsing (`bootparams`), the memory region, pattern
//! and checksum (`region`), the `T` loop's pacing (`pace`). The CPL 0 stub and port I/O live in the binary
//! (`main.rs`, `boot.rs`, `io.rs`).

#![cfg_attr(not(test), no_std)]

pub mod bootparams;
pub mod pace;
pub mod region;
pub mod virtio;

/// Bytes of physical memory the guest's static page tables identity-map (16 GiB).
pub const MAPPED_BYTES: u64 = 16 << 30;
