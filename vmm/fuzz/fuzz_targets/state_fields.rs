//! State files that pass the checksum: a valid state whose fields the fuzzer rewrites (a
//! byte image of another length, a byte changed, a number, a string, a field removed; hex or
//! the array form of older versions), then
//! framed again with a correct checksum, so the decoder is tested beyond the checksum. Any
//! such file gives a state or a clear error, never a panic; and a state the decoder accepts
//! holds every KVM structure at its exact size (nothing was zero-padded or cut).
#![no_main]
use grove_vmm::devices::legacy::ports::PortsState;
use grove_vmm::devices::legacy::serial::SerialState;
use grove_vmm::devices::manager::DeviceState;
use grove_vmm::state::{decode_state, frame, SnapshotState};
use grove_vmm::vstate::blob::from_hex;
use grove_vmm::vstate::vcpu::VcpuState;
use grove_vmm::vstate::vm::VmState;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// A valid state of one vCPU, as a snapshot of a small guest holds.
fn valid() -> Value {
    let vcpu = VcpuState {
        mp_state: kvm_mp_state { mp_state: 0 },
        regs: kvm_regs { rip: 0x10_0000, rflags: 2, ..Default::default() },
        sregs: kvm_sregs { cr0: 0x8000_0011, cr3: 0x9000, ..Default::default() },
        xsave: kvm_xsave::default(),
        xcrs: kvm_xcrs::default(),
        debugregs: kvm_debugregs::default(),
        lapic: kvm_lapic_state::default(),
        msrs: vec![(0x10, 12345), (0x4b56_4d01, 0x1000)],
        events: kvm_vcpu_events::default(),
    };
    let s = SnapshotState {
        cpuid_fingerprint: 1,
        nvcpus: 1,
        regions: grove_vmm::memory::ram_regions(64 << 20).expect("layout"),
        layers: vec!["0000.mlayer".into()],
        vcpus: vec![vcpu],
        vm: VmState {
            pic_master: kvm_irqchip::default(),
            pic_slave: kvm_irqchip { chip_id: 1, ..Default::default() },
            ioapic: kvm_irqchip { chip_id: 2, ..Default::default() },
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data::default(),
        },
        devices: vec![
            DeviceState::Serial(SerialState { regs: [0; 9], in_buffer: vec![] }),
            DeviceState::I8042 {},
            DeviceState::GrovePorts(PortsState { generation: 1 }),
        ],
    };
    serde_json::to_value(&s).expect("encode")
}

/// The fields the fuzzer rewrites.
const FIELDS: &[&[&str]] = &[
    &["vcpus", "0", "mp_state"],
    &["vcpus", "0", "regs"],
    &["vcpus", "0", "sregs"],
    &["vcpus", "0", "xsave"],
    &["vcpus", "0", "xcrs"],
    &["vcpus", "0", "debugregs"],
    &["vcpus", "0", "lapic"],
    &["vcpus", "0", "msrs"],
    &["vcpus", "0", "events"],
    &["vm", "pic_master"],
    &["vm", "pic_slave"],
    &["vm", "ioapic"],
    &["vm", "pit"],
    &["vm", "clock"],
    &["nvcpus"],
    &["regions"],
    &["layers"],
    &["devices"],
    &["devices", "0", "regs"],
    &["devices", "0", "in_buffer"],
    &["devices", "2", "generation"],
    &["cpuid_fingerprint"],
];

fn at<'a>(v: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) => v.get_mut(i),
        Err(_) => v.get_mut(*k),
    })
}

/// The KVM structures saved as byte images, which must round-trip at their exact size.
fn byte_images(v: &Value) -> Vec<Option<usize>> {
    FIELDS[..14]
        .iter()
        .filter(|p| p[p.len() - 1] != "msrs")
        .map(|p| {
            let mut v = v.clone();
            at(&mut v, p).and_then(|f| match f {
                Value::Array(a) => Some(a.len()),
                // Version 4 writes hex; what is not hex stays unknown.
                Value::String(s) => from_hex(s).map(|b| b.len()),
                _ => None,
            })
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut v = valid();
    let mut d = data;
    // Each edit: [field, op, len_lo, len_hi, bytes...].
    while let [f, op, lo, hi, rest @ ..] = d {
        let len = usize::from(u16::from_le_bytes([*lo, *hi]) % 8192);
        let (bytes, rest) = rest.split_at(len.min(rest.len()));
        d = rest;
        let path = FIELDS[usize::from(*f) % FIELDS.len()];
        match op % 5 {
            0 => {
                // A byte image of another length, filled from the input.
                let img: Vec<u8> = (0..len).map(|i| bytes.get(i).copied().unwrap_or(0)).collect();
                if let Some(x) = at(&mut v, path) {
                    *x = serde_json::to_value(img).expect("bytes");
                }
            }
            1 => {
                // One element changed (a byte, or any number); a hex image becomes the
                // array form (versions 2 and 3) first.
                if let Some(x) = at(&mut v, path) {
                    if let Some(b) = x.as_str().and_then(from_hex) {
                        *x = serde_json::to_value(b).expect("bytes");
                    }
                }
                if let Some(Value::Array(a)) = at(&mut v, path) {
                    if !a.is_empty() {
                        let i = len % a.len();
                        let n = bytes.iter().fold(0u64, |a, &b| (a << 8) | u64::from(b));
                        a[i] = n.into();
                    }
                }
            }
            2 => {
                let n = bytes.iter().take(8).fold(0u64, |a, &b| (a << 8) | u64::from(b));
                if let Some(x) = at(&mut v, path) {
                    *x = n.into();
                }
            }
            3 => {
                if let Some(x) = at(&mut v, path) {
                    *x = String::from_utf8_lossy(bytes).into_owned().into();
                }
            }
            _ => {
                let (last, parent) = path.split_last().expect("non-empty path");
                if let Some(Value::Object(o)) = at(&mut v, parent) {
                    o.remove(*last);
                }
            }
        }
    }
    let file = frame(&serde_json::to_vec(&v).expect("encode"));
    if let Ok(s) = decode_state(&file, "fuzz") {
        let back = serde_json::to_value(&s).expect("re-encode");
        assert_eq!(byte_images(&back), byte_images(&v), "a KVM structure was padded or cut");
    }
});
