//! The state file a snapshot directory holds (`DIR/vmstate`): every component's saved state
//! ([`crate::persist::Persist`]) gathered in one versioned, checksummed file.
//!
//! Layout, little endian:
//! ```text
//! 0   8  magic "GROVEVMS"
//! 8   4  format version (4)
//! 12  4  flags (0)
//! 16  8  payload length
//! 24  4  CRC-32 (IEEE) of the payload
//! 28  4  zero
//! 32  .. payload: JSON of [`SnapshotState`]
//! ```
//! Version 2 saves one entry per device (`devices`, [`DeviceState`]); version 3 also names
//! the memory layers relative to the snapshot directory (version 2 files, with absolute
//! names, are still read); version 4 (this one) writes the KVM structures as hex strings
//! ([`crate::vstate::blob`]; versions 2 and 3 wrote one JSON number per byte, still read);
//! version 1 saved a fixed struct of the port devices and is refused with a clear error.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::devices::manager::DeviceState;
use crate::memory::RamRegion;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

/// State file magic.
pub const STATE_MAGIC: &[u8; 8] = b"GROVEVMS";
/// State file format version.
pub const STATE_VERSION: u32 = 4;
/// Oldest format version read. Version 2 named memory layers by absolute path; version 3
/// names them relative to the snapshot directory (`../12/0000.mlayer`), so a data directory
/// with its snapshots can move. Both resolve the same way on read: an absolute name stays.
pub const MIN_STATE_VERSION: u32 = 2;
/// State file name inside a snapshot directory.
pub const STATE_FILE: &str = "vmstate";
/// Header length.
const HEADER_LEN: usize = 32;
/// Largest payload accepted (a state file is tens of KiB per vCPU).
const MAX_PAYLOAD: u64 = 64 << 20;

/// Errors of the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
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
        "{path}: unsupported state format version {version} (this grove-vmm reads {MIN_STATE_VERSION} to {STATE_VERSION})"
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
    /// Longer than its header says.
    #[error("{path}: {extra} bytes of trailing data")]
    TrailingData {
        /// The file.
        path: String,
        /// Bytes past the payload.
        extra: u64,
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
    /// A vCPU count out of range.
    #[error("inconsistent state: {0} vCPUs")]
    VcpuCount(u8),
    /// vCPU states that do not match the count.
    #[error("inconsistent state: {states} vCPU states for {vcpus} vCPUs")]
    VcpuStates {
        /// States saved.
        states: usize,
        /// The count.
        vcpus: u8,
    },
    /// RAM regions that are not the layout of their total size.
    #[error("inconsistent state: memory regions do not match the layout")]
    Regions,
    /// No memory layer.
    #[error("inconsistent state: no memory layers")]
    NoLayers,
    /// The state file is not a readable regular file of a bounded size.
    #[error("{path}")]
    Input {
        /// The file.
        path: String,
        /// Why it was refused.
        #[source]
        source: crate::input::InputError,
    },
    /// A KVM structure saved as bytes is not a byte array.
    #[error("bad state field {field}: not a byte array")]
    FieldNotBytes {
        /// The field (`vcpus[0].sregs`).
        field: String,
    },
    /// A KVM structure saved as bytes has the wrong length (kvm-bindings would zero-pad a
    /// short one and cut a long one: a guest restored from it runs wedged).
    #[error("bad state field {field}: {len} bytes, {expected} expected")]
    FieldLength {
        /// The field (`vcpus[0].sregs`).
        field: String,
        /// Its length.
        len: usize,
        /// The structure's size.
        expected: usize,
    },
    /// A field's value is out of its range.
    #[error("bad state field {field}: {value} is out of range ({allowed})")]
    FieldRange {
        /// The field (`vcpus[0].mp_state`).
        field: String,
        /// The value found.
        value: u64,
        /// What is allowed.
        allowed: &'static str,
    },
}

