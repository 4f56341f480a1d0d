//! How a VM ends ([`VmExit`], typed) and the one-shot signal every party that can end it uses
//! ([`ExitSignal`]: vCPU threads on a fatal exit, the i8042 on a reset, the ACPI PM device on
//! a power-off). The event loop watches the signal's eventfd; the first exit recorded wins.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// A fatal vCPU exit: what KVM reported.
#[derive(Debug, thiserror::Error)]
pub enum VcpuExitError {
    /// An MMIO access where no device is.
    #[error("unhandled MMIO {} of {len} bytes at {addr:#x}", if *.write { "write" } else { "read" })]
    UnhandledMmio {
        /// A write (else a read).
        write: bool,
        /// Guest physical address.
        addr: u64,
        /// Access width.
        len: usize,
    },
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    #[error("guest shut down (triple fault)")]
    TripleFault,
    /// KVM_EXIT_FAIL_ENTRY.
    #[error("vCPU entry failed: hardware reason {reason:#x} on host cpu {cpu}")]
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// KVM_EXIT_INTERNAL_ERROR.
    #[error("KVM internal error {suberror} ({})", internal_error_name(*.suberror))]
    Internal {
        /// KVM's suberror.
        suberror: u32,
    },
    /// A KVM system event other than reset or shutdown (a crash).
    #[error("guest system event {0} (crash)")]
    SystemEvent(u32),
    /// HLT with no in-kernel irqchip able to wake the vCPU.
    #[error("guest halted with no way to wake it")]
    Halted,
    /// Any other KVM exit (its debug form).
    #[error("unexpected KVM exit {0}")]
    Unexpected(String),
    /// KVM_RUN itself failed.
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
}

fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "delivery event failure",
        _ => "unknown",
    }
}

/// Where a vCPU was when it failed (best effort, for the error line).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestContext {
    /// RIP.
    pub rip: u64,
    /// CS selector and CR0, when the special registers could be read.
    pub cs_cr0: Option<(u16, u64)>,
    /// Up to 15 instruction bytes at RIP, when RIP translates to RAM.
    pub bytes: Vec<u8>,
}

impl std::fmt::Display for GuestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, " at rip {:#x}", self.rip)?;
        if let Some((cs, cr0)) = self.cs_cr0 {
            write!(f, " (cs {cs:#x}, cr0 {cr0:#x})")?;
        }
        if !self.bytes.is_empty() {
            f.write_str(", instruction bytes:")?;
            for b in &self.bytes {
                write!(f, " {b:02x}")?;
            }
        }
        Ok(())
    }
}

/// How a VM ended.
#[derive(Debug, thiserror::Error)]
pub enum VmExit {
    /// The guest reset itself (i8042 pulse, ACPI reset register, KVM reset event): status 0.
    #[error("guest reset")]
    Reset,
    /// The guest powered off (ACPI S5, KVM shutdown event): status 0.
    #[error("guest powered off")]
    PowerOff,
    /// A vCPU failed.
    #[error("vCPU {index}: {error}{}", at_text(.at))]
    Vcpu {
        /// vCPU index.
        index: u8,
        /// What KVM reported.
        #[source]
        error: VcpuExitError,
        /// Where the vCPU was.
        at: Option<GuestContext>,
    },
    /// The event loop failed.
    #[error("event loop failed")]
    EventLoop(#[source] event_manager::Error),
    /// Every vCPU thread ended without reporting why.
    #[error("all vCPU threads ended")]
    VcpusGone,
}

fn at_text(at: &Option<GuestContext>) -> String {
    at.as_ref().map(ToString::to_string).unwrap_or_default()
}

impl VmExit {
    /// Whether the VM ended the way a guest asks to (grove-vmm exits with status 0).
    pub fn is_clean(&self) -> bool {
        matches!(self, Self::Reset | Self::PowerOff)
    }
}

/// The first [`VmExit`] reported, and an eventfd the event loop watches.
#[derive(Debug)]
pub struct ExitSignal {
    evt: EventFd,
    exit: Mutex<Option<VmExit>>,
}

impl ExitSignal {
    /// A new signal.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self { evt: EventFd::new(libc::EFD_NONBLOCK)?, exit: Mutex::new(None) }))
    }

    /// Records `exit` unless one is recorded already, and wakes the event loop.
    pub fn request(&self, exit: VmExit) {
        {
            let mut e = self.exit.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if e.is_none() {
                *e = Some(exit);
            }
        }
        // Fails only if the counter would overflow, which means the loop is awake anyway.
        let _ = self.evt.write(1);
    }

    /// Whether an exit was requested (vCPU threads stop running the guest once it is).
    pub fn requested(&self) -> bool {
        self.exit.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some()
    }

    /// Takes the recorded exit.
    pub fn take(&self) -> Option<VmExit> {
        self.exit.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }

    /// The eventfd (readable once an exit was requested).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exit_wins_and_messages_keep_their_shape() {
        let s = ExitSignal::new().unwrap();
        assert!(!s.requested());
        s.request(VmExit::Reset);
        s.request(VmExit::PowerOff);
        assert!(s.requested());
        assert_eq!(s.eventfd().read().unwrap(), 2);
        assert!(matches!(s.take(), Some(VmExit::Reset)));
        assert!(s.take().is_none());
        let e = VmExit::Vcpu {
            index: 1,
            error: VcpuExitError::UnhandledMmio { write: true, addr: 0xe000_0000, len: 1 },
            at: Some(GuestContext {
                rip: 0x10,
                cs_cr0: Some((0x2b, 0x11)),
                bytes: vec![0xc6, 0x00],
            }),
        };
        assert_eq!(
            e.to_string(),
            "vCPU 1: unhandled MMIO write of 1 bytes at 0xe0000000 at rip 0x10 (cs 0x2b, cr0 0x11), instruction bytes: c6 00"
        );
        assert!(!e.is_clean() && VmExit::PowerOff.is_clean());
        assert_eq!(
            VcpuExitError::Internal { suberror: 1 }.to_string(),
            "KVM internal error 1 (emulation failure)"
        );
    }
}
