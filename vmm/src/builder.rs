//! Building a VM: one builder for the three ways a grove-vmm starts.
//!
//! - [`boot`]: fresh memory, a kernel, boot state; devices from the config.
//! - [`restore`] (cold): memory from a snapshot's layer chain (mmap or uffd), then every
//!   component restored from the state file.
//! - [`Standby`]: the per-VM KVM work done ahead (VM, irqchip, PIT, memory slots over reserved
//!   memory, vCPUs with CPUID, COM1's irqfd); [`Standby::finish`] maps a snapshot's chain over
//!   the reserved memory and restores the rest like a cold restore.
//!
//! All three go through the same steps ([`kvm_parts`], then [`boot_tail`] or [`load`]) and end
//! in [`Vmm::start`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use grove_memory::{
    restore_mmap, Chain, LayerError, LayerInfo, MmapOptions, PageServerError, Prefetch,
    RestoreError, UffdMemory, UffdOptions, WorkingSet,
};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiError};
use crate::boot::{self, BootError};
use crate::devices::legacy::serial::{SerialError, SerialOut, COM1_IRQ};
use crate::devices::lock;
use crate::devices::manager::{
    DeviceManager, DeviceManagerError, DeviceState, DiskPaths, EventLoop, LegacyArgs, NetHost,
    RestoreHost, RestoreOverrides, VirtioDeviceState,
};
use crate::devices::virtio::block::disk::{self, Disk, DiskError, DiskSpec};
use crate::devices::virtio::net::tap::{Tap, TapError};
use crate::devices::virtio::net::NetConfig;
use crate::devices::virtio::vsock::device::VsockConfig;
use crate::exit::ExitSignal;
use crate::layout::{MAX_MEM_MIB, MAX_VCPUS, MIN_MEM_MIB};
use crate::memory::{GuestRam, MemoryError, MemoryOwner, RamRegion};
use crate::persist::Persist;
use crate::state::{self, SnapshotState, StateError};
use crate::timing;
use crate::vmm::{Vmm, VmmError, VmmParts};
use crate::vstate::vcpu::{prespawn, Vcpu, VcpuArgs, VcpuError, VcpuThread};
use crate::vstate::vm::{Vm, VmError};
use crate::x86::{self, X86Error};

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("--vcpus {0} out of range 1..={MAX_VCPUS}")]
    Vcpus(u8),
    /// Memory size out of range.
    #[error("--mem-mib {0} out of range {MIN_MEM_MIB}..={MAX_MEM_MIB}")]
    MemMib(u64),
}

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The KVM VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// x86 boot tables.
    #[error(transparent)]
    X86(#[from] X86Error),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// Devices.
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    /// A disk's files.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The snapshot directory cannot be resolved.
    #[error("snapshot directory {path}")]
    SnapshotDir {
        /// The directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The tap of a virtio-net device.
    #[error("--net")]
    Tap(#[from] TapError),
    /// The snapshot and `--net` disagree about having a virtio-net device (standby check).
    #[error(transparent)]
    NetPresence(DeviceManagerError),
    /// The serial output.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// The exit signal's or COM1's eventfd.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The event loop.
    #[error("cannot create the event loop")]
    EventLoop(#[source] event_manager::Error),
    /// Starting the VMM.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The state file.
    #[error(transparent)]
    State(#[from] StateError),
    /// Opening memory layers.
    #[error("memory layer")]
    Layer(#[from] LayerError),
    /// mmap restore.
    #[error("mmap restore")]
    Mmap(#[from] RestoreError),
    /// uffd restore.
    #[error("uffd page server")]
    PageServer(#[from] PageServerError),
    /// Saved on another CPUID set.
    #[error("snapshot was taken on another CPU model or CPUID set (fingerprint {saved:#018x}, this host {host:#018x}); refusing to restore")]
    CpuidMismatch {
        /// In the snapshot.
        saved: u64,
        /// This host.
        host: u64,
    },
    /// The layers describe other memory than the state file.
    #[error("memory layers do not match the saved RAM layout")]
    LayoutMismatch,
    /// A snapshot another size than the standby VMM.
    #[error("snapshot has {snap_vcpus} vCPUs and {snap_bytes} bytes of RAM; this standby VMM has {vcpus} and {bytes}")]
    StandbyMismatch {
        /// The snapshot's vCPUs.
        snap_vcpus: usize,
        /// The snapshot's RAM.
        snap_bytes: u64,
        /// The standby VMM's vCPUs.
        vcpus: usize,
        /// The standby VMM's RAM.
        bytes: u64,
    },
    /// Standby VMMs restore with mmap only.
    #[error("a standby VMM restores in mmap mode only")]
    StandbyMode,
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
    /// A virtio-rng device.
    pub rng: bool,
    /// virtio-blk disks, in order (the first is `/dev/vda` in a Linux guest).
    pub disks: Vec<DiskSpec>,
    /// A virtio-vsock device.
    pub vsock: Option<VsockConfig>,
    /// A virtio-net device.
    pub net: Option<NetConfig>,
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
            rng: false,
            disks: Vec::new(),
            vsock: None,
            net: None,
        }
    }
}

/// Checks a vCPU count and memory size.
pub fn check_size(vcpus: u8, mem_mib: u64) -> Result<(), ConfigError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(ConfigError::Vcpus(vcpus));
    }
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mem_mib) {
        return Err(ConfigError::MemMib(mem_mib));
    }
    Ok(())
}

impl VmConfig {
    /// Checks sizes and counts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_size(self.vcpus, self.mem_mib)
    }
}

/// Memory modes for restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemMode {
    /// MAP_PRIVATE layer files.
    Mmap,
    /// userfaultfd page server.
    Uffd,
}

