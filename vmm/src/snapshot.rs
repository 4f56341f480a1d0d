//! Snapshots of a running VM (full, diff, fork) and restoring one.
//!
//! A snapshot directory holds the state file (`vmstate`, see [`crate::persist`]) and the
//! memory layers written for it (`NNNN.mlayer`, grove-storage's layer format). The state file
//! lists the whole layer chain, base first, by absolute path: a diff snapshot's directory holds
//! only its new layer and refers to the older ones where they are.
//!
//! - `full`: pause, write every non-zero page, save state, resume. Turns dirty logging on, so
//!   later snapshots can be diffs.
//! - `diff`: pause, write the pages KVM logged dirty since the last snapshot, save, resume.
//! - `fork`: like `diff`, but if there is no base yet the full layer is first copied while the
//!   guest runs (dirty logging on), then the pause only writes the pages dirtied meanwhile.
//!   Either way the pause grows with the dirty set, not with memory size.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use grove_storage::memory::{
    restore_mmap, write_diff, write_full, Chain, LayerError, MmapOptions, PageServerError,
    Prefetch, RegionMemory, RestoreError, UffdMemory, UffdOptions, WorkingSet, WriteOptions,
};
use vmm_sys_util::eventfd::EventFd;

use crate::cli::MemMode;
use crate::devices::{DeviceError, PortBus, SerialOut, COM1_IRQ};
use crate::memory::{GuestRam, MemoryError, MemoryOwner, RamRegion};
use crate::persist::{self, load_vcpu, Persist, PersistError, SnapshotState, VcpuPersist};
use crate::vcpu::VcpuError;
use crate::vm::{self, Vm, VmError};

