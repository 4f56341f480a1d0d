//! Saved state: the `Persist` shape (runtime object vs saved-state type) for vCPUs, the VM and
//! the devices, and the versioned state file a snapshot directory holds.
//!
//! State file (`DIR/vmstate`), little endian:
//! ```text
//! 0   8  magic "GROVEVMS"
//! 8   4  format version (1)
//! 12  4  flags (0)
//! 16  8  payload length
//! 24  4  CRC-32 (IEEE) of the payload
//! 28  4  zero
//! 32  .. payload: JSON of [`SnapshotState`]
//! ```

use std::path::Path;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::devices::DevicesState;
use crate::memory::RamRegion;

/// State file magic.
pub const STATE_MAGIC: &[u8; 8] = b"GROVEVMS";
/// State file format version.
pub const STATE_VERSION: u32 = 1;
/// State file name inside a snapshot directory.
pub const STATE_FILE: &str = "vmstate";
/// Header length.
const HEADER_LEN: usize = 32;
/// Largest payload accepted (a state file is tens of KiB per vCPU).
const MAX_PAYLOAD: u64 = 64 << 20;

/// Errors from saving or restoring state.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A KVM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// KVM did not take or give every MSR.
    #[error("{what}: {done} of {total} MSRs")]
    Msrs {
        /// Get or set.
        what: &'static str,
        /// How many went through.
        done: usize,
        /// How many there were.
        total: usize,
    },
    /// File I/O.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a state file.
    #[error("{0}: not a Grove VM state file (bad magic)")]
    BadMagic(String),
    /// Unknown version.
    #[error(
        "{path}: unsupported state format version {version} (this grove-vmm reads {STATE_VERSION})"
    )]
    Version {
        /// The file.
        path: String,
        /// The version found.
        version: u32,
    },
    /// Shorter than its header says.
    #[error("{path}: truncated state file ({actual} bytes, {expected} expected)")]
    Truncated {
        /// The file.
        path: String,
        /// Bytes expected.
        expected: u64,
        /// Bytes found.
        actual: u64,
    },
    /// Checksum mismatch.
    #[error("{path}: state checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// The file.
        path: String,
        /// Stored.
        stored: u32,
        /// Computed.
        computed: u32,
    },
    /// Payload does not parse.
    #[error("{path}: bad state payload")]
    Payload {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Saved on another CPUID set.
    #[error("snapshot was taken on another CPU model or CPUID set (fingerprint {saved:#018x}, this host {host:#018x}); refusing to restore")]
    CpuidMismatch {
        /// In the snapshot.
        saved: u64,
        /// This host.
        host: u64,
    },
    /// Inconsistent state.
    #[error("inconsistent state: {0}")]
    Invalid(String),
}

/// A component whose runtime object can be saved to and rebuilt from a plain state type.
pub trait Persist: Sized {
    /// The saved state.
    type State;
    /// What `restore` needs besides the state.
    type Args;
    /// Saves.
    fn save(&self) -> Result<Self::State, PersistError>;
    /// Rebuilds (or loads into) the runtime object.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, PersistError>;
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// MP state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (legacy 4 KiB XSAVE area).
    pub xsave: kvm_xsave,
    /// XCR0.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// MSRs (index, value), TSC and kvmclock included.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
}

/// A vCPU fd as a `Persist` component (save runs on the paused vCPU's own thread).
pub struct VcpuPersist<'a> {
    /// The vCPU.
    pub fd: &'a VcpuFd,
    /// MSR indices to save.
    pub msr_list: &'a [u32],
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PersistError {
    move |e| PersistError::Kvm(what, e)
}

