//! Snapshot, restore and fork tests: the test guest on /dev/kvm, driven through
//! `grove-vmm run/restore --api-sock` and checked from the guest (its `T` stream,
//! `ID=.. CHECKSUM=..` lines) and from the host (the memory layer chains, read with
//! grove-storage).
//!
//! Without /dev/kvm every test prints `skipped: /dev/kvm not available`. No timing
//! assertions: deadlines only keep a broken VMM from hanging the run, and every VMM
//! is killed by PID when its guard drops.

#![allow(clippy::tests_outside_test_module)]

mod common;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use grove_memory::Chain;
use grove_vmm::state as persist;
use serde_json::json;

use common::{id_line, kvm_available, pattern, tmp, Vmm, DEADLINE, MIB, PAGE, REGION_START};

/// The first 64-bit word of each page of `[gpa, gpa + pages*4 KiB)` as the chain of the
/// snapshot in `dir` resolves it (low memory: memory page number = gpa / 4 KiB).
fn first_words(dir: &Path, gpa: u64, pages: u64) -> Vec<u64> {
    let state = persist::read_state(dir).expect("state file");
    let chain = Chain::open(&state.layers).expect("layer chain");
    let mut buf = vec![0u8; usize::try_from(pages * PAGE).unwrap()];
    chain.read_pages(gpa / PAGE, &mut buf).expect("read pages");
    buf.chunks_exact(PAGE as usize)
        .map(|p| u64::from_le_bytes(p[..8].try_into().unwrap()))
        .collect()
}

/// Busy-mode invariant: counter `n` goes to region page `(n - 1) % P`. A consistent image has
/// consecutive counters page to page except at most one wrap point (where the round robin
/// stands), and there the step is `1 - P`. A torn image (pages from different instants)
/// breaks it. Before its first wrap (a starved guest: its `T`s come by the clock, not by
/// writes) the image is counters 1..=k, then pages still holding the boot pattern (default
/// seed): that is one instant of the model too, and a page the dirty log missed inside the
/// counters still breaks it.
fn assert_round_robin_consistent(words: &[u64], what: &str) {
    let k = words.iter().zip(1u64..).take_while(|&(&w, n)| w == n).count();
    let untouched = |i: usize| pattern(REGION_START + i as u64 * PAGE, 0);
    if k > 0 && k < words.len() && (k..words.len()).all(|i| words[i] == untouched(i)) {
        return;
    }
    let p = words.len() as u64;
    let mut breaks = Vec::new();
    for i in 0..words.len() - 1 {
        if words[i + 1] != words[i].wrapping_add(1) {
            breaks.push(i);
        }
    }
    assert!(
        breaks.len() <= 1,
        "{what}: {} breaks in the round-robin counters at pages {:?} (first words {:?}..)",
        breaks.len(),
        &breaks[..breaks.len().min(8)],
        &words[..words.len().min(8)]
    );
    if let Some(&i) = breaks.first() {
        assert_eq!(
            words[i].wrapping_sub(words[i + 1]),
            p - 1,
            "{what}: wrap point at page {i} does not step back by P-1"
        );
    }
}

/// A fork-mode parent with `touch_mib` MiB touched, READY and running.
fn fork_parent(dir: &Path, touch_mib: u64) -> Vmm {
    let mut p =
        Vmm::boot(&format!("tg.mode=fork tg.touch_mib={touch_mib}"), 64, &dir.join("parent.sock"));
    p.wait_for("READY", |s| s.contains("READY"));
    p.wait_ts(20);
    p
}