/// Most MSRs a vCPU state may hold (a vCPU saves a few dozen).
pub const MAX_MSRS: usize = 1024;

/// A KVM structure as the state file holds it (for the checks): its bytes (from a hex string
/// or an array of bytes), or something that is neither.
#[derive(Debug, Clone, PartialEq)]
enum RawField {
    Bytes(Vec<u8>),
    NotBytes,
}

/// One element of a [`RawField`] array.
enum RawElem {
    Byte(u8),
    Other,
}

/// Deserializes anything, consuming it, as "not what was wanted".
macro_rules! visit_other {
    ($other:expr) => {
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok($other)
        }
        visit_other!($other, no_str);
    };
    ($other:expr, no_str) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Self::Value, A::Error> {
            while m.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
            Ok($other)
        }
    };
}

impl<'de> Deserialize<'de> for RawElem {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawElem;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte")
            }
            fn visit_u64<E>(self, v: u64) -> Result<RawElem, E> {
                Ok(u8::try_from(v).map_or(RawElem::Other, RawElem::Byte))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<RawElem, A::Error> {
                while s.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(RawElem::Other)
            }
            visit_other!(RawElem::Other);
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawField;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of bytes")
            }
            fn visit_u64<E>(self, _: u64) -> Result<RawField, E> {
                Ok(RawField::NotBytes)
            }
            fn visit_str<E>(self, s: &str) -> Result<RawField, E> {
                Ok(crate::vstate::blob::from_hex(s).map_or(RawField::NotBytes, RawField::Bytes))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<RawField, A::Error> {
                let mut out = Vec::with_capacity(s.size_hint().unwrap_or(0).min(1 << 16));
                let mut bytes = true;
                while let Some(e) = s.next_element::<RawElem>()? {
                    match e {
                        RawElem::Byte(b) if bytes => out.push(b),
                        _ => bytes = false,
                    }
                }
                Ok(if bytes { RawField::Bytes(out) } else { RawField::NotBytes })
            }
            visit_other!(RawField::NotBytes, no_str);
        }
        d.deserialize_any(V)
    }
}

/// Present fields are never `None`: a `null` is "not bytes" (serde would take it for absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<RawField>, D::Error> {
    RawField::deserialize(d).map(Some)
}

/// The number of elements of an array (0 for anything else).
struct RawCount(usize);

impl<'de> Deserialize<'de> for RawCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawCount;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array")
            }
            fn visit_u64<E>(self, _: u64) -> Result<RawCount, E> {
                Ok(RawCount(0))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<RawCount, A::Error> {
                let mut n = 0;
                while s.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(RawCount(n))
            }
            visit_other!(RawCount(0));
        }
        d.deserialize_any(V)
    }
}

/// The fields of a vCPU's state the checks look at (the rest is skipped).
#[derive(Deserialize)]
struct RawVcpu {
    #[serde(default, deserialize_with = "present")]
    mp_state: Option<RawField>,
    #[serde(default, deserialize_with = "present")]
    regs: Option<RawField>,
    #[serde(default, deserialize_with = "present")]
    sregs: Option<RawField>,
    #[serde(default, deserialize_with = "present")]
    xsave: Option<RawField>,
    #[serde(default, deserialize_with = "present")]
    xcrs: Option<RawField>,
    #[serde(default, deserialize_with = "present")]
    debugregs: Option<RawField>,
    #[serde(default, deserialize_with = "present")]
    lapic: Option<RawField>,
    #[serde(default, deserialize_with = "present")]
    events: Option<RawField>,
    msrs: Option<RawCount>,
}

/// The fields of the VM's state the checks look at.
#[derive(Deserialize)]
struct RawVm {
    #[serde(default, deserialize_with = "present")]
    pic_master: Option<RawField>,
    #[serde(default, deserialize_with = "present")]
    pic_slave: Option<RawField>,
    #[serde(default, deserialize_with = "present")]
    ioapic: Option<RawField>,
    #[serde(default, deserialize_with = "present")]
    pit: Option<RawField>,
    #[serde(default, deserialize_with = "present")]
    clock: Option<RawField>,
}

