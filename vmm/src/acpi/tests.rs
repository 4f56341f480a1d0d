//! The tables written into guest memory, read back as a guest does ([`super::parse`]).

use super::parse::{self, eisa_id, resources, u32_at, u64_at, Node, Obj, Resource};
use super::*;
use crate::memory::GuestRam;

const MIB: u64 = 1 << 20;

fn written(nvcpus: usize, devices: &[MmioDeviceInfo]) -> (GuestRam, Vec<parse::Table>) {
    let ram = GuestRam::new_anonymous(64 * MIB).unwrap();
    let rsdp = write_tables(ram.mem(), nvcpus, devices).unwrap();
    assert_eq!(rsdp, RSDP_ADDR);
    let t = parse::tables(ram.mem(), rsdp);
    (ram, t)
}

fn find<'a>(t: &'a [parse::Table], sig: &[u8; 4]) -> &'a parse::Table {
    t.iter().find(|x| &x.sig == sig).unwrap_or_else(|| panic!("no {:?}", sig))
}

fn name<'a>(nodes: &'a [Node], n: &str) -> Option<&'a Obj> {
    nodes.iter().find_map(|x| match x {
        Node::Name(k, v) if k == n => Some(v),
        _ => None,
    })
}

fn devices(nodes: &[Node]) -> Vec<(String, Vec<Node>)> {
    let mut out = Vec::new();
    for n in nodes {
        if let Node::Container { device, name, children } = n {
            if *device {
                out.push((name.clone(), children.clone()));
            }
            out.extend(devices(children));
        }
    }
    out
}

#[test]
fn every_table_is_listed_and_checksummed() {
    let (_, t) = written(2, &[MmioDeviceInfo { base: 0xd000_0000, gsi: 5 }]);
    let sigs: Vec<&[u8; 4]> = t.iter().map(|x| &x.sig).collect();
    assert_eq!(sigs, vec![b"DSDT", b"FACP", b"APIC", b"XSDT"]);
    for x in &t {
        assert!(x.addr >= RSDP_ADDR && x.addr + x.bytes.len() as u64 <= ACPI_END, "{:?}", x.sig);
        assert_eq!(&x.bytes[10..16], &OEM_ID);
    }
}

#[test]
fn fadt_is_hardware_reduced_with_power_off_and_reset_registers() {
    let (_, t) = written(1, &[]);
    let f = &find(&t, b"FACP").bytes;
    let flags = u32_at(f, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    assert_eq!(u64_at(f, 140), find(&t, b"DSDT").addr, "X_DSDT");
    let iapc = parse::u16_at(f, 109);
    assert_eq!(iapc & 0b1_1100, 0b1_1100, "no VGA, no MSI, no ASPM");
    assert_eq!(iapc & 0b10, 0, "no 8042 claimed");
    // Generic address structures: space 1 (I/O), 8 bits wide, byte access, the port.
    let gas = |o: usize| (f[o], f[o + 1], f[o + 3], u64_at(f, o + 4));
    let pm = u64::from(ACPI_PM_PORT);
    assert_eq!(gas(116), (1, 8, 1, pm + 2), "reset register");
    assert_eq!(f[128], 1, "reset value");
    assert_eq!(gas(244), (1, 8, 1, pm), "sleep control register");
    assert_eq!(gas(256), (1, 8, 1, pm + 1), "sleep status register");
    assert_eq!(&f[268..276], HYPERVISOR_ID);
}

#[test]
fn madt_lists_every_cpu_and_the_ioapic() {
    let (_, t) = written(4, &[]);
    let m = &find(&t, b"APIC").bytes;
    assert_eq!(u32_at(m, 36), APIC_ADDR);
    assert_eq!(u32_at(m, 40) & 1, 1, "PC-AT compatible");
    let (mut cpus, mut ioapics) = (Vec::new(), Vec::new());
    let mut i = 44;
    while i < m.len() {
        let (ty, len) = (m[i], usize::from(m[i + 1]));
        match ty {
            0 => cpus.push((m[i + 2], m[i + 3], u32_at(m, i + 4))),
            1 => ioapics.push((u32_at(m, i + 4), u32_at(m, i + 8))),
            other => panic!("MADT entry type {other}"),
        }
        i += len;
    }
    assert_eq!(cpus, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1)], "uid, APIC id, enabled");
    assert_eq!(ioapics, vec![(IOAPIC_ADDR, 0)]);
    assert!(matches!(
        write_tables(GuestRam::new_anonymous(64 * MIB).unwrap().mem(), 300, &[]),
        Err(AcpiError::TooManyCpus(300))
    ));
}

#[test]
fn dsdt_describes_s5_legacy_and_virtio_devices() {
    let virtio = [
        MmioDeviceInfo { base: 0xd000_0000, gsi: 5 },
        MmioDeviceInfo { base: 0xd000_1000, gsi: 6 },
    ];
    let (_, t) = written(1, &virtio);
    let nodes = parse::aml(find(&t, b"DSDT"));
    let s5 = name(&nodes, "_S5_").expect("\\_S5_");
    assert_eq!(s5, &Obj::Pkg(vec![Obj::Int(5), Obj::Int(0), Obj::Int(0), Obj::Int(0)]));
    let devs = devices(&nodes);
    let hid = |c: &[Node]| match name(c, "_HID") {
        Some(Obj::Int(v)) => eisa_id(*v),
        Some(Obj::Str(s)) => s.clone(),
        other => panic!("_HID {other:?}"),
    };
    let crs = |c: &[Node]| match name(c, "_CRS") {
        Some(Obj::Buf(b)) => resources(b),
        other => panic!("_CRS {other:?}"),
    };
    let com1 = devs.iter().find(|(_, c)| hid(c) == "PNP0501").expect("COM1");
    assert_eq!(
        crs(&com1.1),
        vec![
            Resource::Io { min: 0x3f8, len: 8 },
            Resource::Irq { gsi: 4, edge: true, active_low: false }
        ]
    );
    assert!(devs.iter().all(|(_, c)| hid(c) != "PNP0303"), "no PS/2 controller is described");
    let vio: Vec<_> = devs.iter().filter(|(_, c)| hid(c) == VIRTIO_MMIO_HID).collect();
    assert_eq!(vio.len(), 2);
    for (i, (_, c)) in vio.iter().enumerate() {
        assert_eq!(name(c, "_UID"), Some(&Obj::Int(i as u64)));
        assert_eq!(
            crs(c),
            vec![
                Resource::Mem32 { base: virtio[i].base as u32, len: 0x1000, writable: true },
                Resource::Irq { gsi: virtio[i].gsi, edge: true, active_low: false },
            ]
        );
    }
    // Without devices, no virtio-mmio entry at all.
    let (_, t) = written(1, &[]);
    let none = devices(&parse::aml(find(&t, b"DSDT")));
    assert!(none.iter().all(|(_, c)| hid(c) != VIRTIO_MMIO_HID));
}

#[test]
fn too_many_devices_do_not_fit() {
    let many: Vec<MmioDeviceInfo> =
        (0..4000u64).map(|i| MmioDeviceInfo { base: 0xd000_0000 + i * 0x1000, gsi: 5 }).collect();
    let ram = GuestRam::new_anonymous(64 * MIB).unwrap();
    assert!(matches!(write_tables(ram.mem(), 1, &many), Err(AcpiError::TooLarge(_))));
}