#[test]
fn restored_guest_continues_where_it_stopped() {
    if !kvm_available() {
        return;
    }
    let d = tmp();
    let mut parent = fork_parent(d.path(), 8);
    let mut api = parent.api();
    // Pause: no T while paused; resume: the stream continues.
    api.call(&json!({"cmd": "pause"}));
    assert_eq!(api.call(&json!({"cmd": "status"}))["state"], json!("paused"));
    let snap = d.path().join("s");
    api.snapshot("full", &snap);
    api.call(&json!({"cmd": "resume"}));
    parent.wait_ts(20);
    drop(api);
    drop(parent);
    for (mode, id) in [("mmap", 5u64), ("uffd", 6)] {
        let sock = d.path().join(format!("{mode}.sock"));
        let mut child = Vmm::restore(&snap, mode, u32::try_from(id).unwrap(), Some(&sock));
        // The guest was in its T loop: it continues there, sees the new identity,
        // rewrites its first page and prints the checksum of the region it had filled.
        let want = id_line(id, 8);
        child.wait_for(&want, |s| s.contains(&want));
        assert!(!child.stdout().contains("READY"), "a restored guest does not boot again");
        child.wait_ts(50);
        let st = child.api().call(&json!({"cmd": "status"}));
        assert_eq!(st["generation"], json!(1), "{st}");
        assert_eq!(st["identity"], json!(id), "{st}");
    }
}

/// Snapshot destinations: a relative path is refused; of an absolute one only the last
/// component is created (before, `snapshot` created the whole path). Temporary layer files
/// a killed writer left behind are swept when a snapshot starts in, or a VMM restores from,
/// their directory (before, they stayed forever).
#[test]
fn snapshot_destinations_are_checked_and_stale_files_swept() {
    if !kvm_available() {
        return;
    }
    let d = tmp();
    let parent = fork_parent(d.path(), 1);
    let mut api = parent.api();
    let v = api.refused(
        &json!({"cmd": "snapshot", "kind": "full", "dir": "relative/snap"}).to_string(),
        "invalid-argument",
    );
    assert!(v["error"]["message"].as_str().unwrap().contains("absolute"), "{v}");
    let deep = d.path().join("no/such/parent");
    let v = api.raw(&json!({"cmd": "snapshot", "kind": "full", "dir": deep}).to_string());
    assert_eq!(v["ok"], json!(false), "{v}");
    assert!(!d.path().join("no").exists(), "the parents were created");
    // A killed writer's half-written layer (PID 0 is no process), 1 GiB apparent size.
    let snap = d.path().join("s");
    std::fs::create_dir(&snap).unwrap();
    let stale = snap.join(".0000.mlayer.tmp-0-abc");
    std::fs::File::create(&stale).unwrap().set_len(1 << 30).unwrap();
    api.snapshot("full", &snap);
    assert!(!stale.exists(), "swept when the snapshot started");
    drop(api);
    drop(parent);
    std::fs::File::create(&stale).unwrap().set_len(1 << 30).unwrap();
    let mut child = Vmm::restore(&snap, "mmap", 3, None);
    let want = id_line(3, 1);
    child.wait_for(&want, |s| s.contains(&want));
    assert!(!stale.exists(), "swept when a VMM restored from the directory");
}

