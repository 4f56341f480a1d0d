//! KVM state: the VM ([`vm`]: its fd, irqchip, PIT, memory slots, dirty log, irqfds and
//! ioeventfds) and the vCPUs ([`vcpu`]: threads, exits, pausing), each with its saved state.

pub mod blob;
pub mod vcpu;
pub mod vm;
