//! vCPU threads: the KVM_RUN loop, exit handling, and pausing through a kick signal.
//!
//! Every exit that is not a port access to a known device ends the VM with a one-line error:
//! internal errors (with the instruction bytes at RIP when they can be read), shutdown (triple
//! fault), failed entry, MMIO outside a device, unknown exits. A guest reset through the i8042
//! ends it with status 0.
//!
//! Pausing: the VMM thread sends [`VcpuCmd::Pause`] and kicks the thread with a real-time signal.
//! The signal handler sets `immediate_exit` in this thread's `kvm_run`, so KVM_RUN returns EINTR
//! whether the signal lands inside KVM_RUN or just before it (no lost wake-ups). KVM completes a
//! pending port IN before honouring `immediate_exit`, so saved registers never miss it.
//!
//! Idling: an OUT to the idle port (0x44c) makes the thread wait up to 1 ms before it re-enters
//! the guest, on its own command channel (`recv_timeout`), so the `Pause` that precedes every
//! kick ends the wait at once. A command received there is kept and served after the next
//! KVM_RUN returns EINTR (the kick follows the command), so the pending OUT is completed by KVM
//! before any state is saved. vCPU threads run with 1 us timer slack so short sleeps keep
//! their length.

use std::cell::Cell;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::{PortAction, PortBus};
use crate::memory::GuestRam;

/// Errors from the vCPU layer (setup; exits are reported as [`VmExit`]).
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {index}: {what} failed")]
    Kvm {
        /// vCPU index.
        index: u8,
        /// What was being done.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The kick signal handler cannot be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The thread cannot be spawned.
    #[error("cannot spawn vCPU thread")]
    Spawn(#[source] std::io::Error),
    /// The vCPU thread is gone.
    #[error("vCPU {0} thread is gone")]
    Gone(u8),
}

/// How a VM ended.
#[derive(Debug)]
pub enum VmExit {
    /// The guest reset itself (i8042): exit status 0.
    Reset,
    /// A fatal guest or VMM error, one line.
    Error(String),
}

/// A job run on the vCPU thread while it is paused (save or load of its state).
pub type VcpuJob = Box<dyn FnOnce(&mut VcpuFd) + Send>;

/// Commands to a vCPU thread.
pub enum VcpuCmd {
    /// Stop at the next exit and acknowledge on the sender.
    Pause(Sender<()>),
    /// Continue running.
    Resume,
    /// Run a job on the vCPU (only while paused).
    Run(VcpuJob),
}

/// Events from vCPU threads to the VMM thread.
#[derive(Debug)]
pub enum VcpuEvent {
    /// The VM must end.
    Exit(VmExit),
    /// A control-socket request.
    Api(crate::api::ApiCall),
}

thread_local! {
    // This thread's kvm_run, for the kick signal handler. Const-initialised, no destructor:
    // reading it from a signal handler never allocates or runs lazy initialisation.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal (SIGRTMIN).
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN_PTR.with(Cell::get);
    if !p.is_null() {
        // SAFETY: `p` points at this thread's kvm_run mapping, set by the vCPU loop before
        // its first KVM_RUN and valid for the life of the thread's VcpuFd; a byte store is
        // async-signal-safe.
        unsafe { std::ptr::write_volatile(&raw mut (*p).immediate_exit, 1) };
    }
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(VcpuError::Signal)
}

/// A running vCPU thread.
pub struct VcpuHandle {
    /// vCPU index.
    pub index: u8,
    /// Command channel.
    pub cmds: Sender<VcpuCmd>,
    /// The thread.
    pub thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Interrupts KVM_RUN on this thread.
    pub fn kick(&self) {
        use vmm_sys_util::signal::Killable;
        // Fails only if the thread has exited, in which case there is nothing to kick.
        let _ = self.thread.kill(kick_signal());
    }
}

/// What every vCPU thread shares.
#[derive(Clone)]
pub struct VcpuShared {
    /// Port devices.
    pub bus: Arc<PortBus>,
    /// Guest RAM (for instruction bytes in error reports).
    pub ram: Arc<GuestRam>,
    /// Where exits are reported.
    pub events: Sender<VcpuEvent>,
}

/// Spawns the thread for `vcpu`; it waits for [`VcpuCmd::Resume`] first if `start_paused`.
pub fn spawn(
    index: u8,
    vcpu: VcpuFd,
    shared: VcpuShared,
    start_paused: bool,
) -> Result<VcpuHandle, VcpuError> {
    let (cmd_tx, cmds) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .stack_size(256 * 1024)
        .spawn(move || {
            set_timer_slack();
            let exit = run_loop(index, vcpu, &shared.bus, &shared.ram, &cmds, start_paused);
            if let Some(exit) = exit {
                let _ = shared.events.send(VcpuEvent::Exit(exit));
            }
        })
        .map_err(VcpuError::Spawn)?;
    Ok(VcpuHandle { index, cmds: cmd_tx, thread })
}

/// Timer slack of vCPU threads (ns): an idle sleep of 40 us must not become 90 us (the default
/// slack is 50 us).
const TIMER_SLACK_NS: libc::c_ulong = 1000;

/// Lowers this thread's timer slack to [`TIMER_SLACK_NS`]; best effort (a failure only makes
/// idle sleeps longer).
fn set_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and changes only this thread's
    // timer slack; no memory is passed.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, TIMER_SLACK_NS, 0, 0, 0) };
}