#[test]
fn bad_requests_leave_the_vm_running() {
    if !kvm_available() {
        return;
    }
    let d = tmp();
    let mut parent = fork_parent(d.path(), 2);
    let mut api = parent.api();
    for bad in [
        "{\"cmd\":\"explode\"}",
        "not json",
        "{\"cmd\":\"snapshot\",\"kind\":\"diff\",\"dir\":\"/nonexistent-grove/x\"}",
        "{\"cmd\":\"snapshot\",\"kind\":\"sideways\",\"dir\":\"/tmp/x\"}",
        "{\"cmd\":\"save-working-set\"}",
    ] {
        let v = api.raw(bad);
        assert_eq!(v["ok"], json!(false), "{bad} must fail: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        assert!(v["error"]["code"].as_str().is_some_and(|c| !c.is_empty()), "{v}");
    }
    // diff without a base names the problem.
    let diff = json!({"cmd": "snapshot", "kind": "diff", "dir": d.path().join("x")}).to_string();
    let v = api.refused(&diff, "failed-precondition");
    assert!(v["error"]["message"].as_str().unwrap().contains("full snapshot first"), "{v}");
    // A snapshot into a directory that already holds one is refused.
    let s = d.path().join("s");
    api.snapshot("full", &s);
    api.refused(
        &json!({"cmd": "snapshot", "kind": "full", "dir": s}).to_string(),
        "already-exists",
    );
    assert_eq!(api.call(&json!({"cmd": "status"}))["state"], json!("running"));
    parent.wait_ts(50);
}

#[test]
fn forked_children_are_independent() {
    if !kvm_available() {
        return;
    }
    let d = tmp();
    let touch = 4;
    let mut parent = fork_parent(d.path(), touch);
    let mut api = parent.api();
    let fork_dir = d.path().join("fork");
    api.fork(&fork_dir);
    parent.wait_ts(20); // the parent runs on
    let mut children = Vec::new();
    for id in 1..=4u32 {
        let sock = d.path().join(format!("c{id}.sock"));
        let mode = if id % 2 == 0 { "uffd" } else { "mmap" };
        children.push((id, Vmm::restore(&fork_dir, mode, id, Some(&sock))));
    }
    for (id, c) in &mut children {
        let want = id_line(u64::from(*id), touch);
        c.wait_for(&want, |s| s.contains(&want));
        // Only its own write: no other child's ID line in its output.
        for other in 1..=4u32 {
            if other != *id {
                assert!(!c.stdout().contains(&format!("ID={other} ")), "child {id} saw {other}");
            }
        }
        c.wait_ts(20);
    }
    // Host side: each child's memory (a diff snapshot of it) holds its own first page;
    // the parent's still holds seed 0.
    for (id, c) in &children {
        let dir = d.path().join(format!("child{id}"));
        c.api().snapshot("diff", &dir);
        let w = first_words(&dir, REGION_START, 2);
        assert_eq!(w[0], pattern(REGION_START, u64::from(*id)), "child {id} first page");
        assert_eq!(w[1], pattern(REGION_START + PAGE, 0), "child {id} second page");
    }
    let pdir = d.path().join("parent-after");
    api.snapshot("diff", &pdir);
    assert_eq!(first_words(&pdir, REGION_START, 1)[0], pattern(REGION_START, 0));
    assert!(!parent.stdout().contains("ID="), "the parent never sees a child's identity");
}

#[test]
fn chain_of_depth_ten_restores() {
    if !kvm_available() {
        return;
    }
    let d = tmp();
    let touch = 2;
    let parent = fork_parent(d.path(), touch);
    let mut prev = d.path().join("g0");
    parent.api().fork(&prev);
    drop(parent);
    // Each generation restores the previous one with a new identity (which rewrites a
    // page), then takes a diff on top: the chain grows by one layer per generation.
    for g in 1..=10u32 {
        let sock = d.path().join(format!("g{g}.sock"));
        let mode = if g % 3 == 0 { "uffd" } else { "mmap" };
        let mut c = Vmm::restore(&prev, mode, g, Some(&sock));
        let want = id_line(u64::from(g), touch);
        c.wait_for(&want, |s| s.contains(&want));
        let next = d.path().join(format!("g{g}"));
        let st = c.api().snapshot("diff", &next);
        // The first fork wrote a pre-copied full layer and a diff: depth 2 at g0.
        assert_eq!(st["depth"], json!(g + 2), "{st}");
        prev = next;
    }
    let state = persist::read_state(&prev).unwrap();
    assert_eq!(state.layers.len(), 12);
    let generation = state.devices.iter().find_map(|d| match d {
        grove_vmm::devices::manager::DeviceState::GrovePorts(p) => Some(p.generation),
        _ => None,
    });
    assert_eq!(generation, Some(10), "one grove-ports entry with the generation");
    assert_eq!(first_words(&prev, REGION_START, 1)[0], pattern(REGION_START, 10));
    for (mode, id) in [("mmap", 77u32), ("uffd", 78)] {
        let sock = d.path().join(format!("final-{mode}.sock"));
        let mut c = Vmm::restore(&prev, mode, id, Some(&sock));
        let want = id_line(u64::from(id), touch);
        c.wait_for(&want, |s| s.contains(&want));
        assert_eq!(c.api().call(&json!({"cmd": "status"}))["generation"], json!(11));
    }
}

/// Tiny deterministic PRNG for the property test (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn dirty_tracking_matches_the_round_robin_model() {
    if !kvm_available() {
        return;
    }
    // The busy guest writes counter n into region page n % P. Every snapshot of the chain
    // (pre-copied fork, then diffs at random moments) must resolve to one instant of that
    // model: a page missed by the dirty log would keep an older counter and break it.
    let d = tmp();
    let touch = 2; // 512 pages: the round robin wraps many times between snapshots.
    let pages = touch * MIB / PAGE;
    let mut vm =
        Vmm::boot(&format!("tg.mode=busy tg.touch_mib={touch}"), 64, &d.path().join("b.sock"));
    vm.wait_for("READY", |s| s.contains("READY"));
    vm.wait_ts(10);
    let mut api = vm.api();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let first = d.path().join("s0");
    api.fork(&first);
    let w = first_words(&first, REGION_START, pages);
    assert_round_robin_consistent(&w, "pre-copied fork");
    let mut last = w;
    for i in 1..=12 {
        thread::sleep(Duration::from_micros(rng.next() % 30_000));
        // Two new Ts: at least one burst of writes ran since the last snapshot.
        vm.wait_ts(2);
        let dir = d.path().join(format!("s{i}"));
        let kind = if i % 4 == 0 { "full" } else { "diff" };
        if i % 5 == 0 {
            api.fork(&dir);
        } else {
            api.snapshot(kind, &dir);
        }
        let w = first_words(&dir, REGION_START, pages);
        assert_round_robin_consistent(&w, &format!("snapshot {i} ({kind})"));
        assert!(w.iter().max() > last.iter().max(), "snapshot {i}: the guest made progress");
        last = w;
    }
    vm.wait_ts(10);
}

