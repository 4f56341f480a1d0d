//! netd: network slots and the eBPF dataplane for Grove sandboxes.
//!
//! - [`pool`]: [`SlotPool`] prepares slots ahead (netns + tap + veth, programs
//!   attached, maps pinned), gives them out ([`SlotPool::take`]), scrubs them on
//!   [`SlotPool::release`], and finds them again after a restart
//!   ([`SlotPool::open`], with a clean-up pass for anything half-built).
//! - [`dataplane`]: the tc programs (`bpf/slot.c`), their maps, counters,
//!   denials, and `BPF_PROG_TEST_RUN`.
//! - [`policy`]: CIDR and domain rules, rate limits, port exposure.
//! - [`resolver`] and [`dns`]: the per-slot resolver that enforces domain rules.
//! - [`netns`], [`links`], [`tap`], [`conntrack`]: the kernel objects.
//! - [`packet`]: frames for the userspace peer that stands in for the guest.
//!
//! See docs/networking.md for the design, the maps and the figures.

pub mod conntrack;
pub mod dataplane;
pub mod dns;
pub mod links;
pub mod netns;
pub mod packet;
pub mod policy;
pub mod pool;
pub mod record;
pub mod resolver;
pub mod tap;
pub mod testbed;

pub use policy::{
    Action, Cidr, CidrRule, DomainPattern, DomainRule, Exposure, Policy, Proto, RateLimit,
};
pub use pool::{
    Denial, GuestAddressing, PoolConfig, PoolError, Recovery, Slot, SlotPool, SlotRequest,
};