/// Waits `d` for the guest's idle request, or until a command arrives (a pause is always sent
/// before the kick). Returns the command to serve after the next interrupted KVM_RUN, or
/// `Err(())` if the VMM hung up.
fn idle(d: Duration, cmds: &Receiver<VcpuCmd>) -> Result<Option<VcpuCmd>, ()> {
    if d.is_zero() {
        return Ok(None);
    }
    match cmds.recv_timeout(d) {
        // A resume while running changes nothing (and no kick follows it).
        Ok(VcpuCmd::Resume) => Ok(None),
        Ok(cmd) => Ok(Some(cmd)),
        Err(RecvTimeoutError::Timeout) => Ok(None),
        Err(RecvTimeoutError::Disconnected) => Err(()),
    }
}

/// Serves commands while paused; returns false if the VMM hung up.
fn paused(vcpu: &mut VcpuFd, cmds: &Receiver<VcpuCmd>) -> bool {
    loop {
        match cmds.recv() {
            Ok(VcpuCmd::Resume) => return true,
            Ok(VcpuCmd::Run(job)) => job(vcpu),
            Ok(VcpuCmd::Pause(ack)) => {
                let _ = ack.send(());
            }
            Err(_) => return false,
        }
    }
}

/// Handles pending commands after an interrupted KVM_RUN (first `kept`, one received while
/// idling). Returns false to stop the thread.
fn service(vcpu: &mut VcpuFd, cmds: &Receiver<VcpuCmd>, kept: Option<VcpuCmd>) -> bool {
    let mut next = kept;
    while let Some(cmd) = next.take().or_else(|| cmds.try_recv().ok()) {
        match cmd {
            VcpuCmd::Pause(ack) => {
                let _ = ack.send(());
                if !paused(vcpu, cmds) {
                    return false;
                }
            }
            VcpuCmd::Resume => {}
            VcpuCmd::Run(job) => job(vcpu),
        }
    }
    true
}

fn run_loop(
    index: u8,
    mut vcpu: VcpuFd,
    bus: &PortBus,
    ram: &GuestRam,
    cmds: &Receiver<VcpuCmd>,
    start_paused: bool,
) -> Option<VmExit> {
    let run_ptr: *mut kvm_run = vcpu.get_kvm_run();
    KVM_RUN_PTR.with(|p| p.set(run_ptr));
    if start_paused && !paused(&mut vcpu, cmds) {
        return None;
    }
    if index == 0 {
        crate::timing::mark("first KVM_RUN");
    }
    // A command received while idling, served once KVM_RUN is interrupted by its kick.
    let mut kept: Option<VcpuCmd> = None;
    loop {
        let exit = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => match bus.io_out(port, data) {
                PortAction::Continue => continue,
                PortAction::Reset => return Some(VmExit::Reset),
                // With a command kept, its kick is on the way: do not wait again.
                PortAction::Idle(d) if kept.is_none() => match idle(d, cmds) {
                    Ok(cmd) => {
                        kept = cmd;
                        continue;
                    }
                    Err(()) => return None,
                },
                PortAction::Idle(_) => continue,
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.io_in(port, data);
                continue;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                format!("unhandled MMIO read of {} bytes at {addr:#x}", data.len())
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                format!("unhandled MMIO write of {} bytes at {addr:#x}", data.len())
            }
            Ok(VcpuExit::Shutdown) => "guest shut down (triple fault)".to_string(),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                format!("vCPU entry failed: hardware reason {reason:#x} on host cpu {cpu}")
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit the `internal` member of the
                // kvm_run union is the valid one.
                let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
                let what = match internal.suberror {
                    1 => "emulation failure",
                    2 => "simultaneous exceptions",
                    3 => "delivery event failure",
                    _ => "unknown",
                };
                format!("KVM internal error {} ({what})", internal.suberror)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET | kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    return Some(VmExit::Reset)
                }
                other => format!("guest system event {other} (crash)"),
            },
            Ok(VcpuExit::Hlt) => "guest halted with no way to wake it".to_string(),
            Ok(other) => format!("unexpected KVM exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                if !service(&mut vcpu, cmds, kept.take()) {
                    return None;
                }
                continue;
            }
            Err(e) => {
                // Guest memory may be what failed (e.g. a page server that cannot serve a
                // page leaves it inaccessible): report registers only, never read it.
                return Some(VmExit::Error(format!(
                    "vCPU {index}: KVM_RUN failed: {e}{}",
                    where_(&vcpu, None)
                )));
            }
        };
        return Some(VmExit::Error(format!("vCPU {index}: {exit}{}", where_(&vcpu, Some(ram)))));
    }
}

/// ` at rip 0x... (bytes: ..)`, best effort; instruction bytes only when `ram` is given.
fn where_(vcpu: &VcpuFd, ram: Option<&GuestRam>) -> String {
    let Ok(regs) = vcpu.get_regs() else {
        return String::new();
    };
    let mut s = format!(" at rip {:#x}", regs.rip);
    if let Ok(sregs) = vcpu.get_sregs() {
        s.push_str(&format!(" (cs {:#x}, cr0 {:#x})", sregs.cs.selector, sregs.cr0));
    }
    let Some(ram) = ram else {
        return s;
    };
    if let Ok(t) = vcpu.translate_gva(regs.rip) {
        if t.valid != 0 {
            let mut bytes = [0u8; 15];
            let mut n = 0;
            for (i, b) in bytes.iter_mut().enumerate() {
                match ram.mem().read_obj::<u8>(GuestAddress(t.physical_address + i as u64)) {
                    Ok(v) => {
                        *b = v;
                        n = i + 1;
                    }
                    Err(_) => break,
                }
            }
            if n > 0 {
                s.push_str(", instruction bytes:");
                for b in &bytes[..n] {
                    s.push_str(&format!(" {b:02x}"));
                }
            }
        }
    }
    s
}