/// What [`check_fields`] reads of a state file: one pass over the text, without building a
/// JSON tree (which cost more than the typed decode itself on every restore).
#[derive(Deserialize)]
struct RawState {
    #[serde(default)]
    vcpus: Vec<RawVcpu>,
    vm: Option<RawVm>,
}

/// A field checked to be exactly `size_of::<T>()` bytes (absent: empty, the typed decoder
/// names it); the bytes returned for range checks.
fn field_bytes<T>(f: Option<&RawField>, field: impl Fn() -> String) -> Result<&[u8], StateError> {
    match f {
        None => Ok(&[]),
        Some(RawField::NotBytes) => Err(StateError::FieldNotBytes { field: field() }),
        Some(RawField::Bytes(b)) => {
            let expected = std::mem::size_of::<T>();
            if b.len() == expected {
                Ok(b)
            } else {
                Err(StateError::FieldLength { field: field(), len: b.len(), expected })
            }
        }
    }
}

/// Little-endian integer of `n` bytes at `off` of `b` (0 past the end: lengths are checked
/// first).
fn le_at(b: &[u8], off: usize, n: usize) -> u64 {
    b.get(off..off + n).map_or(0, |s| s.iter().rev().fold(0, |a, &x| (a << 8) | u64::from(x)))
}

fn range(field: String, value: u64, ok: bool, allowed: &'static str) -> Result<(), StateError> {
    if ok {
        Ok(())
    } else {
        Err(StateError::FieldRange { field, value, allowed })
    }
}

/// The ranges KVM does not check itself (or checks by wedging the guest) of vCPU `i`'s
/// `mp_state` and `xcrs` (their bytes; empty when absent) and its MSR count.
fn vcpu_ranges(i: usize, mp: &[u8], xcrs: &[u8], msrs: usize) -> Result<(), StateError> {
    let at = |k: &str| format!("vcpus[{i}].{k}");
    let state = le_at(mp, 0, 4);
    // RUNNABLE, UNINITIALIZED, INIT_RECEIVED, HALTED, SIPI_RECEIVED.
    range(at("mp_state"), state, state <= 4, "0 to 4")?;
    let n = le_at(xcrs, std::mem::offset_of!(kvm_bindings::kvm_xcrs, nr_xcrs), 4);
    range(at("xcrs.nr_xcrs"), n, n <= 16, "at most KVM_MAX_XCRS (16)")?;
    range(at("msrs"), msrs as u64, msrs <= MAX_MSRS, "at most 1024 entries")
}

/// An interrupt controller saved as `key` holds chip `id` (its bytes; empty when absent).
fn chip_range(id: u64, key: &str, chip: &[u8]) -> Result<(), StateError> {
    if chip.is_empty() {
        return Ok(());
    }
    let got = le_at(chip, std::mem::offset_of!(kvm_bindings::kvm_irqchip, chip_id), 4);
    let allowed = ["chip 0 (PIC master)", "chip 1 (PIC slave)", "chip 2 (IOAPIC)"];
    let allowed = allowed[usize::try_from(id).unwrap_or(0)];
    range(format!("vm.{key}.chip_id"), got, got == id, allowed)
}

/// The ranges of [`vcpu_ranges`] and [`chip_range`] on a decoded state.
fn check_ranges(s: &SnapshotState) -> Result<(), StateError> {
    use zerocopy::IntoBytes;
    for (i, c) in s.vcpus.iter().enumerate() {
        vcpu_ranges(i, c.mp_state.as_bytes(), c.xcrs.as_bytes(), c.msrs.len())?;
    }
    let vm = &s.vm;
    chip_range(0, "pic_master", vm.pic_master.as_bytes())?;
    chip_range(1, "pic_slave", vm.pic_slave.as_bytes())?;
    chip_range(2, "ioapic", vm.ioapic.as_bytes())
}

