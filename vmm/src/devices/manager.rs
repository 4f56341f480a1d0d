//! The device manager: builds the VM's devices, places them (vm-allocator: MMIO register
//! pages in [`MMIO_DEVICES_START`].., interrupt lines [`DEVICE_GSI_FIRST`]..=[`DEVICE_GSI_LAST`]),
//! wires them to KVM (irqfds, ioeventfds on QueueNotify) and to the event loop, tells the guest
//! where they are (ACPI and `virtio_mmio.device=` command-line entries), serves the pause
//! (each device finishes its pending work), and saves and restores them: one
//! [`DeviceState`] entry per device in the state file.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use serde::{Deserialize, Serialize};
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vmm_sys_util::eventfd::EventFd;

use super::bus::{BusError, IoBus};
use super::legacy::acpi_pm::{AcpiPm, ACPI_PM_LEN};
use super::legacy::i8042::{I8042, I8042_CMD, I8042_DATA};
use super::legacy::ports::{
    Cmos, GrovePorts, PortsArgs, PortsState, BOOT_TIMER, CMOS, GROVE_PORTS_LEN,
};
use super::legacy::serial::{
    SerialArgs, SerialDevice, SerialError, SerialOut, SerialState, COM1, COM1_LEN,
};
use super::lock;
use super::virtio::block::device::Block;
use super::virtio::block::disk::{Disk, DiskError};
use super::virtio::block::persist::{BlockArgs, BlockPersistError, BlockState};
use super::virtio::mmio::{MmioArgs, MmioError, MmioState, MmioTransport, NOTIFY_REG};
use super::virtio::net::device::{Net, NetParams};
use super::virtio::net::persist::{NetArgs, NetPersistError, NetState};
use super::virtio::net::tap::Backend;
use super::virtio::net::NetConfig;
use super::virtio::rng::device::Rng;
use super::virtio::rng::persist::{RngArgs, RngPersistError, RngState};
use super::virtio::vsock::device::{Vsock, VsockConfig, VsockError};
use super::virtio::vsock::persist::{VsockArgs, VsockPersistError, VsockState};
use super::virtio::{IrqTrigger, VirtioDevice};
use crate::acpi::MmioDeviceInfo;
use crate::exit::ExitSignal;
use crate::layout::{
    ACPI_PM_PORT, DEVICE_GSI_FIRST, DEVICE_GSI_LAST, MMIO_DEVICES_SIZE, MMIO_DEVICES_START,
    MMIO_DEVICE_SIZE,
};
use crate::memory::GuestRam;
use crate::persist::Persist;
use crate::vstate::vm::{Vm, VmError};

/// What the event loop holds: any subscriber, shared with the device's other users.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
/// The VMM's event loop.
pub type EventLoop = EventManager<Subscriber>;

/// Errors of the device manager.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// Registering on the bus.
    #[error("device bus")]
    Bus(#[from] BusError),
    /// A KVM registration (irqfd, ioeventfd).
    #[error("KVM device registration")]
    Kvm(#[from] VmError),
    /// An eventfd cannot be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// No MMIO space or interrupt line left, or a saved placement outside the window.
    #[error("cannot place a device")]
    Allocator(#[from] vm_allocator::Error),
    /// Devices are added before the vCPUs start, while the bus is not shared yet.
    #[error("devices cannot be added once the vCPUs run")]
    BusShared,
    /// A virtio device's queues cannot be built.
    #[error("virtio queues")]
    Queue(#[source] virtio_queue::Error),
    /// The serial port.
    #[error("serial port")]
    Serial(#[from] SerialError),
    /// A saved transport.
    #[error("virtio-mmio transport at {base:#x}")]
    Transport {
        /// Its register page.
        base: u64,
        /// Why.
        #[source]
        source: MmioError,
    },
    /// A saved virtio-rng.
    #[error("virtio-rng at {base:#x}")]
    Rng {
        /// Its register page.
        base: u64,
        /// Why.
        #[source]
        source: RngPersistError,
    },
    /// A saved virtio-blk.
    #[error("virtio-blk at {base:#x}")]
    Block {
        /// Its register page.
        base: u64,
        /// Why.
        #[source]
        source: BlockPersistError,
    },
    /// A disk's snapshot (preparing or freezing its layer).
    #[error("disk snapshot")]
    Disk(#[from] DiskError),
    /// A new virtio-vsock.
    #[error("virtio-vsock")]
    VsockNew(#[source] VsockError),
    /// A saved virtio-vsock.
    #[error("virtio-vsock at {base:#x}")]
    Vsock {
        /// Its register page.
        base: u64,
        /// Why.
        #[source]
        source: VsockPersistError,
    },
    /// A restored virtio-vsock needs its own socket.
    #[error(
        "the snapshot has a virtio-vsock device: give the restored VM its socket (--vsock-uds)"
    )]
    VsockUdsRequired,
    /// A saved virtio-net.
    #[error("virtio-net at {base:#x}")]
    Net {
        /// Its register page.
        base: u64,
        /// Why.
        #[source]
        source: NetPersistError,
    },
    /// The snapshot has a virtio-net device and no backend was given for it.
    #[error("the snapshot has a virtio-net device: give --net for it")]
    NetMissing,
    /// A backend was given and the snapshot has no virtio-net device.
    #[error("--net given, but the snapshot has no virtio-net device")]
    NetUnused,
    /// A virtio-net device's own eventfds or timers.
    #[error("cannot create virtio-net's eventfds or timers")]
    NetIo(#[source] std::io::Error),
    /// A device the state file must hold once is missing or repeated.
    #[error("state file has {count} {kind} entries, 1 expected")]
    LegacyCount {
        /// The device kind.
        kind: &'static str,
        /// How many entries.
        count: usize,
    },
    /// A saved interrupt line outside the range or given twice.
    #[error(
        "saved interrupt line {0} is outside {DEVICE_GSI_FIRST}..={DEVICE_GSI_LAST} or taken twice"
    )]
    Gsi(u32),
}

/// One device's entry in the state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DeviceState {
    /// COM1.
    Serial(SerialState),
    /// The i8042 (stateless).
    I8042 {},
    /// Grove's ports.
    GrovePorts(PortsState),
    /// The CMOS stub (stateless).
    Cmos {},
    /// The ACPI power-management ports (stateless).
    AcpiPm {},
    /// A virtio device behind its MMIO transport.
    VirtioMmio(VirtioMmioState),
}

/// A virtio-mmio device's entry: placement, transport registers, and the device's own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioMmioState {
    /// Register page.
    pub base: u64,
    /// Interrupt line.
    pub gsi: u32,
    /// Transport registers.
    pub transport: MmioState,
    /// The device.
    pub device: VirtioDeviceState,
}

/// The saved state of each kind of virtio device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum VirtioDeviceState {
    /// virtio-rng.
    Rng(RngState),
    /// virtio-blk.
    Block(BlockState),
    /// virtio-vsock.
    Vsock(VsockState),
    /// virtio-net.
    Net(NetState),
}

