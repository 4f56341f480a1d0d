//! The Grove VMM library: a KVM virtual machine monitor on the rust-vmm crates.
//!
//! Layers, each importing only the ones above it (no cycle; `tests::no_import_cycles`):
//! - basics: [`layout`] (addresses), [`timing`], [`persist`] (the `Persist` trait),
//!   [`exit`] (how a VM ends), [`input`] (opening the files a VMM is handed), [`seccomp`]
//!   (the filter of each thread kind);
//! - guest memory and boot structures: [`memory`], [`cpuid`], [`x86`], [`boot`], [`acpi`];
//! - KVM: [`vstate`] (the VM and its vCPUs);
//! - [`devices`]: the bus, legacy devices, virtio over MMIO, the device manager;
//! - [`state`]: the state file gathering every component's saved state;
//! - [`vmm`]: the running VMM and its event loop; [`snapshot`]: snapshot and fork;
//!   [`builder`]: boot, standby and cold restore; [`guest_refresh`]: the post-restore
//!   refresh of a restored guest (clock, entropy, hostname, network) over vsock;
//! - [`api_server`]: the control socket; [`controller`]: the loop and request handling;
//!   [`cli`]; the binary (`main.rs`). [`hostcheck`] stands alone.

pub mod acpi;
pub mod api_server;
pub mod boot;
pub mod builder;
pub mod cli;
pub mod controller;
pub mod cpuid;
pub mod devices;
pub mod exit;
pub mod guest_refresh;
pub mod hostcheck;
pub mod input;
pub mod jail;
pub mod layout;
pub mod memory;
pub mod paths;
pub mod persist;
pub mod seccomp;
pub mod snapshot;
pub mod state;
pub mod timing;
pub mod vmm;
pub mod vstate;
pub mod x86;

/// `println!` that never panics: when the reader of stdout went away (`grove-vmm … | head`),
/// the line is dropped instead of aborting the VMM (`println!` panics on `EPIPE`, and release
/// builds abort on panic).
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `print!` that never panics (see [`outln!`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut o = std::io::stdout().lock();
        let _ = write!(o, $($arg)*).and_then(|()| o.flush());
    }};
}

/// `eprintln!` that never panics (see [`outln!`]): log lines are dropped when stderr is a
/// closed pipe.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

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

#[cfg(test)]
mod tests;
