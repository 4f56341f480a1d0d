//! vCPUs: creating and configuring them, their saved state ([`Persist`]), and the threads
//! that run them.
//!
//! A vCPU thread runs `KVM_RUN` and handles the exits that concern the guest's own accesses:
//! port and MMIO accesses go to the device bus ([`IoBus`]); the idle port (0x44c) sleeps the
//! thread. It reports nothing but exits: a fatal one (triple fault, failed entry, internal
//! error, MMIO where no device is, ...) is recorded in the VM's [`ExitSignal`] as a typed
//! [`VmExit`], after which the thread stops; so does a device that ended the VM (i8042 reset,
//! ACPI power-off). Control requests never travel through vCPU threads.
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

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::bus::IoBus;
use crate::exit::{ExitSignal, GuestContext, VcpuExitError, VmExit};
use crate::layout::{IDLE_MAGIC, IDLE_MAX_US, IDLE_PORT};
use crate::memory::GuestRam;
use crate::persist::Persist;
use crate::x86;

/// Errors of the vCPU layer (setup, state, threads; exits are [`VmExit`]s).
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
    /// KVM did not take or give every MSR.
    #[error("vCPU {index}: {what}: {done} of {total} MSRs")]
    Msrs {
        /// vCPU index.
        index: u8,
        /// Get, set or build.
        what: &'static str,
        /// How many went through.
        done: usize,
        /// How many there were.
        total: usize,
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

/// A vCPU: its KVM fd and index, before or while its thread runs it.
#[derive(Debug)]
pub struct Vcpu {
    /// vCPU index (= APIC id).
    pub index: u8,
    /// The KVM vCPU fd.
    pub fd: VcpuFd,
    /// MSR indices to save (set before a save: the VMM reads the list from KVM once).
    pub msr_list: Arc<Vec<u32>>,
}

impl Vcpu {
    fn err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Kvm { index, what, source }
    }

    /// Creates vCPU `index` with its CPUID set.
    pub fn create(vm: &VmFd, index: u8, cpuid: &CpuId) -> Result<Self, VcpuError> {
        let err = |what| move |source| VcpuError::Kvm { index, what, source };
        let fd = vm.create_vcpu(u64::from(index)).map_err(err("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(cpuid).map_err(err("KVM_SET_CPUID2"))?;
        Ok(Self { index, fd, msr_list: Arc::default() })
    }

    /// Puts a fresh vCPU into the 64-bit boot state, entering at `entry`.
    pub fn configure_boot(&self, entry: u64) -> Result<(), VcpuError> {
        let msrs = x86::boot_msrs();
        let kmsrs = Msrs::from_entries(&msrs).map_err(|_| VcpuError::Msrs {
            index: self.index,
            what: "build",
            done: 0,
            total: msrs.len(),
        })?;
        let n = self.fd.set_msrs(&kmsrs).map_err(self.err("KVM_SET_MSRS"))?;
        if n != msrs.len() {
            return Err(VcpuError::Msrs {
                index: self.index,
                what: "KVM_SET_MSRS (boot)",
                done: n,
                total: msrs.len(),
            });
        }
        self.fd.set_fpu(&x86::boot_fpu()).map_err(self.err("KVM_SET_FPU"))?;
        let sregs = self.fd.get_sregs().map_err(self.err("KVM_GET_SREGS"))?;
        self.fd.set_sregs(&x86::boot_sregs(sregs)).map_err(self.err("KVM_SET_SREGS"))?;
        self.fd.set_regs(&x86::boot_regs(entry)).map_err(self.err("KVM_SET_REGS"))?;
        let mut lapic = self.fd.get_lapic().map_err(self.err("KVM_GET_LAPIC"))?;
        x86::set_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(self.err("KVM_SET_LAPIC"))?;
        Ok(())
    }

    /// Reads the MSRs of `list` that this vCPU can give; MSRs KVM refuses to read are
    /// dropped (KVM_GET_MSRS stops at the first failing index).
    fn read_msrs(&self, list: &[u32]) -> Result<Vec<(u32, u64)>, VcpuError> {
        let mut want: Vec<u32> = list.to_vec();
        let mut out = Vec::with_capacity(want.len());
        while !want.is_empty() {
            let chunk: Vec<kvm_msr_entry> = want
                .iter()
                .take(kvm_bindings::KVM_MAX_MSR_ENTRIES)
                .map(|&index| kvm_msr_entry { index, ..Default::default() })
                .collect();
            let mut msrs = Msrs::from_entries(&chunk).map_err(|_| VcpuError::Msrs {
                index: self.index,
                what: "build",
                done: 0,
                total: chunk.len(),
            })?;
            let n = self.fd.get_msrs(&mut msrs).map_err(self.err("KVM_GET_MSRS"))?;
            out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
            // Skip the entry that failed (if any) and continue after it.
            let consumed = if n < chunk.len() { n + 1 } else { n };
            want.drain(..consumed);
        }
        Ok(out)
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// MP state (runnable, halted, waiting for SIPI).
    #[serde(with = "super::blob")]
    pub mp_state: kvm_mp_state,
    /// General registers.
    #[serde(with = "super::blob")]
    pub regs: kvm_regs,
    /// Segment and control registers.
    #[serde(with = "super::blob")]
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (legacy 4 KiB XSAVE area).
    #[serde(with = "super::blob")]
    pub xsave: kvm_xsave,
    /// XCR0.
    #[serde(with = "super::blob")]
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    #[serde(with = "super::blob")]
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    #[serde(with = "super::blob")]
    pub lapic: kvm_lapic_state,
    /// MSRs (index, value), TSC and kvmclock included.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    #[serde(with = "super::blob")]
    pub events: kvm_vcpu_events,
}

/// What restoring a vCPU needs: a fresh vCPU fd with its CPUID set (created just before, or
/// ahead of time by a standby VMM).
#[derive(Debug)]
pub struct VcpuArgs {
    /// The fresh vCPU.
    pub vcpu: Vcpu,
}

/// Whether this host's CPU is AMD's (the vendor string of CPUID leaf 0).
fn host_is_amd() -> bool {
    // The vendor string is "AuthenticAMD" in EBX, EDX, ECX.
    let r = std::arch::x86_64::__cpuid(0);
    (r.ebx, r.edx, r.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163)
}

/// The saved special registers as they are loaded on a restore. On AMD, TR's cached type is
/// loaded as "available" (9) instead of the "busy" (11) that KVM reported: KVM's SVM code ORs
/// the busy bit into every TR it reads (a workaround of its own; the VMCB keeps what the CPU
/// loaded), AMD's VMRUN does not check TR's type, and QEMU's emulated CPU (the test host's)
/// lets user space do port I/O through the TSS bitmap only with type 9: there a restored
/// guest's `ioperm`ed process got SIGSEGV on `in`. Intel's VM entry requires a busy TR in
/// 64-bit mode, so nothing changes there.
fn restore_sregs(s: &kvm_bindings::kvm_sregs, amd: bool) -> kvm_bindings::kvm_sregs {
    let mut out = *s;
    if amd && out.tr.present == 1 && out.tr.type_ == 11 {
        out.tr.type_ = 9;
    }
    out
}

impl Persist for Vcpu {
    type State = VcpuState;
    type Args = VcpuArgs;
    type Error = VcpuError;

    /// Saves the vCPU (run it on the vCPU's own thread while paused).
    fn save(&self) -> Result<VcpuState, VcpuError> {
        let fd = &self.fd;
        Ok(VcpuState {
            mp_state: fd.get_mp_state().map_err(self.err("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(self.err("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(self.err("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(self.err("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(self.err("KVM_GET_XCRS"))?,
            debugregs: fd.get_debug_regs().map_err(self.err("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(self.err("KVM_GET_LAPIC"))?,
            msrs: self.read_msrs(&self.msr_list)?,
            events: fd.get_vcpu_events().map_err(self.err("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Loads `s` into the fresh vCPU in the order KVM needs: MSRs after sregs (EFER) and the
    /// LAPIC (TSC deadline), events last.
    fn restore(args: VcpuArgs, s: &VcpuState) -> Result<Vcpu, VcpuError> {
        let v = args.vcpu;
        let fd = &v.fd;
        fd.set_mp_state(s.mp_state).map_err(v.err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&s.regs).map_err(v.err("KVM_SET_REGS"))?;
        fd.set_sregs(&restore_sregs(&s.sregs, host_is_amd())).map_err(v.err("KVM_SET_SREGS"))?;
        // SAFETY: `s.xsave` is a legacy 4 KiB kvm_xsave, the size KVM_SET_XSAVE reads (the
        // CPUID policy keeps XCR0 inside it, so no KVM_SET_XSAVE2 is needed).
        unsafe { fd.set_xsave(&s.xsave) }.map_err(v.err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&s.xcrs).map_err(v.err("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&s.debugregs).map_err(v.err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&s.lapic).map_err(v.err("KVM_SET_LAPIC"))?;
        let entries: Vec<kvm_msr_entry> = s
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() })
            .collect();
        for chunk in entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| VcpuError::Msrs {
                index: v.index,
                what: "build",
                done: 0,
                total: chunk.len(),
            })?;
            let n = fd.set_msrs(&msrs).map_err(v.err("KVM_SET_MSRS"))?;
            if n != chunk.len() {
                return Err(VcpuError::Msrs {
                    index: v.index,
                    what: "KVM_SET_MSRS",
                    done: n,
                    total: chunk.len(),
                });
            }
        }
        fd.set_vcpu_events(&s.events).map_err(v.err("KVM_SET_VCPU_EVENTS"))?;
        Ok(v)
    }
}

/// A job run on the vCPU thread while it is paused (save or load of its state).
pub type VcpuJob = Box<dyn FnOnce(&mut Vcpu) + Send>;

/// Commands to a vCPU thread.
pub enum VcpuCmd {
    /// Stop at the next exit and acknowledge on the sender.
    Pause(Sender<()>),
    /// Continue running.
    Resume,
    /// Run a job on the vCPU (only while paused).
    Run(VcpuJob),
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
pub struct VcpuContext {
    /// Port and MMIO devices.
    pub bus: Arc<IoBus>,
    /// Guest RAM (instruction bytes in error reports).
    pub ram: Arc<GuestRam>,
    /// Where a fatal exit is recorded.
    pub exit: Arc<ExitSignal>,
}

/// What a [`VcpuThread`] is started with: the vCPU, what every vCPU thread shares, and
/// whether to wait for [`VcpuCmd::Resume`] first.
type Launch = (Vcpu, VcpuContext, bool);

/// The thread of vCPU `index`, started before its vCPU is ready to run: it has its timer
/// slack and its seccomp filter and waits for [`VcpuThread::start`]. A standby VMM starts them
/// ahead, so that a restore pays neither the thread's creation nor the filter's load.
/// Dropped unstarted, the thread ends.
pub struct VcpuThread {
    index: u8,
    cmds: Sender<VcpuCmd>,
    go: Sender<Launch>,
    thread: JoinHandle<()>,
}

/// Starts the thread of vCPU `index` (see [`VcpuThread`]).
pub fn prespawn(index: u8) -> Result<VcpuThread, VcpuError> {
    let (cmd_tx, cmds) = std::sync::mpsc::channel();
    let (go, launch) = std::sync::mpsc::channel::<Launch>();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .stack_size(256 * 1024)
        .spawn(move || {
            set_timer_slack();
            // Before the first KVM_RUN: everything the guest triggers on this thread runs
            // under the vCPU filter.
            crate::seccomp::install_or_exit(crate::seccomp::Kind::Vcpu);
            let Ok((vcpu, ctx, start_paused)) = launch.recv() else { return };
            if let Some(exit) = run_loop(vcpu, &ctx, &cmds, start_paused) {
                ctx.exit.request(exit);
            }
        })
        .map_err(VcpuError::Spawn)?;
    Ok(VcpuThread { index, cmds: cmd_tx, go, thread })
}

impl VcpuThread {
    /// The vCPU index this thread was started for.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Runs `vcpu` (of this thread's index) on the thread.
    pub fn start(
        self,
        vcpu: Vcpu,
        ctx: VcpuContext,
        start_paused: bool,
    ) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        if vcpu.index != index {
            return Err(VcpuError::Gone(vcpu.index));
        }
        // Fails only if the thread ended (its filter could not be installed).
        self.go.send((vcpu, ctx, start_paused)).map_err(|_| VcpuError::Gone(index))?;
        Ok(VcpuHandle { index, cmds: self.cmds, thread: self.thread })
    }
}

/// Spawns the thread that runs `vcpu`; it waits for [`VcpuCmd::Resume`] first if
/// `start_paused`.
pub fn spawn(vcpu: Vcpu, ctx: VcpuContext, start_paused: bool) -> Result<VcpuHandle, VcpuError> {
    prespawn(vcpu.index)?.start(vcpu, ctx, start_paused)
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

/// The sleep an OUT of `data` (little endian, 1-4 bytes) to the idle port asks for, clamped to
/// [`IDLE_MAX_US`].
pub fn idle_duration(data: &[u8]) -> Duration {
    let mut le = [0u8; 4];
    for (d, s) in le.iter_mut().zip(data) {
        *d = *s;
    }
    let us = u32::from_le_bytes(le).min(IDLE_MAX_US);
    Duration::from_micros(u64::from(us))
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
fn paused(vcpu: &mut Vcpu, cmds: &Receiver<VcpuCmd>) -> bool {
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
fn service(vcpu: &mut Vcpu, cmds: &Receiver<VcpuCmd>, kept: Option<VcpuCmd>) -> bool {
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

/// What one exit asks of the loop.
enum Step {
    /// Re-enter the guest.
    Continue,
    /// Sleep up to this long first (idle port).
    Idle(Duration),
    /// KVM_RUN was interrupted by a kick: serve commands.
    Kicked,
    /// Stop the thread (the VM is ending: recorded by a device or by this exit).
    Stop(Option<VmExit>),
}

/// Handles one KVM_RUN outcome.
fn step(vcpu: &mut Vcpu, ctx: &VcpuContext) -> Step {
    let index = vcpu.index;
    let error = match vcpu.fd.run() {
        Ok(VcpuExit::IoOut(port, data)) => {
            if port == IDLE_PORT {
                return Step::Idle(idle_duration(data));
            }
            ctx.bus.pio_write(port, data);
            // A device (i8042, ACPI PM) may have ended the VM: stop running the guest.
            return if ctx.exit.requested() { Step::Stop(None) } else { Step::Continue };
        }
        Ok(VcpuExit::IoIn(port, data)) => {
            if port == IDLE_PORT {
                fill_le(data, IDLE_MAGIC);
            } else {
                ctx.bus.pio_read(port, data);
            }
            return Step::Continue;
        }
        Ok(VcpuExit::MmioRead(addr, data)) => match ctx.bus.mmio_read(addr, data) {
            Ok(()) => return Step::Continue,
            Err(_) => VcpuExitError::UnhandledMmio { write: false, addr, len: data.len() },
        },
        Ok(VcpuExit::MmioWrite(addr, data)) => match ctx.bus.mmio_write(addr, data) {
            Ok(()) => return if ctx.exit.requested() { Step::Stop(None) } else { Step::Continue },
            Err(_) => VcpuExitError::UnhandledMmio { write: true, addr, len: data.len() },
        },
        Ok(VcpuExit::Shutdown) => VcpuExitError::TripleFault,
        Ok(VcpuExit::FailEntry(reason, cpu)) => VcpuExitError::FailEntry { reason, cpu },
        Ok(VcpuExit::InternalError) => {
            // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit the `internal` member of the
            // kvm_run union is the valid one.
            let internal = unsafe { vcpu.fd.get_kvm_run().__bindgen_anon_1.internal };
            VcpuExitError::Internal { suberror: internal.suberror }
        }
        Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => return Step::Stop(Some(VmExit::Reset)),
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => return Step::Stop(Some(VmExit::PowerOff)),
            other => VcpuExitError::SystemEvent(other),
        },
        Ok(VcpuExit::Hlt) => VcpuExitError::Halted,
        Ok(other) => VcpuExitError::Unexpected(format!("{other:?}")),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            vcpu.fd.set_kvm_immediate_exit(0);
            return Step::Kicked;
        }
        Err(e) => {
            // Guest memory may be what failed (e.g. a page server that cannot serve a
            // page leaves it inaccessible): report registers only, never read it.
            let at = context(&vcpu.fd, None);
            return Step::Stop(Some(VmExit::Vcpu { index, error: VcpuExitError::Run(e), at }));
        }
    };
    let at = context(&vcpu.fd, Some(&ctx.ram));
    Step::Stop(Some(VmExit::Vcpu { index, error, at }))
}

fn run_loop(
    mut vcpu: Vcpu,
    ctx: &VcpuContext,
    cmds: &Receiver<VcpuCmd>,
    start_paused: bool,
) -> Option<VmExit> {
    let run_ptr: *mut kvm_run = vcpu.fd.get_kvm_run();
    KVM_RUN_PTR.with(|p| p.set(run_ptr));
    if start_paused && !paused(&mut vcpu, cmds) {
        return None;
    }
    if vcpu.index == 0 {
        crate::timing::mark("first KVM_RUN");
    }
    // A command received while idling, served once KVM_RUN is interrupted by its kick.
    let mut kept: Option<VcpuCmd> = None;
    // A command sent before KVM_RUN_PTR was set had its kick find no kvm_run: the first
    // KVM_RUN would not return for it (a halted vCPU never would, and a pause would wait
    // forever). Take it now and make that KVM_RUN return at once. One sent after this point
    // is kicked normally.
    if let Ok(cmd) = cmds.try_recv() {
        kept = Some(cmd);
        // SAFETY: `run_ptr` is this thread's kvm_run mapping, valid while `vcpu` lives; a
        // byte store, as the kick handler does.
        unsafe { std::ptr::write_volatile(&raw mut (*run_ptr).immediate_exit, 1) };
    }
    loop {
        match step(&mut vcpu, ctx) {
            Step::Continue => {}
            // With a command kept, its kick is on the way: do not wait again.
            Step::Idle(d) if kept.is_none() => match idle(d, cmds) {
                Ok(cmd) => kept = cmd,
                Err(()) => return None,
            },
            Step::Idle(_) => {}
            Step::Kicked => {
                if !service(&mut vcpu, cmds, kept.take()) {
                    return None;
                }
            }
            Step::Stop(exit) => return exit,
        }
    }
}

fn fill_le(data: &mut [u8], v: u32) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = v.to_le_bytes().get(i).copied().unwrap_or(0);
    }
}

/// Where the vCPU is, best effort; instruction bytes only when `ram` is given.
fn context(vcpu: &VcpuFd, ram: Option<&GuestRam>) -> Option<GuestContext> {
    let regs = vcpu.get_regs().ok()?;
    let mut c = GuestContext { rip: regs.rip, ..Default::default() };
    if let Ok(sregs) = vcpu.get_sregs() {
        c.cs_cr0 = Some((sregs.cs.selector, sregs.cr0));
    }
    let (Some(ram), Ok(t)) = (ram, vcpu.translate_gva(regs.rip)) else {
        return Some(c);
    };
    if t.valid != 0 {
        for i in 0..15u64 {
            match ram.mem().read_obj::<u8>(GuestAddress(t.physical_address + i)) {
                Ok(v) => c.bytes.push(v),
                Err(_) => break,
            }
        }
    }
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_tr_is_loaded_available_on_amd_only() {
        let mut s = kvm_bindings::kvm_sregs::default();
        s.tr.present = 1;
        s.tr.type_ = 11;
        assert_eq!(restore_sregs(&s, true).tr.type_, 9, "AMD");
        assert_eq!(restore_sregs(&s, false).tr.type_, 11, "Intel keeps the busy TR");
        s.tr.type_ = 3; // a 16-bit busy TSS: left alone
        assert_eq!(restore_sregs(&s, true).tr.type_, 3);
        let mut other = s;
        other.cr3 = 0x1000;
        assert_eq!(restore_sregs(&other, true).cr3, 0x1000, "the rest as saved");
    }

    #[test]
    fn idle_requests_clamp_and_zero_extend() {
        let us = |n: u32| idle_duration(&n.to_le_bytes());
        assert_eq!(us(0), Duration::ZERO);
        assert_eq!(us(40), Duration::from_micros(40));
        assert_eq!(us(IDLE_MAX_US), Duration::from_micros(1000));
        assert_eq!(us(IDLE_MAX_US + 1), Duration::from_micros(1000));
        assert_eq!(us(u32::MAX), Duration::from_micros(1000));
        assert_eq!(idle_duration(&[200]), Duration::from_micros(200));
        assert_eq!(idle_duration(&[0x10, 0x02]), Duration::from_micros(528));
        assert_eq!(idle_duration(&[]), Duration::ZERO);
        let mut d = [0u8; 4];
        fill_le(&mut d, IDLE_MAGIC);
        assert_eq!(&d, b"VORG", "\"GROV\" as a little-endian u32");
    }

    /// A command sent before a vCPU thread set its kick target (its kick found no kvm_run)
    /// is still served: an AP that never got a SIPI blocks in KVM_RUN for good, so without
    /// the check at the loop's start this pause would wait forever (seen as a hung snapshot
    /// right after boot, once the seccomp install widened the window at thread start).
    #[test]
    fn a_pause_sent_before_the_thread_runs_is_served() {
        if !crate::vstate::vm::kvm_ok() {
            return;
        }
        let vm = crate::vstate::vm::Vm::create().unwrap();
        let (cpuids, _) = vm.vcpu_cpuids(2).unwrap();
        let _bsp = Vcpu::create(&vm.fd, 0, &cpuids[0]).unwrap();
        let ap = Vcpu::create(&vm.fd, 1, &cpuids[1]).unwrap();
        let ctx = VcpuContext {
            bus: Arc::new(IoBus::new()),
            ram: Arc::new(GuestRam::new_anonymous(2 << 20).unwrap()),
            exit: ExitSignal::new().unwrap(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let (ack_tx, ack_rx) = std::sync::mpsc::channel();
        // Queued before the thread exists, and never kicked.
        tx.send(VcpuCmd::Pause(ack_tx)).unwrap();
        let t = std::thread::spawn(move || run_loop(ap, &ctx, &rx, false));
        // A hang guard, not a timing assertion.
        ack_rx.recv_timeout(Duration::from_secs(60)).expect("the pause is served");
        // Paused, it ends when the VMM hangs up.
        drop(tx);
        assert!(t.join().unwrap().is_none());
    }

    /// A vCPU saved after boot setup, restored into a fresh VM and saved again, comes back
    /// with the same registers, LAPIC and MSRs (TSC and kvmclock counters move on).
    #[test]
    fn vcpu_state_round_trips_through_kvm() {
        if !crate::vstate::vm::kvm_ok() {
            return;
        }
        let a_vm = crate::vstate::vm::Vm::create().unwrap();
        let (cpuids, _) = a_vm.vcpu_cpuids(1).unwrap();
        let mut a = Vcpu::create(&a_vm.fd, 0, &cpuids[0]).unwrap();
        a.configure_boot(0x10_0000).unwrap();
        let list: Arc<Vec<u32>> =
            Arc::new(a_vm.kvm.get_msr_index_list().unwrap().as_slice().to_vec());
        a.msr_list = list.clone();
        let saved = a.save().unwrap();
        assert_eq!(saved.regs.rip, 0x10_0000);
        assert!(saved.msrs.iter().any(|&(i, _)| i == 0x10), "TSC is saved");

        let b_vm = crate::vstate::vm::Vm::create().unwrap();
        let fresh = Vcpu::create(&b_vm.fd, 0, &cpuids[0]).unwrap();
        let mut b = Vcpu::restore(VcpuArgs { vcpu: fresh }, &saved).unwrap();
        b.msr_list = list;
        let again = b.save().unwrap();
        assert_eq!(again.regs.rip, saved.regs.rip);
        assert_eq!(again.regs.rsi, saved.regs.rsi);
        assert_eq!(again.sregs.cr3, saved.sregs.cr3);
        assert_eq!(again.sregs.efer, saved.sregs.efer);
        assert_eq!(again.lapic.regs[..], saved.lapic.regs[..]);
        assert_eq!(again.xcrs.xcrs[0].value, saved.xcrs.xcrs[0].value);
        let idx = |s: &VcpuState| s.msrs.iter().map(|&(i, _)| i).collect::<Vec<_>>();
        assert_eq!(idx(&again), idx(&saved), "same MSRs readable");
        for (x, y) in again.msrs.iter().zip(&saved.msrs) {
            if x.0 != 0x10 && x.0 != 0x6e0 {
                assert_eq!(x, y, "MSR {:#x}", x.0);
            }
        }
    }
}
