//! Reads ACPI tables back from guest memory the way a guest does: RSDP signature and both
//! checksums, XSDT entries, each table's signature, length and checksum, and the AML objects
//! the DSDT holds (scopes, devices, names with integers, strings, EISA ids, buffers and
//! packages). Test code: it panics on anything malformed.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// A table read back: signature and whole bytes (checksum verified).
#[derive(Debug, Clone)]
pub struct Table {
    /// Signature.
    pub sig: [u8; 4],
    /// Its address.
    pub addr: u64,
    /// All its bytes, header included.
    pub bytes: Vec<u8>,
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

pub fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

pub fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

pub fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    mem.read_slice(&mut b, GuestAddress(addr)).expect("table inside guest memory");
    b
}

/// Reads the table at `addr` and checks its length and checksum.
pub fn table(mem: &GuestMemory, addr: u64) -> Table {
    let head = read(mem, addr, 36);
    let len = u32_at(&head, 4) as usize;
    assert!(len >= 36, "table at {addr:#x}: length {len}");
    let bytes = read(mem, addr, len);
    assert_eq!(sum(&bytes), 0, "table {:?} checksum", String::from_utf8_lossy(&bytes[..4]));
    Table { sig: bytes[..4].try_into().unwrap(), addr, bytes }
}

/// Follows the RSDP at `rsdp` to the XSDT and returns every table it lists, and the DSDT
/// the FADT points at.
pub fn tables(mem: &GuestMemory, rsdp: u64) -> Vec<Table> {
    let r = read(mem, rsdp, 36);
    assert_eq!(&r[..8], b"RSD PTR ");
    assert_eq!(sum(&r[..20]), 0, "RSDP checksum");
    assert_eq!(r[15], 2, "ACPI 2.0+ RSDP");
    assert_eq!(u32_at(&r, 20), 36, "RSDP length");
    assert_eq!(sum(&r), 0, "RSDP extended checksum");
    let xsdt = table(mem, u64_at(&r, 24));
    assert_eq!(&xsdt.sig, b"XSDT");
    let mut out = Vec::new();
    for e in (36..xsdt.bytes.len()).step_by(8) {
        let t = table(mem, u64_at(&xsdt.bytes, e));
        if &t.sig == b"FACP" {
            let dsdt = u64_at(&t.bytes, 140);
            out.push(table(mem, dsdt));
        }
        out.push(t);
    }
    out.push(xsdt);
    out
}

/// An AML object the DSDT declares.
#[derive(Debug, Clone, PartialEq)]
pub enum Obj {
    /// Integer (any width, EISA ids included).
    Int(u64),
    /// String.
    Str(String),
    /// Buffer (a resource template).
    Buf(Vec<u8>),
    /// Package.
    Pkg(Vec<Obj>),
}

/// A named AML node: a device or scope with its children, or a name with its value.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// `Scope` or `Device`.
    Container {
        /// Device (else scope).
        device: bool,
        /// Its name (the last segment).
        name: String,
        /// What it holds.
        children: Vec<Node>,
    },
    /// `Name(NAME, value)`.
    Name(String, Obj),
}

struct P<'a> {
    b: &'a [u8],
    i: usize,
}

