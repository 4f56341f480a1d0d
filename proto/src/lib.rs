//! Grove's wire protocols. Generated code lives only in this crate.
//!
//! - [`v1`]: `sandbox.proto` (package `grove.v1`), the public API: messages, tonic clients and
//!   servers, and [`v1::FILE_DESCRIPTOR_SET`] for gRPC server reflection.
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

/// `sandbox.proto` (package `grove.v1`): Grove's public API.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/grove.v1.rs"));

    /// The encoded `FileDescriptorSet` of sandbox.proto, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/grove.v1.descriptor.bin"));
}

/// "GROV": the magic in `Hello` / `HelloReply`.
pub const GUEST_MAGIC: u32 = 0x4752_4f56;
/// The guest protocol version this crate speaks.
pub const GUEST_PROTOCOL_VERSION: u32 = 1;
/// The vsock port guest-init listens on inside a guest.
pub const GUEST_VSOCK_PORT: u32 = 1024;
