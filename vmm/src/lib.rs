//! The Grove VMM library: a KVM virtual machine monitor on the rust-vmm crates.
//!
//! Layout: [`memory`] (guest RAM and its backing), [`boot`] (kernel, initrd, boot_params),
//! [`x86`] (vCPU boot state, MP table), [`cpuid`] (the CPUID policy), [`devices`] (port I/O),
//! [`vcpu`] (vCPU threads and exits), [`vm`] (the VM), [`cli`] (argument parsing).

pub mod boot;
pub mod cli;
pub mod cpuid;
pub mod devices;
pub mod hostcheck;
pub mod layout;
pub mod memory;
pub mod timing;
pub mod vcpu;
pub mod vm;
pub mod x86;