impl P<'_> {
    fn byte(&mut self) -> u8 {
        let v = self.b[self.i];
        self.i += 1;
        v
    }

    fn pkg_len(&mut self) -> usize {
        let start = self.i;
        let lead = self.byte();
        let n = usize::from(lead >> 6);
        let mut len = if n == 0 { usize::from(lead & 0x3f) } else { usize::from(lead & 0x0f) };
        for k in 0..n {
            len |= usize::from(self.byte()) << (4 + 8 * k);
        }
        // The length counts from the PkgLength's first byte: return the end.
        start + len
    }

    fn name_seg(&mut self) -> String {
        let s = String::from_utf8(self.b[self.i..self.i + 4].to_vec()).unwrap();
        self.i += 4;
        s
    }

    fn name_string(&mut self) -> String {
        let mut prefix = String::new();
        while matches!(self.b[self.i], b'\\' | b'^') {
            prefix.push(char::from(self.byte()));
        }
        let segs = match self.b[self.i] {
            0x2e => {
                self.i += 1;
                2
            }
            0x2f => {
                self.i += 1;
                usize::from(self.byte())
            }
            0x00 => {
                self.i += 1;
                0
            }
            _ => 1,
        };
        let parts: Vec<String> = (0..segs).map(|_| self.name_seg()).collect();
        prefix + &parts.join(".")
    }

    fn obj(&mut self) -> Obj {
        match self.byte() {
            0x00 => Obj::Int(0),
            0x01 => Obj::Int(1),
            0xff => Obj::Int(u64::MAX),
            0x0a => Obj::Int(u64::from(self.byte())),
            0x0b => {
                let v = u16_at(self.b, self.i);
                self.i += 2;
                Obj::Int(u64::from(v))
            }
            0x0c => {
                let v = u32_at(self.b, self.i);
                self.i += 4;
                Obj::Int(u64::from(v))
            }
            0x0e => {
                let v = u64_at(self.b, self.i);
                self.i += 8;
                Obj::Int(v)
            }
            0x0d => {
                let end = self.i + self.b[self.i..].iter().position(|&c| c == 0).unwrap();
                let s = String::from_utf8(self.b[self.i..end].to_vec()).unwrap();
                self.i = end + 1;
                Obj::Str(s)
            }
            0x11 => {
                let end = self.pkg_len();
                let Obj::Int(size) = self.obj() else { panic!("buffer size") };
                let data = self.b[self.i..end].to_vec();
                assert_eq!(data.len() as u64, size, "buffer size");
                self.i = end;
                Obj::Buf(data)
            }
            0x12 => {
                let end = self.pkg_len();
                let n = self.byte();
                let mut v = Vec::new();
                while self.i < end {
                    v.push(self.obj());
                }
                assert_eq!(v.len(), usize::from(n), "package element count");
                Obj::Pkg(v)
            }
            op => panic!("unexpected AML data op {op:#x} at {}", self.i - 1),
        }
    }

    fn terms(&mut self, end: usize) -> Vec<Node> {
        let mut out = Vec::new();
        while self.i < end {
            match self.byte() {
                0x08 => {
                    let n = self.name_string();
                    out.push(Node::Name(n, self.obj()));
                }
                0x10 => {
                    let e = self.pkg_len();
                    let name = self.name_string();
                    let children = self.terms(e);
                    out.push(Node::Container { device: false, name, children });
                }
                0x5b if self.b[self.i] == 0x82 => {
                    self.i += 1;
                    let e = self.pkg_len();
                    let name = self.name_string();
                    let children = self.terms(e);
                    out.push(Node::Container { device: true, name, children });
                }
                op => panic!("unexpected AML op {op:#x} at {}", self.i - 1),
            }
        }
        out
    }
}

/// Parses a DSDT's AML body.
pub fn aml(dsdt: &Table) -> Vec<Node> {
    let mut p = P { b: &dsdt.bytes, i: 36 };
    p.terms(dsdt.bytes.len())
}

/// Decodes an EISA id (`PNP0501`) from its integer form.
pub fn eisa_id(v: u64) -> String {
    let v = u32::try_from(v).unwrap().swap_bytes();
    let c = |s: u32| char::from(b'@' + u8::try_from((v >> s) & 0x1f).unwrap());
    format!("{}{}{}{:04X}", c(26), c(21), c(16), v & 0xffff)
}

/// A device's `_CRS` resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// Memory32Fixed: base, length, writable.
    Mem32 { base: u32, len: u32, writable: bool },
    /// Extended interrupt: line, edge triggered, active low.
    Irq { gsi: u32, edge: bool, active_low: bool },
    /// I/O port range: min, length.
    Io { min: u16, len: u8 },
}

/// Decodes a resource template (large and small descriptors, up to the end tag).
pub fn resources(b: &[u8]) -> Vec<Resource> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        let tag = b[i];
        if tag & 0x80 == 0 {
            let len = usize::from(tag & 7);
            match tag >> 3 {
                0x0f => return out,
                0x08 => out.push(Resource::Io { min: u16_at(b, i + 2), len: b[i + 7] }),
                t => panic!("small resource {t:#x}"),
            }
            i += 1 + len;
        } else {
            let len = usize::from(u16_at(b, i + 1));
            let d = &b[i + 3..i + 3 + len];
            match tag {
                0x86 => out.push(Resource::Mem32 {
                    writable: d[0] & 1 == 1,
                    base: u32_at(d, 1),
                    len: u32_at(d, 5),
                }),
                0x89 => {
                    assert_eq!(d[1], 1, "one interrupt");
                    out.push(Resource::Irq {
                        edge: d[0] & 2 != 0,
                        active_low: d[0] & 4 != 0,
                        gsi: u32_at(d, 2),
                    });
                }
                t => panic!("large resource {t:#x}"),
            }
            i += 3 + len;
        }
    }
}
