//! Validation of every API input: names, labels, ids, counts, sizes, paths. Each check
//! returns [`AgentError::InvalidArgument`] with a message that says what is wrong.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{AgentError, Result};

/// Most labels on one sandbox or snapshot.
pub const MAX_LABELS: usize = 32;
/// Longest label key.
pub const MAX_LABEL_KEY: usize = 63;
/// Longest label value.
pub const MAX_LABEL_VALUE: usize = 255;
/// Most children of one fork (E2B allows 100 from one snapshot).
pub const MAX_FORK: u32 = 100;
/// Longest template name.
pub const MAX_NAME: usize = 63;
/// Longest kernel command line (the boot protocol's page, NUL included).
pub const MAX_CMDLINE: usize = 4095;
/// Most vCPUs (grove-vmm's limit).
pub const MAX_VCPUS: u32 = 32;
/// Guest memory bounds in MiB (grove-vmm's).
pub const MIN_MEM_MIB: u32 = 8;
/// Upper bound in MiB (1 TiB).
pub const MAX_MEM_MIB: u32 = 1 << 20;
/// Longest TTL (30 days).
pub const MAX_TTL_S: u32 = 30 * 24 * 3600;
/// Ready text bounds.
pub const MAX_READY_TEXT: usize = 128;

fn bad(msg: impl Into<String>) -> AgentError {
    AgentError::InvalidArgument(msg.into())
}

/// A template name: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn name(what: &str, n: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.len() <= MAX_NAME
        && n.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "{what} name {:?} is malformed: 1-{MAX_NAME} characters of [a-z0-9._-], starting with a letter or digit",
            truncate(n)
        )))
    }
}

