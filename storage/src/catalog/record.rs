//! The on-disk encoding of one catalog record.
//!
//! ```text
//! offset size
//!      0    4  magic "GRVC"
//!      4    2  format version (little endian), currently 1
//!      6    2  record kind (1 layer, 2 snapshot, 3 template, 4 sandbox)
//!      8    4  payload length (little endian)
//!     12    4  CRC-32 (IEEE) of the payload
//!     16    n  payload: the record as JSON
//! ```

use serde::{de::DeserializeOwned, Serialize};

/// Record magic.
pub const MAGIC: [u8; 4] = *b"GRVC";
/// Record format version.
pub const VERSION: u16 = 1;
/// Size of the header before the payload.
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted (records are small; this bounds a corrupt length).
pub const MAX_PAYLOAD: usize = 1 << 20;

/// Why a stored record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record truncated: {0} bytes")]
    Truncated(usize),
    #[error("bad record magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("unknown record version {0}")]
    UnknownVersion(u16),
    #[error("record kind {found}, expected {expected}")]
    WrongKind { found: u16, expected: u16 },
    #[error("record payload length {0} does not match")]
    BadLength(usize),
    #[error("record checksum mismatch")]
    BadChecksum,
    #[error("record payload: {0}")]
    Payload(String),
}

/// Encodes `value` as a record of `kind`.
pub fn encode<T: Serialize>(kind: u16, value: &T) -> Vec<u8> {
    // Serialising plain data structs to JSON cannot fail.
    let payload = serde_json::to_vec(value).expect("catalog records serialise");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    let len = u32::try_from(payload.len()).expect("record under 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes a record of `kind`, checking magic, version, length and checksum.
pub fn decode<T: DeserializeOwned>(kind: u16, bytes: &[u8]) -> Result<T, RecordError> {
    if bytes.len() < HEADER_LEN {
        return Err(RecordError::Truncated(bytes.len()));
    }
    let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(RecordError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != VERSION {
        return Err(RecordError::UnknownVersion(version));
    }
    let found = u16::from_le_bytes([bytes[6], bytes[7]]);
    if found != kind {
        return Err(RecordError::WrongKind { found, expected: kind });
    }
    let len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let payload = &bytes[HEADER_LEN..];
    if len > MAX_PAYLOAD || payload.len() != len {
        return Err(if payload.len() < len {
            RecordError::Truncated(bytes.len())
        } else {
            RecordError::BadLength(len)
        });
    }
    let crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    if crc32fast::hash(payload) != crc {
        return Err(RecordError::BadChecksum);
    }
    serde_json::from_slice(payload).map_err(|e| RecordError::Payload(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_corruption_is_reported() {
        let v = vec![1u32, 2, 3];
        let bytes = encode(7, &v);
        assert_eq!(decode::<Vec<u32>>(7, &bytes).unwrap(), v);
        assert_eq!(
            decode::<Vec<u32>>(8, &bytes).unwrap_err(),
            RecordError::WrongKind { found: 7, expected: 8 }
        );
        for cut in 0..bytes.len() {
            assert!(decode::<Vec<u32>>(7, &bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[0] ^= 1;
        assert!(matches!(decode::<Vec<u32>>(7, &bad), Err(RecordError::BadMagic(_))));
        let mut bad = bytes.clone();
        bad[4] = 9;
        assert_eq!(decode::<Vec<u32>>(7, &bad), Err(RecordError::UnknownVersion(9)));
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 0x40;
        assert_eq!(decode::<Vec<u32>>(7, &bad), Err(RecordError::BadChecksum));
        let mut long = bytes;
        long.push(0);
        assert!(matches!(decode::<Vec<u32>>(7, &long), Err(RecordError::BadLength(_))));
    }
}
