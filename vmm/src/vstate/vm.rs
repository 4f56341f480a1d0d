//! The KVM VM: `/dev/kvm`, the VM fd with its in-kernel irqchip and PIT, one memory slot per
//! RAM region (dirty logging on or off), the dirty log, irqfds (device interrupts) and
//! ioeventfds (queue notifications that never leave the kernel), and the VM-wide saved state
//! (PICs, IOAPIC, PIT, kvmclock) as a [`Persist`] component.

use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::cpuid;
use crate::memory::GuestRam;
use crate::persist::Persist;
use crate::timing;

/// TSS address for Intel VMX (three pages just below the 4 GiB boundary, inside the MMIO gap).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors of the KVM VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// Not the KVM API this VMM speaks.
    #[error("KVM API version {0} (12 needed)")]
    ApiVersion(i32),
    /// A KVM VM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// More RAM regions than KVM memory slots.
    #[error("RAM region {0} has no KVM memory slot number")]
    SlotNumber(usize),
    /// A RAM region larger than the address space.
    #[error("RAM region of {0} bytes does not fit the address space")]
    RegionSize(u64),
    /// KVM's supported CPUID does not fit a CPUID set.
    #[error("too many CPUID entries")]
    CpuidEntries,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm(what, e)
}

/// The VM: the KVM system fd and the VM fd (shared with the vCPU and device code that
/// registers eventfds).
#[derive(Debug)]
pub struct Vm {
    /// The KVM system fd.
    pub kvm: Kvm,
    /// The VM fd.
    pub fd: Arc<VmFd>,
}

impl Vm {
    /// Opens KVM and creates the VM with its irqchip and PIT.
    pub fn create() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        if kvm.get_api_version() != 12 {
            return Err(VmError::ApiVersion(kvm.get_api_version()));
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        timing::mark("KVM_CREATE_VM done");
        fd.set_tss_address(KVM_TSS_ADDRESS).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        timing::mark("irqchip and PIT created");
        Ok(Self { kvm, fd: Arc::new(fd) })
    }

    /// Registers (or re-registers with new flags) one KVM memory slot per RAM region.
    pub fn set_memory_slots(&self, ram: &GuestRam, log_dirty: bool) -> Result<(), VmError> {
        for (slot, (r, &(host, _))) in ram.regions().iter().zip(ram.host_regions()).enumerate() {
            let region = kvm_userspace_memory_region {
                slot: u32::try_from(slot).map_err(|_| VmError::SlotNumber(slot))?,
                flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping stays alive as long as `ram`, which the VMM keeps for the
            // life of the VM fd (the Vmm owns both and drops the vCPUs and the VM first).
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Reads and resets KVM's dirty bitmap of every slot (one per RAM region).
    pub fn dirty_log(&self, ram: &GuestRam) -> Result<Vec<Vec<u64>>, VmError> {
        ram.regions()
            .iter()
            .enumerate()
            .map(|(slot, r)| {
                let len = usize::try_from(r.size).map_err(|_| VmError::RegionSize(r.size))?;
                let slot = u32::try_from(slot).map_err(|_| VmError::SlotNumber(slot))?;
                self.fd.get_dirty_log(slot, len).map_err(kvm_err("KVM_GET_DIRTY_LOG"))
            })
            .collect()
    }

    /// The filtered CPUID of every vCPU, and the set's fingerprint (vCPU 0's).
    pub fn vcpu_cpuids(&self, nvcpus: u8) -> Result<(Vec<CpuId>, u64), VmError> {
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut out = Vec::with_capacity(usize::from(nvcpus));
        let mut fp = 0;
        for i in 0..nvcpus {
            let entries = cpuid::filter(supported.as_slice(), i, nvcpus);
            if i == 0 {
                fp = cpuid::fingerprint(&entries);
            }
            out.push(CpuId::from_entries(&entries).map_err(|_| VmError::CpuidEntries)?);
        }
        Ok((out, fp))
    }

    /// Makes `evt` raise interrupt line `gsi` (an irqfd).
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(kvm_err("KVM_IRQFD"))
    }

    /// Makes a guest write of `datamatch` (32 bits) to MMIO address `addr` signal `evt` inside
    /// KVM, without an exit to this process (an ioeventfd).
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: Option<u32>,
    ) -> Result<(), VmError> {
        let a = IoEventAddress::Mmio(addr);
        match datamatch {
            Some(d) => self.fd.register_ioevent(evt, &a, d),
            None => self.fd.register_ioevent(evt, &a, NoDatamatch),
        }
        .map_err(kvm_err("KVM_IOEVENTFD"))
    }
}

/// The VM-wide KVM state: PICs, IOAPIC, PIT, kvmclock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master.
    #[serde(with = "super::blob")]
    pub pic_master: kvm_irqchip,
    /// PIC slave.
    #[serde(with = "super::blob")]
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    #[serde(with = "super::blob")]
    pub ioapic: kvm_irqchip,
    /// PIT.
    #[serde(with = "super::blob")]
    pub pit: kvm_pit_state2,
    /// kvmclock.
    #[serde(with = "super::blob")]
    pub clock: kvm_clock_data,
}