/// How to restore.
#[derive(Clone, Debug)]
pub struct RestoreConfig {
    /// Snapshot directory.
    pub dir: PathBuf,
    /// Memory mode.
    pub mem_mode: MemMode,
    /// Identity for port 0x444.
    pub identity: u32,
    /// Serial sink.
    pub serial: String,
    /// Turn dirty logging on from the start (needed for diff snapshots of the restored VM).
    pub dirty_logging: bool,
    /// Where the VM's writable disks get their new layers (`DIR/<disk id>.data`, `.idx`).
    pub disk_dir: Option<PathBuf>,
    /// Host-side resources the restored VM gets instead of the snapshot's.
    pub overrides: RestoreOverrides,
    /// The tap for the snapshot's virtio-net device.
    pub net: Option<NetConfig>,
}

/// How long a restore waits for a virtio-net tap to be running before the guest resumes.
pub const NET_RUNNING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens the tap a `--net` option names (in its namespace).
pub fn open_net(c: Option<&NetConfig>) -> Result<Option<NetHost>, BuildError> {
    let Some(c) = c else { return Ok(None) };
    let tap = Tap::open(&c.tap, c.netns.as_deref())?;
    timing::mark("tap opened");
    Ok(Some(NetHost { config: c.clone(), backend: Box::new(tap) }))
}

/// A fresh event loop.
pub fn event_loop() -> Result<EventLoop, BuildError> {
    EventLoop::new().map_err(BuildError::EventLoop)
}

/// The per-VM KVM work every path does the same way.
struct KvmParts {
    vm: Vm,
    ram: Arc<GuestRam>,
    fingerprint: u64,
    vcpus: Vec<Vcpu>,
    serial_irq: EventFd,
    /// Their threads, started ahead (standby VMMs; empty otherwise).
    threads: Vec<VcpuThread>,
}

/// KVM VM, irqchip, PIT, memory slots over `ram`, vCPUs with their CPUID, COM1's irqfd.
fn kvm_parts(nvcpus: u8, ram: GuestRam, log_dirty: bool) -> Result<KvmParts, BuildError> {
    let vm = Vm::create()?;
    vm.set_memory_slots(&ram, log_dirty)?;
    timing::mark("guest memory mapped");
    let (cpuids, fingerprint) = vm.vcpu_cpuids(nvcpus)?;
    let vcpus = (0..nvcpus)
        .map(|i| Vcpu::create(&vm.fd, i, &cpuids[usize::from(i)]))
        .collect::<Result<Vec<_>, _>>()?;
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    Ok(KvmParts { vm, ram: Arc::new(ram), fingerprint, vcpus, serial_irq, threads: Vec::new() })
}