/// Names the field a failed typed decode stumbled on: the exact length of each KVM
/// structure, whether it is bytes at all, and the ranges of [`vcpu_ranges`] and
/// [`chip_range`]. Runs on the payload only when the typed decode failed (a second pass over
/// the text), so that the error says which field, not only where in the text.
fn check_fields(payload: &[u8]) -> Result<(), StateError> {
    use kvm_bindings::{
        kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
        kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    };
    let raw: RawState = serde_json::from_slice(payload)
        .map_err(|source| StateError::Payload { path: "state".into(), source })?;
    for (i, c) in raw.vcpus.iter().enumerate() {
        let at = |k: &str| format!("vcpus[{i}].{k}");
        let mp = field_bytes::<kvm_mp_state>(c.mp_state.as_ref(), || at("mp_state"))?;
        field_bytes::<kvm_regs>(c.regs.as_ref(), || at("regs"))?;
        field_bytes::<kvm_sregs>(c.sregs.as_ref(), || at("sregs"))?;
        field_bytes::<kvm_xsave>(c.xsave.as_ref(), || at("xsave"))?;
        let xcrs = field_bytes::<kvm_xcrs>(c.xcrs.as_ref(), || at("xcrs"))?;
        field_bytes::<kvm_debugregs>(c.debugregs.as_ref(), || at("debugregs"))?;
        field_bytes::<kvm_lapic_state>(c.lapic.as_ref(), || at("lapic"))?;
        field_bytes::<kvm_vcpu_events>(c.events.as_ref(), || at("events"))?;
        let msrs = c.msrs.as_ref().map_or(0, |m| m.0);
        vcpu_ranges(i, mp, xcrs, msrs)?;
    }
    let Some(vm) = raw.vm else { return Ok(()) };
    for (id, key, f) in [
        (0u64, "pic_master", &vm.pic_master),
        (1, "pic_slave", &vm.pic_slave),
        (2, "ioapic", &vm.ioapic),
    ] {
        let chip = field_bytes::<kvm_irqchip>(f.as_ref(), || format!("vm.{key}"))?;
        chip_range(id, key, chip)?;
    }
    // PIT channel fields are KVM's to check: an unprogrammed channel saves mode 0xff.
    field_bytes::<kvm_pit_state2>(vm.pit.as_ref(), || "vm.pit".into())?;
    field_bytes::<kvm_clock_data>(vm.clock.as_ref(), || "vm.clock".into())?;
    Ok(())
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
    /// Memory layer files, base first: relative to the snapshot directory when written
    /// (version 3; absolute in version 2). [`read_state`] returns them absolute.
    pub layers: Vec<String>,
    /// Per-vCPU state.
    pub vcpus: Vec<VcpuState>,
    /// VM-wide state.
    pub vm: VmState,
    /// One entry per device.
    pub devices: Vec<DeviceState>,
}

impl SnapshotState {
    /// Structural checks (counts, sizes) before anything is built from it.
    pub fn validate(&self) -> Result<(), StateError> {
        if self.nvcpus == 0 || self.nvcpus > crate::layout::MAX_VCPUS {
            return Err(StateError::VcpuCount(self.nvcpus));
        }
        if self.vcpus.len() != usize::from(self.nvcpus) {
            return Err(StateError::VcpuStates { states: self.vcpus.len(), vcpus: self.nvcpus });
        }
        let size: u64 = self.regions.iter().map(|r| r.size).sum();
        let expect = crate::memory::ram_regions(size).map_err(|_| StateError::Regions)?;
        if expect != self.regions {
            return Err(StateError::Regions);
        }
        if self.layers.is_empty() {
            return Err(StateError::NoLayers);
        }
        Ok(())
    }
}

/// Encodes a state file.
pub fn encode_state(s: &SnapshotState) -> Vec<u8> {
    frame(&serde_json::to_vec(s).unwrap_or_default())
}

