//! KVM structures in the state file, as `#[serde(with = "blob")]` fields: written as a hex
//! string of their bytes (state format version 4), read from that or from an array of bytes
//! (versions 2 and 3 wrote kvm-bindings' own form, one JSON number per byte), and exactly
//! `size_of::<T>()` bytes either way (kvm-bindings' own decoder zero-pads a short image and
//! cuts a long one).
//!
//! Why hex: a vCPU's state is ~6 KiB of bytes (the 4 KiB XSAVE area, the 1 KiB LAPIC page),
//! which as numbers was ~17 KiB of JSON whose parse was the largest step of a standby
//! restore; a hex string is one token, decoded without a per-byte parse.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Serializer;
use zerocopy::{FromBytes, Immutable, IntoBytes};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lower-case hex of `b`.
pub fn to_hex(b: &[u8]) -> String {
    let mut s = Vec::with_capacity(b.len() * 2);
    for &x in b {
        s.push(HEX[usize::from(x >> 4)]);
        s.push(HEX[usize::from(x & 15)]);
    }
    // Only ASCII hex digits were pushed.
    String::from_utf8(s).unwrap_or_default()
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decodes hex `s` into `out`, which must be exactly half its length.
fn hex_into(s: &[u8], out: &mut [u8]) -> bool {
    if s.len() != out.len() * 2 {
        return false;
    }
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        match (nibble(pair[0]), nibble(pair[1])) {
            (Some(h), Some(l)) => *o = (h << 4) | l,
            _ => return false,
        }
    }
    true
}

/// The bytes of hex `s` (`None` if it is not hex: odd length or another character).
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let mut out = vec![0u8; s.len() / 2];
    hex_into(s.as_bytes(), &mut out).then_some(out)
}

/// Writes `v` as the hex string of its bytes.
pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&to_hex(v.as_bytes()))
}

/// Reads a `T` from a hex string or an array of bytes of exactly its size.
pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
where
    T: FromBytes + IntoBytes,
    D: Deserializer<'de>,
{
    d.deserialize_any(Exact::<T>(std::marker::PhantomData))
}

struct Exact<T>(std::marker::PhantomData<T>);

impl<'de, T: FromBytes + IntoBytes> Visitor<'de> for Exact<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} bytes (hex or an array)", std::mem::size_of::<T>())
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
        let mut v = T::new_zeroed();
        if hex_into(s.as_bytes(), v.as_mut_bytes()) {
            Ok(v)
        } else {
            Err(E::invalid_value(de::Unexpected::Str(s), &self))
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
        let mut v = T::new_zeroed();
        let out = v.as_mut_bytes();
        let mut n = 0;
        while let Some(b) = seq.next_element::<u8>()? {
            match out.get_mut(n) {
                Some(o) => *o = b,
                None => return Err(de::Error::invalid_length(n + 1, &self)),
            }
            n += 1;
        }
        if n != out.len() {
            return Err(de::Error::invalid_length(n, &self));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_regs, kvm_xsave};
    use serde::{Deserialize, Serialize};
    use zerocopy::FromZeros;

    #[derive(Serialize, Deserialize, Debug)]
    struct W {
        #[serde(with = "super")]
        regs: kvm_regs,
    }

    #[test]
    fn hex_round_trip_and_bad_hex() {
        let b: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&b)).unwrap(), b);
        assert_eq!(from_hex("0aFf").unwrap(), vec![10, 255]);
        for bad in ["0", "0g", "hello", "+1"] {
            assert!(from_hex(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_structure_round_trips_as_hex_and_reads_from_an_array() {
        let w = W { regs: kvm_regs { rip: 0x1234_5678, rflags: 2, ..Default::default() } };
        let j = serde_json::to_value(&w).unwrap();
        let hex = j["regs"].as_str().unwrap();
        assert_eq!(hex.len(), 2 * std::mem::size_of::<kvm_regs>());
        let back: W = serde_json::from_value(j).unwrap();
        assert_eq!(back.regs, w.regs);
        // The form versions 2 and 3 wrote: one number per byte.
        let arr = serde_json::json!({ "regs": w.regs.as_bytes() });
        let back: W = serde_json::from_value(arr).unwrap();
        assert_eq!(back.regs, w.regs);
    }

    #[test]
    fn only_the_exact_size_is_read() {
        let n = std::mem::size_of::<kvm_regs>();
        for len in [0, 10, n - 1, n + 1] {
            let arr = serde_json::json!({ "regs": vec![0u8; len] });
            assert!(serde_json::from_value::<W>(arr).is_err(), "array of {len}");
            let hex = serde_json::json!({ "regs": "00".repeat(len) });
            assert!(serde_json::from_value::<W>(hex).is_err(), "hex of {len}");
        }
        for bad in
            [serde_json::json!("zz".repeat(n)), serde_json::json!(7), serde_json::json!(null)]
        {
            assert!(serde_json::from_value::<W>(serde_json::json!({ "regs": bad })).is_err());
        }
        let mut big = vec![0u16; n];
        big[3] = 300;
        assert!(serde_json::from_value::<W>(serde_json::json!({ "regs": big })).is_err());
        // The largest structure too.
        let x = kvm_xsave::default();
        let s = to_hex(x.as_bytes());
        let mut y = kvm_xsave::new_zeroed();
        assert!(hex_into(s.as_bytes(), y.as_mut_bytes()));
    }
}
