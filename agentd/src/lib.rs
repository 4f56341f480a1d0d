//! agentd: Grove's per-host node agent, and the library behind the `grove` CLI.
//!
//! - [`node`]: the sandbox manager (templates, sandboxes, snapshots, state machine,
//!   capacity, TTL, events, recovery);
//! - [`vmm`]: grove-vmm processes (own process group, adoption, exit) and their control client;
//! - [`pool`]: standby VMMs per shape;
//! - [`procs`]: ProcessService's processes (guest-init's agent over vsock);
//! - [`files`]: FilesystemService (the same agent);
//! - [`server`]: the gRPC services, health, reflection, auth, `/metrics`;
//! - [`client`]: connecting to agentd (CLI, tests, bench);
//! - [`config`], [`layout`], [`validate`], [`error`], [`metrics`].
//!
//! docs/agentd.md describes the design, the state machine and restart semantics.

pub mod client;
pub mod config;
pub mod error;
pub mod files;
pub mod layout;
pub mod metrics;
pub mod node;
pub mod pool;
pub mod procs;
pub mod server;
pub mod validate;
pub mod vmm;
