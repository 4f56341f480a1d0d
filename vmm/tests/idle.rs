//! The idle port (0x44c) with the real test guest on /dev/kvm: a ready-mode guest that
//! sleeps through it keeps printing `T`s and costs much less host CPU than one that spins
//! (a CPU-use comparison within one run, not a timing assertion); a guest sleeping in the
//! port still pauses, snapshots and forks, and its children run.
//!
//! Prints `skipped: ...` and returns where /dev/kvm is missing. Every VMM is killed by PID
//! from a drop guard.

#![allow(clippy::tests_outside_test_module)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const VMM: &str = env!("CARGO_BIN_EXE_grove-vmm");
/// Hang guard only; nothing asserts on how long things take.
const DEADLINE: Duration = Duration::from_secs(120);
const PATTERN_MUL: u64 = 0x9E37_79B9_7F4A_7C15;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x100_0000_01b3;
const MIB: u64 = 1 << 20;
const REGION_START: u64 = 16 * MIB;
const PAGE: u64 = 4096;

/// The tests here run one at a time: the CPU comparison must not share the cores with the
/// other test's guests.
static SERIAL: Mutex<()> = Mutex::new(());

fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !ok {
        println!("skipped: /dev/kvm not available");
    }
    ok
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("vmm/ has a parent").to_path_buf()
}

/// The test guest: `GROVE_TESTGUEST`, else built by scripts/build-testguest.sh.
fn guest() -> String {
    static GUEST: OnceLock<String> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("GROVE_TESTGUEST").filter(|p| !p.is_empty()) {
                return p.to_string_lossy().into_owned();
            }
            let out = Command::new(repo_root().join("scripts/build-testguest.sh"))
                .stderr(Stdio::inherit())
                .output()
                .expect("run scripts/build-testguest.sh");
            assert!(out.status.success(), "build-testguest.sh failed");
            let s = String::from_utf8(out.stdout).expect("utf-8");
            s.lines().last().expect("a path").trim().to_string()
        })
        .clone()
}

/// A running grove-vmm whose output is collected as it arrives; killed by PID on drop.
struct Vmm {
    child: Child,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    sock: PathBuf,
}

fn collect(mut r: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut s = into.lock().unwrap();
            s.push_str(&String::from_utf8_lossy(&buf[..n]));
            // Keep memory bounded: the T stream is endless. Keep the start (READY, the
            // verbose line) and the recent tail.
            if s.len() > 4 << 20 {
                let head = s.find("READY").map_or(0, |i| i + 6);
                let cut = s.len() - (1 << 20);
                if cut > head {
                    s.replace_range(head..cut, "");
                }
            }
        }
    });
}

impl Vmm {
    fn spawn(args: &[&str], sock: &Path) -> Self {
        let mut child = Command::new(VMM)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn grove-vmm");
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        collect(child.stdout.take().unwrap(), out.clone());
        collect(child.stderr.take().unwrap(), err.clone());
        Self { child, out, err, sock: sock.to_path_buf() }
    }

    fn boot(cmdline: &str, sock: &Path) -> Self {
        let g = guest();
        let s = sock.to_str().unwrap();
        let args =
            ["run", "--kernel", &g, "--cmdline", cmdline, "--mem-mib", "64", "--api-sock", s];
        Self::spawn(&args, sock)
    }

    fn restore(dir: &Path, mode: &str, identity: u32, sock: &Path) -> Self {
        let (d, id, s) = (dir.to_str().unwrap(), identity.to_string(), sock.to_str().unwrap());
        let args =
            ["restore", "--snapshot", d, "--mem-mode", mode, "--identity", &id, "--api-sock", s];
        Self::spawn(&args, sock)
    }