/// A state file of the current version around `payload` (header, length, checksum): for
/// [`encode_state`], and for tests and fuzzers that edit a payload and need it to pass the
/// checksum.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Decodes and checks a state file's bytes (`path` only names it in errors).
pub fn decode_state(b: &[u8], path: &str) -> Result<SnapshotState, StateError> {
    let p = || path.to_string();
    if b.len() < 8 || &b[..8] != STATE_MAGIC {
        return Err(StateError::BadMagic(p()));
    }
    if b.len() < HEADER_LEN {
        return Err(StateError::Truncated {
            path: p(),
            expected: HEADER_LEN as u64,
            actual: b.len() as u64,
        });
    }
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let version = u32_at(8);
    if !(MIN_STATE_VERSION..=STATE_VERSION).contains(&version) {
        return Err(StateError::Version { path: p(), version });
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&b[16..24]);
    let len = u64::from_le_bytes(len8);
    let expected = (HEADER_LEN as u64).saturating_add(len);
    if len > MAX_PAYLOAD || (b.len() as u64) < expected {
        return Err(StateError::Truncated { path: p(), expected, actual: b.len() as u64 });
    }
    if (b.len() as u64) > expected {
        return Err(StateError::TrailingData { path: p(), extra: b.len() as u64 - expected });
    }
    let payload = &b[HEADER_LEN..];
    let stored = u32_at(24);
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(StateError::Checksum { path: p(), stored, computed });
    }
    // One pass in the common case; the error of a bad file names its field.
    let s: SnapshotState = match serde_json::from_slice(payload) {
        Ok(s) => s,
        Err(source) => {
            check_fields(payload).map_err(|e| match e {
                StateError::Payload { source, .. } => StateError::Payload { path: p(), source },
                e => e,
            })?;
            return Err(StateError::Payload { path: p(), source });
        }
    };
    check_ranges(&s)?;
    s.validate()?;
    Ok(s)
}

/// Does ahead the one-time work of the first decode: crc32fast picks its implementation
/// with CPUID on first use, and CPUID exits to the hypervisor (tens of microseconds in a
/// nested VM). A standby VMM calls this so its restore does not pay it.
pub fn warm_up() {
    std::hint::black_box(crc32fast::hash(std::hint::black_box(&[0u8; 64])));
}

