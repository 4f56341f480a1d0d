//! The Grove VMM library: a KVM virtual machine monitor on the rust-vmm crates.
//!
//! Layout: [`memory`] (guest RAM and its backing), [`boot`] (kernel, initrd, boot_params),
//! [`x86`] (vCPU boot state, MP table), [`cpuid`] (the CPUID policy), [`devices`] (port I/O),
//! [`vcpu`] (vCPU threads and exits), [`vm`] (the VM), [`cli`] (argument parsing).

pub mod api;
pub mod boot;
pub mod cli;
pub mod cpuid;
pub mod devices;
pub mod hostcheck;
pub mod layout;
pub mod memory;
pub mod persist;
pub mod snapshot;
pub mod timing;
pub mod vcpu;
pub mod vm;
pub mod x86;

/// One line: an error and its sources joined with ": " (for the CLI and API replies).
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s.replace('\n', " ")
}