impl Persist for Vm {
    type State = VmState;
    /// The VM to load the state into: fresh, with its irqchip and PIT.
    type Args = Vm;
    type Error = VmError;

    fn save(&self) -> Result<VmState, VmError> {
        // The clock first: right after the vCPUs' TSCs were read (the snapshot saves them just
        // before), so the two stay as close as the ioctls allow.
        let mut clock = self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
            self.fd.get_irqchip(&mut c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        // Only the clock value is restorable; the flags describe this host's TSC.
        clock.flags = 0;
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock,
        })
    }

    fn restore(vm: Vm, s: &VmState) -> Result<Vm, VmError> {
        let vm = vm.restore_chips(s)?;
        vm.fd.set_clock(&s.clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        Ok(vm)
    }
}

impl Vm {
    /// Restores all of `s` but the clock: for a restore that sets the clock after the vCPUs'
    /// TSCs ([`Vm::set_clock_after_tsc`]), which would only overwrite it.
    pub fn restore_chips(self, s: &VmState) -> Result<Vm, VmError> {
        for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            self.fd.set_irqchip(c).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        self.fd.set_pit2(&s.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        Ok(self)
    }

    /// Sets kvmclock once every vCPU's TSC is loaded. KVM_SET_CLOCK and the TSC writes
    /// (KVM_SET_MSRS) each take effect "now", and the saved clock and TSC were read a few
    /// ioctls apart: kvmclock set before the vCPUs were loaded led the restored TSC by that
    /// time (34 ms in the test host, where the restored Linux guest's clocksource watchdog then
    /// marked its TSC unstable). So the clock goes last, and its value is derived from vCPU 0's
    /// saved TSC (`vcpu0_msrs`) through the guest's own kvmclock page (the pvclock parameters
    /// KVM last wrote there), so clock and TSC agree as saved, plus the time since vCPU 0's
    /// TSC was written (`tsc_loaded`: the TSC has run on since); without an enabled kvmclock
    /// page the saved value is used. Then, where KVM reads the clock together with the host
    /// TSC (`KVM_CLOCK_HOST_TSC`, master clock) and has the vCPU TSC-offset attribute, every
    /// vCPU's TSC offset is set from that one atomic reading, so TSC and kvmclock agree with
    /// no ioctl gap at all. Called with the vCPUs loaded and not running.
    pub fn set_clock_after_tsc(
        &self,
        s: &VmState,
        vcpus: &[&kvm_ioctls::VcpuFd],
        vcpu0_msrs: Option<&[(u32, u64)]>,
        mem: &crate::memory::GuestMemory,
        tsc_loaded: Option<std::time::Instant>,
    ) -> Result<(), VmError> {
        let mut clock = s.clock;
        let pv = vcpu0_msrs.and_then(|m| saved_pvclock(m, mem));
        if let Some(ns) = pv.and_then(|(p, tsc)| pvclock_ns(&p, tsc)) {
            let since =
                tsc_loaded.map_or(0, |t| u64::try_from(t.elapsed().as_nanos()).unwrap_or(0));
            clock.clock = ns.saturating_add(since);
        }
        self.fd.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        let Some((p, _)) = pv else { return Ok(()) };
        let Ok(now) = self.fd.get_clock() else { return Ok(()) };
        if now.flags & kvm_bindings::KVM_CLOCK_HOST_TSC == 0 {
            return Ok(());
        }
        let Some(guest_tsc) = pvclock_tsc(&p, now.clock) else { return Ok(()) };
        // Guest TSC = host TSC + offset (no TSC scaling: the vCPUs run at the host's rate).
        let offset = guest_tsc.wrapping_sub(now.host_tsc);
        let attr = kvm_bindings::kvm_device_attr {
            flags: 0,
            group: kvm_bindings::KVM_VCPU_TSC_CTRL,
            attr: u64::from(kvm_bindings::KVM_VCPU_TSC_OFFSET),
            addr: std::ptr::addr_of!(offset) as u64,
        };
        for v in vcpus {
            // SAFETY: KVM_HAS_DEVICE_ATTR on a vCPU fd reads the kvm_device_attr passed by
            // reference (alive for the call) and writes nothing.
            let has =
                unsafe { vmm_sys_util::ioctl::ioctl_with_ref(*v, kvm_has_device_attr(), &attr) };
            if has != 0 {
                return Ok(()); // Older KVM: the MSR-written TSC stays.
            }
            // SAFETY: KVM_SET_DEVICE_ATTR reads the kvm_device_attr and the u64 at
            // `attr.addr`, which is `offset`, alive for the whole call.
            let r =
                unsafe { vmm_sys_util::ioctl::ioctl_with_ref(*v, kvm_set_device_attr(), &attr) };
            if r != 0 {
                return Err(VmError::Kvm(
                    "KVM_SET_DEVICE_ATTR (TSC offset)",
                    kvm_ioctls::Error::last(),
                ));
            }
        }
        Ok(())
    }
}

// The vCPU device-attribute ioctls (kvm-ioctls wraps them for aarch64 only).
vmm_sys_util::ioctl_iow_nr!(kvm_set_device_attr, 0xAE, 0xe1, kvm_bindings::kvm_device_attr);
vmm_sys_util::ioctl_iow_nr!(kvm_has_device_attr, 0xAE, 0xe3, kvm_bindings::kvm_device_attr);

/// vCPU 0's saved TSC and the pvclock page MSR_KVM_SYSTEM_TIME_NEW points at (read through
/// vm-memory while the vCPUs are not running).
fn saved_pvclock(msrs: &[(u32, u64)], mem: &crate::memory::GuestMemory) -> Option<([u8; 32], u64)> {
    use vm_memory::{Bytes, GuestAddress};
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
    let msr = |i| msrs.iter().find(|&&(x, _)| x == i).map(|&(_, v)| v);
    let tsc = msr(MSR_IA32_TSC)?;
    let st = msr(MSR_KVM_SYSTEM_TIME_NEW)?;
    if st & 1 == 0 {
        return None;
    }
    let mut p = [0u8; 32];
    mem.read_slice(&mut p, GuestAddress(st & !1)).ok()?;
    Some((p, tsc))
}

/// The inverse of [`pvclock_ns`]: the TSC at which the page's clock reads `ns`.
fn pvclock_tsc(p: &[u8; 32], ns: u64) -> Option<u64> {
    let u32_at = |o: usize| u32::from_le_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]]);
    let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
    let mul = u32_at(24);
    if u32_at(0) & 1 == 1 || mul == 0 {
        return None;
    }
    let shift = i8::from_le_bytes([p[28]]);
    let scaled = (u128::from(ns.checked_sub(u64_at(16))?) << 32) / u128::from(mul);
    let delta = if shift >= 0 { scaled >> shift } else { scaled << shift.unsigned_abs() };
    u64_at(8).checked_add(u64::try_from(delta).ok()?)
}

