//! Grove's wire protocols. Generated code lives only in this crate.
//!
//! - [`guest`]: the messages of `guest.proto` (agentd <-> guest-init), version 1.
//! - [`frame`]: the length-prefixed framing the guest protocol uses on a byte stream.
//! - [`client`]: a small blocking client for the guest protocol (tests, tools, agentd).

pub mod client;
pub mod frame;

/// Messages of `guest.proto` (package `grove.guest.v1`).
pub mod guest {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/grove.guest.v1.rs"));
}

/// "GROV": the magic in `Hello` / `HelloReply`.
pub const GUEST_MAGIC: u32 = 0x4752_4f56;
/// The guest protocol version this crate speaks.
pub const GUEST_PROTOCOL_VERSION: u32 = 1;
/// The vsock port guest-init listens on inside a guest.
pub const GUEST_VSOCK_PORT: u32 = 1024;