/// Errors from snapshot, fork and restore.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The snapshot directory cannot be used.
    #[error("snapshot directory {path}: {why}")]
    Dir {
        /// The directory.
        path: String,
        /// Why.
        why: String,
    },
    /// A diff needs a previous snapshot.
    #[error("no previous snapshot to diff against: take a full snapshot first")]
    NoBase,
    /// Writing or opening memory layers.
    #[error("memory layer")]
    Layer(#[from] LayerError),
    /// Saved state.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// vCPU control.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// VM setup.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Devices.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// mmap restore.
    #[error("mmap restore")]
    Mmap(#[from] RestoreError),
    /// uffd restore.
    #[error("uffd page server")]
    PageServer(#[from] PageServerError),
    /// KVM dirty log.
    #[error("KVM_GET_DIRTY_LOG failed")]
    DirtyLog(#[source] kvm_ioctls::Error),
}

/// Kinds of snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotKind {
    /// Every non-zero page.
    Full,
    /// Pages dirtied since the previous snapshot.
    Diff,
}

/// What a snapshot did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SnapshotReport {
    /// The directory.
    pub dir: String,
    /// Chain depth (layers, base included).
    pub depth: usize,
    /// Pages written into the layer(s) of this snapshot.
    pub pages: u64,
    /// How long the vCPUs were paused (ms).
    pub pause_ms: f64,
    /// Whole operation (ms).
    pub total_ms: f64,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn prepare_dir(dir: &Path) -> Result<PathBuf, SnapshotError> {
    let err = |why: String| SnapshotError::Dir { path: dir.display().to_string(), why };
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let dir = dir.canonicalize().map_err(|e| err(e.to_string()))?;
    if dir.join(persist::STATE_FILE).exists() {
        return Err(err("already holds a snapshot".into()));
    }
    Ok(dir)
}

impl Vm {
    fn region_memory<'a>(&'a self, dirty: Option<&'a [Vec<u64>]>) -> Vec<RegionMemory<'a>> {
        self.ram
            .regions()
            .iter()
            .enumerate()
            .map(|(i, r)| RegionMemory {
                gpa: r.gpa,
                // SAFETY: callers pause the vCPUs first, except the fork pre-copy, which
                // accepts torn pages: every page written during the copy is in the dirty log
                // and rewritten by the diff taken while paused.
                mem: unsafe { self.ram.region_slice(i) },
                dirty: dirty.map(|d| d[i].as_slice()),
            })
            .collect()
    }

    /// Reads (and resets) KVM's dirty bitmaps, one per region.
    fn dirty_bitmaps(&self) -> Result<Vec<Vec<u64>>, SnapshotError> {
        self.ram
            .regions()
            .iter()
            .enumerate()
            .map(|(slot, r)| {
                let len = usize::try_from(r.size).map_err(|_| MemoryError::BadSize(r.size))?;
                let slot = u32::try_from(slot).map_err(|_| MemoryError::BadSize(r.size))?;
                self.fd.get_dirty_log(slot, len).map_err(SnapshotError::DirtyLog)
            })
            .collect()
    }

    /// Starts dirty logging, or resets the log if it is on.
    fn restart_dirty_log(&mut self) -> Result<(), SnapshotError> {
        if self.dirty_logging {
            self.dirty_bitmaps()?;
        } else {
            self.set_dirty_logging(true)?;
        }
        Ok(())
    }

    fn layer_path(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{:04}.{}", self.layers.len(), grove_storage::memory::LAYER_EXT))
    }

    fn write_full_layer(&mut self, dir: &Path, fsync: bool) -> Result<u64, SnapshotError> {
        let path = dir.join(format!("0000.{}", grove_storage::memory::LAYER_EXT));
        let opts = WriteOptions { fsync, ..Default::default() };
        let info = write_full(&path, &self.region_memory(None), &opts)?;
        self.layers = vec![path];
        let pages = info.present_pages;
        self.head = Some(info);
        Ok(pages)
    }

    fn write_diff_layer(&mut self, dir: &Path, fsync: bool) -> Result<u64, SnapshotError> {
        let parent = self.head.clone().ok_or(SnapshotError::NoBase)?;
        let dirty = self.dirty_bitmaps()?;
        let path = self.layer_path(dir);
        let opts = WriteOptions { fsync, ..Default::default() };
        let info = write_diff(&path, &parent, &self.region_memory(Some(&dirty)), &opts)?;
        self.layers.push(path);
        let pages = info.present_pages;
        self.head = Some(info);
        Ok(pages)
    }

    /// Saves vCPU, VM and device state into `dir` (vCPUs must be paused).
    fn save_state(&mut self, dir: &Path, fsync: bool) -> Result<(), SnapshotError> {
        let list = match &self.msr_list {
            Some(l) => l.clone(),
            None => {
                let l = self
                    .kvm
                    .get_msr_index_list()
                    .map_err(|e| PersistError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?;
                let l = Arc::new(l.as_slice().to_vec());
                self.msr_list = Some(l.clone());
                l
            }
        };
        let vcpus = self
            .on_vcpus(move |_, fd| VcpuPersist { fd, msr_list: &list }.save())?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        // Keep only the MSRs KVM gave: later saves skip the probing of unreadable ones.
        if let Some(v0) = vcpus.first() {
            self.msr_list = Some(Arc::new(v0.msrs.iter().map(|&(i, _)| i).collect()));
        }
        let vm_state = (&*self.fd).save()?;
        let state = SnapshotState {
            cpuid_fingerprint: self.cpuid_fingerprint,
            nvcpus: u8::try_from(self.vcpus.len()).unwrap_or(u8::MAX),
            regions: self.ram.regions().to_vec(),
            layers: self.layers.iter().map(|p| p.display().to_string()).collect(),
            vcpus,
            vm: vm_state,
            devices: self.bus.save(),
        };
        persist::write_state(dir, &state, fsync)?;
        Ok(())
    }

    /// Runs `f` with the vCPUs paused, restoring the running state afterwards (also on error).
    fn paused_op<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, SnapshotError>,
    ) -> Result<(T, f64), SnapshotError> {
        let was_paused = self.paused;
        let t = Instant::now();
        self.pause()?;
        let r = f(self);
        if !was_paused {
            self.resume()?;
        }
        Ok((r?, if was_paused { 0.0 } else { ms(t) }))
    }

    /// Takes a snapshot into `dir`.
    pub fn snapshot(
        &mut self,
        kind: SnapshotKind,
        dir: &Path,
        fsync: bool,
    ) -> Result<SnapshotReport, SnapshotError> {
        let t = Instant::now();
        self.check_memory()?;
        if kind == SnapshotKind::Diff && self.head.is_none() {
            return Err(SnapshotError::NoBase);
        }
        let dir = prepare_dir(dir)?;
        let (pages, pause_ms) = self.paused_op(|vm| {
            let pages = match kind {
                SnapshotKind::Full => {
                    vm.restart_dirty_log()?;
                    vm.write_full_layer(&dir, fsync)?
                }
                SnapshotKind::Diff => vm.write_diff_layer(&dir, fsync)?,
            };
            vm.save_state(&dir, fsync)?;
            Ok(pages)
        })?;
        Ok(SnapshotReport {
            dir: dir.display().to_string(),
            depth: self.layers.len(),
            pages,
            pause_ms,
            total_ms: ms(t),
        })
    }

    /// Fork: snapshot for children with a pause bounded by the dirty set.
    pub fn fork(&mut self, dir: &Path) -> Result<SnapshotReport, SnapshotError> {
        let t = Instant::now();
        self.check_memory()?;
        let dir = prepare_dir(dir)?;
        let mut pages = 0;
        if self.head.is_none() {
            // Pre-copy while the guest runs; what it dirties meanwhile goes into the diff.
            self.restart_dirty_log()?;
            pages += self.write_full_layer(&dir, false)?;
        }
        let (diff_pages, pause_ms) = self.paused_op(|vm| {
            let p = vm.write_diff_layer(&dir, false)?;
            vm.save_state(&dir, false)?;
            Ok(p)
        })?;
        Ok(SnapshotReport {
            dir: dir.display().to_string(),
            depth: self.layers.len(),
            pages: pages + diff_pages,
            pause_ms,
            total_ms: ms(t),
        })
    }

    /// Saves the uffd page server's recorded working set next to the chain head, so later
    /// restores of this snapshot prefetch it.
    pub fn save_working_set(&self) -> Result<String, SnapshotError> {
        let uffd =
            self.ram.owner().and_then(|o| o.downcast_ref::<UffdMemory>()).ok_or_else(|| {
                SnapshotError::Dir { path: String::new(), why: "not restored in uffd mode".into() }
            })?;
        let head = self.layers.last().ok_or(SnapshotError::NoBase)?;
        let path = WorkingSet::default_path(head);
        uffd.working_set().save(&path)?;
        Ok(path.display().to_string())
    }

    /// Refuses to read guest memory whose page server has failed (it is inaccessible; the
    /// VM is about to end with the page server's error anyway).
    fn check_memory(&self) -> Result<(), SnapshotError> {
        match self.page_server_failure() {
            Some(e) => Err(SnapshotError::Dir {
                path: String::new(),
                why: format!("guest memory unavailable: page server failed: {e}"),
            }),
            None => Ok(()),
        }
    }

    /// The page server's failure, if the memory is served by one and it failed.
    pub fn page_server_failure(&self) -> Option<String> {
        let uffd = self.ram.owner()?.downcast_ref::<UffdMemory>()?;
        uffd.failure().map(|e| crate::one_line(&*e))
    }
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
}

/// Builds guest memory for the chain in the chosen mode.
fn restore_memory(
    chain: Chain,
    regions: &[RamRegion],
    mode: MemMode,
) -> Result<GuestRam, SnapshotError> {
    let layout = chain.layout();
    let same = layout.regions.len() == regions.len()
        && layout.regions.iter().zip(regions).all(|(l, r)| l.gpa == r.gpa && l.len == r.size);
    if !same {
        return Err(PersistError::Invalid(
            "memory layers do not match the saved RAM layout".into(),
        )
        .into());
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
            let opts = UffdOptions { prefetch, ..Default::default() };
            let u = UffdMemory::start(Arc::new(chain), &opts)?;
            let hosts = u.regions().iter().map(|r| (r.as_ptr(), r.len)).collect();
            (hosts, Box::new(u))
        }
    };
    // SAFETY: the host ranges come from `owner` (MappedMemory / UffdMemory), which keeps them
    // mapped until it is dropped with the GuestRam.
    Ok(unsafe { GuestRam::from_external(regions.to_vec(), hosts, owner) }?)
}

/// Maps the chain over `ram`'s existing mappings with MAP_FIXED: the base layer over each
/// region, then every run a diff layer owns on top (all MAP_PRIVATE, so clean pages are shared
/// through the page cache). The KVM memory slots registered over these addresses stay valid:
/// KVM follows the host mapping (MMU notifiers), so no slot update is needed.
fn map_chain_fixed(ram: &GuestRam, chain: &Chain) -> Result<usize, SnapshotError> {
    use std::os::fd::AsRawFd;
    let layout = chain.layout();
    let ps = u64::from(layout.page_size);
    let firsts = layout.region_first_pages();
    let map = |addr: *mut u8, len: u64, fd: i32, off: u64| -> Result<(), SnapshotError> {
        let ulen = usize::try_from(len).map_err(|_| MemoryError::BadSize(len))?;
        // SAFETY: `addr..addr+len` lies inside a mapping `ram` owns (checked by the callers'
        // arithmetic against the region length), and no Rust reference into guest memory is
        // alive (vCPUs not started).
        unsafe { grove_storage::memory::map_file_fixed(addr, ulen, fd, off) }
            .map_err(|source| MemoryError::Mmap { len, source }.into())
    };
    let layers = chain.layers();
    let mut count = 0;
    for ((r, &(host, len)), &first) in layout.regions.iter().zip(ram.host_regions()).zip(&firsts) {
        let pages = r.len / ps;
        if u64::try_from(len).ok() != Some(r.len) {
            return Err(PersistError::Invalid("region size".into()).into());
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

/// The VMM thread's event channel.
pub type VmEvents = (
    std::sync::mpsc::Sender<crate::vcpu::VcpuEvent>,
    std::sync::mpsc::Receiver<crate::vcpu::VcpuEvent>,
);

/// A VMM that has done its per-VM KVM work (VM, irqchip, PIT, memory slots over reserved
/// guest memory, vCPUs with their CPUID) before knowing which snapshot it will run, so that a
/// restore only maps memory and loads state. On this host those KVM steps are most of a cold
/// restore (they wait for SRCU grace periods).
pub struct Standby {
    kvm: kvm_ioctls::Kvm,
    fd: kvm_ioctls::VmFd,
    ram: GuestRam,
    cpuids: Vec<kvm_bindings::CpuId>,
    fingerprint: u64,
    vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
    serial_irq: EventFd,
}

impl Standby {
    /// Prepares a VM of `nvcpus` vCPUs and `mem_mib` MiB.
    pub fn new(nvcpus: u8, mem_mib: u64) -> Result<Self, SnapshotError> {
        let cfg = vm::VmConfig { vcpus: nvcpus, mem_mib, ..Default::default() };
        cfg.validate()?;
        let (kvm, fd) = vm::create_kvm_vm()?;
        let regions = crate::memory::ram_regions(mem_mib << 20)?;
        let mappings = regions
            .iter()
            .map(|r| crate::memory::Mapping::anonymous(r.size))
            .collect::<Result<Vec<_>, _>>()?;
        let ram = GuestRam::from_mappings(regions, mappings, None)?;
        vm::set_memory_slots(&fd, &ram, true)?;
        let (cpuids, fingerprint) = vm::vcpu_cpuids(&kvm, nvcpus)?;
        let mut vcpu_fds = Vec::with_capacity(usize::from(nvcpus));
        for i in 0..nvcpus {
            vcpu_fds.push(vm::create_vcpu(&fd, i, &cpuids[usize::from(i)])?);
        }
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        fd.register_irqfd(&serial_irq, COM1_IRQ).map_err(|e| VmError::Kvm("KVM_IRQFD", e))?;
        crate::timing::mark("standby ready");
        Ok(Self { kvm, fd, ram, cpuids, fingerprint, vcpu_fds, serial_irq })
    }

    /// Reads and checks the snapshot in `cfg.dir` against this standby VM (vCPU count, RAM,
    /// CPUID) and opens its layers. Nothing is changed: on error the standby VMM stays usable.
    pub fn check(&self, cfg: &RestoreConfig) -> Result<Prepared, SnapshotError> {
        if cfg.mem_mode != MemMode::Mmap {
            return Err(SnapshotError::Dir {
                path: cfg.dir.display().to_string(),
                why: "a standby VMM restores in mmap mode only".into(),
            });
        }
        let state = persist::read_state(&cfg.dir)?;
        if state.cpuid_fingerprint != self.fingerprint {
            return Err(PersistError::CpuidMismatch {
                saved: state.cpuid_fingerprint,
                host: self.fingerprint,
            }
            .into());
        }
        if state.regions != self.ram.regions() || state.vcpus.len() != self.vcpu_fds.len() {
            return Err(PersistError::Invalid(format!(
                "snapshot has {} vCPUs and {} bytes of RAM; this standby VMM has {} and {}",
                state.vcpus.len(),
                state.regions.iter().map(|r| r.size).sum::<u64>(),
                self.vcpu_fds.len(),
                self.ram.size()
            ))
            .into());
        }
        let chain = Chain::open(&state.layers)?;
        let out = SerialOut::open(&cfg.serial)?;
        Ok(Prepared { state, chain, out })
    }

    /// Loads a checked snapshot into the prepared VM and starts it. Errors are final (the VM
    /// was being changed).
    pub fn finish(
        self,
        cfg: &RestoreConfig,
        prepared: Prepared,
        events: VmEvents,
    ) -> Result<Vm, SnapshotError> {
        let Prepared { state, chain, out } = prepared;
        let head = chain.head();
        map_chain_fixed(&self.ram, &chain)?;
        crate::timing::mark("memory mapped");
        <&kvm_ioctls::VmFd as Persist>::restore(&self.fd, &state.vm)?;
        for (v, s) in self.vcpu_fds.iter().zip(&state.vcpus) {
            load_vcpu(v, s)?;
        }
        let irq = self.serial_irq.try_clone().map_err(DeviceError::EventFd)?;
        let bus = PortBus::restore(&state.devices, out, irq, crate::timing::start(), cfg.identity)?;
        bus.set_generation(state.devices.generation.wrapping_add(1));
        let mut vm = Vm::assemble(
            self.kvm,
            self.fd,
            self.ram,
            Arc::new(bus),
            self.cpuids,
            self.fingerprint,
            self.serial_irq,
        )
        .with_events(events.0, events.1);
        vm.dirty_logging = true;
        vm.layers = state.layers.iter().map(PathBuf::from).collect();
        vm.head = Some(head);
        vm.start_vcpus(self.vcpu_fds, false)?;
        Ok(vm)
    }
}

/// Restores a VM from a snapshot directory and starts its vCPUs.
pub fn restore(cfg: &RestoreConfig) -> Result<Vm, SnapshotError> {
    let state = persist::read_state(&cfg.dir)?;
    crate::timing::mark("state file read");
    let out = SerialOut::open(&cfg.serial)?;
    let (kvm, fd) = vm::create_kvm_vm()?;
    let (cpuids, fingerprint) = vm::vcpu_cpuids(&kvm, state.nvcpus)?;
    if fingerprint != state.cpuid_fingerprint {
        return Err(PersistError::CpuidMismatch {
            saved: state.cpuid_fingerprint,
            host: fingerprint,
        }
        .into());
    }
    let chain = Chain::open(&state.layers)?;
    let head = chain.head();
    let ram = restore_memory(chain, &state.regions, cfg.mem_mode)?;
    vm::set_memory_slots(&fd, &ram, cfg.dirty_logging)?;
    crate::timing::mark("memory restored");
    <&kvm_ioctls::VmFd as Persist>::restore(&fd, &state.vm)?;
    let mut vcpu_fds = Vec::with_capacity(state.vcpus.len());
    for (i, s) in state.vcpus.iter().enumerate() {
        let index = u8::try_from(i).map_err(|_| PersistError::Invalid("vCPU index".into()))?;
        let v = vm::create_vcpu(&fd, index, &cpuids[i])?;
        load_vcpu(&v, s)?;
        vcpu_fds.push(v);
    }
    crate::timing::mark("vCPUs restored");
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    fd.register_irqfd(&serial_irq, COM1_IRQ).map_err(|e| VmError::Kvm("KVM_IRQFD", e))?;
    let irq = serial_irq.try_clone().map_err(DeviceError::EventFd)?;
    let bus = PortBus::restore(&state.devices, out, irq, crate::timing::start(), cfg.identity)?;
    bus.set_generation(state.devices.generation.wrapping_add(1));
    let mut vm = Vm::assemble(kvm, fd, ram, Arc::new(bus), cpuids, fingerprint, serial_irq);
    vm.dirty_logging = cfg.dirty_logging;
    vm.layers = state.layers.iter().map(PathBuf::from).collect();
    let ws_path = WorkingSet::default_path(&head.path);
    vm.head = Some(head);
    if cfg.mem_mode == MemMode::Uffd && !ws_path.exists() {
        // First uffd restore of this snapshot: record what the guest touches in its first
        // AUTO_WORKING_SET, for later restores to prefetch.
        vm.auto_working_set = Some(Instant::now() + AUTO_WORKING_SET);
    }
    vm.start_vcpus(vcpu_fds, false)?;
    Ok(vm)
}

/// How long after a first uffd restore the first-touch order is saved as the snapshot's
/// working set.
pub const AUTO_WORKING_SET: std::time::Duration = std::time::Duration::from_millis(500);
