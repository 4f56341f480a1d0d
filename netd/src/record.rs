//! Slot records: what netd must know to find a slot again after a restart.
//!
//! One file per slot, `<state dir>/<slot>.slot`, written to a temporary file and
//! renamed. Format: magic `GRVSLOT\0`, version (u32 LE), payload length (u32 LE),
//! CRC-32 of the payload (u32 LE), then the payload (JSON). The state directory
//! defaults to `/run/grove/netd`: a tmpfs, like the namespaces and bpffs pins the
//! records describe, so a reboot forgets all of them together.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::policy::Policy;

/// File magic.
pub const MAGIC: &[u8; 8] = b"GRVSLOT\0";
/// Format version.
pub const VERSION: u32 = 1;
/// Largest payload accepted.
pub const MAX_PAYLOAD: usize = 1 << 20;
const HEADER: usize = 20;

/// Errors of slot records.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("slot record {path}: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("slot record {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether the slot is in the pool or given out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// Prepared, in the pool.
    Free,
    /// Given out to `owner`, with its policy.
    Taken { owner: String, policy: Policy },
}

/// A slot as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    pub name: String,
    /// Index in the pool's address range.
    pub index: u32,
    pub host_ip: Ipv4Addr,
    pub slot_ip: Ipv4Addr,
    pub state: SlotState,
}

/// Encodes a record.
pub fn encode(r: &SlotRecord) -> Vec<u8> {
    let payload = serde_json::to_vec(r).expect("slot records serialise");
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes a record; `path` only names it in errors.
pub fn decode(b: &[u8], path: &Path) -> Result<SlotRecord, RecordError> {
    let corrupt = |what: String| RecordError::Corrupt { path: path.to_path_buf(), what };
    if b.len() < HEADER {
        return Err(corrupt(format!("truncated header ({} bytes)", b.len())));
    }
    if &b[..8] != MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let version = u32_at(8);
    if version != VERSION {
        return Err(corrupt(format!("version {version}, this netd reads {VERSION}")));
    }
    let len = usize::try_from(u32_at(12)).unwrap_or(usize::MAX);
    if len > MAX_PAYLOAD || b.len() != HEADER + len {
        return Err(corrupt(format!(
            "payload length {len} does not match the file ({} bytes)",
            b.len()
        )));
    }
    let payload = &b[HEADER..];
    if crc32fast::hash(payload) != u32_at(16) {
        return Err(corrupt("checksum mismatch".into()));
    }
    serde_json::from_slice(payload).map_err(|e| corrupt(format!("payload: {e}")))
}

/// Path of a slot's record.
pub fn path_for(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.slot"))
}

/// Writes a record atomically (temporary file + rename).
pub fn store(dir: &Path, r: &SlotRecord) -> Result<(), RecordError> {
    let path = path_for(dir, &r.name);
    let io = |source| RecordError::Io { path: path.clone(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!(".{}.tmp", r.name));
    std::fs::write(&tmp, encode(r)).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

/// Removes a record (absent is fine).
pub fn remove(dir: &Path, name: &str) -> Result<(), RecordError> {
    let path = path_for(dir, name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RecordError::Io { path, source }),
    }
}

/// Every record in `dir` whose slot name starts with `prefix`: the good ones,
/// and the names of the files that could not be read (with why).
pub fn load_all(dir: &Path, prefix: &str) -> (Vec<SlotRecord>, Vec<(String, RecordError)>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return (good, bad) };
    for e in entries.filter_map(Result::ok) {
        let file = e.file_name().to_string_lossy().into_owned();
        if let Some(tmp) = file.strip_prefix('.').and_then(|f| f.strip_suffix(".tmp")) {
            if tmp.starts_with(prefix) {
                let _ = std::fs::remove_file(e.path());
            }
            continue;
        }
        let Some(name) = file.strip_suffix(".slot") else { continue };
        if !name.starts_with(prefix) {
            continue;
        }
        let path = e.path();
        match std::fs::read(&path).map_err(|source| RecordError::Io { path: path.clone(), source })
        {
            Ok(b) => match decode(&b, &path) {
                Ok(r) if r.name == name => good.push(r),
                Ok(_) => bad.push((
                    name.to_string(),
                    RecordError::Corrupt { path, what: "name mismatch".into() },
                )),
                Err(err) => bad.push((name.to_string(), err)),
            },
            Err(err) => bad.push((name.to_string(), err)),
        }
    }
    good.sort_by_key(|r| r.index);
    (good, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> SlotRecord {
        SlotRecord {
            name: "gv3".into(),
            index: 3,
            host_ip: "10.201.0.13".parse().unwrap(),
            slot_ip: "10.201.0.14".parse().unwrap(),
            state: SlotState::Taken { owner: "sandbox-1".into(), policy: Policy::default() },
        }
    }

    #[test]
    fn round_trip() {
        let b = encode(&rec());
        assert_eq!(decode(&b, Path::new("x")).unwrap(), rec());
    }

    #[test]
    fn every_corruption_is_a_clear_error() {
        let b = encode(&rec());
        let p = Path::new("x");
        let msg = |b: &[u8]| decode(b, p).unwrap_err().to_string();
        assert!(msg(&b[..10]).contains("truncated header"));
        assert!(msg(&b[..b.len() - 1]).contains("payload length"));
        let mut m = b.clone();
        m[0] = b'X';
        assert!(msg(&m).contains("bad magic"));
        let mut m = b.clone();
        m[8] = 9;
        assert!(msg(&m).contains("version 9"));
        let mut m = b.clone();
        let n = m.len();
        m[n - 2] ^= 0x20;
        assert!(msg(&m).contains("checksum"));
        // Every truncation fails, none panics.
        for i in 0..b.len() {
            assert!(decode(&b[..i], p).is_err());
        }
    }

    #[test]
    fn store_and_load_all_skip_and_report() {
        let dir = std::env::temp_dir().join(format!("grove-netd-rec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        store(&dir, &rec()).unwrap();
        std::fs::write(dir.join("gv4.slot"), b"garbage").unwrap();
        std::fs::write(dir.join("other1.slot"), b"not ours").unwrap();
        let (good, bad) = load_all(&dir, "gv");
        assert_eq!(good, vec![rec()]);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, "gv4");
        remove(&dir, "gv3").unwrap();
        remove(&dir, "gv3").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
