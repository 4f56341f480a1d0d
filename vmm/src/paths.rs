//! Path helpers shared by the state file and the disks (no dependencies inside the crate).

use std::path::{Component, Path, PathBuf};

/// `path` relative to directory `base` (both absolute): `a/b` from `/x` to `/x/a/b`,
/// `../y/c` from `/x` to `/y/c`.
pub fn relative_to(path: &Path, base: &Path) -> PathBuf {
    let p: Vec<Component> = path.components().collect();
    let b: Vec<Component> = base.components().collect();
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c.as_os_str());
    }
    out
}
