//! The VM: KVM VM fd, guest RAM slots, in-kernel irqchip/PIT, vCPUs and devices, and booting.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError};
use crate::cpuid;
use crate::devices::{DeviceError, PortBus, SerialOut, COM1_IRQ};
use crate::layout::{MAX_MEM_MIB, MAX_VCPUS, MIN_MEM_MIB};
use crate::memory::{GuestRam, MemoryError};
use crate::timing;
use crate::vcpu::{self, VcpuCmd, VcpuError, VcpuEvent, VcpuHandle, VmExit};
use crate::x86::{self, X86Error};

/// TSS address for Intel VMX (three pages just below the 4 GiB boundary, inside the MMIO gap).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors from building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM VM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// Memory setup.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// x86 tables.
    #[error(transparent)]
    X86(#[from] X86Error),
    /// vCPU setup.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Devices.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// What `grove-vmm run` boots.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Kernel (ELF vmlinux or bzImage).
    pub kernel: String,
    /// Optional initrd.
    pub initrd: Option<String>,
    /// Command line (default [`boot::DEFAULT_CMDLINE`]).
    pub cmdline: Option<String>,
    /// vCPU count.
    pub vcpus: u8,
    /// Memory size in MiB.
    pub mem_mib: u64,
    /// `stdout` or a path.
    pub serial: String,
    /// Identity value on port 0x444.
    pub identity: u32,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            kernel: String::new(),
            initrd: None,
            cmdline: None,
            vcpus: 1,
            mem_mib: 128,
            serial: "stdout".into(),
            identity: 0,
        }
    }
}

impl VmConfig {
    /// Checks sizes and counts.
    pub fn validate(&self) -> Result<(), VmError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(VmError::Config(format!(
                "--vcpus {} out of range 1..={MAX_VCPUS}",
                self.vcpus
            )));
        }
        if self.mem_mib < MIN_MEM_MIB || self.mem_mib > MAX_MEM_MIB {
            return Err(VmError::Config(format!(
                "--mem-mib {} out of range {MIN_MEM_MIB}..={MAX_MEM_MIB}",
                self.mem_mib
            )));
        }
        Ok(())
    }
}

/// A built VM.
pub struct Vm {
    /// The KVM system fd.
    pub kvm: Kvm,
    /// The VM fd.
    pub fd: Arc<VmFd>,
    /// Guest RAM.
    pub ram: Arc<GuestRam>,
    /// Port devices.
    pub bus: Arc<PortBus>,
    /// Filtered CPUID per vCPU.
    pub cpuids: Vec<CpuId>,
    /// Fingerprint of the CPUID set (vCPU 0).
    pub cpuid_fingerprint: u64,
    /// vCPU threads.
    pub vcpus: Vec<VcpuHandle>,
    /// vCPU events (exits).
    pub events: Receiver<VcpuEvent>,
    events_tx: Sender<VcpuEvent>,
    serial_irq: EventFd,
    /// Whether the memory slots have KVM_MEM_LOG_DIRTY_PAGES on.
    pub dirty_logging: bool,
    /// Whether the vCPUs are paused.
    pub paused: bool,
    /// MSR indices saved with each vCPU (read from KVM at the first snapshot).
    pub(crate) msr_list: Option<Arc<Vec<u32>>>,
    /// Memory layer chain so far (base first); diff snapshots extend it.
    pub layers: Vec<std::path::PathBuf>,
    /// Head of the chain.
    pub(crate) head: Option<grove_storage::memory::LayerInfo>,
    /// uffd restores without a recorded working set: when to save the first-touch order.
    pub(crate) auto_working_set: Option<std::time::Instant>,
}

/// Opens KVM and creates the VM with its irqchip and PIT.
pub fn create_kvm_vm() -> Result<(Kvm, VmFd), VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    if kvm.get_api_version() != 12 {
        return Err(VmError::Config(format!(
            "KVM API version {} (12 needed)",
            kvm.get_api_version()
        )));
    }
    let fd = kvm.create_vm().map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
    timing::mark("KVM_CREATE_VM done");
    fd.set_tss_address(KVM_TSS_ADDRESS).map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
    fd.create_irq_chip().map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    fd.create_pit2(pit).map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;
    timing::mark("irqchip and PIT created");
    Ok((kvm, fd))
}