/// Boots a kernel: builds everything and starts the vCPUs.
pub fn boot(cfg: &VmConfig, mut events: EventLoop) -> Result<Vmm, BuildError> {
    cfg.validate()?;
    let cmdline = cfg.cmdline.clone().unwrap_or_else(|| boot::DEFAULT_CMDLINE.to_string());
    let serial_out = SerialOut::open(&cfg.serial)?;
    let ram = GuestRam::new_anonymous(cfg.mem_mib << 20)?;
    let p = kvm_parts(cfg.vcpus, ram, false)?;
    let exit = ExitSignal::new().map_err(BuildError::EventFd)?;
    let legacy = LegacyArgs {
        serial_out,
        serial_irq: p.serial_irq,
        start: timing::start(),
        identity: cfg.identity,
        exit: exit.clone(),
    };
    let mut devices = DeviceManager::new(p.ram.clone(), legacy)?;
    disk::check_specs(&cfg.disks)?;
    for spec in &cfg.disks {
        devices.add_block(&p.vm, &mut events, Disk::open(spec)?)?;
    }
    if cfg.rng {
        devices.add_rng(&p.vm, &mut events)?;
    }
    if let Some(v) = &cfg.vsock {
        devices.add_vsock(&p.vm, &mut events, v)?;
    }
    if let Some(net) = open_net(cfg.net.as_ref())? {
        devices.add_net(&p.vm, &mut events, net)?;
    }
    // guest-init writes the boot-timer port only when asked: under other VMMs the write
    // has faulted (docs/testing.md), and the port is grove-vmm's.
    let cmdline = cmdline + &devices.cmdline_devices() + " " + boot::BOOT_TIMER_ARG;
    let rsdp = acpi::write_tables(p.ram.mem(), p.vcpus.len(), &devices.mmio_infos())?;
    let kernel = boot::prepare(&p.ram, &cfg.kernel, cfg.initrd.as_deref(), &cmdline, Some(rsdp))?;
    x86::write_boot_tables(p.ram.mem())?;
    x86::write_mptable(p.ram.mem(), cfg.vcpus)?;
    timing::mark("kernel loaded");
    for v in &p.vcpus {
        v.configure_boot(kernel.entry)?;
    }
    timing::mark("vCPUs configured");
    let parts = VmmParts {
        vm: p.vm,
        ram: p.ram,
        fingerprint: p.fingerprint,
        devices,
        events,
        exit,
        dirty_logging: false,
        layers: Vec::new(),
        head: None,
        auto_working_set: None,
        threads: p.threads,
    };
    Ok(Vmm::start(parts, p.vcpus)?)
}

/// How long after a first uffd restore the first-touch order is saved as the snapshot's
/// working set.
pub const AUTO_WORKING_SET: std::time::Duration = std::time::Duration::from_millis(500);