#[test]
fn fork_while_the_guest_is_busy() {
    if !kvm_available() {
        return;
    }
    let d = tmp();
    let touch = 8;
    let pages = touch * MIB / PAGE;
    let mut parent =
        Vmm::boot(&format!("tg.mode=busy tg.touch_mib={touch}"), 64, &d.path().join("p.sock"));
    parent.wait_for("READY", |s| s.contains("READY"));
    parent.wait_ts(10);
    let mut api = parent.api();
    let f1 = d.path().join("f1");
    let r = api.fork(&f1);
    assert!(r["pages"].as_u64().unwrap() >= pages, "{r}");
    assert_round_robin_consistent(&first_words(&f1, REGION_START, pages), "first fork");
    parent.wait_ts(10);
    let f2 = d.path().join("f2");
    api.fork(&f2); // a diff fork on top of the first
    assert_round_robin_consistent(&first_words(&f2, REGION_START, pages), "second fork");
    parent.wait_ts(10);
    let mut kids: Vec<Vmm> = (1..=3u32)
        .map(|i| {
            let sock = d.path().join(format!("k{i}.sock"));
            Vmm::restore(&f2, if i == 2 { "uffd" } else { "mmap" }, i, Some(&sock))
        })
        .collect();
    for (i, k) in kids.iter_mut().enumerate() {
        k.wait_ts(50);
        // The child keeps writing from where the parent was: its own snapshot stays a
        // consistent round robin too.
        let dir = d.path().join(format!("k{i}-snap"));
        k.api().snapshot("diff", &dir);
        assert_round_robin_consistent(&first_words(&dir, REGION_START, pages), "child snapshot");
    }
    parent.wait_ts(10);
}

/// Copies a snapshot dir (state file only; layers stay where the state file says).
fn copy_state(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(from.join(persist::STATE_FILE), to.join(persist::STATE_FILE)).unwrap();
    to.to_path_buf()
}

fn restore_error(dir: &Path, mode: &str) -> String {
    let mut c = Vmm::restore(dir, mode, 1, None);
    let (ok, err) = c.wait_exit();
    assert!(!ok, "restore of {} must fail", dir.display());
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one-line error expected, got:\n{err}");
    assert!(lines[0].starts_with("grove-vmm: error: "), "{err}");
    lines[0].to_string()
}