/// Registers (or re-registers with new flags) one KVM memory slot per RAM region.
pub fn set_memory_slots(fd: &VmFd, ram: &GuestRam, log_dirty: bool) -> Result<(), VmError> {
    for (slot, (r, &(host, _))) in ram.regions().iter().zip(ram.host_regions()).enumerate() {
        let region = kvm_userspace_memory_region {
            slot: u32::try_from(slot).map_err(|_| VmError::Config("too many slots".into()))?,
            flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: r.gpa,
            memory_size: r.size,
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping stays alive as long as `ram`, which the caller keeps for the
        // life of the VM fd (Vm owns both; the VM fd is dropped with it).
        unsafe { fd.set_user_memory_region(region) }
            .map_err(|e| VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(())
}

/// Filtered CPUID for every vCPU.
pub fn vcpu_cpuids(kvm: &Kvm, nvcpus: u8) -> Result<(Vec<CpuId>, u64), VmError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    let mut out = Vec::with_capacity(usize::from(nvcpus));
    let mut fp = 0;
    for i in 0..nvcpus {
        let entries = cpuid::filter(supported.as_slice(), i, nvcpus);
        if i == 0 {
            fp = cpuid::fingerprint(&entries);
        }
        out.push(
            CpuId::from_entries(&entries)
                .map_err(|_| VmError::Config("too many CPUID entries".into()))?,
        );
    }
    Ok((out, fp))
}

fn vcpu_err(index: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { index, what, source }
}

/// Creates vCPU `index` with its CPUID set.
pub fn create_vcpu(fd: &VmFd, index: u8, cpuid: &CpuId) -> Result<VcpuFd, VmError> {
    let vcpu = fd.create_vcpu(u64::from(index)).map_err(vcpu_err(index, "KVM_CREATE_VCPU"))?;
    vcpu.set_cpuid2(cpuid).map_err(vcpu_err(index, "KVM_SET_CPUID2"))?;
    Ok(vcpu)
}

/// Puts a fresh vCPU into the 64-bit boot state.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, index: u8, entry: u64) -> Result<(), VmError> {
    let msrs = x86::boot_msrs();
    let kmsrs = Msrs::from_entries(&msrs).map_err(|_| VmError::Config("MSR list".into()))?;
    let n = vcpu.set_msrs(&kmsrs).map_err(vcpu_err(index, "KVM_SET_MSRS"))?;
    if n != msrs.len() {
        return Err(VmError::Config(format!(
            "vCPU {index}: KVM accepted {n} of {} boot MSRs",
            msrs.len()
        )));
    }
    vcpu.set_fpu(&x86::boot_fpu()).map_err(vcpu_err(index, "KVM_SET_FPU"))?;
    let sregs = vcpu.get_sregs().map_err(vcpu_err(index, "KVM_GET_SREGS"))?;
    vcpu.set_sregs(&x86::boot_sregs(sregs)).map_err(vcpu_err(index, "KVM_SET_SREGS"))?;
    vcpu.set_regs(&x86::boot_regs(entry)).map_err(vcpu_err(index, "KVM_SET_REGS"))?;
    let mut lapic = vcpu.get_lapic().map_err(vcpu_err(index, "KVM_GET_LAPIC"))?;
    x86::set_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(vcpu_err(index, "KVM_SET_LAPIC"))?;
    Ok(())
}

impl Vm {
    /// Boots a kernel: builds everything and starts the vCPUs.
    pub fn boot(cfg: &VmConfig) -> Result<Self, VmError> {
        cfg.validate()?;
        let cmdline = cfg.cmdline.clone().unwrap_or_else(|| boot::DEFAULT_CMDLINE.to_string());
        let out = SerialOut::open(&cfg.serial)?;
        let (kvm, fd) = create_kvm_vm()?;
        let ram = GuestRam::new_anonymous(cfg.mem_mib << 20)?;
        set_memory_slots(&fd, &ram, false)?;
        timing::mark("guest memory mapped");
        let kernel = boot::prepare(&ram, &cfg.kernel, cfg.initrd.as_deref(), &cmdline)?;
        x86::write_boot_tables(ram.mem())?;
        x86::write_mptable(ram.mem(), cfg.vcpus)?;
        timing::mark("kernel loaded");
        let (cpuids, cpuid_fingerprint) = vcpu_cpuids(&kvm, cfg.vcpus)?;
        let mut vcpu_fds = Vec::with_capacity(usize::from(cfg.vcpus));
        for i in 0..cfg.vcpus {
            let v = create_vcpu(&fd, i, &cpuids[usize::from(i)])?;
            setup_boot_vcpu(&v, i, kernel.entry)?;
            vcpu_fds.push(v);
        }
        timing::mark("vCPUs configured");
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        fd.register_irqfd(&serial_irq, COM1_IRQ).map_err(|e| VmError::Kvm("KVM_IRQFD", e))?;
        let irq = serial_irq.try_clone().map_err(DeviceError::EventFd)?;
        let bus = Arc::new(PortBus::new(out, irq, timing::start(), cfg.identity));
        let mut vm = Self::assemble(kvm, fd, ram, bus, cpuids, cpuid_fingerprint, serial_irq);
        vm.start_vcpus(vcpu_fds, false)?;
        Ok(vm)
    }

    /// Puts the parts together (no vCPU threads yet).
    pub fn assemble(
        kvm: Kvm,
        fd: VmFd,
        ram: GuestRam,
        bus: Arc<PortBus>,
        cpuids: Vec<CpuId>,
        cpuid_fingerprint: u64,
        serial_irq: EventFd,
    ) -> Self {
        let (events_tx, events) = channel();
        Self {
            kvm,
            fd: Arc::new(fd),
            ram: Arc::new(ram),
            bus,
            cpuids,
            cpuid_fingerprint,
            vcpus: Vec::new(),
            events,
            events_tx,
            serial_irq,
            dirty_logging: false,
            paused: false,
            msr_list: None,
            layers: Vec::new(),
            head: None,
            auto_working_set: None,
        }
    }

    /// Uses an existing event channel (a standby VMM's, whose control socket already sends
    /// into it). Call before the vCPUs start.
    pub fn with_events(mut self, tx: Sender<VcpuEvent>, rx: Receiver<VcpuEvent>) -> Self {
        self.events_tx = tx;
        self.events = rx;
        self
    }

    /// The serial interrupt eventfd.
    pub fn serial_irq(&self) -> &EventFd {
        &self.serial_irq
    }

    /// Spawns one thread per vCPU.
    pub fn start_vcpus(&mut self, fds: Vec<VcpuFd>, paused: bool) -> Result<(), VmError> {
        vcpu::install_kick_handler()?;
        let shared = vcpu::VcpuShared {
            bus: self.bus.clone(),
            ram: self.ram.clone(),
            events: self.events_tx.clone(),
        };
        for (i, v) in fds.into_iter().enumerate() {
            let index = u8::try_from(i).map_err(|_| VmError::Config("too many vCPUs".into()))?;
            self.vcpus.push(vcpu::spawn(index, v, shared.clone(), paused)?);
        }
        Ok(())
    }

    /// Pauses every vCPU; returns when all are out of KVM_RUN.
    pub fn pause(&mut self) -> Result<(), VcpuError> {
        if self.paused {
            return Ok(());
        }
        self.pause_vcpus()?;
        self.paused = true;
        Ok(())
    }

    /// Resumes every vCPU.
    pub fn resume(&mut self) -> Result<(), VcpuError> {
        if !self.paused {
            return Ok(());
        }
        self.resume_vcpus()?;
        self.paused = false;
        Ok(())
    }

    fn pause_vcpus(&self) -> Result<(), VcpuError> {
        let (ack_tx, ack_rx) = channel();
        for v in &self.vcpus {
            v.cmds.send(VcpuCmd::Pause(ack_tx.clone())).map_err(|_| VcpuError::Gone(v.index))?;
            v.kick();
        }
        // Only the vCPU threads hold senders now: a thread that died (its queued Pause
        // dropped with it) makes recv fail instead of waiting forever.
        drop(ack_tx);
        for v in &self.vcpus {
            ack_rx.recv().map_err(|_| VcpuError::Gone(v.index))?;
        }
        Ok(())
    }

    fn resume_vcpus(&self) -> Result<(), VcpuError> {
        for v in &self.vcpus {
            v.cmds.send(VcpuCmd::Resume).map_err(|_| VcpuError::Gone(v.index))?;
        }
        Ok(())
    }

    /// Runs `job` on every (paused) vCPU thread and collects the results in vCPU order.
    pub fn on_vcpus<T: Send + 'static>(
        &self,
        job: impl Fn(u8, &mut VcpuFd) -> T + Send + Sync + 'static,
    ) -> Result<Vec<T>, VcpuError> {
        let job = Arc::new(job);
        let mut rxs = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let (tx, rx) = channel();
            let job = job.clone();
            let index = v.index;
            v.cmds
                .send(VcpuCmd::Run(Box::new(move |fd| {
                    let _ = tx.send(job(index, fd));
                })))
                .map_err(|_| VcpuError::Gone(v.index))?;
            rxs.push((v.index, rx));
        }
        rxs.into_iter().map(|(i, rx)| rx.recv().map_err(|_| VcpuError::Gone(i))).collect()
    }

    /// Turns dirty-page logging on or off on every slot.
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<(), VmError> {
        if self.dirty_logging != on {
            set_memory_slots(&self.fd, &self.ram, on)?;
            self.dirty_logging = on;
        }
        Ok(())
    }

    /// Where vCPU exits and control requests are sent.
    pub fn event_sender(&self) -> Sender<VcpuEvent> {
        self.events_tx.clone()
    }

    /// Serves control requests until a vCPU ends the VM.
    pub fn run_until_exit(&mut self) -> VmExit {
        loop {
            let ev = match self.auto_working_set {
                Some(at) => {
                    let left = at.saturating_duration_since(std::time::Instant::now());
                    match self.events.recv_timeout(left) {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                            // Best effort: a read-only snapshot directory just means no
                            // prefetch next time.
                            self.auto_working_set = None;
                            let _ = self.save_working_set();
                            continue;
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                            Err(std::sync::mpsc::RecvError)
                        }
                        Ok(ev) => Ok(ev),
                    }
                }
                None => self.events.recv(),
            };
            match ev {
                Ok(VcpuEvent::Exit(e)) => return e,
                Ok(VcpuEvent::Api(call)) => {
                    let reply = crate::api::handle(self, call.req);
                    let _ = call.reply.send(reply);
                }
                Err(_) => return VmExit::Error("all vCPU threads ended".into()),
            }
        }
    }
}