/// Reads the MSRs of `list` that this vCPU can give; MSRs KVM refuses to read are dropped
/// (KVM_GET_MSRS stops at the first failing index).
pub fn read_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>, PersistError> {
    let mut want: Vec<u32> = list.to_vec();
    let mut out = Vec::with_capacity(want.len());
    while !want.is_empty() {
        let chunk: Vec<kvm_msr_entry> = want
            .iter()
            .take(kvm_bindings::KVM_MAX_MSR_ENTRIES)
            .map(|&index| kvm_msr_entry { index, ..Default::default() })
            .collect();
        let mut msrs = Msrs::from_entries(&chunk).map_err(|_| PersistError::Msrs {
            what: "build",
            done: 0,
            total: chunk.len(),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // Skip the entry that failed (if any) and continue after it.
        let consumed = if n < chunk.len() { n + 1 } else { n };
        want.drain(..consumed);
    }
    Ok(out)
}

impl Persist for VcpuPersist<'_> {
    type State = VcpuState;
    type Args = ();

    fn save(&self) -> Result<VcpuState, PersistError> {
        let fd = self.fd;
        Ok(VcpuState {
            mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            debugregs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            msrs: read_msrs(fd, self.msr_list)?,
            events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    fn restore(_: (), _: &VcpuState) -> Result<Self, PersistError> {
        Err(PersistError::Invalid("use load_vcpu to load state into a vCPU fd".into()))
    }
}

/// Loads saved state into a fresh vCPU (CPUID already set), in the order KVM needs: MSRs
/// after sregs (EFER) and LAPIC (TSC deadline), events last.
pub fn load_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), PersistError> {
    fd.set_mp_state(s.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // SAFETY: `s.xsave` is a legacy 4 KiB kvm_xsave, the size KVM_SET_XSAVE reads (the CPUID
    // policy keeps XCR0 inside it, so no KVM_SET_XSAVE2 is needed).
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debugregs).map_err(kvm("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() })
        .collect();
    for chunk in entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| PersistError::Msrs {
            what: "build",
            done: 0,
            total: chunk.len(),
        })?;
        let n = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if n != chunk.len() {
            return Err(PersistError::Msrs { what: "KVM_SET_MSRS", done: n, total: chunk.len() });
        }
    }
    fd.set_vcpu_events(&s.events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// The VM-wide KVM state: PICs, IOAPIC, PIT, kvmclock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master.
    pub pic_master: kvm_irqchip,
    /// PIC slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

impl Persist for &VmFd {
    type State = VmState;
    type Args = Self;

    fn save(&self) -> Result<VmState, PersistError> {
        let chip = |id| -> Result<kvm_irqchip, PersistError> {
            let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
            self.get_irqchip(&mut c).map_err(kvm("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        let mut clock = self.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        // Only the clock value is restorable; the flags describe this host's TSC.
        clock.flags = 0;
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
            clock,
        })
    }

    fn restore(fd: Self, s: &VmState) -> Result<Self, PersistError> {
        for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            fd.set_irqchip(c).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        fd.set_pit2(&s.pit).map_err(kvm("KVM_SET_PIT2"))?;
        fd.set_clock(&s.clock).map_err(kvm("KVM_SET_CLOCK"))?;
        Ok(fd)
    }
}

/// Everything a snapshot directory's state file holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// CPUID fingerprint of the VM ([`crate::cpuid::fingerprint`]).
    pub cpuid_fingerprint: u64,
    /// vCPU count.
    pub nvcpus: u8,
    /// RAM layout.
    pub regions: Vec<RamRegion>,
    /// Memory layer files, base first (absolute paths).
    pub layers: Vec<String>,
    /// Per-vCPU state.
    pub vcpus: Vec<VcpuState>,
    /// VM-wide state.
    pub vm: VmState,
    /// Devices.
    pub devices: DevicesState,
}

impl SnapshotState {
    /// Structural checks (counts, sizes) before anything is built from it.
    pub fn validate(&self) -> Result<(), PersistError> {
        if self.nvcpus == 0 || self.nvcpus > crate::layout::MAX_VCPUS {
            return Err(PersistError::Invalid(format!("{} vCPUs", self.nvcpus)));
        }
        if self.vcpus.len() != usize::from(self.nvcpus) {
            return Err(PersistError::Invalid(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                self.nvcpus
            )));
        }
        let size: u64 = self.regions.iter().map(|r| r.size).sum();
        let expect =
            crate::memory::ram_regions(size).map_err(|e| PersistError::Invalid(e.to_string()))?;
        if expect != self.regions {
            return Err(PersistError::Invalid("memory regions do not match the layout".into()));
        }
        if self.layers.is_empty() {
            return Err(PersistError::Invalid("no memory layers".into()));
        }
        Ok(())
    }
}

/// Encodes a state file.
pub fn encode_state(s: &SnapshotState) -> Vec<u8> {
    let payload = serde_json::to_vec(s).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes and checks a state file's bytes (`path` only names it in errors).
pub fn decode_state(b: &[u8], path: &str) -> Result<SnapshotState, PersistError> {
    let p = || path.to_string();
    if b.len() < 8 || &b[..8] != STATE_MAGIC {
        return Err(PersistError::BadMagic(p()));
    }
    if b.len() < HEADER_LEN {
        return Err(PersistError::Truncated {
            path: p(),
            expected: HEADER_LEN as u64,
            actual: b.len() as u64,
        });
    }
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let version = u32_at(8);
    if version != STATE_VERSION {
        return Err(PersistError::Version { path: p(), version });
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&b[16..24]);
    let len = u64::from_le_bytes(len8);
    let expected = (HEADER_LEN as u64).saturating_add(len);
    if len > MAX_PAYLOAD || (b.len() as u64) < expected {
        return Err(PersistError::Truncated { path: p(), expected, actual: b.len() as u64 });
    }
    if (b.len() as u64) > expected {
        return Err(PersistError::Invalid(format!(
            "{path}: {} bytes of trailing data",
            b.len() as u64 - expected
        )));
    }
    let payload = &b[HEADER_LEN..];
    let stored = u32_at(24);
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(PersistError::Checksum { path: p(), stored, computed });
    }
    let s: SnapshotState = serde_json::from_slice(payload)
        .map_err(|source| PersistError::Payload { path: p(), source })?;
    s.validate()?;
    Ok(s)
}

/// Writes the state file into `dir` (temporary name, then rename).
pub fn write_state(dir: &Path, s: &SnapshotState, fsync: bool) -> Result<(), PersistError> {
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let io = |op, source| PersistError::Io { op, path: path.display().to_string(), source };
    let bytes = encode_state(s);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("create", e))?;
        f.write_all(&bytes).map_err(|e| io("write", e))?;
        if fsync {
            f.sync_all().map_err(|e| io("fsync", e))?;
        }
    }
    std::fs::rename(&tmp, &path).map_err(|e| io("rename", e))?;
    Ok(())
}

/// Reads and checks the state file of snapshot directory `dir`.
pub fn read_state(dir: &Path) -> Result<SnapshotState, PersistError> {
    let path = dir.join(STATE_FILE);
    let b = std::fs::read(&path).map_err(|source| PersistError::Io {
        op: "read",
        path: path.display().to_string(),
        source,
    })?;
    decode_state(&b, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> SnapshotState {
        let vcpu = VcpuState {
            mp_state: kvm_mp_state { mp_state: 0 },
            regs: kvm_regs { rip: 0x1234, rsi: 0x7000, ..Default::default() },
            sregs: kvm_sregs { cr3: 0x9000, ..Default::default() },
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            msrs: vec![(0x10, 12345), (0x4b56_4d01, 0x1000)],
            events: kvm_vcpu_events::default(),
        };
        SnapshotState {
            cpuid_fingerprint: 0xfeed,
            nvcpus: 1,
            regions: crate::memory::ram_regions(256 << 20).unwrap(),
            layers: vec!["/x/mem.mlayer".into()],
            vcpus: vec![vcpu],
            vm: VmState {
                pic_master: kvm_irqchip::default(),
                pic_slave: kvm_irqchip::default(),
                ioapic: kvm_irqchip::default(),
                pit: kvm_pit_state2::default(),
                clock: kvm_clock_data { clock: 99, ..Default::default() },
            },
            devices: DevicesState {
                serial_regs: [1, 2, 3, 4, 5, 6, 7, 8, 9],
                serial_in: vec![],
                generation: 4,
            },
        }
    }

    #[test]
    fn state_round_trips() {
        let s = sample();
        let b = encode_state(&s);
        let d = decode_state(&b, "t").unwrap();
        assert_eq!(d.vcpus[0].regs.rip, 0x1234);
        assert_eq!(d.vcpus[0].sregs.cr3, 0x9000);
        assert_eq!(d.vcpus[0].msrs, s.vcpus[0].msrs);
        assert_eq!(d.vm.clock.clock, 99);
        assert_eq!(d.devices, s.devices);
        assert_eq!(d.regions, s.regions);
        assert_eq!(encode_state(&d), b, "re-encoding is stable");
    }

    #[test]
    fn corrupt_files_are_refused_clearly() {
        let b = encode_state(&sample());
        let mut bad = b.clone();
        bad[0] = b'X';
        assert!(matches!(decode_state(&bad, "t"), Err(PersistError::BadMagic(_))));
        let mut bad = b.clone();
        bad[8] = 9;
        let e = decode_state(&bad, "t").unwrap_err();
        assert!(matches!(e, PersistError::Version { version: 9, .. }), "{e}");
        let e = decode_state(&b[..b.len() - 10], "t").unwrap_err();
        assert!(matches!(e, PersistError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("truncated"));
        let e = decode_state(&b[..20], "t").unwrap_err();
        assert!(matches!(e, PersistError::Truncated { .. }), "{e}");
        let mut bad = b.clone();
        let last = bad.len() - 3;
        bad[last] ^= 0x20;
        let e = decode_state(&bad, "t").unwrap_err();
        assert!(matches!(e, PersistError::Checksum { .. }), "{e}");
        let mut long = b.clone();
        long.push(0);
        assert!(decode_state(&long, "t").is_err());
        assert!(decode_state(&[], "t").is_err());
    }

    #[test]
    fn inconsistent_state_is_refused() {
        let mut s = sample();
        s.nvcpus = 2;
        assert!(decode_state(&encode_state(&s), "t").is_err());
        let mut s = sample();
        s.regions[0].size = 100;
        assert!(decode_state(&encode_state(&s), "t").is_err());
        let mut s = sample();
        s.layers.clear();
        assert!(decode_state(&encode_state(&s), "t").is_err());
    }

    #[test]
    fn garbage_payload_with_valid_header_is_a_payload_error() {
        let payload = b"{not json";
        let mut b = Vec::new();
        b.extend_from_slice(STATE_MAGIC);
        b.extend_from_slice(&STATE_VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        b.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(payload);
        assert!(matches!(decode_state(&b, "t"), Err(PersistError::Payload { .. })));
    }
}

/// Round trips through KVM itself: state saved from a configured vCPU and VM, loaded into a
/// fresh one and saved again, comes back identical.
#[cfg(test)]
mod kvm_round_trip {
    use super::*;
    use crate::vm;

    fn kvm_ok() -> bool {
        let ok = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
        if !ok {
            println!("skipped: /dev/kvm not available");
        }
        ok
    }

    #[test]
    fn vcpu_and_vm_state_round_trip() {
        if !kvm_ok() {
            return;
        }
        let (kvm, fd_a) = vm::create_kvm_vm().unwrap();
        let (cpuids, _) = vm::vcpu_cpuids(&kvm, 1).unwrap();
        let a = vm::create_vcpu(&fd_a, 0, &cpuids[0]).unwrap();
        vm::setup_boot_vcpu(&a, 0, 0x10_0000).unwrap();
        let list: Vec<u32> = kvm.get_msr_index_list().unwrap().as_slice().to_vec();
        let saved = VcpuPersist { fd: &a, msr_list: &list }.save().unwrap();
        assert_eq!(saved.regs.rip, 0x10_0000);
        assert!(saved.msrs.iter().any(|&(i, _)| i == 0x10), "TSC is saved");
        let vm_saved = (&fd_a).save().unwrap();

        let (_, fd_b) = vm::create_kvm_vm().unwrap();
        <&VmFd as Persist>::restore(&fd_b, &vm_saved).unwrap();
        let b = vm::create_vcpu(&fd_b, 0, &cpuids[0]).unwrap();
        load_vcpu(&b, &saved).unwrap();
        let again = VcpuPersist { fd: &b, msr_list: &list }.save().unwrap();
        assert_eq!(again.regs.rip, saved.regs.rip);
        assert_eq!(again.regs.rsi, saved.regs.rsi);
        assert_eq!(again.sregs.cr3, saved.sregs.cr3);
        assert_eq!(again.sregs.efer, saved.sregs.efer);
        assert_eq!(again.lapic.regs[..], saved.lapic.regs[..]);
        assert_eq!(again.xcrs.xcrs[0].value, saved.xcrs.xcrs[0].value);
        let idx = |s: &VcpuState| s.msrs.iter().map(|&(i, _)| i).collect::<Vec<_>>();
        assert_eq!(idx(&again), idx(&saved), "same MSRs readable");
        for (x, y) in again.msrs.iter().zip(&saved.msrs) {
            // TSC and kvmclock-related counters move on; everything else is equal.
            if x.0 != 0x10 && x.0 != 0x6e0 {
                assert_eq!(x, y, "MSR {:#x}", x.0);
            }
        }
        let vm_again = (&fd_b).save().unwrap();
        let bytes = |v: &VmState| {
            let j = serde_json::to_value(v).unwrap();
            (j["ioapic"].clone(), j["pic_master"].clone(), j["pic_slave"].clone())
        };
        assert_eq!(bytes(&vm_again), bytes(&vm_saved), "PICs and IOAPIC");
    }
}