#[test]
fn corrupt_truncated_and_mismatched_snapshots_fail_clearly() {
    if !kvm_available() {
        return;
    }
    let d = tmp();
    let parent = fork_parent(d.path(), 2);
    let snap = d.path().join("s");
    parent.api().snapshot("full", &snap);
    drop(parent);
    let state_bytes = std::fs::read(snap.join(persist::STATE_FILE)).unwrap();

    let c = copy_state(&snap, &d.path().join("flip"));
    let mut b = state_bytes.clone();
    let n = b.len();
    b[n / 2] ^= 0x01;
    std::fs::write(c.join(persist::STATE_FILE), &b).unwrap();
    assert!(restore_error(&c, "mmap").contains("checksum mismatch"));

    let c = copy_state(&snap, &d.path().join("trunc"));
    std::fs::write(c.join(persist::STATE_FILE), &state_bytes[..n - 100]).unwrap();
    assert!(restore_error(&c, "mmap").contains("truncated"));

    let c = copy_state(&snap, &d.path().join("magic"));
    std::fs::write(c.join(persist::STATE_FILE), b"hello world, not a state file at all....")
        .unwrap();
    assert!(restore_error(&c, "mmap").contains("bad magic"));

    let c = copy_state(&snap, &d.path().join("version"));
    let mut b = state_bytes.clone();
    b[8] = 99;
    std::fs::write(c.join(persist::STATE_FILE), &b).unwrap();
    assert!(restore_error(&c, "uffd").contains("version 99"));

    // Another CPUID set: a valid file whose fingerprint differs.
    let c = d.path().join("cpuid");
    std::fs::create_dir_all(&c).unwrap();
    let mut s = persist::read_state(&snap).unwrap();
    s.cpuid_fingerprint ^= 1;
    persist::write_state(&c, &s, false).unwrap();
    assert!(restore_error(&c, "mmap").contains("another CPU"));

    // A corrupted memory layer (header byte) and a truncated one.
    let layer = PathBuf::from(&persist::read_state(&snap).unwrap().layers[0]);
    let bytes = std::fs::read(&layer).unwrap();
    for (name, data) in [
        ("layer-flip", {
            let mut v = bytes.clone();
            v[20] ^= 0xff;
            v
        }),
        ("layer-trunc", bytes[..bytes.len() - 4096].to_vec()),
    ] {
        let c = d.path().join(name);
        std::fs::create_dir_all(&c).unwrap();
        let copy = c.join("0000.mlayer");
        std::fs::write(&copy, &data).unwrap();
        let mut s = persist::read_state(&snap).unwrap();
        s.layers = vec![copy.display().to_string()];
        persist::write_state(&c, &s, false).unwrap();
        let e = restore_error(&c, "mmap");
        assert!(e.contains("memory layer"), "{name}: {e}");
    }

    // No state file at all.
    let e = restore_error(&d.path().join("nothing-here"), "mmap");
    assert!(e.contains("vmstate"), "{e}");
}