/// Restores VM, vCPU and device state into built KVM parts and starts the VM: the tail every
/// restore shares.
fn load(
    p: KvmParts,
    state: &SnapshotState,
    head: LayerInfo,
    cfg: &RestoreConfig,
    mut events: EventLoop,
    (serial_out, net): (SerialOut, Option<NetHost>),
    auto_working_set: Option<Instant>,
) -> Result<Vmm, BuildError> {
    // The clock is set once, after the TSCs (below).
    let vm = p.vm.restore_chips(&state.vm)?;
    let mut tsc_loaded = None;
    let vcpus = p
        .vcpus
        .into_iter()
        .zip(&state.vcpus)
        .map(|(vcpu, s)| {
            let v = Vcpu::restore(VcpuArgs { vcpu }, s);
            tsc_loaded.get_or_insert_with(Instant::now);
            v
        })
        .collect::<Result<Vec<_>, _>>()?;
    let fds: Vec<&kvm_ioctls::VcpuFd> = vcpus.iter().map(|v| &v.fd).collect();
    let vcpu0_msrs = state.vcpus.first().map(|v| v.msrs.as_slice());
    vm.set_clock_after_tsc(&state.vm, &fds, vcpu0_msrs, p.ram.mem(), tsc_loaded)?;
    timing::mark("vCPUs restored");
    let exit = ExitSignal::new().map_err(BuildError::EventFd)?;
    let legacy = LegacyArgs {
        serial_out,
        serial_irq: p.serial_irq,
        start: timing::start(),
        identity: cfg.identity,
        exit: exit.clone(),
    };
    let snapshot_dir = cfg.dir.canonicalize().map_err(|source| BuildError::SnapshotDir {
        path: cfg.dir.display().to_string(),
        source,
    })?;
    let disks = DiskPaths { snapshot_dir, disk_dir: cfg.disk_dir.clone() };
    let devices = DeviceManager::restore(
        p.ram.clone(),
        &vm,
        &mut events,
        legacy,
        &state.devices,
        RestoreHost { disks, overrides: cfg.overrides.clone(), net },
    )?;
    {
        let mut ports = lock(devices.ports());
        let g = ports.generation().wrapping_add(1);
        ports.set_generation(g);
    }
    // Notifications the saved VM had not served yet are served now.
    devices.process_pending();
    // The guest talks at once after a restore: its tap must deliver by then.
    for late in devices.wait_net_running(NET_RUNNING_TIMEOUT) {
        crate::errln!("grove-vmm: warning: {late} after {NET_RUNNING_TIMEOUT:?}; the guest may lose its first frames");
    }
    timing::mark("devices restored");
    let parts = VmmParts {
        vm,
        ram: p.ram,
        fingerprint: p.fingerprint,
        devices,
        events,
        exit,
        dirty_logging: cfg.dirty_logging,
        layers: state.layers.iter().map(PathBuf::from).collect(),
        head: Some(head),
        auto_working_set,
        threads: p.threads,
    };
    Ok(Vmm::start(parts, vcpus)?)
}

/// Builds guest memory for the chain in the chosen mode.
fn restore_memory(
    chain: Chain,
    regions: &[RamRegion],
    mode: MemMode,
) -> Result<GuestRam, BuildError> {
    let layout = chain.layout();
    let same = layout.regions.len() == regions.len()
        && layout.regions.iter().zip(regions).all(|(l, r)| l.gpa == r.gpa && l.len == r.size);
    if !same {
        return Err(BuildError::LayoutMismatch);
    }
    let (hosts, owner): (Vec<(*mut u8, usize)>, MemoryOwner) = match mode {
        MemMode::Mmap => {
            let m = restore_mmap(&chain, &MmapOptions::default())?;
            let hosts = m.regions().iter().map(|r| (r.as_ptr(), r.len)).collect();
            (hosts, Box::new(m))
        }
        MemMode::Uffd => {
            let ws_path = WorkingSet::default_path(&chain.head().path);
            // A working set recorded for another chain head is refused by the page server;
            // an unreadable one means no prefetch.
            let prefetch = match WorkingSet::load(&ws_path) {
                Ok(ws) => Prefetch::BeforeStart(ws),
                Err(_) => Prefetch::None,
            };
            let opts = UffdOptions {
                prefetch,
                // The page server takes its filter before it serves a page.
                thread_start: Some(|| {
                    crate::seccomp::install_or_exit(crate::seccomp::Kind::PageServer);
                }),
                ..Default::default()
            };
            let u = UffdMemory::start(Arc::new(chain), &opts)?;
            let hosts = u.regions().iter().map(|r| (r.as_ptr(), r.len)).collect();
            (hosts, Box::new(u))
        }
    };
    // SAFETY: the host ranges come from `owner` (MappedMemory / UffdMemory), which keeps them
    // mapped until it is dropped with the GuestRam.
    Ok(unsafe { GuestRam::from_external(regions.to_vec(), hosts, owner) }?)
}

fn check_fingerprint(state: &SnapshotState, host: u64) -> Result<(), BuildError> {
    if state.cpuid_fingerprint != host {
        return Err(BuildError::CpuidMismatch { saved: state.cpuid_fingerprint, host });
    }
    Ok(())
}

