//! The virtio-mmio transport (virtio 1.2 §4.2, register layout version 2, modern devices
//! only): one 4 KiB register page per device.
//!
//! The driver's state machine is enforced: features are read and written only between DRIVER
//! and FEATURES_OK, FEATURES_OK is refused (stays clear) unless the driver accepted
//! VIRTIO_F_VERSION_1 and nothing the device did not offer, queues are configured only between
//! FEATURES_OK and DRIVER_OK, and DRIVER_OK activates the device with the ready queues (a queue
//! outside guest memory sets DEVICE_NEEDS_RESET instead). Writing 0 to Status resets. Registers
//! take aligned 32-bit accesses only; configuration space (from 0x100) any width. Anything else
//! is ignored, never fatal: the guest is not trusted.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

use super::{
    new_queues, status, IrqKind, IrqTrigger, QueueSaved, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::devices::lock;
use crate::memory::GuestRam;
use crate::persist::Persist;

/// "virt".
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Register layout version (2: virtio 1.x).
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported ("GROV").
pub const VENDOR_ID: u32 = 0x564f_5247;
/// Offset of the QueueNotify register (where ioeventfds are registered).
pub const NOTIFY_REG: u64 = 0x50;
/// Start of the device configuration space.
pub const CONFIG_SPACE: u64 = 0x100;

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x00;
    pub const VERSION: u64 = 0x04;
    pub const DEVICE_ID: u64 = 0x08;
    pub const VENDOR_ID: u64 = 0x0c;
    pub const DEVICE_FEATURES: u64 = 0x10;
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    pub const DRIVER_FEATURES: u64 = 0x20;
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    pub const QUEUE_SEL: u64 = 0x30;
    pub const QUEUE_NUM_MAX: u64 = 0x34;
    pub const QUEUE_NUM: u64 = 0x38;
    pub const QUEUE_READY: u64 = 0x44;
    pub const QUEUE_NOTIFY: u64 = super::NOTIFY_REG;
    pub const INTERRUPT_STATUS: u64 = 0x60;
    pub const INTERRUPT_ACK: u64 = 0x64;
    pub const STATUS: u64 = 0x70;
    pub const QUEUE_DESC_LOW: u64 = 0x80;
    pub const QUEUE_DESC_HIGH: u64 = 0x84;
    pub const QUEUE_DRIVER_LOW: u64 = 0x90;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x94;
    pub const QUEUE_DEVICE_LOW: u64 = 0xa0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0xa4;
    pub const SHM_LEN_LOW: u64 = 0xb0;
    pub const SHM_BASE_HIGH: u64 = 0xbc;
    pub const CONFIG_GENERATION: u64 = 0xfc;
}

/// Errors restoring a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A saved queue virtio-queue refuses.
    #[error("saved queue {index}")]
    Queue {
        /// Queue index.
        index: usize,
        /// virtio-queue's reason.
        #[source]
        source: virtio_queue::Error,
    },
    /// A saved queue count that is not the device's.
    #[error("{got} saved queues for a device with {want}")]
    QueueCount {
        /// Saved.
        got: usize,
        /// The device's.
        want: usize,
    },
}