/// A concrete virtio device (for saving it with its own `Persist`).
#[derive(Clone)]
enum VirtioHandle {
    Rng(Arc<Mutex<Rng>>),
    Block(Arc<Mutex<Block>>),
    Vsock(Arc<Mutex<Vsock>>),
    Net(Arc<Mutex<Net>>),
}

/// The host side of a virtio-net device: the `--net` option and its opened backend.
pub struct NetHost {
    /// The option (limits; on a restore, guest-visible values to check).
    pub config: NetConfig,
    /// The opened tap (or a stand-in).
    pub backend: Box<dyn Backend>,
}

/// A placed virtio device.
pub struct VirtioSlot {
    /// Register page.
    pub base: u64,
    /// Interrupt line.
    pub gsi: u32,
    /// The transport on the MMIO bus.
    pub transport: Arc<Mutex<MmioTransport>>,
    handle: VirtioHandle,
}

impl std::fmt::Debug for VirtioSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioSlot").field("base", &self.base).field("gsi", &self.gsi).finish()
    }
}

/// What building the legacy devices needs.
pub struct LegacyArgs {
    /// Where COM1 writes.
    pub serial_out: SerialOut,
    /// COM1's interrupt eventfd, already registered as an irqfd on line 4.
    pub serial_irq: EventFd,
    /// VMM start (the boot timer measures from it).
    pub start: Instant,
    /// The guest's identity.
    pub identity: u32,
    /// Where the i8042 and ACPI PM record a reset or power-off.
    pub exit: Arc<ExitSignal>,
}

/// Where a restore finds and puts disk layers.
#[derive(Clone, Debug, Default)]
pub struct DiskPaths {
    /// The snapshot directory (saved layer paths are relative to it).
    pub snapshot_dir: std::path::PathBuf,
    /// Where writable disks get their new layers (`--disk-dir`).
    pub disk_dir: Option<std::path::PathBuf>,
}

/// The host-side resources a restore builds the saved devices on.
#[derive(Default)]
pub struct RestoreHost {
    /// Where disk layers are found and put.
    pub disks: DiskPaths,
    /// The vsock socket and cid.
    pub overrides: RestoreOverrides,
    /// The virtio-net backend.
    pub net: Option<NetHost>,
}

/// What a restored VM gets instead of its snapshot's host-side resources.
#[derive(Clone, Debug, Default)]
pub struct RestoreOverrides {
    /// The vsock device's socket (required when the snapshot has one: the saved VM's socket
    /// may still be in use).
    pub vsock_uds: Option<PathBuf>,
    /// Another vsock context id for the guest.
    pub vsock_cid: Option<u64>,
}

/// The VM's devices.
pub struct DeviceManager {
    bus: Arc<IoBus>,
    mem: Arc<GuestRam>,
    mmio: AddressAllocator,
    gsis: IdAllocator,
    serial: Arc<Mutex<SerialDevice>>,
    ports: Arc<Mutex<GrovePorts>>,
    virtio: Vec<VirtioSlot>,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager").field("virtio", &self.virtio).finish_non_exhaustive()
    }
}