/// Restores a VM from a snapshot directory and starts its vCPUs (a cold restore).
pub fn restore(cfg: &RestoreConfig, events: EventLoop) -> Result<Vmm, BuildError> {
    let state = state::read_state(&cfg.dir)?;
    // A snapshot whose writer was killed may have left temporary files beside it.
    crate::snapshot::sweep(&cfg.dir, false);
    timing::mark("state file read");
    DeviceManager::check_overrides(&state.devices, &cfg.overrides)?;
    let serial_out = SerialOut::open(&cfg.serial)?;
    let chain = Chain::open(&state.layers)?;
    let head = chain.head();
    let ram = restore_memory(chain, &state.regions, cfg.mem_mode)?;
    let p = kvm_parts(state.nvcpus, ram, cfg.dirty_logging)?;
    check_fingerprint(&state, p.fingerprint)?;
    timing::mark("memory restored");
    let ws_path = WorkingSet::default_path(&head.path);
    // First uffd restore of this snapshot: record what the guest touches in its first
    // AUTO_WORKING_SET, for later restores to prefetch.
    let auto = (cfg.mem_mode == MemMode::Uffd && !ws_path.exists())
        .then(|| Instant::now() + AUTO_WORKING_SET);
    let net = open_net(cfg.net.as_ref())?;
    load(p, &state, head, cfg, events, (serial_out, net), auto)
}

/// Maps the chain over `ram`'s existing mappings with MAP_FIXED: the base layer over each
/// region, then every run a diff layer owns on top (all MAP_PRIVATE, so clean pages are shared
/// through the page cache). The KVM memory slots registered over these addresses stay valid:
/// KVM follows the host mapping (MMU notifiers), so no slot update is needed.
fn map_chain_fixed(ram: &GuestRam, chain: &Chain) -> Result<usize, BuildError> {
    use std::os::fd::AsRawFd;
    let layout = chain.layout();
    let ps = u64::from(layout.page_size);
    let firsts = layout.region_first_pages();
    let map = |addr: *mut u8, len: u64, fd: i32, off: u64| -> Result<(), BuildError> {
        let ulen = usize::try_from(len).map_err(|_| MemoryError::BadSize(len))?;
        // SAFETY: `addr..addr+len` lies inside a mapping `ram` owns (checked by the callers'
        // arithmetic against the region length), and no Rust reference into guest memory is
        // alive (vCPUs not started).
        unsafe { grove_memory::map_file_fixed(addr, ulen, fd, off) }
            .map_err(|source| MemoryError::Mmap { len, source }.into())
    };
    let layers = chain.layers();
    let mut count = 0;
    for ((r, &(host, len)), &first) in layout.regions.iter().zip(ram.host_regions()).zip(&firsts) {
        let pages = r.len / ps;
        if u64::try_from(len).ok() != Some(r.len) {
            return Err(BuildError::LayoutMismatch);
        }
        map(host, r.len, layers[0].file().as_raw_fd(), layers[0].header().page_offset(first))?;
        count += 1;
        for seg in chain.segments() {
            let (start, end) = (seg.start.max(first), seg.end().min(first + pages));
            if seg.layer == 0 || start >= end {
                continue;
            }
            let l = &layers[seg.layer];
            let off =
                usize::try_from((start - first) * ps).map_err(|_| MemoryError::BadSize(start))?;
            // SAFETY: `off + (end - start) * ps <= r.len`: the segment was clipped to the region.
            let addr = unsafe { host.add(off) };
            map(addr, (end - start) * ps, l.file().as_raw_fd(), l.header().page_offset(start))?;
            count += 1;
        }
    }
    Ok(count)
}

/// A snapshot checked against a standby VM, ready to load.
pub struct Prepared {
    state: SnapshotState,
    chain: Chain,
    out: SerialOut,
}