    fn stdout(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn dump(&self) -> String {
        let o = self.stdout();
        let tail: String =
            o.chars().rev().take(600).collect::<Vec<_>>().into_iter().rev().collect();
        format!("--- stdout tail ---\n{tail}\n--- stderr ---\n{}", self.err.lock().unwrap())
    }

    /// Waits until `pred(stdout)` holds; panics (with the output) at the deadline or if the
    /// VMM exits first.
    fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) {
        let t = Instant::now();
        loop {
            if pred(&self.stdout()) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                thread::sleep(Duration::from_millis(50));
                if pred(&self.stdout()) {
                    return;
                }
                panic!("grove-vmm exited ({st}) before {what}\n{}", self.dump());
            }
            assert!(t.elapsed() < DEADLINE, "timed out waiting for {what}\n{}", self.dump());
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits for `n` more `T`s after the current output.
    fn wait_ts(&mut self, n: usize) {
        let base = self.stdout().len();
        self.wait_for(&format!("{n} more Ts"), |s| {
            s.get(base..).is_some_and(|t| t.matches('T').count() >= n)
        });
    }

    fn api(&self) -> Api {
        Api::connect(&self.sock)
    }

    /// The process's user + system CPU time so far (`/proc/PID/stat` fields 14 and 15).
    fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("read /proc/PID/stat");
        // The command name (field 2) is in parentheses and may hold spaces: split after it.
        let rest = &stat[stat.rfind(')').expect("comm field") + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // rest starts at field 3 (state): utime is field 14 -> index 11, stime index 12.
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
        Duration::from_secs_f64(ticks as f64 / hz as f64)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A control-socket client (replies bounded by a read timeout, so a stuck pause fails).
struct Api {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Api {
    fn connect(path: &Path) -> Self {
        let t = Instant::now();
        loop {
            if let Ok(s) = UnixStream::connect(path) {
                s.set_read_timeout(Some(DEADLINE)).unwrap();
                let r = BufReader::new(s.try_clone().unwrap());
                return Self { w: s, r };
            }
            assert!(t.elapsed() < DEADLINE, "no control socket at {}", path.display());
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn call(&mut self, req: &Value) -> Value {
        self.w.write_all(req.to_string().as_bytes()).unwrap();
        self.w.write_all(b"\n").unwrap();
        let mut reply = String::new();
        self.r.read_line(&mut reply).unwrap_or_else(|e| panic!("no reply to {req}: {e}"));
        let v: Value =
            serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad reply {reply:?}: {e}"));
        assert_eq!(v["ok"], json!(true), "request {req} failed: {v}");
        v
    }
}

/// The guest's fork-mode checksum: `touch_mib` from 16 MiB, first page re-seeded with the
/// identity.
fn fork_checksum(touch_mib: u64, identity: u64) -> u64 {
    let mut h = FNV_OFFSET;
    let mut a = REGION_START;
    while a < REGION_START + touch_mib * MIB {
        let seed = if a < REGION_START + PAGE { identity } else { 0 };
        h = (h ^ (a.wrapping_mul(PATTERN_MUL) ^ seed)).wrapping_mul(FNV_PRIME);
        a += 8;
    }
    h
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("grove-idle-").tempdir().expect("tempdir")
}

/// Boots a ready-mode guest with `tg.idle=<idle>`, waits until it streams, and returns
/// (CPU seconds the VMM used over ~1 s, `T`s printed meanwhile).
fn ready_guest_cpu(idle: &str, dir: &Path) -> (f64, usize) {
    let sock = dir.join(format!("{idle}.sock"));
    let mut vm = Vmm::boot(
        &format!("tg.mode=ready tg.touch_mib=4 tg.verbose=1 tg.idle={idle} tg.idle_us=1000"),
        &sock,
    );
    vm.wait_for("READY", |s| s.contains("READY"));
    let want = format!("idle={idle}");
    assert!(vm.stdout().contains(&want), "verbose line lacks {want}\n{}", vm.dump());
    vm.wait_ts(50);
    let (c0, t0, n0) = (vm.cpu_time(), Instant::now(), vm.stdout().matches('T').count());
    thread::sleep(Duration::from_secs(1));
    let (c1, t1, n1) = (vm.cpu_time(), Instant::now(), vm.stdout().matches('T').count());
    let cpu = (c1 - c0).as_secs_f64() / (t1 - t0).as_secs_f64();
    // The stream goes on after the measurement (the guest did not stop in the port).
    vm.wait_ts(100);
    (cpu, n1.saturating_sub(n0))
}

#[test]
fn idle_port_guest_streams_and_uses_less_cpu_than_a_spinning_one() {
    if !kvm_available() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let d = tmp();
    let (spin, spin_ts) = ready_guest_cpu("spin", d.path());
    let (port, port_ts) = ready_guest_cpu("port", d.path());
    println!(
        "VMM CPU use over ~1 s: spin {:.0} % of a core ({spin_ts} T), port {:.0} % ({port_ts} T)",
        spin * 100.0,
        port * 100.0
    );
    assert!(port_ts > 0, "the port-idling guest printed no T while measured");
    if spin < 0.3 {
        println!("skipped: host too loaded to compare CPU use (spin guest got {spin:.2} core)");
        return;
    }
    assert!(port < spin / 2.0, "idling through the port used {port:.2} core vs spin {spin:.2}");
}

#[test]
fn a_guest_sleeping_in_the_port_pauses_forks_and_its_children_run() {
    if !kvm_available() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let d = tmp();
    let touch = 4;
    // Default tg.idle=auto: the guest finds the port's magic and sleeps through it.
    let mut parent =
        Vmm::boot(&format!("tg.mode=fork tg.touch_mib={touch} tg.verbose=1"), &d.path().join("p"));
    parent.wait_for("READY", |s| s.contains("READY"));
    assert!(parent.stdout().contains("idle=port"), "auto did not pick the port\n{}", parent.dump());
    parent.wait_ts(20);
    let mut api = parent.api();
    for _ in 0..20 {
        assert_eq!(api.call(&json!({"cmd": "pause"}))["state"], json!("paused"));
        assert_eq!(api.call(&json!({"cmd": "status"}))["state"], json!("paused"));
        assert_eq!(api.call(&json!({"cmd": "resume"}))["state"], json!("running"));
        // Let it go back to sleeping in the port.
        thread::sleep(Duration::from_millis(3));
    }
    parent.wait_ts(20);
    let mut forks = Vec::new();
    for i in 0..3 {
        let dir = d.path().join(format!("fork{i}"));
        let v = api.call(&json!({"cmd": "fork", "dir": dir}));
        let pause = v["snapshot"]["pause_ms"].as_f64().expect("pause_ms");
        println!("fork {i}: pause {pause:.2} ms, total {} ms", v["snapshot"]["total_ms"]);
        parent.wait_ts(20);
        forks.push(dir);
    }
    assert!(!parent.stdout().contains("ID="), "the parent never sees a child's identity");
    let mut children = Vec::new();
    for (id, mode) in [(1u32, "mmap"), (2, "uffd")] {
        let sock = d.path().join(format!("c{id}"));
        children.push((id, Vmm::restore(forks.last().unwrap(), mode, id, &sock)));
    }
    for (id, c) in &mut children {
        let want = format!("ID={id} CHECKSUM={:#018x}", fork_checksum(touch, u64::from(*id)));
        c.wait_for(&want, |s| s.contains(&want));
        c.wait_ts(50);
        // The child idles through the port too, and pauses like its parent.
        let mut capi = c.api();
        assert_eq!(capi.call(&json!({"cmd": "pause"}))["state"], json!("paused"));
        assert_eq!(capi.call(&json!({"cmd": "resume"}))["state"], json!("running"));
        c.wait_ts(20);
    }
}