/// Writes the state file into `dir` (temporary name, then rename).
pub fn write_state(dir: &Path, s: &SnapshotState, fsync: bool) -> Result<(), StateError> {
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let io = |op, source| StateError::Io { op, path: path.display().to_string(), source };
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

/// Reads and checks the state file of snapshot directory `dir`; its memory layer names come
/// back absolute (relative ones resolved against `dir`).
pub fn read_state(dir: &Path) -> Result<SnapshotState, StateError> {
    let path = dir.join(STATE_FILE);
    // Bounded by the largest header-announced payload; a FIFO, a device or a symlink to
    // /dev/zero is refused before a byte is read.
    let b = crate::input::read_bounded(&path, HEADER_LEN as u64 + MAX_PAYLOAD)
        .map_err(|source| StateError::Input { path: path.display().to_string(), source })?;
    let mut s = decode_state(&b, &path.display().to_string())?;
    let base = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    for l in &mut s.layers {
        let p = base.join(&*l);
        *l = p.canonicalize().unwrap_or(p).display().to_string();
    }
    Ok(s)
}

pub use crate::paths::relative_to;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::ports::PortsState;
    use crate::devices::legacy::serial::SerialState;
    use kvm_bindings::{
        kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
        kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    };

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
                pic_slave: kvm_irqchip { chip_id: 1, ..Default::default() },
                ioapic: kvm_irqchip { chip_id: 2, ..Default::default() },
                pit: kvm_pit_state2::default(),
                clock: kvm_clock_data { clock: 99, ..Default::default() },
            },
            devices: vec![
                DeviceState::Serial(SerialState {
                    regs: [1, 2, 3, 4, 5, 6, 7, 8, 9],
                    in_buffer: vec![],
                }),
                DeviceState::I8042 {},
                DeviceState::GrovePorts(PortsState { generation: 4 }),
                DeviceState::Cmos {},
                DeviceState::AcpiPm {},
            ],
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
        assert!(matches!(decode_state(&bad, "t"), Err(StateError::BadMagic(_))));
        let mut bad = b.clone();
        bad[8] = 9;
        let e = decode_state(&bad, "t").unwrap_err();
        assert!(matches!(e, StateError::Version { version: 9, .. }), "{e}");
        let e = decode_state(&b[..b.len() - 10], "t").unwrap_err();
        assert!(matches!(e, StateError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("truncated"));
        let e = decode_state(&b[..20], "t").unwrap_err();
        assert!(matches!(e, StateError::Truncated { .. }), "{e}");
        let mut bad = b.clone();
        let last = bad.len() - 3;
        bad[last] ^= 0x20;
        let e = decode_state(&bad, "t").unwrap_err();
        assert!(matches!(e, StateError::Checksum { .. }), "{e}");
        let mut long = b.clone();
        long.push(0);
        assert!(decode_state(&long, "t").is_err());
        assert!(decode_state(&[], "t").is_err());
    }

    #[test]
    fn devices_are_one_entry_each_and_unknown_kinds_are_refused() {
        let b = encode_state(&sample());
        let payload: serde_json::Value = serde_json::from_slice(&b[HEADER_LEN..]).unwrap();
        let kinds: Vec<&str> = payload["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["serial", "i8042", "grove-ports", "cmos", "acpi-pm"]);
        let mut v = payload.clone();
        v["devices"][1]["kind"] = "floppy".into();
        let e = decode_state(&frame(&serde_json::to_vec(&v).unwrap()), "t").unwrap_err();
        assert!(matches!(e, StateError::Payload { .. }), "{e}");
        let mut v = payload;
        v["devices"][2]["extra"] = 1.into();
        assert!(decode_state(&frame(&serde_json::to_vec(&v).unwrap()), "t").is_err());
    }

    #[test]
    fn layer_names_are_relative_and_resolve_after_a_move() {
        let r = |p: &str, b: &str| relative_to(Path::new(p), Path::new(b)).display().to_string();
        assert_eq!(r("/data/s/12/0001.mlayer", "/data/s/12"), "0001.mlayer");
        assert_eq!(r("/data/s/7/0000.mlayer", "/data/s/12"), "../7/0000.mlayer");
        let t = tempfile::tempdir().unwrap();
        let (snap, base) = (t.path().join("a/snap"), t.path().join("a/base"));
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("0000.mlayer"), b"x").unwrap();
        let mut s = sample();
        let (snap_c, base_c) = (snap.canonicalize().unwrap(), base.canonicalize().unwrap());
        s.layers = vec![relative_to(&base_c.join("0000.mlayer"), &snap_c).display().to_string()];
        assert_eq!(s.layers, vec!["../base/0000.mlayer".to_string()]);
        write_state(&snap, &s, false).unwrap();
        std::fs::rename(t.path().join("a"), t.path().join("moved")).unwrap();
        let back = read_state(&t.path().join("moved/snap")).unwrap();
        let want = t.path().join("moved/base/0000.mlayer").canonicalize().unwrap();
        assert_eq!(back.layers, vec![want.display().to_string()], "resolved in the moved tree");
        // Version 2 files (absolute names) are still read, and keep their names.
        let mut v2 = sample();
        v2.layers = vec![want.display().to_string()];
        let mut b = encode_state(&v2);
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        std::fs::write(t.path().join("moved/snap").join(STATE_FILE), &b).unwrap();
        assert_eq!(read_state(&t.path().join("moved/snap")).unwrap().layers, v2.layers);
    }

    #[test]
    fn version_1_files_are_refused_by_version() {
        let mut b = encode_state(&sample());
        b[8] = 1;
        let e = decode_state(&b, "t").unwrap_err();
        assert!(matches!(e, StateError::Version { version: 1, .. }), "{e}");
        assert!(e.to_string().contains("version 1"));
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

    /// Sets byte `i` of a KVM structure saved as hex.
    fn set_byte(f: &mut serde_json::Value, i: usize, b: u8) {
        let mut bytes = crate::vstate::blob::from_hex(f.as_str().unwrap()).unwrap();
        bytes[i] = b;
        *f = crate::vstate::blob::to_hex(&bytes).into();
    }

    /// A KVM structure saved as hex, as versions 2 and 3 wrote it: an array of numbers.
    fn as_array(f: &mut serde_json::Value) {
        let bytes = crate::vstate::blob::from_hex(f.as_str().unwrap()).unwrap();
        *f = serde_json::to_value(bytes).unwrap();
    }

    #[test]
    fn version_3_files_with_byte_arrays_are_read_the_same() {
        let mut v = serde_json::to_value(sample()).unwrap();
        let keys = ["mp_state", "regs", "sregs", "xsave", "xcrs", "debugregs", "lapic", "events"];
        for k in keys {
            as_array(&mut v["vcpus"][0][k]);
        }
        for k in ["pic_master", "pic_slave", "ioapic", "pit", "clock"] {
            as_array(&mut v["vm"][k]);
        }
        let mut b = frame(&serde_json::to_vec(&v).unwrap());
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        let old = decode_state(&b, "t").unwrap();
        let new = decode_state(&encode_state(&sample()), "t").unwrap();
        assert_eq!(serde_json::to_value(&old).unwrap(), serde_json::to_value(&new).unwrap());
        assert_eq!(old.vcpus[0].regs.rip, 0x1234);
        assert_eq!(old.vm.pic_slave.chip_id, 1);
        // Version 4 writes hex: the 4 KiB XSAVE area is one string of 8 KiB.
        let j = serde_json::to_value(&new).unwrap();
        assert_eq!(j["vcpus"][0]["xsave"].as_str().unwrap().len(), 8192);
        assert_eq!(&encode_state(&sample())[8..12], &4u32.to_le_bytes());
    }

    /// The payload of `sample()` with `edit` applied, framed with a valid checksum.
    fn edited(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v = serde_json::to_value(sample()).unwrap();
        edit(&mut v);
        frame(&serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn short_or_long_kvm_structures_are_refused_by_field() {
        // Each was zero-padded (short) or cut (long) by kvm-bindings and accepted.
        for (at, key) in [
            ("vcpus", "mp_state"),
            ("vcpus", "regs"),
            ("vcpus", "sregs"),
            ("vcpus", "xsave"),
            ("vcpus", "xcrs"),
            ("vcpus", "debugregs"),
            ("vcpus", "lapic"),
            ("vcpus", "events"),
            ("vm", "pic_master"),
            ("vm", "pic_slave"),
            ("vm", "ioapic"),
            ("vm", "pit"),
            ("vm", "clock"),
        ] {
            for len in [10usize, 0] {
                let b = edited(|v| {
                    let f = if at == "vcpus" { &mut v["vcpus"][0][key] } else { &mut v["vm"][key] };
                    *f = serde_json::to_value(vec![0u8; len]).unwrap();
                });
                let e = decode_state(&b, "t").unwrap_err();
                let want =
                    if at == "vcpus" { format!("vcpus[0].{key}") } else { format!("vm.{key}") };
                match &e {
                    StateError::FieldLength { field, len: l, .. } => {
                        assert_eq!((field.as_str(), *l), (want.as_str(), len), "{e}");
                    }
                    _ => panic!("{key} of {len} bytes: {e}"),
                }
            }
            let b = edited(|v| {
                let f = if at == "vcpus" { &mut v["vcpus"][0][key] } else { &mut v["vm"][key] };
                let n = f.as_str().unwrap().len() / 2;
                *f = serde_json::to_value(vec![0u8; n + 1]).unwrap();
            });
            assert!(matches!(decode_state(&b, "t"), Err(StateError::FieldLength { .. })), "{key}");
            // The same in hex: one byte short, one byte long.
            for delta in [-2i64, 2] {
                let b = edited(|v| {
                    let f = if at == "vcpus" { &mut v["vcpus"][0][key] } else { &mut v["vm"][key] };
                    let mut h = f.as_str().unwrap().to_string();
                    if delta < 0 {
                        h.truncate(h.len() - 2);
                    } else {
                        h.push_str("00");
                    }
                    *f = h.into();
                });
                let e = decode_state(&b, "t").unwrap_err();
                assert!(matches!(e, StateError::FieldLength { .. }), "{key} {delta}: {e}");
            }
        }
        let b = edited(|v| v["vcpus"][0]["sregs"] = "hello".into());
        assert!(matches!(decode_state(&b, "t"), Err(StateError::FieldNotBytes { .. })));
        let b = edited(|v| {
            as_array(&mut v["vcpus"][0]["regs"]);
            v["vcpus"][0]["regs"][3] = 300.into();
        });
        assert!(matches!(decode_state(&b, "t"), Err(StateError::FieldNotBytes { .. })));
        // Hex with a character that is not a digit, at the right length.
        let b = edited(|v| {
            let h = v["vcpus"][0]["regs"].as_str().unwrap().replacen('0', "g", 1);
            v["vcpus"][0]["regs"] = h.into();
        });
        assert!(matches!(decode_state(&b, "t"), Err(StateError::FieldNotBytes { .. })));
    }

    #[test]
    fn out_of_range_fields_are_refused_by_field() {
        let field_of = |b: &[u8]| match decode_state(b, "t") {
            Err(StateError::FieldRange { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let b = edited(|v| set_byte(&mut v["vcpus"][0]["mp_state"], 0, 9));
        assert_eq!(field_of(&b), "vcpus[0].mp_state");
        let b = edited(|v| set_byte(&mut v["vcpus"][0]["xcrs"], 0, 17));
        assert_eq!(field_of(&b), "vcpus[0].xcrs.nr_xcrs");
        let b = edited(|v| set_byte(&mut v["vm"]["pic_slave"], 0, 0));
        assert_eq!(field_of(&b), "vm.pic_slave.chip_id");
        // The same in the array form of versions 2 and 3.
        let b = edited(|v| {
            as_array(&mut v["vm"]["ioapic"]);
            v["vm"]["ioapic"][0] = 1.into();
        });
        assert_eq!(field_of(&b), "vm.ioapic.chip_id");
        let b = edited(|v| {
            v["vcpus"][0]["msrs"] = serde_json::to_value(vec![(1u32, 0u64); MAX_MSRS + 1]).unwrap();
        });
        assert_eq!(field_of(&b), "vcpus[0].msrs");
    }

    #[test]
    fn special_state_files_are_refused_before_reading() {
        let t = tempfile::tempdir().unwrap();
        // A state file symlinked to /dev/zero was read until memory ran out.
        std::os::unix::fs::symlink("/dev/zero", t.path().join(STATE_FILE)).unwrap();
        let e = read_state(t.path()).unwrap_err();
        assert!(matches!(e, StateError::Input { .. }), "{e}");
        assert!(crate::one_line(&e).contains("character device"), "{e}");
        std::fs::remove_file(t.path().join(STATE_FILE)).unwrap();
        std::fs::create_dir(t.path().join(STATE_FILE)).unwrap();
        assert!(crate::one_line(&read_state(t.path()).unwrap_err()).contains("directory"));
    }

    #[test]
    fn garbage_payload_with_valid_header_is_a_payload_error() {
        let b = frame(b"{not json");
        assert!(matches!(decode_state(&b, "t"), Err(StateError::Payload { .. })));
    }
}
