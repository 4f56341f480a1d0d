//! Crate-wide checks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path of a source file (`devices/virtio/mod.rs` -> `devices::virtio`).
fn module_of(rel: &Path) -> String {
    let s = rel.with_extension("").to_string_lossy().replace('/', "::");
    let s = s.strip_suffix("::mod").unwrap_or(&s).to_string();
    if s == "lib" {
        String::new()
    } else {
        s
    }
}

/// The code of a file without comments and without its test code (from the first
/// `#[cfg(test)]` on: tests may reach anywhere).
fn code_of(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        out.push_str(line.split(" //").next().unwrap_or(""));
        out.push('\n');
    }
    out
}

/// Paths (`a::b::C`) that follow `prefix` in `code`, braces expanded one level.
fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let path_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let end = rest.find(|c: char| !path_char(c)).unwrap_or(rest.len());
        let head = rest[..end].trim_end_matches(':').to_string();
        if rest[end..].starts_with('{') {
            let close = rest[end..].find('}').map_or(rest.len(), |j| end + j);
            for item in rest[end + 1..close].split(',') {
                let item = item.trim().split(" as ").next().unwrap_or("").trim();
                let item: String = item.chars().take_while(|&c| path_char(c)).collect();
                if !item.is_empty() {
                    out.push(if head.is_empty() { item } else { format!("{head}::{item}") });
                }
            }
        } else {
            out.push(head);
        }
    }
    out
}

/// The longest known module that `path` starts with.
fn resolve(path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
    (1..=parts.len()).rev().map(|n| parts[..n].join("::")).find(|m| modules.contains(m))
}

/// No module imports (through `crate::` or `super::` paths in code, not comments or tests)
/// a module that imports it back, directly or through others. A parent module that imports a
/// child that imports the parent counts as a cycle too.
#[test]
fn no_import_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let rel = |p: &Path| p.strip_prefix(&src).unwrap().to_path_buf();
    let modules: BTreeSet<String> = files
        .iter()
        .filter(|p| !p.ends_with("main.rs"))
        .map(|p| module_of(&rel(p)))
        .filter(|m| !m.is_empty())
        .collect();
    assert!(modules.contains("devices::virtio::rng::device"), "{modules:?}");
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files.iter().filter(|p| !p.ends_with("main.rs")) {
        let m = module_of(&rel(f));
        let code = code_of(&std::fs::read_to_string(f).unwrap());
        let parent = m.rsplit_once("::").map_or(String::new(), |(p, _)| p.to_string());
        let mut targets: Vec<String> = paths_after(&code, "crate::");
        for p in paths_after(&code, "super::") {
            targets.push(if parent.is_empty() { p } else { format!("{parent}::{p}") });
        }
        for t in targets {
            if let Some(to) = resolve(&t, &modules) {
                if to != m {
                    edges.entry(m.clone()).or_default().insert(to);
                }
            }
        }
    }
    // Depth-first search for a cycle, reporting its path.
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for t in edges.get(n).into_iter().flatten() {
            match state.get(t.as_str()) {
                Some(1) => {
                    let i = stack.iter().position(|x| x == t).unwrap_or(0);
                    let mut c = stack[i..].to_vec();
                    c.push(t.clone());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(t, edges, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in &modules {
        if !state.contains_key(m) {
            if let Some(c) = visit(m, &edges, &mut state, &mut Vec::new()) {
                panic!("import cycle: {}", c.join(" -> "));
            }
        }
    }
    // The checker sees edges at all (a broken parser would pass vacuously).
    assert!(edges["snapshot"].contains("vmm"), "{:?}", edges.get("snapshot"));
    assert!(edges["devices::virtio::rng::device"].contains("devices::virtio"));
}

#[test]
fn import_paths_are_parsed() {
    let code = code_of("use crate::a::{b::X, c};\n// use crate::d;\nlet x = super::e::f();\n#[cfg(test)]\nuse crate::g;");
    assert_eq!(paths_after(&code, "crate::"), vec!["a::b::X", "a::c"]);
    assert_eq!(paths_after(&code, "super::"), vec!["e::f"]);
    let mods: BTreeSet<String> = ["a", "a::b"].iter().map(|s| (*s).to_string()).collect();
    assert_eq!(resolve("a::b::X", &mods).as_deref(), Some("a::b"));
    assert_eq!(resolve("a::c", &mods).as_deref(), Some("a"));
    assert_eq!(module_of(Path::new("devices/virtio/mod.rs")), "devices::virtio");
}