/// A virtio device behind its MMIO register page.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: Arc<GuestRam>,
    interrupt: Arc<IrqTrigger>,
    status: u32,
    features_select: u32,
    acked_features_select: u32,
    queue_select: u32,
    config_generation: u32,
    /// Every feature bit the driver wrote (the device keeps only those it offers).
    driver_features: u64,
    /// The driver's queue configuration (before activation; the device owns the live ones).
    queues: Vec<Queue>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport").field("status", &self.status).finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// What `status` shows of this transport: its Status and InterruptStatus registers and
    /// the device's live queues with the ring indexes read from guest memory.
    pub fn view(&self) -> (u32, u32, Vec<grove_vmm_api::VirtqueueStatus>) {
        use std::sync::atomic::Ordering;
        let mem = self.mem.mem();
        let queues = lock(&self.device)
            .queues()
            .iter()
            .map(|q| grove_vmm_api::VirtqueueStatus {
                size: q.size(),
                avail_idx: q.avail_idx(mem, Ordering::Acquire).ok().map(|w| w.0),
                next_avail: q.next_avail(),
                used_idx: q.used_idx(mem, Ordering::Acquire).ok().map(|w| w.0),
            })
            .collect();
        (self.status, self.interrupt.status(), queues)
    }

    /// A transport for `device`, interrupting through `interrupt`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: Arc<GuestRam>,
        interrupt: Arc<IrqTrigger>,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = new_queues(lock(&device).queue_max_sizes())?;
        Ok(Self {
            device,
            mem,
            interrupt,
            status: 0,
            features_select: 0,
            acked_features_select: 0,
            queue_select: 0,
            config_generation: 0,
            driver_features: 0,
            queues,
        })
    }

    /// The device.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// Device status.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn status_is(&self, set: u32, clear: u32) -> bool {
        self.status & set == set && self.status & clear == 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queues are configured only after feature negotiation and before DRIVER_OK.
        if !self.status_is(status::FEATURES_OK, status::DRIVER_OK | status::FAILED) {
            return None;
        }
        self.queues.get_mut(usize::try_from(self.queue_select).ok()?)
    }

    fn reset(&mut self) {
        let mut dev = lock(&self.device);
        dev.reset();
        dev.set_acked_features(0);
        if let Ok(q) = new_queues(dev.queue_max_sizes()) {
            self.queues = q;
        }
        drop(dev);
        self.status = 0;
        self.features_select = 0;
        self.acked_features_select = 0;
        self.queue_select = 0;
        self.driver_features = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, v: u32) {
        use status::*;
        if v == 0 {
            self.reset();
            return;
        }
        if v & FAILED != 0 {
            self.status |= FAILED;
            return;
        }
        // Only forward steps, one bit at a time, in the spec's order.
        let next = match (self.status, v & !self.status) {
            (0, ACKNOWLEDGE) => v,
            (s, DRIVER) if s == ACKNOWLEDGE => v,
            (s, FEATURES_OK) if s == ACKNOWLEDGE | DRIVER => {
                let avail = lock(&self.device).avail_features();
                let f = self.driver_features;
                // Refused (the bit stays clear) unless VERSION_1 and only offered features.
                if f & VIRTIO_F_VERSION_1 == 0 || f & !avail != 0 {
                    return;
                }
                v
            }
            (s, DRIVER_OK) if s == ACKNOWLEDGE | DRIVER | FEATURES_OK => {
                self.activate();
                return;
            }
            _ => return,
        };
        self.status = next;
    }

    fn activate(&mut self) {
        let mem = self.mem.mem();
        let mut dev = lock(&self.device);
        // A copy for the device (virtio-queue's Queue is not Clone): through its plain state.
        let queues: Result<Vec<Queue>, _> =
            self.queues.iter().map(|q| Queue::try_from(q.state())).collect();
        let ok = match queues {
            Ok(q) if q.iter().all(|q| q.is_valid(mem)) => {
                dev.activate(q, self.interrupt.clone()).is_ok()
            }
            _ => false,
        };
        drop(dev);
        if ok {
            self.status |= status::DRIVER_OK;
        } else {
            self.status |= status::DEVICE_NEEDS_RESET;
            let _ = self.interrupt.trigger(IrqKind::Config);
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let dev = lock(&self.device);
        match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => dev.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.features_select {
                0 => dev.avail_features() as u32,
                1 => (dev.avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => usize::try_from(self.queue_select)
                .ok()
                .and_then(|i| dev.queue_max_sizes().get(i))
                .map_or(0, |&m| u32::from(m)),
            reg::QUEUE_READY => usize::try_from(self.queue_select)
                .ok()
                .and_then(|i| self.queues.get(i))
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: length and base read as all ones.
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let negotiating = self
            .status_is(status::ACKNOWLEDGE | status::DRIVER, status::FEATURES_OK | status::FAILED);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.features_select = v,
            reg::DRIVER_FEATURES_SEL => self.acked_features_select = v,
            reg::DRIVER_FEATURES if negotiating => {
                let mut dev = lock(&self.device);
                let shift = match self.acked_features_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                self.driver_features = (self.driver_features & !mask) | (u64::from(v) << shift);
                dev.set_acked_features(self.driver_features);
            }
            reg::QUEUE_SEL => self.queue_select = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(u16::try_from(v).unwrap_or(0));
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW => self.queue_addr(|q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => self.queue_addr(|q| q.set_desc_table_address(None, Some(v))),
            reg::QUEUE_DRIVER_LOW => self.queue_addr(|q| q.set_avail_ring_address(Some(v), None)),
            reg::QUEUE_DRIVER_HIGH => self.queue_addr(|q| q.set_avail_ring_address(None, Some(v))),
            reg::QUEUE_DEVICE_LOW => self.queue_addr(|q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_DEVICE_HIGH => self.queue_addr(|q| q.set_used_ring_address(None, Some(v))),
            reg::QUEUE_NOTIFY => {
                // Reached only without an ioeventfd: signal the queue's eventfd ourselves.
                let dev = lock(&self.device);
                if let Some(e) = usize::try_from(v).ok().and_then(|i| dev.queue_events().get(i)) {
                    let _ = e.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            _ => {}
        }
    }

    fn queue_addr(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            // Addresses are set while the queue is not ready (the spec's order).
            if !q.ready() {
                f(q);
            }
        }
    }
}

impl MutDeviceMmio for MmioTransport {
    fn mmio_read(&mut self, _: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            data.fill(0);
            lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn mmio_write(&mut self, _: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            // Configuration writes only while the driver sets the device up or runs it.
            if self.status_is(status::DRIVER, status::FAILED) {
                lock(&self.device).write_config(offset - CONFIG_SPACE, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            return;
        }
        let Ok(b) = <[u8; 4]>::try_from(data) else { return };
        if offset.is_multiple_of(4) {
            self.write_reg(offset, u32::from_le_bytes(b));
        }
    }
}

/// The transport's saved registers (the device saves its own state and live queues).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmioState {
    /// Device status.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub features_select: u32,
    /// DriverFeaturesSel.
    pub acked_features_select: u32,
    /// QueueSel.
    pub queue_select: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Every feature bit the driver wrote.
    pub driver_features: u64,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The driver's queue configuration.
    pub queues: Vec<QueueSaved>,
}

/// What restoring a transport needs: the restored device, memory and interrupt eventfd.
pub struct MmioArgs {
    /// The device (restored first).
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// Guest memory.
    pub mem: Arc<GuestRam>,
    /// The interrupt (its status is restored from the state).
    pub interrupt: Arc<IrqTrigger>,
}

impl Persist for MmioTransport {
    type State = MmioState;
    type Args = MmioArgs;
    type Error = MmioError;

    fn save(&self) -> Result<MmioState, MmioError> {
        Ok(MmioState {
            status: self.status,
            features_select: self.features_select,
            acked_features_select: self.acked_features_select,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            driver_features: self.driver_features,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.iter().map(QueueSaved::of).collect(),
        })
    }

    fn restore(args: MmioArgs, s: &MmioState) -> Result<Self, MmioError> {
        let want = lock(&args.device).queue_max_sizes().len();
        if s.queues.len() != want {
            return Err(MmioError::QueueCount { got: s.queues.len(), want });
        }
        let queues = s
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| q.to_queue().map_err(|source| MmioError::Queue { index, source }))
            .collect::<Result<Vec<_>, _>>()?;
        args.interrupt.ack(u32::MAX);
        args.interrupt.status.fetch_or(s.interrupt_status, std::sync::atomic::Ordering::SeqCst);
        Ok(Self {
            device: args.device,
            mem: args.mem,
            interrupt: args.interrupt,
            status: s.status,
            features_select: s.features_select,
            acked_features_select: s.acked_features_select,
            queue_select: s.queue_select,
            config_generation: s.config_generation,
            driver_features: s.driver_features,
            queues,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::rng::device::tests::{ram, MIB};
    use crate::devices::virtio::rng::device::Rng;
    use crate::devices::virtio::{device_type, IrqKind};

    struct Rig {
        t: MmioTransport,
        rng: Arc<Mutex<Rng>>,
        irq: Arc<IrqTrigger>,
        ram: Arc<GuestRam>,
    }

    impl Rig {
        fn new() -> Self {
            let ram = ram();
            let rng = Arc::new(Mutex::new(Rng::new(ram.clone()).unwrap()));
            let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), 0));
            let dev: Arc<Mutex<dyn VirtioDevice>> = rng.clone();
            let t = MmioTransport::new(dev, ram.clone(), irq.clone()).unwrap();
            Self { t, rng, irq, ram }
        }

        fn r(&mut self, off: u64) -> u32 {
            let mut d = [0u8; 4];
            self.t.mmio_read(MmioAddress(0), off, &mut d);
            u32::from_le_bytes(d)
        }

        fn w(&mut self, off: u64, v: u32) {
            self.t.mmio_write(MmioAddress(0), off, &v.to_le_bytes());
        }

        /// The driver's side of virtio 1.2 §3.1.1 up to FEATURES_OK; returns the status then.
        fn negotiate(&mut self, features: u64) -> u32 {
            self.w(reg::STATUS, status::ACKNOWLEDGE);
            self.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
            self.w(reg::DRIVER_FEATURES_SEL, 0);
            self.w(reg::DRIVER_FEATURES, features as u32);
            self.w(reg::DRIVER_FEATURES_SEL, 1);
            self.w(reg::DRIVER_FEATURES, (features >> 32) as u32);
            self.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
            self.r(reg::STATUS)
        }

        /// Sets queue 0 up over a mock driver's rings at 1 MiB and sets DRIVER_OK.
        fn setup_queue(&mut self, size: u32) {
            let ram = self.ram.clone();
            let mq = MockSplitQueue::create(ram.mem(), GuestAddress(MIB), 16);
            self.w(reg::QUEUE_SEL, 0);
            self.w(reg::QUEUE_NUM, size);
            let a = |g: GuestAddress| (g.0 as u32, (g.0 >> 32) as u32);
            let (dl, dh) = a(mq.desc_table_addr());
            let (al, ah) = a(mq.avail_addr());
            let (ul, uh) = a(mq.used_addr());
            self.w(reg::QUEUE_DESC_LOW, dl);
            self.w(reg::QUEUE_DESC_HIGH, dh);
            self.w(reg::QUEUE_DRIVER_LOW, al);
            self.w(reg::QUEUE_DRIVER_HIGH, ah);
            self.w(reg::QUEUE_DEVICE_LOW, ul);
            self.w(reg::QUEUE_DEVICE_HIGH, uh);
            self.w(reg::QUEUE_READY, 1);
            let s = self.r(reg::STATUS);
            self.w(reg::STATUS, s | status::DRIVER_OK);
        }
    }

    const OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;

    #[test]
    fn identity_registers() {
        let mut rig = Rig::new();
        assert_eq!(rig.r(reg::MAGIC), MMIO_MAGIC);
        assert_eq!(rig.r(reg::VERSION), 2);
        assert_eq!(rig.r(reg::DEVICE_ID), device_type::RNG);
        assert_eq!(rig.r(reg::VENDOR_ID), VENDOR_ID);
        rig.w(reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rig.r(reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        rig.w(reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(rig.r(reg::DEVICE_FEATURES), 0);
        assert_eq!(rig.r(reg::QUEUE_NUM_MAX), 256);
        rig.w(reg::QUEUE_SEL, 1);
        assert_eq!(rig.r(reg::QUEUE_NUM_MAX), 0, "no queue 1");
        assert_eq!(rig.r(reg::SHM_LEN_LOW), u32::MAX, "no shared memory");
        // Narrow or misaligned register accesses read 0 and write nothing.
        let mut b = [0xffu8; 2];
        rig.t.mmio_read(MmioAddress(0), reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        rig.t.mmio_write(MmioAddress(0), reg::STATUS, &[1]);
        assert_eq!(rig.r(reg::STATUS), 0);
    }

    #[test]
    fn features_ok_needs_version_1_and_only_offered_features() {
        let mut rig = Rig::new();
        assert_eq!(rig.negotiate(0), status::ACKNOWLEDGE | status::DRIVER, "no VERSION_1");
        rig.w(reg::STATUS, 0);
        assert_eq!(
            rig.negotiate(VIRTIO_F_VERSION_1 | 1 << 28),
            status::ACKNOWLEDGE | status::DRIVER
        );
        assert_eq!(lock(&rig.rng).acked_features(), VIRTIO_F_VERSION_1, "unoffered bits dropped");
        rig.w(reg::STATUS, 0);
        assert_eq!(rig.negotiate(VIRTIO_F_VERSION_1), OK);
        // Features are frozen after FEATURES_OK.
        rig.w(reg::DRIVER_FEATURES_SEL, 1);
        rig.w(reg::DRIVER_FEATURES, 0);
        assert_eq!(lock(&rig.rng).acked_features(), VIRTIO_F_VERSION_1);
    }

    #[test]
    fn out_of_order_status_steps_are_ignored() {
        let mut rig = Rig::new();
        rig.w(reg::STATUS, status::DRIVER);
        assert_eq!(rig.r(reg::STATUS), 0);
        rig.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(rig.r(reg::STATUS), 0, "several steps at once");
        rig.w(reg::STATUS, status::ACKNOWLEDGE);
        rig.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER_OK);
        assert_eq!(rig.r(reg::STATUS), status::ACKNOWLEDGE, "DRIVER_OK before the rest");
        // Queues cannot be set up before FEATURES_OK.
        rig.w(reg::QUEUE_READY, 1);
        assert_eq!(rig.r(reg::QUEUE_READY), 0);
        rig.w(reg::STATUS, status::FAILED);
        assert_ne!(rig.r(reg::STATUS) & status::FAILED, 0);
    }

    #[test]
    fn driver_ok_activates_and_notifications_reach_the_device() {
        let mut rig = Rig::new();
        assert_eq!(rig.negotiate(VIRTIO_F_VERSION_1), OK);
        rig.setup_queue(16);
        assert_eq!(rig.r(reg::STATUS), OK | status::DRIVER_OK);
        assert!(lock(&rig.rng).is_activated());
        // A request, notified through the register (no ioeventfd here).
        let ram = rig.ram.clone();
        let mq = MockSplitQueue::create(ram.mem(), GuestAddress(MIB), 16);
        mq.add_desc_chains(&[RawDescriptor::from(Descriptor::new(2 * MIB, 16, 2, 0))], 0).unwrap();
        rig.w(reg::QUEUE_NOTIFY, 0);
        assert_eq!(lock(&rig.rng).queue_events()[0].read().unwrap(), 1);
        lock(&rig.rng).process_queue();
        assert_eq!(mq.used().idx().load(), 1);
        assert_eq!(rig.r(reg::INTERRUPT_STATUS), IrqKind::Vring as u32);
        rig.w(reg::INTERRUPT_ACK, IrqKind::Vring as u32);
        assert_eq!(rig.r(reg::INTERRUPT_STATUS), 0);
        // A notification for a queue that does not exist is ignored.
        rig.w(reg::QUEUE_NOTIFY, 7);
        // Queue registers are frozen after DRIVER_OK.
        rig.w(reg::QUEUE_NUM, 2);
        assert_eq!(lock(&rig.rng).queues()[0].size(), 16);
        // Reset: status 0, device deactivated, features forgotten.
        rig.w(reg::STATUS, 0);
        assert_eq!(rig.r(reg::STATUS), 0);
        assert!(!lock(&rig.rng).is_activated());
        assert_eq!(lock(&rig.rng).acked_features(), 0);
    }

    #[test]
    fn a_queue_outside_guest_memory_needs_a_reset() {
        let mut rig = Rig::new();
        assert_eq!(rig.negotiate(VIRTIO_F_VERSION_1), OK);
        rig.w(reg::QUEUE_SEL, 0);
        rig.w(reg::QUEUE_DESC_LOW, 0);
        rig.w(reg::QUEUE_DESC_HIGH, 0x10);
        rig.w(reg::QUEUE_READY, 1);
        rig.w(reg::STATUS, OK | status::DRIVER_OK);
        assert_eq!(rig.r(reg::STATUS), OK | status::DEVICE_NEEDS_RESET);
        assert!(!lock(&rig.rng).is_activated());
        assert_eq!(rig.irq.status.load(Ordering::SeqCst), IrqKind::Config as u32);
    }

    #[test]
    fn transport_state_round_trips() {
        let mut rig = Rig::new();
        assert_eq!(rig.negotiate(VIRTIO_F_VERSION_1), OK);
        rig.setup_queue(8);
        rig.irq.trigger(IrqKind::Vring).unwrap();
        let saved = rig.t.save().unwrap();
        assert_eq!(saved.status, OK | status::DRIVER_OK);
        assert_eq!(saved.queues[0].size, 8);
        let irq2 = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), 0));
        let device: Arc<Mutex<dyn VirtioDevice>> = rig.rng.clone();
        let back = MmioTransport::restore(
            MmioArgs { device, mem: rig.ram.clone(), interrupt: irq2.clone() },
            &saved,
        )
        .unwrap();
        assert_eq!(back.save().unwrap(), saved);
        assert_eq!(irq2.status(), IrqKind::Vring as u32, "interrupt status restored");
        let bad = MmioState { queues: vec![], ..saved };
        let device: Arc<Mutex<dyn VirtioDevice>> = rig.rng.clone();
        assert!(matches!(
            MmioTransport::restore(MmioArgs { device, mem: rig.ram, interrupt: irq2 }, &bad),
            Err(MmioError::QueueCount { got: 0, want: 1 })
        ));
    }

    #[test]
    fn config_space_reads_zero_for_rng() {
        let mut rig = Rig::new();
        let mut b = [0xffu8; 8];
        rig.t.mmio_read(MmioAddress(0), CONFIG_SPACE, &mut b);
        assert_eq!(b, [0; 8]);
    }
}