impl DeviceManager {
    fn with_legacy(
        mem: Arc<GuestRam>,
        serial: SerialDevice,
        ports: GrovePorts,
        exit: &Arc<ExitSignal>,
    ) -> Result<Self, DeviceManagerError> {
        let mut bus = IoBus::new();
        let serial = Arc::new(Mutex::new(serial));
        let ports = Arc::new(Mutex::new(ports));
        let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));
        bus.register_pio(COM1, COM1_LEN, serial.clone())?;
        bus.register_pio(I8042_DATA, 1, i8042.clone())?;
        bus.register_pio(I8042_CMD, 1, i8042)?;
        bus.register_pio(BOOT_TIMER, GROVE_PORTS_LEN, ports.clone())?;
        bus.register_pio(CMOS, 2, Arc::new(Mutex::new(Cmos)))?;
        bus.register_pio(
            ACPI_PM_PORT,
            ACPI_PM_LEN,
            Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
        )?;
        Ok(Self {
            bus: Arc::new(bus),
            mem,
            mmio: AddressAllocator::new(MMIO_DEVICES_START, MMIO_DEVICES_SIZE)?,
            gsis: IdAllocator::new(DEVICE_GSI_FIRST, DEVICE_GSI_LAST)?,
            serial,
            ports,
            virtio: Vec::new(),
        })
    }

    /// The legacy devices of a fresh VM.
    pub fn new(mem: Arc<GuestRam>, a: LegacyArgs) -> Result<Self, DeviceManagerError> {
        let serial = SerialDevice::new(a.serial_out, a.serial_irq);
        Self::with_legacy(mem, serial, GrovePorts::new(a.start, a.identity), &a.exit)
    }

    fn bus_mut(&mut self) -> Result<&mut IoBus, DeviceManagerError> {
        Arc::get_mut(&mut self.bus).ok_or(DeviceManagerError::BusShared)
    }

    /// Places a virtio device at `base`/`gsi` (or the next free ones), registers its
    /// interrupt and notification eventfds with KVM, its transport on the bus and the device
    /// in the event loop, and keeps it as `handle`.
    #[allow(clippy::too_many_arguments)] // the device, its handle, where, and its transport
    fn place<D>(
        &mut self,
        vm: &Vm,
        events: &mut EventLoop,
        device: Arc<Mutex<D>>,
        handle: VirtioHandle,
        at: Option<(u64, u32)>,
        make_transport: impl FnOnce(
            Arc<Mutex<dyn VirtioDevice>>,
            Arc<IrqTrigger>,
        ) -> Result<MmioTransport, DeviceManagerError>,
        interrupt: Arc<IrqTrigger>,
    ) -> Result<(), DeviceManagerError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let (base, gsi) = match at {
            Some((base, gsi)) => {
                let r = self.mmio.allocate(
                    MMIO_DEVICE_SIZE,
                    MMIO_DEVICE_SIZE,
                    AllocPolicy::ExactMatch(base),
                )?;
                (r.start(), gsi)
            }
            None => {
                let r = self.mmio.allocate(
                    MMIO_DEVICE_SIZE,
                    MMIO_DEVICE_SIZE,
                    AllocPolicy::FirstMatch,
                )?;
                (r.start(), self.gsis.allocate_id()?)
            }
        };
        vm.register_irqfd(&interrupt.evt, gsi)?;
        for (i, evt) in lock(&device).queue_events().iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            vm.register_mmio_ioevent(evt, base + NOTIFY_REG, Some(index))?;
        }
        let dyn_dev: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let transport = Arc::new(Mutex::new(make_transport(dyn_dev, interrupt)?));
        self.bus_mut()?.register_mmio(base, MMIO_DEVICE_SIZE, transport.clone())?;
        events.add_subscriber(device);
        self.virtio.push(VirtioSlot { base, gsi, transport, handle });
        Ok(())
    }

    fn new_interrupt() -> Result<Arc<IrqTrigger>, DeviceManagerError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        Ok(Arc::new(IrqTrigger::new(evt, 0)))
    }

    /// Places a new device (next free register page and GSI) and keeps it as `handle`.
    fn add_fresh<D>(
        &mut self,
        vm: &Vm,
        events: &mut EventLoop,
        device: Arc<Mutex<D>>,
        handle: VirtioHandle,
    ) -> Result<(), DeviceManagerError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let mem = self.mem.clone();
        let interrupt = Self::new_interrupt()?;
        let make = |d, i| MmioTransport::new(d, mem, i).map_err(DeviceManagerError::Queue);
        self.place(vm, events, device, handle, None, make, interrupt)
    }

    /// Adds a virtio-rng fed by the host's getrandom(2).
    pub fn add_rng(&mut self, vm: &Vm, events: &mut EventLoop) -> Result<(), DeviceManagerError> {
        let rng =
            Arc::new(Mutex::new(Rng::new(self.mem.clone()).map_err(DeviceManagerError::EventFd)?));
        self.add_fresh(vm, events, rng.clone(), VirtioHandle::Rng(rng))
    }

    /// Adds a virtio-blk serving `disk`.
    pub fn add_block(
        &mut self,
        vm: &Vm,
        events: &mut EventLoop,
        disk: Disk,
    ) -> Result<(), DeviceManagerError> {
        let blk = Block::new(self.mem.clone(), disk).map_err(DeviceManagerError::EventFd)?;
        let blk = Arc::new(Mutex::new(blk));
        self.add_fresh(vm, events, blk.clone(), VirtioHandle::Block(blk))
    }

    fn blocks(&self) -> impl Iterator<Item = &Arc<Mutex<Block>>> {
        self.virtio.iter().filter_map(|s| match &s.handle {
            VirtioHandle::Block(b) => Some(b),
            _ => None,
        })
    }

    /// Before pausing for a snapshot into `dir`: each disk checks it can freeze its layer
    /// there and makes the layer it continues on, so the pause creates no file.
    pub fn prepare_disk_snapshot(&self, dir: &std::path::Path) -> Result<(), DeviceManagerError> {
        for b in self.blocks() {
            lock(b).disk_mut().prepare_snapshot(dir)?;
        }
        Ok(())
    }

    /// With the vCPUs paused and pending requests served: freezes each disk's writable layer
    /// into `dir` (and continues on a new one).
    pub fn freeze_disks(
        &self,
        dir: &std::path::Path,
        durable: bool,
    ) -> Result<(), DeviceManagerError> {
        for b in self.blocks() {
            lock(b).disk_mut().freeze(dir, durable)?;
        }
        Ok(())
    }

    /// Adds a virtio-vsock with its unix socket.
    pub fn add_vsock(
        &mut self,
        vm: &Vm,
        events: &mut EventLoop,
        cfg: &VsockConfig,
    ) -> Result<(), DeviceManagerError> {
        let vsock = Vsock::new(self.mem.clone(), cfg).map_err(DeviceManagerError::VsockNew)?;
        let vsock = Arc::new(Mutex::new(vsock));
        self.add_fresh(vm, events, vsock.clone(), VirtioHandle::Vsock(vsock))
    }

    /// The vsock device's state, if the VM has one.
    pub fn vsock_status(&self) -> Option<grove_vmm_api::VsockStatus> {
        self.virtio.iter().find_map(|s| match &s.handle {
            VirtioHandle::Vsock(v) => {
                let v = lock(v);
                let counters = serde_json::to_value(v.metrics().snapshot())
                    .ok()
                    .and_then(|j| serde_json::from_value(j).ok())
                    .unwrap_or_default();
                Some(grove_vmm_api::VsockStatus {
                    uds: v.uds().to_path_buf(),
                    cid: v.cid(),
                    connections: v.backend().connections() as u64,
                    handshakes: v.backend().handshakes() as u64,
                    counters,
                })
            }
            _ => None,
        })
    }

    /// Every virtio device's transport registers and live queues (the `status` reply).
    pub fn virtio_status(&self) -> Vec<grove_vmm_api::VirtioStatus> {
        self.virtio
            .iter()
            .map(|s| {
                let (status, interrupt_status, queues) = lock(&s.transport).view();
                let kind = match &s.handle {
                    VirtioHandle::Rng(_) => "rng",
                    VirtioHandle::Block(_) => "block",
                    VirtioHandle::Vsock(_) => "vsock",
                    VirtioHandle::Net(_) => "net",
                };
                grove_vmm_api::VirtioStatus {
                    kind: kind.into(),
                    base: s.base,
                    gsi: s.gsi,
                    status,
                    interrupt_status,
                    queues,
                }
            })
            .collect()
    }

    /// The vsock device's socket, if the VM has one.
    pub fn vsock_uds(&self) -> Option<PathBuf> {
        self.virtio.iter().find_map(|s| match &s.handle {
            VirtioHandle::Vsock(v) => Some(lock(v).uds().to_path_buf()),
            _ => None,
        })
    }
    /// Adds a virtio-net device on `host`'s backend.
    pub fn add_net(
        &mut self,
        vm: &Vm,
        events: &mut EventLoop,
        host: NetHost,
    ) -> Result<(), DeviceManagerError> {
        let params = NetParams::boot(&host.config);
        let net =
            Net::new(self.mem.clone(), params, host.backend).map_err(DeviceManagerError::NetIo)?;
        let net = Arc::new(Mutex::new(net));
        self.add_fresh(vm, events, net.clone(), VirtioHandle::Net(net))
    }

    /// Tells the devices the VM is paused or resumed.
    pub fn set_paused(&self, paused: bool) {
        for s in &self.virtio {
            lock(lock(&s.transport).device()).set_paused(paused);
        }
    }

    /// Waits up to `timeout` until every virtio-net backend is running (a tap's link watch
    /// has run after the VMM attached: before that the kernel drops frames sent to it).
    /// Returns the backends that are not, with why.
    pub fn wait_net_running(&self, timeout: std::time::Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut late = Vec::new();
        for s in &self.virtio {
            let VirtioHandle::Net(n) = &s.handle else { continue };
            loop {
                let n = lock(n);
                match n.backend().is_running() {
                    Ok(true) => break,
                    Ok(false) if Instant::now() < deadline => {}
                    Ok(false) => {
                        late.push(format!("{} is not running", n.backend().describe()));
                        break;
                    }
                    Err(e) => {
                        late.push(format!("{}: {e}", n.backend().describe()));
                        break;
                    }
                }
                drop(n);
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
        }
        late
    }

    /// The bus the vCPUs dispatch to.
    pub fn bus(&self) -> Arc<IoBus> {
        self.bus.clone()
    }

    /// The virtio devices.
    pub fn virtio(&self) -> &[VirtioSlot] {
        &self.virtio
    }

    /// The virtio devices as the DSDT lists them.
    pub fn mmio_infos(&self) -> Vec<MmioDeviceInfo> {
        self.virtio.iter().map(|s| MmioDeviceInfo { base: s.base, gsi: s.gsi }).collect()
    }

    /// `virtio_mmio.device=4K@0x...:N` for each virtio device, for kernels built with
    /// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` (and without ACPI).
    pub fn cmdline_devices(&self) -> String {
        self.virtio
            .iter()
            .map(|s| {
                format!(" virtio_mmio.device={}K@{:#x}:{}", MMIO_DEVICE_SIZE >> 10, s.base, s.gsi)
            })
            .collect()
    }

    /// Grove's ports (identity, generation).
    pub fn ports(&self) -> &Arc<Mutex<GrovePorts>> {
        &self.ports
    }

    /// Finishes every device's pending work (called with the vCPUs paused, before a
    /// snapshot, and after a restore).
    pub fn process_pending(&self) {
        for s in &self.virtio {
            lock(lock(&s.transport).device()).process_pending();
        }
    }

    /// Saves every device, one entry each.
    pub fn save(&self) -> Result<Vec<DeviceState>, DeviceManagerError> {
        let mut out = vec![
            DeviceState::Serial(lock(&self.serial).save()?),
            DeviceState::I8042 {},
            DeviceState::GrovePorts(match lock(&self.ports).save() {
                Ok(s) => s,
                Err(never) => match never {},
            }),
            DeviceState::Cmos {},
            DeviceState::AcpiPm {},
        ];
        for s in &self.virtio {
            let t = lock(&s.transport);
            let transport = t
                .save()
                .map_err(|source| DeviceManagerError::Transport { base: s.base, source })?;
            let device = match &s.handle {
                VirtioHandle::Rng(r) => VirtioDeviceState::Rng(
                    lock(r)
                        .save()
                        .map_err(|source| DeviceManagerError::Rng { base: s.base, source })?,
                ),
                VirtioHandle::Block(b) => VirtioDeviceState::Block(
                    lock(b)
                        .save()
                        .map_err(|source| DeviceManagerError::Block { base: s.base, source })?,
                ),
                VirtioHandle::Vsock(v) => VirtioDeviceState::Vsock(
                    lock(v)
                        .save()
                        .map_err(|source| DeviceManagerError::Vsock { base: s.base, source })?,
                ),
                VirtioHandle::Net(n) => VirtioDeviceState::Net(
                    lock(n)
                        .save()
                        .map_err(|source| DeviceManagerError::Net { base: s.base, source })?,
                ),
            };
            out.push(DeviceState::VirtioMmio(VirtioMmioState {
                base: s.base,
                gsi: s.gsi,
                transport,
                device,
            }));
        }
        Ok(out)
    }

    /// Checks, before anything is built, that `overrides` gives what the saved devices need
    /// on this host: a vsock device needs a socket path that is free.
    pub fn check_overrides(
        states: &[DeviceState],
        overrides: &RestoreOverrides,
    ) -> Result<(), DeviceManagerError> {
        let has_vsock = states.iter().any(|s| {
            matches!(
                s,
                DeviceState::VirtioMmio(VirtioMmioState {
                    device: VirtioDeviceState::Vsock(_),
                    ..
                })
            )
        });
        if !has_vsock {
            return Ok(());
        }
        let uds = overrides.vsock_uds.as_ref().ok_or(DeviceManagerError::VsockUdsRequired)?;
        if uds.symlink_metadata().is_ok() {
            let e = super::virtio::vsock::backend::BackendError::Exists(uds.clone());
            return Err(DeviceManagerError::VsockNew(VsockError::Backend(e)));
        }
        Ok(())
    }

    /// Rebuilds the devices from a state file's entries (the generation as saved), on the
    /// host-side resources of `host` (a virtio-net device gets its backend).
    pub fn restore(
        mem: Arc<GuestRam>,
        vm: &Vm,
        events: &mut EventLoop,
        a: LegacyArgs,
        states: &[DeviceState],
        mut host: RestoreHost,
    ) -> Result<Self, DeviceManagerError> {
        let one = |kind: &'static str, f: &dyn Fn(&DeviceState) -> bool| {
            let count = states.iter().filter(|s| f(s)).count();
            if count == 1 {
                Ok(())
            } else {
                Err(DeviceManagerError::LegacyCount { kind, count })
            }
        };
        one("serial", &|s| matches!(s, DeviceState::Serial(_)))?;
        one("i8042", &|s| matches!(s, DeviceState::I8042 {}))?;
        one("grove-ports", &|s| matches!(s, DeviceState::GrovePorts(_)))?;
        one("cmos", &|s| matches!(s, DeviceState::Cmos {}))?;
        one("acpi-pm", &|s| matches!(s, DeviceState::AcpiPm {}))?;
        let mut serial = None;
        let mut ports = None;
        for s in states {
            match s {
                DeviceState::Serial(st) => serial = Some(st),
                DeviceState::GrovePorts(st) => ports = Some(st),
                _ => {}
            }
        }
        let (Some(serial), Some(ports)) = (serial, ports) else {
            return Err(DeviceManagerError::LegacyCount { kind: "serial", count: 0 });
        };
        let serial =
            SerialDevice::restore(SerialArgs { out: a.serial_out, irq: a.serial_irq }, serial)?;
        let ports =
            match GrovePorts::restore(PortsArgs { start: a.start, identity: a.identity }, ports) {
                Ok(p) => p,
                Err(never) => match never {},
            };
        let mut dm = Self::with_legacy(mem, serial, ports, &a.exit)?;
        let mut gsis_seen = Vec::new();
        for s in states {
            let DeviceState::VirtioMmio(v) = s else { continue };
            if !(DEVICE_GSI_FIRST..=DEVICE_GSI_LAST).contains(&v.gsi) || gsis_seen.contains(&v.gsi)
            {
                return Err(DeviceManagerError::Gsi(v.gsi));
            }
            gsis_seen.push(v.gsi);
            dm.restore_virtio(vm, events, v, &mut host)?;
        }
        if host.net.is_some() {
            return Err(DeviceManagerError::NetUnused);
        }
        Ok(dm)
    }

    fn restore_virtio(
        &mut self,
        vm: &Vm,
        events: &mut EventLoop,
        v: &VirtioMmioState,
        host: &mut RestoreHost,
    ) -> Result<(), DeviceManagerError> {
        let (disks, overrides) = (&host.disks, &host.overrides);
        let base = v.base;
        let interrupt = Self::new_interrupt()?;
        let mem = self.mem.clone();
        let transport_state = v.transport.clone();
        let make = move |device, interrupt| {
            MmioTransport::restore(MmioArgs { device, mem, interrupt }, &transport_state)
                .map_err(|source| DeviceManagerError::Transport { base, source })
        };
        match &v.device {
            VirtioDeviceState::Rng(st) => {
                let rng = Rng::restore(
                    RngArgs { mem: self.mem.clone(), interrupt: interrupt.clone() },
                    st,
                )
                .map_err(|source| DeviceManagerError::Rng { base, source })?;
                let rng = Arc::new(Mutex::new(rng));
                let at = Some((v.base, v.gsi));
                self.place(vm, events, rng.clone(), VirtioHandle::Rng(rng), at, make, interrupt)?;
            }
            VirtioDeviceState::Block(st) => {
                let args = BlockArgs {
                    mem: self.mem.clone(),
                    interrupt: interrupt.clone(),
                    snapshot_dir: disks.snapshot_dir.clone(),
                    disk_dir: disks.disk_dir.clone(),
                };
                let blk = Block::restore(args, st)
                    .map_err(|source| DeviceManagerError::Block { base, source })?;
                let blk = Arc::new(Mutex::new(blk));
                let at = Some((v.base, v.gsi));
                self.place(vm, events, blk.clone(), VirtioHandle::Block(blk), at, make, interrupt)?;
            }
            VirtioDeviceState::Vsock(st) => {
                let uds =
                    overrides.vsock_uds.clone().ok_or(DeviceManagerError::VsockUdsRequired)?;
                let args = VsockArgs {
                    mem: self.mem.clone(),
                    interrupt: interrupt.clone(),
                    uds,
                    cid: overrides.vsock_cid,
                };
                let vsock = Vsock::restore(args, st)
                    .map_err(|source| DeviceManagerError::Vsock { base, source })?;
                let vsock = Arc::new(Mutex::new(vsock));
                let at = Some((v.base, v.gsi));
                self.place(
                    vm,
                    events,
                    vsock.clone(),
                    VirtioHandle::Vsock(vsock),
                    at,
                    make,
                    interrupt,
                )?;
            }
            VirtioDeviceState::Net(st) => {
                let host = host.net.take().ok_or(DeviceManagerError::NetMissing)?;
                let args = NetArgs {
                    mem: self.mem.clone(),
                    interrupt: interrupt.clone(),
                    backend: host.backend,
                    config: host.config,
                };
                let n = Net::restore(args, st)
                    .map_err(|source| DeviceManagerError::Net { base, source })?;
                let n = Arc::new(Mutex::new(n));
                let at = Some((v.base, v.gsi));
                self.place(vm, events, n.clone(), VirtioHandle::Net(n), at, make, interrupt)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::status;

    const MIB: u64 = 1 << 20;

    fn legacy(exit: &Arc<ExitSignal>) -> LegacyArgs {
        LegacyArgs {
            serial_out: SerialOut::Sink,
            serial_irq: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            start: Instant::now(),
            identity: 3,
            exit: exit.clone(),
        }
    }

    fn w(bus: &IoBus, addr: u64, v: u32) {
        bus.mmio_write(addr, &v.to_le_bytes()).unwrap();
    }

    /// Two virtio-rng devices placed, one driven to DRIVER_OK through the bus, saved,
    /// restored into a fresh VM, saved again: the same entries.
    #[test]
    fn devices_round_trip_through_the_state_entries() {
        if !crate::vstate::vm::kvm_ok() {
            return;
        }
        let ram = Arc::new(GuestRam::new_anonymous(64 * MIB).unwrap());
        let vm = Vm::create().unwrap();
        let exit = ExitSignal::new().unwrap();
        let mut events = EventLoop::new().unwrap();
        let mut dm = DeviceManager::new(ram.clone(), legacy(&exit)).unwrap();
        dm.add_rng(&vm, &mut events).unwrap();
        dm.add_rng(&vm, &mut events).unwrap();
        assert_eq!(
            dm.mmio_infos(),
            vec![
                MmioDeviceInfo { base: MMIO_DEVICES_START, gsi: DEVICE_GSI_FIRST },
                MmioDeviceInfo { base: MMIO_DEVICES_START + 0x1000, gsi: DEVICE_GSI_FIRST + 1 },
            ]
        );
        assert_eq!(
            dm.cmdline_devices(),
            " virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        // Drive the second one through the bus as a driver would.
        let bus = dm.bus();
        let b = MMIO_DEVICES_START + 0x1000;
        let mut magic = [0u8; 4];
        bus.mmio_read(b, &mut magic).unwrap();
        assert_eq!(&magic, b"virt");
        w(&bus, b + 0x70, status::ACKNOWLEDGE);
        w(&bus, b + 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(&bus, b + 0x24, 1);
        w(&bus, b + 0x20, 1);
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w(&bus, b + 0x70, ok);
        w(&bus, b + 0x38, 16);
        for (reg, addr) in [(0x80u64, MIB), (0x90, MIB + 0x1000), (0xa0, MIB + 0x2000)] {
            w(&bus, b + reg, addr as u32);
        }
        w(&bus, b + 0x44, 1);
        w(&bus, b + 0x70, ok | status::DRIVER_OK);
        drop(bus);
        // `status` shows the rings as the guest left them: 3 requests published, none seen.
        vm_memory::Bytes::write_obj(ram.mem(), 3u16, vm_memory::GuestAddress(MIB + 0x1000 + 2))
            .unwrap();
        let st = dm.virtio_status();
        assert_eq!(st.len(), 2);
        assert_eq!((st[0].kind.as_str(), st[0].status, st[0].queues.len()), ("rng", 0, 0));
        assert_eq!(
            (st[1].base, st[1].gsi, st[1].status),
            (b, DEVICE_GSI_FIRST + 1, ok | status::DRIVER_OK)
        );
        let q = &st[1].queues[0];
        assert_eq!((q.size, q.avail_idx, q.next_avail, q.used_idx), (16, Some(3), 0, Some(0)));
        lock(dm.ports()).set_generation(7);
        let saved = dm.save().unwrap();
        assert_eq!(saved.len(), 7, "five legacy entries and two virtio ones");
        let DeviceState::VirtioMmio(v) = &saved[6] else { panic!("{saved:?}") };
        assert_eq!(v.transport.status, ok | status::DRIVER_OK);
        let VirtioDeviceState::Rng(r) = &v.device else { panic!("{v:?}") };
        assert!(r.virtio.activated);

        let vm2 = Vm::create().unwrap();
        let mut events2 = EventLoop::new().unwrap();
        let back = DeviceManager::restore(
            ram.clone(),
            &vm2,
            &mut events2,
            legacy(&exit),
            &saved,
            RestoreHost::default(),
        )
        .unwrap();
        assert_eq!(back.save().unwrap(), saved, "save(restore(s)) == s");
        assert_eq!(lock(back.ports()).generation(), 7, "as saved; the builder bumps it");
        assert_eq!(lock(back.ports()).identity(), 3, "the restore's identity");
        let mut st = [0u8; 4];
        back.bus().mmio_read(b + 0x70, &mut st).unwrap();
        assert_eq!(u32::from_le_bytes(st), ok | status::DRIVER_OK, "the bus reaches it");
    }

    #[test]
    fn bad_entries_are_refused() {
        if !crate::vstate::vm::kvm_ok() {
            return;
        }
        let ram = Arc::new(GuestRam::new_anonymous(64 * MIB).unwrap());
        let exit = ExitSignal::new().unwrap();
        let mut dm = DeviceManager::new(ram.clone(), legacy(&exit)).unwrap();
        let vm = Vm::create().unwrap();
        let mut events = EventLoop::new().unwrap();
        dm.add_rng(&vm, &mut events).unwrap();
        let saved = dm.save().unwrap();
        let restore = |s: &[DeviceState]| {
            let vm = Vm::create().unwrap();
            let mut ev = EventLoop::new().unwrap();
            DeviceManager::restore(
                ram.clone(),
                &vm,
                &mut ev,
                legacy(&exit),
                s,
                RestoreHost::default(),
            )
        };
        let no_serial: Vec<_> =
            saved.iter().filter(|d| !matches!(d, DeviceState::Serial(_))).cloned().collect();
        assert!(matches!(
            restore(&no_serial),
            Err(DeviceManagerError::LegacyCount { kind: "serial", count: 0 })
        ));
        let mut twice = saved.clone();
        twice.push(DeviceState::Cmos {});
        assert!(matches!(
            restore(&twice),
            Err(DeviceManagerError::LegacyCount { kind: "cmos", count: 2 })
        ));
        let DeviceState::VirtioMmio(v) = saved[5].clone() else { panic!() };
        let mut same_gsi = saved.clone();
        same_gsi
            .push(DeviceState::VirtioMmio(VirtioMmioState { base: v.base + 0x1000, ..v.clone() }));
        assert!(matches!(restore(&same_gsi), Err(DeviceManagerError::Gsi(5))));
        let mut same_base = saved.clone();
        same_base.push(DeviceState::VirtioMmio(VirtioMmioState { gsi: 9, ..v.clone() }));
        assert!(matches!(restore(&same_base), Err(DeviceManagerError::Allocator(_))));
        let mut outside = saved[..5].to_vec();
        outside.push(DeviceState::VirtioMmio(VirtioMmioState { base: 0x1000, ..v.clone() }));
        assert!(matches!(restore(&outside), Err(DeviceManagerError::Allocator(_))));
        let mut gsi_range = saved[..5].to_vec();
        gsi_range.push(DeviceState::VirtioMmio(VirtioMmioState { gsi: 4, ..v }));
        assert!(matches!(restore(&gsi_range), Err(DeviceManagerError::Gsi(4))));
    }
    fn socket_net() -> NetHost {
        let (b, _peer) = crate::devices::virtio::net::tap::SocketBackend::pair().unwrap();
        NetHost { config: NetConfig::new("t"), backend: Box::new(b) }
    }

    /// A virtio-net device is placed after the others, saved with its own entry, restored onto
    /// the backend the restore gives; a snapshot with one needs a backend and one without
    /// refuses a backend.
    #[test]
    fn a_net_device_round_trips_and_needs_its_backend() {
        if !crate::vstate::vm::kvm_ok() {
            return;
        }
        let ram = Arc::new(GuestRam::new_anonymous(64 * MIB).unwrap());
        let vm = Vm::create().unwrap();
        let exit = ExitSignal::new().unwrap();
        let mut events = EventLoop::new().unwrap();
        let mut dm = DeviceManager::new(ram.clone(), legacy(&exit)).unwrap();
        dm.add_rng(&vm, &mut events).unwrap();
        dm.add_net(&vm, &mut events, socket_net()).unwrap();
        assert_eq!(
            dm.mmio_infos()[1],
            MmioDeviceInfo { base: MMIO_DEVICES_START + 0x1000, gsi: DEVICE_GSI_FIRST + 1 }
        );
        let mut id = [0u8; 4];
        dm.bus().mmio_read(MMIO_DEVICES_START + 0x1000 + 8, &mut id).unwrap();
        assert_eq!(u32::from_le_bytes(id), 1, "device id 1: network card");
        assert!(dm.wait_net_running(std::time::Duration::from_millis(10)).is_empty());
        dm.set_paused(true);
        dm.set_paused(false);
        let saved = dm.save().unwrap();
        let DeviceState::VirtioMmio(v) = &saved[6] else { panic!("{saved:?}") };
        let VirtioDeviceState::Net(n) = &v.device else { panic!("{v:?}") };
        assert_eq!(n.queue_size, 256);
        let restore = |s: &[DeviceState], net| {
            let vm = Vm::create().unwrap();
            let mut ev = EventLoop::new().unwrap();
            DeviceManager::restore(
                ram.clone(),
                &vm,
                &mut ev,
                legacy(&exit),
                s,
                RestoreHost { net, ..RestoreHost::default() },
            )
        };
        let back = restore(&saved, Some(socket_net())).unwrap();
        assert_eq!(back.save().unwrap(), saved, "save(restore(s)) == s");
        assert!(matches!(restore(&saved, None), Err(DeviceManagerError::NetMissing)));
        let no_net = &saved[..6];
        assert!(matches!(restore(no_net, Some(socket_net())), Err(DeviceManagerError::NetUnused)));
        let mut other_mac = socket_net();
        other_mac.config.mac = Some([2, 0, 0, 0, 0, 9]);
        assert!(matches!(restore(&saved, Some(other_mac)), Err(DeviceManagerError::Net { .. })));
    }
}