/// A VMM that has done its per-VM KVM work (VM, irqchip, PIT, memory slots over reserved
/// guest memory, vCPUs with their CPUID) before knowing which snapshot it will run, so that a
/// restore only maps memory and loads state. On this host those KVM steps are most of a cold
/// restore (they wait for SRCU grace periods).
pub struct Standby {
    parts: KvmParts,
    disk_dir: Option<PathBuf>,
    /// Its tap, opened ahead too (its link watch has long run when the restore comes).
    net: Option<NetHost>,
}

impl Standby {
    /// Prepares a VM of `nvcpus` vCPUs and `mem_mib` MiB (with the tap of `net`).
    pub fn new(nvcpus: u8, mem_mib: u64, net: Option<&NetConfig>) -> Result<Self, BuildError> {
        check_size(nvcpus, mem_mib)?;
        let regions = crate::memory::ram_regions(mem_mib << 20)?;
        let mappings = regions
            .iter()
            .map(|r| crate::memory::Mapping::anonymous(r.size))
            .collect::<Result<Vec<_>, _>>()?;
        let ram = GuestRam::from_mappings(regions, mappings, None)?;
        let mut parts = kvm_parts(nvcpus, ram, true)?;
        parts.threads = (0..nvcpus).map(prespawn).collect::<Result<_, _>>()?;
        let net = open_net(net)?;
        crate::state::warm_up();
        timing::mark("standby ready");
        Ok(Self { parts, disk_dir: None, net })
    }

    /// Where the restored VM's writable disks get their new layers.
    pub fn with_disk_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.disk_dir = dir;
        self
    }

    /// vCPUs of the prepared VM.
    pub fn vcpus(&self) -> usize {
        self.parts.vcpus.len()
    }

    /// RAM of the prepared VM (bytes).
    pub fn mem_bytes(&self) -> u64 {
        self.parts.ram.size()
    }

    /// Reads and checks the snapshot in `cfg.dir` against this standby VM (vCPU count, RAM,
    /// CPUID) and opens its layers. Nothing is changed: on error the standby VMM stays usable.
    /// The directory's stale temporary files are the caller's to sweep, once the restore is
    /// answered (off the restore's path).
    pub fn check(&self, cfg: &RestoreConfig) -> Result<Prepared, BuildError> {
        if cfg.mem_mode != MemMode::Mmap {
            return Err(BuildError::StandbyMode);
        }
        let state = state::read_state(&cfg.dir)?;
        timing::mark("state read");
        check_fingerprint(&state, self.parts.fingerprint)?;
        if state.regions != self.parts.ram.regions() || state.vcpus.len() != self.vcpus() {
            return Err(BuildError::StandbyMismatch {
                snap_vcpus: state.vcpus.len(),
                snap_bytes: state.regions.iter().map(|r| r.size).sum(),
                vcpus: self.vcpus(),
                bytes: self.mem_bytes(),
            });
        }
        DeviceManager::check_overrides(&state.devices, &cfg.overrides)?;
        let has_net = state.devices.iter().any(|d| {
            matches!(d, DeviceState::VirtioMmio(v) if matches!(v.device, VirtioDeviceState::Net(_)))
        });
        match (has_net, self.net.is_some()) {
            (true, false) => return Err(BuildError::NetPresence(DeviceManagerError::NetMissing)),
            (false, true) => return Err(BuildError::NetPresence(DeviceManagerError::NetUnused)),
            _ => {}
        }
        let chain = Chain::open(&state.layers)?;
        timing::mark("layers opened");
        let out = SerialOut::open(&cfg.serial)?;
        Ok(Prepared { state, chain, out })
    }

    /// Loads a checked snapshot into the prepared VM and starts it. Errors are final (the VM
    /// was being changed).
    pub fn finish(
        self,
        cfg: &RestoreConfig,
        prepared: Prepared,
        events: EventLoop,
    ) -> Result<Vmm, BuildError> {
        let Prepared { state, chain, out } = prepared;
        let head = chain.head();
        map_chain_fixed(&self.parts.ram, &chain)?;
        timing::mark("memory mapped");
        let disk_dir = cfg.disk_dir.clone().or(self.disk_dir);
        let cfg = RestoreConfig { dirty_logging: true, disk_dir, ..cfg.clone() };
        load(self.parts, &state, head, &cfg, events, (out, self.net), None)
    }
}
