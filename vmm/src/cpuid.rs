//! The CPUID a guest sees: KVM's supported set, filtered to what Grove can save and restore.
//!
//! Policy (applied by [`filter`], per vCPU):
//! - leaf 0x1: EBX[31:24] = the vCPU's APIC id, EBX[23:16] = vCPU count, EDX.HTT when > 1 vCPU;
//!   ECX.hypervisor set; ECX.MONITOR cleared (MONITOR/MWAIT are not offered to guests).
//! - leaves 0x4, 0xb, 0x1f: topology = one package, one thread per core, `n` cores; 0xb/0x1f
//!   EDX = x2APIC id of this vCPU.
//! - leaf 0x6 (thermal/power) and 0xa (PMU): zeroed: no vPMU, whose counters are not saved.
//! - leaf 0x7.0: SGX, Intel PT, WAITPKG and AMX cleared (state outside what KVM_GET_XSAVE,
//!   the MSR list and the LAPIC save).
//! - leaf 0xd: XCR0 limited to x87, SSE, AVX, MPX, AVX-512 and PKRU (all inside the 4 KiB legacy
//!   KVM_GET_XSAVE area); no supervisor states (IA32_XSS = 0); the XSAVE size recomputed.
//! - leaves 0x12 (SGX), 0x14 (PT), 0x19 (Key Locker), 0x1d/0x1e (AMX tiles): removed.
//! - leaf 0x4000_0001 (KVM features): async page faults cleared (in-flight faults cannot be saved);
//!   kvmclock and the other paravirtual features stay (their MSRs are saved).
//! - everything else as KVM reports it for this host.
//!
//! [`fingerprint`] hashes the vCPU-independent part, so a snapshot taken on another CPUID set
//! can be refused.

use kvm_bindings::kvm_cpuid_entry2;

/// XCR0 bits offered: x87, SSE, AVX, MPX (BNDREGS, BNDCSR), AVX-512 (opmask, ZMM_Hi256, Hi16_ZMM), PKRU.
pub const XCR0_ALLOWED: u64 = 0b10_1111_1111;

const LEAF_REMOVED: [u32; 5] = [0x12, 0x14, 0x19, 0x1d, 0x1e];

fn set_bit(v: &mut u32, bit: u32, on: bool) {
    if on {
        *v |= 1 << bit;
    } else {
        *v &= !(1 << bit);
    }
}

/// Bits needed to number `n` items (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Applies the policy above for vCPU `cpu_index` of `nvcpus`. The APIC id is the index.
pub fn filter(entries: &[kvm_cpuid_entry2], cpu_index: u8, nvcpus: u8) -> Vec<kvm_cpuid_entry2> {
    let apic_id = u32::from(cpu_index);
    let n = u32::from(nvcpus.max(1));
    // XSAVE component sizes/offsets for the recomputed area size.
    let xsave_max = entries
        .iter()
        .filter(|e| e.function == 0xd && e.index >= 2 && e.index < 64)
        .filter(|e| XCR0_ALLOWED & (1 << e.index) != 0)
        .map(|e| e.eax + e.ebx)
        .fold(512 + 64, u32::max);
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let mut e = *e;
        match e.function {
            f if LEAF_REMOVED.contains(&f) => continue,
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((n & 0xff) << 16);
                set_bit(&mut e.edx, 28, n > 1);
                set_bit(&mut e.ecx, 31, true);
                set_bit(&mut e.ecx, 3, false);
            }
            0x4 => {
                // EAX[31:26] = cores per package - 1, EAX[25:14] = threads sharing this cache - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((n - 1) << 26) | (sharing << 14);
            }
            0x6 | 0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x7 if e.index == 0 => {
                set_bit(&mut e.ebx, 2, false); // SGX
                set_bit(&mut e.ebx, 25, false); // Intel PT
                set_bit(&mut e.ecx, 5, false); // WAITPKG
                for bit in [22, 24, 25] {
                    set_bit(&mut e.edx, bit, false); // AMX
                }
            }
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8; // level 0: SMT
                    }
                    1 => {
                        e.eax = bits_for(n);
                        e.ebx = n;
                        e.ecx = (2 << 8) | 1; // level 1: core
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i & 0xff; // invalid level
                    }
                }
            }
            0xd => match e.index {
                0 => {
                    e.eax &= u32::try_from(XCR0_ALLOWED & 0xffff_ffff).unwrap_or(0);
                    e.edx = 0;
                    e.ecx = xsave_max;
                }
                1 => {
                    // XSAVES supervisor states: none.
                    e.ecx = 0;
                    e.edx = 0;
                }
                i if i < 64 && XCR0_ALLOWED & (1 << i) != 0 => {}
                _ => continue,
            },
            0x4000_0001 => {
                for bit in [4, 10, 14] {
                    set_bit(&mut e.eax, bit, false); // ASYNC_PF, ASYNC_PF_VMEXIT, ASYNC_PF_INT
                }
            }
            _ => {}
        }
        out.push(e);
    }
    out
}