#[test]
fn a_failed_page_server_fails_the_vm() {
    if !kvm_available() {
        return;
    }
    let d = tmp();
    // 256 MiB to serve (4096 faults of 16 pages) leaves a wide window for the cut below.
    let touch = 256;
    let mut p =
        Vmm::boot(&format!("tg.mode=busy tg.touch_mib={touch}"), 512, &d.path().join("p.sock"));
    p.wait_for("READY", |s| s.contains("READY"));
    let snap = d.path().join("s");
    p.api().snapshot("full", &snap);
    drop(p);
    // The child's chain is a copy of the layer, which is cut short once the child runs:
    // the page server cannot serve the pages past the cut.
    let c = d.path().join("c");
    std::fs::create_dir_all(&c).unwrap();
    let mut s = persist::read_state(&snap).unwrap();
    let copy = c.join("0000.mlayer");
    std::fs::copy(&s.layers[0], &copy).unwrap();
    s.layers = vec![copy.display().to_string()];
    persist::write_state(&c, &s, false).unwrap();
    let mut child = Vmm::restore(&c, "uffd", 1, None);
    child.wait_for("the first T", |s| s.contains('T'));
    let f = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
    f.set_len(64 * 1024).unwrap();
    let (ok, err) = child.wait_exit();
    assert!(!ok, "the VM must fail, not run on or hang\n{err}");
    assert!(err.contains("page server"), "the error names the page server: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn standby_vmm_restores_a_fork() {
    if !kvm_available() {
        return;
    }
    let d = tmp();
    let touch = 4;
    let mut parent = fork_parent(d.path(), touch);
    let f = d.path().join("f");
    parent.api().fork(&f);
    parent.wait_ts(10);
    let sock = d.path().join("standby.sock");
    let args =
        ["standby", "--api-sock", sock.to_str().unwrap(), "--mem-mib", "64"].map(String::from);
    let mut sb = Vmm::spawn(&args, Some(sock.clone()));
    let mut api = sb.api();
    assert_eq!(api.call(&json!({"cmd": "status"}))["state"], json!("standby"));
    // Refusals leave the standby VMM usable: wrong size, missing snapshot, other commands.
    let small = d.path().join("small.sock");
    let mut other = Vmm::boot("tg.mode=fork tg.touch_mib=1", 32, &small);
    other.wait_for("READY", |s| s.contains("READY"));
    let f32 = d.path().join("f32");
    other.api().fork(&f32);
    drop(other);
    let v = api.refused(&json!({"cmd": "restore", "snapshot": f32}).to_string(), "incompatible");
    assert!(v["error"]["message"].as_str().unwrap().contains("bytes of RAM"), "{v}");
    let none = json!({"cmd": "restore", "snapshot": d.path().join("none")}).to_string();
    api.refused(&none, "not-found");
    api.refused(r#"{"cmd":"pause"}"#, "failed-precondition");
    // The real one.
    let v = api.call(&json!({"cmd": "restore", "snapshot": f, "identity": 9}));
    assert!(v["restore_ms"].as_f64().is_some(), "{v}");
    let want = id_line(9, touch);
    sb.wait_for(&want, |s| s.contains(&want));
    sb.wait_ts(20);
    // Now it is an ordinary VM on the same socket.
    let st = api.call(&json!({"cmd": "status"}));
    assert_eq!(st["generation"], json!(1), "{st}");
    api.refused(&json!({"cmd": "restore", "snapshot": f}).to_string(), "failed-precondition");
    let snap = d.path().join("child-diff");
    api.snapshot("diff", &snap);
    assert_eq!(first_words(&snap, REGION_START, 1)[0], pattern(REGION_START, 9));
}

#[test]
fn uffd_restore_records_then_prefetches_a_working_set() {
    if !kvm_available() {
        return;
    }
    let d = tmp();
    let touch = 4;
    let parent = fork_parent(d.path(), touch);
    let snap = d.path().join("s");
    parent.api().snapshot("full", &snap);
    drop(parent);
    let head = PathBuf::from(persist::read_state(&snap).unwrap().layers.pop().unwrap());
    let ws = PathBuf::from(format!("{}.ws", head.display()));
    assert!(!ws.exists());
    let mut first = Vmm::restore(&snap, "uffd", 3, None);
    let want = id_line(3, touch);
    first.wait_for(&want, |s| s.contains(&want));
    // Saved by the VMM shortly after the restore (no request needed).
    let t = Instant::now();
    while !ws.exists() {
        assert!(t.elapsed() < DEADLINE, "no working set at {}\n{}", ws.display(), first.dump());
        thread::sleep(Duration::from_millis(10));
    }
    let saved = grove_memory::WorkingSet::load(&ws).expect("a valid working set");
    assert!(!saved.pages.is_empty(), "the guest touched pages after the restore");
    drop(first);
    // The next restore prefetches it and runs the same.
    let mut second = Vmm::restore(&snap, "uffd", 4, Some(&d.path().join("2.sock")));
    let want = id_line(4, touch);
    second.wait_for(&want, |s| s.contains(&want));
    second.wait_ts(20);
    // An explicit save works too.
    let v = second.api().call(&json!({"cmd": "save-working-set"}));
    assert_eq!(v, json!(ws.display().to_string()), "{v}");
}