/// The pvclock formula on a raw `pvclock_vcpu_time_info` (version, pad, tsc_timestamp,
/// system_time, tsc_to_system_mul, tsc_shift, flags): `system_time + scale(tsc - tsc_timestamp)`.
/// None while an update is in progress (odd version) or for a TSC before the timestamp.
fn pvclock_ns(p: &[u8; 32], tsc: u64) -> Option<u64> {
    let u32_at = |o: usize| u32::from_le_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]]);
    let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
    if u32_at(0) & 1 == 1 {
        return None;
    }
    let mul = u32_at(24);
    let shift = i8::from_le_bytes([p[28]]);
    let mut delta = tsc.checked_sub(u64_at(8))?;
    if shift >= 0 {
        delta <<= shift;
    } else {
        delta >>= shift.unsigned_abs();
    }
    let ns = (u128::from(delta) * u128::from(mul)) >> 32;
    u64_at(16).checked_add(u64::try_from(ns).ok()?)
}

/// Whether /dev/kvm opens (for tests that need it).
#[cfg(test)]
pub(crate) fn kvm_ok() -> bool {
    let ok = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !ok {
        println!("skipped: /dev/kvm not available");
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvclock_formula() {
        let mut p = [0u8; 32];
        p[8..16].copy_from_slice(&1_000u64.to_le_bytes()); // tsc_timestamp
        p[16..24].copy_from_slice(&5_000_000u64.to_le_bytes()); // system_time
        p[24..28].copy_from_slice(&0x8000_0000u32.to_le_bytes()); // x0.5
        p[28] = 1; // << 1: one ns per TSC tick
        assert_eq!(pvclock_ns(&p, 3_000), Some(5_002_000));
        p[28] = 0xff; // >> 1: a quarter ns per tick
        assert_eq!(pvclock_ns(&p, 9_000), Some(5_002_000));
        assert_eq!(pvclock_tsc(&p, 5_002_000), Some(9_000), "inverse");
        p[28] = 1;
        assert_eq!(pvclock_tsc(&p, 5_002_000), Some(3_000));
        assert_eq!(pvclock_tsc(&p, 4_999_999), None, "before system_time");
        p[28] = 0xff;
        assert_eq!(pvclock_ns(&p, 999), None, "TSC before the timestamp");
        p[0] = 1;
        assert_eq!(pvclock_ns(&p, 3_000), None, "update in progress");
    }

    /// VM state saved from one VM, loaded into a fresh one and saved again, comes back equal.
    #[test]
    fn vm_state_round_trips_through_kvm() {
        if !kvm_ok() {
            return;
        }
        let a = Vm::create().unwrap();
        let saved = a.save().unwrap();
        let b = Vm::restore(Vm::create().unwrap(), &saved).unwrap();
        let again = b.save().unwrap();
        let chips = |v: &VmState| {
            let j = serde_json::to_value(v).unwrap();
            (j["ioapic"].clone(), j["pic_master"].clone(), j["pic_slave"].clone())
        };
        assert_eq!(chips(&again), chips(&saved), "PICs and IOAPIC");
        assert_eq!(again.pit.channels[0].count, saved.pit.channels[0].count, "PIT reload value");
        // The clock runs on from the saved value (never backwards).
        assert!(again.clock.clock >= saved.clock.clock);
    }
}