/// FNV-1a 64 over the vCPU-independent CPUID words (APIC id and topology fields masked).
pub fn fingerprint(entries: &[kvm_cpuid_entry2]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |w: u32| {
        for b in w.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    };
    for e in entries {
        let (mut ebx, mut edx) = (e.ebx, e.edx);
        if e.function == 0x1 {
            ebx &= 0x00ff_ffff;
        }
        if e.function == 0xb || e.function == 0x1f {
            edx = 0;
        }
        for w in [e.function, e.index, e.flags, e.eax, ebx, e.ecx, edx] {
            mix(w);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, flags: 0, eax, ebx, ecx, edx, padding: [0; 3] }
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> Option<kvm_cpuid_entry2> {
        v.iter().copied().find(|e| e.function == f && e.index == i)
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            ent(0x0, 0, 0x1f, 0, 0, 0),
            ent(0x1, 0, 0x906ea, 0xff00_0800, 0x0000_0008, 0),
            ent(0x4, 0, 0x0000_0121, 0, 0, 0),
            ent(0x4, 3, 0x0000_0163, 0, 0, 0),
            ent(0x6, 0, 7, 7, 7, 7),
            ent(0x7, 0, 0, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff),
            ent(0xb, 0, 1, 2, 0x100, 9),
            ent(0xb, 1, 4, 8, 0x201, 9),
            ent(0xd, 0, 0x602e7, 0xa88, 0x2b00, 0x1),
            ent(0xd, 1, 0xf, 0, 0x1900, 0),
            ent(0xd, 2, 256, 576, 0, 0),
            ent(0xd, 9, 8, 2688, 0, 0),
            ent(0xd, 17, 64, 2752, 0, 0),
            ent(0xd, 18, 8192, 2816, 0, 0),
            ent(0x12, 0, 1, 1, 1, 1),
            ent(0x14, 0, 1, 1, 1, 1),
            ent(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            ent(0x4000_0001, 0, 0xffff_ffff, 0, 0, 0),
        ]
    }

    #[test]
    fn leaf1_gets_apic_id_count_and_hypervisor_bit() {
        let f = filter(&host(), 3, 4);
        let l1 = find(&f, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & (1 << 31), 0);
        assert_eq!(l1.ecx & (1 << 3), 0, "MONITOR must be hidden");
        assert_ne!(l1.edx & (1 << 28), 0);
        let single = find(&filter(&host(), 0, 1), 1, 0).unwrap();
        assert_eq!(single.edx & (1 << 28), 0);
    }

    #[test]
    fn topology_leaves_are_per_vcpu() {
        let f = filter(&host(), 2, 3);
        let smt = find(&f, 0xb, 0).unwrap();
        let core = find(&f, 0xb, 1).unwrap();
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let l4 = find(&f, 4, 0).unwrap();
        assert_eq!(l4.eax >> 26, 2);
        let l4_l3 = find(&f, 4, 3).unwrap();
        assert_eq!((l4_l3.eax >> 14) & 0xfff, 2);
    }

    #[test]
    fn unsaveable_features_are_removed() {
        let f = filter(&host(), 0, 1);
        assert!(find(&f, 0x12, 0).is_none());
        assert!(find(&f, 0x14, 0).is_none());
        assert!(find(&f, 0xd, 17).is_none());
        assert!(find(&f, 0xd, 18).is_none());
        assert!(find(&f, 0xd, 9).is_some());
        let d0 = find(&f, 0xd, 0).unwrap();
        assert_eq!(u64::from(d0.eax) & !XCR0_ALLOWED, 0);
        assert_eq!(d0.edx, 0);
        assert_eq!(d0.ecx, 2688 + 8);
        let d1 = find(&f, 0xd, 1).unwrap();
        assert_eq!(d1.ecx, 0);
        let l7 = find(&f, 7, 0).unwrap();
        assert_eq!(l7.ebx & (1 << 2), 0);
        assert_eq!(l7.edx & (1 << 24), 0);
        assert_eq!(find(&f, 6, 0).unwrap().eax, 0);
        let kvm = find(&f, 0x4000_0001, 0).unwrap();
        assert_eq!(kvm.eax & (1 << 4), 0);
        assert_ne!(kvm.eax & 1, 0, "kvmclock stays");
        assert!(find(&f, 0x4000_0000, 0).is_some());
    }

    #[test]
    fn fingerprint_ignores_vcpu_identity_but_not_features() {
        let a = fingerprint(&filter(&host(), 0, 2));
        let b = fingerprint(&filter(&host(), 1, 2));
        assert_eq!(a, b);
        let mut other = host();
        other[1].ecx |= 1 << 5;
        assert_ne!(a, fingerprint(&filter(&other, 0, 2)));
    }
}