/// A sandbox id as agentd makes them: `sb-` and 16 lowercase hex digits.
pub fn sandbox_id(id: &str) -> Result<()> {
    let ok = id.len() == 19
        && id.starts_with("sb-")
        && id[3..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(bad(format!("sandbox id {:?} is malformed (sb- and 16 hex digits)", truncate(id))))
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Labels: at most [`MAX_LABELS`]; keys 1-63 characters of `[A-Za-z0-9._/-]`, values at most
/// 255 printable characters.
pub fn labels(l: &HashMap<String, String>) -> Result<BTreeMap<String, String>> {
    if l.len() > MAX_LABELS {
        return Err(bad(format!("{} labels (at most {MAX_LABELS})", l.len())));
    }
    for (k, v) in l {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_LABEL_KEY
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
        if !key_ok {
            return Err(bad(format!(
                "label key {:?} is malformed: 1-{MAX_LABEL_KEY} characters of [A-Za-z0-9._/-]",
                truncate(k)
            )));
        }
        if v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return Err(bad(format!(
                "label {k}: value of {} bytes or with control characters (at most {MAX_LABEL_VALUE} printable)",
                v.len()
            )));
        }
    }
    Ok(l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Merges `extra` labels over `base`, checking the result's size.
pub fn merge_labels(
    base: &BTreeMap<String, String>,
    extra: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    let mut out = base.clone();
    out.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    if out.len() > MAX_LABELS {
        return Err(bad(format!("{} labels after merging (at most {MAX_LABELS})", out.len())));
    }
    Ok(out)
}

/// A fork count: 1..=[`MAX_FORK`].
pub fn fork_count(n: u32) -> Result<()> {
    if (1..=MAX_FORK).contains(&n) {
        Ok(())
    } else {
        Err(bad(format!("fork count {n} is out of range (1..={MAX_FORK})")))
    }
}

/// vCPUs: 1..=32.
pub fn vcpus(n: u32) -> Result<()> {
    if (1..=MAX_VCPUS).contains(&n) {
        Ok(())
    } else {
        Err(bad(format!("{n} vCPUs is out of range (1..={MAX_VCPUS})")))
    }
}

/// Memory: 8 MiB .. 1 TiB.
pub fn mem_mib(n: u32) -> Result<()> {
    if (MIN_MEM_MIB..=MAX_MEM_MIB).contains(&n) {
        Ok(())
    } else {
        Err(bad(format!("memory of {n} MiB is out of range ({MIN_MEM_MIB}..={MAX_MEM_MIB})")))
    }
}

/// A TTL in seconds (0: none).
pub fn ttl(s: u32) -> Result<()> {
    if s <= MAX_TTL_S {
        Ok(())
    } else {
        Err(bad(format!("ttl of {s} s is too long (at most {MAX_TTL_S})")))
    }
}

/// A kernel command line.
pub fn cmdline(c: &str) -> Result<()> {
    if c.len() > MAX_CMDLINE || c.chars().any(char::is_control) {
        Err(bad(format!(
            "command line of {} bytes or with control characters (at most {MAX_CMDLINE})",
            c.len()
        )))
    } else {
        Ok(())
    }
}

/// An absolute path to an existing regular file (`what` names it in errors).
pub fn host_file(what: &str, p: &str) -> Result<PathBuf> {
    let path = host_path(what, p)?;
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(_) => Err(bad(format!("{what} {p} is not a regular file"))),
        Err(e) => Err(bad(format!("{what} {p}: {e}"))),
    }
}

/// An absolute path to an existing directory.
pub fn host_dir(what: &str, p: &str) -> Result<PathBuf> {
    let path = host_path(what, p)?;
    match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => Ok(path),
        Ok(_) => Err(bad(format!("{what} {p} is not a directory"))),
        Err(e) => Err(bad(format!("{what} {p}: {e}"))),
    }
}

fn host_path(what: &str, p: &str) -> Result<PathBuf> {
    let path = Path::new(p);
    if p.is_empty() || p.len() > 4096 || !path.is_absolute() || p.contains('\0') {
        return Err(bad(format!(
            "{what} must be an absolute path on the agent's host: {:?}",
            truncate(p)
        )));
    }
    Ok(path.to_path_buf())
}

/// Ready text for a serial ready check.
pub fn ready_text(t: &str) -> Result<()> {
    if t.is_empty() || t.len() > MAX_READY_TEXT || t.chars().any(char::is_control) {
        Err(bad(format!("ready text must be 1-{MAX_READY_TEXT} printable characters")))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["tg", "a", "debian-12.1_x", &"a".repeat(63)] {
            assert!(name("template", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "A", "a b", "a/b", "é", &"a".repeat(64), "a\0"] {
            assert!(name("template", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ids() {
        assert!(sandbox_id("sb-0123456789abcdef").is_ok());
        for bad in [
            "",
            "sb-",
            "sb-0123456789ABCDEF",
            "xx-0123456789abcdef",
            "sb-0123456789abcdef0",
            "../etc",
        ] {
            assert!(sandbox_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn labels_are_bounded() {
        let m = |k: &str, v: &str| HashMap::from([(k.to_string(), v.to_string())]);
        assert!(labels(&m("team", "a")).is_ok());
        assert!(labels(&m("k8s.io/app-name_1", "")).is_ok());
        assert!(labels(&m("", "a")).is_err());
        assert!(labels(&m(&"k".repeat(64), "a")).is_err());
        assert!(labels(&m("a b", "a")).is_err());
        assert!(labels(&m("a", &"v".repeat(256))).is_err());
        assert!(labels(&m("a", "line\nbreak")).is_err());
        let many: HashMap<_, _> = (0..33).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(labels(&many).is_err());
        let base: BTreeMap<_, _> = (0..32).map(|i| (format!("k{i}"), String::new())).collect();
        let extra = BTreeMap::from([("x".to_string(), String::new())]);
        assert!(merge_labels(&base, &extra).is_err());
        assert_eq!(merge_labels(&base, &BTreeMap::new()).unwrap().len(), 32);
    }

    #[test]
    fn numbers_and_paths() {
        assert!(fork_count(0).is_err() && fork_count(10_000).is_err() && fork_count(100).is_ok());
        assert!(vcpus(0).is_err() && vcpus(33).is_err() && vcpus(32).is_ok());
        assert!(mem_mib(7).is_err() && mem_mib(8).is_ok() && mem_mib(u32::MAX).is_err());
        assert!(ttl(MAX_TTL_S + 1).is_err() && ttl(0).is_ok());
        assert!(cmdline(&"x".repeat(4096)).is_err() && cmdline("console=ttyS0").is_ok());
        assert!(host_file("kernel", "relative/path").is_err());
        assert!(host_file("kernel", "/nonexistent/k").is_err());
        assert!(host_file("kernel", "/").is_err());
        assert!(host_dir("rootfs", "/").is_ok());
        assert!(ready_text("READY").is_ok() && ready_text("").is_err());
    }
}
