//! Helpers shared by the KVM integration tests (boot.rs, snapshot.rs, idle.rs): the
//! test guest's contract constants, the /dev/kvm check, the guest path, a `grove-vmm`
//! process guard that collects its output, and a control-socket client.
//!
//! A module (`tests/common/mod.rs`), not a file at `tests/`, so cargo does not build it as
//! a test crate of its own.

// Each test crate uses only a subset of these helpers.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const VMM: &str = env!("CARGO_BIN_EXE_grove-vmm");
/// Hang guard (not a timing assertion).
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The contract's pattern and checksum (vmm/testguest/README.md).
pub const PATTERN_MUL: u64 = 0x9E37_79B9_7F4A_7C15;
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub const FNV_PRIME: u64 = 0x100_0000_01b3;
pub const MIB: u64 = 1 << 20;
pub const REGION_START: u64 = 16 * MIB;
pub const PAGE: u64 = 4096;

#[path = "../../../testsupport/skip.rs"]
pub mod skip;

/// Whether /dev/kvm opens read-write as a character device. If not, the test fails unless
/// GROVE_ALLOW_SKIP allows `kvm` (then false: the caller returns).
pub fn kvm_available() -> bool {
    use std::os::unix::fs::FileTypeExt;
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .and_then(|f| f.metadata())
        .is_ok_and(|m| m.file_type().is_char_device());
    if !ok {
        skip::missing("kvm", "/dev/kvm not available");
    }
    ok
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("vmm/ has a parent").to_path_buf()
}

/// The test guest ELF: `GROVE_TESTGUEST`, else built by scripts/build-testguest.sh.
pub fn guest() -> &'static str {
    static GUEST: OnceLock<String> = OnceLock::new();
    GUEST.get_or_init(|| {
        if let Some(p) = std::env::var_os("GROVE_TESTGUEST").filter(|p| !p.is_empty()) {
            return p.into_string().expect("utf-8 guest path");
        }
        let out = Command::new(repo_root().join("scripts/build-testguest.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/build-testguest.sh");
        assert!(out.status.success(), "scripts/build-testguest.sh failed: {}", out.status);
        let stdout = String::from_utf8(out.stdout).expect("utf-8 path");
        let last = stdout.lines().last().expect("build-testguest.sh printed a path").trim();
        let path = Path::new(last);
        assert!(path.is_absolute() && path.is_file(), "not a built guest: {last}");
        last.to_string()
    })
}

/// Starts `grove-vmm <args>` with stdin closed and stdout/stderr piped.
pub fn spawn_vmm<S: AsRef<OsStr>>(args: &[S]) -> Child {
    Command::new(VMM)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn grove-vmm")
}

/// A running grove-vmm whose stdout/stderr are collected as they arrive; killed by PID on drop.
pub struct Vmm {
    child: Child,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    sock: Option<PathBuf>,
    /// The stdout and stderr reader threads (joined once the process has exited, so that
    /// everything it wrote is collected).
    readers: Vec<thread::JoinHandle<()>>,
}

pub fn collect(
    mut r: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
) -> thread::JoinHandle<()> {
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
    })
}

impl Vmm {
    pub fn spawn(args: &[String], sock: Option<PathBuf>) -> Self {
        Self::spawn_with_stderr(args, sock, Stdio::piped())
    }

    /// Like [`Vmm::spawn`], with stderr sent to `stderr` (a file, a closed pipe) instead of
    /// being collected when it is not `Stdio::piped()`.
    pub fn spawn_with_stderr(args: &[String], sock: Option<PathBuf>, stderr: Stdio) -> Self {
        Self::spawn_env(args, sock, stderr, &[])
    }

    /// Like [`Vmm::spawn_with_stderr`], with extra environment variables.
    pub fn spawn_env(
        args: &[String],
        sock: Option<PathBuf>,
        stderr: Stdio,
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn_program(VMM, args, sock, stderr, env)
    }

    /// Like [`Vmm::spawn_env`], with another program in front (`grove-jailer ... -- grove-vmm
    /// ...`); the process guarded is that program's.
    pub fn spawn_program(
        program: &str,
        args: &[String],
        sock: Option<PathBuf>,
        stderr: Stdio,
        env: &[(&str, &str)],
    ) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn grove-vmm");
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        let mut readers = vec![collect(child.stdout.take().unwrap(), out.clone())];
        if let Some(e) = child.stderr.take() {
            readers.push(collect(e, err.clone()));
        }
        Self { child, out, err, sock, readers }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status once the process has ended (waits up to [`DEADLINE`]).
    pub fn wait_status(&mut self) -> std::process::ExitStatus {
        let _ = self.wait_exit();
        self.child.try_wait().ok().flatten().expect("exited")
    }

    pub fn boot(cmdline: &str, mem_mib: u64, sock: &Path) -> Self {
        let args = [
            "run",
            "--kernel",
            guest(),
            "--cmdline",
            cmdline,
            "--mem-mib",
            &mem_mib.to_string(),
            "--api-sock",
            sock.to_str().unwrap(),
        ]
        .map(String::from);
        Self::spawn(&args, Some(sock.to_path_buf()))
    }

    pub fn restore(dir: &Path, mode: &str, identity: u32, sock: Option<&Path>) -> Self {
        let mut args: Vec<String> = [
            "restore",
            "--snapshot",
            dir.to_str().unwrap(),
            "--mem-mode",
            mode,
            "--identity",
            &identity.to_string(),
        ]
        .map(String::from)
        .to_vec();
        if let Some(s) = sock {
            args.push("--api-sock".into());
            args.push(s.to_str().unwrap().into());
        }
        Self::spawn(&args, sock.map(Path::to_path_buf))
    }

    pub fn stdout(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    pub fn dump(&self) -> String {
        let o = self.stdout();
        let tail: String =
            o.chars().rev().take(600).collect::<Vec<_>>().into_iter().rev().collect();
        format!("--- stdout tail ---\n{tail}\n--- stderr ---\n{}", self.stderr())
    }

    /// Waits until `pred(stdout)` holds; panics (with the output) at the deadline or if the
    /// VMM exits first.
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) {
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
    pub fn wait_ts(&mut self, n: usize) {
        let base = self.stdout().len();
        self.wait_for(&format!("{n} more Ts"), |s| {
            s.get(base..).is_some_and(|t| t.matches('T').count() >= n)
        });
    }

    /// Waits for the exit; returns (success, stderr).
    pub fn wait_exit(&mut self) -> (bool, String) {
        let t = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                // The pipes reach EOF once the process is gone: everything is collected.
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return (st.success(), self.stderr());
            }
            assert!(t.elapsed() < DEADLINE, "grove-vmm did not exit\n{}", self.dump());
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn api(&self) -> Api {
        Api::connect(self.sock.as_deref().expect("started with --api-sock"))
    }

    /// The process's user + system CPU time so far (`/proc/PID/stat` fields 14 and 15).
    pub fn cpu_time(&self) -> Duration {
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

/// A control-socket client (replies bounded by a read timeout, so a stuck request fails).
pub struct Api {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Api {
    pub fn connect(path: &Path) -> Self {
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

    /// Sends one request line; returns the reply, whether it is ok or not.
    pub fn raw(&mut self, line: &str) -> Value {
        self.w.write_all(line.as_bytes()).unwrap();
        self.w.write_all(b"\n").unwrap();
        let mut reply = String::new();
        self.r.read_line(&mut reply).unwrap_or_else(|e| panic!("no reply to {line}: {e}"));
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad reply {reply:?}: {e}"))
    }

    /// Sends `req`, asserts the reply is ok and returns what it carries (the value under
    /// `reply.<kind>`: the status object, the state, the snapshot report, ...).
    pub fn call(&mut self, req: &Value) -> Value {
        let v = self.raw(&req.to_string());
        assert_eq!(v["ok"], json!(true), "request {req} failed: {v}");
        let reply = v["reply"].as_object().unwrap_or_else(|| panic!("no reply object: {v}"));
        assert_eq!(reply.len(), 1, "a reply carries one kind: {v}");
        reply.values().next().cloned().unwrap()
    }

    /// Sends one request line and asserts it is refused with `code`.
    pub fn refused(&mut self, line: &str, code: &str) -> Value {
        let v = self.raw(line);
        assert_eq!(v["ok"], json!(false), "{line} must be refused: {v}");
        assert_eq!(v["error"]["code"], json!(code), "{line}: {v}");
        v
    }

    pub fn snapshot(&mut self, kind: &str, dir: &Path) -> Value {
        self.call(&json!({"cmd": "snapshot", "kind": kind, "dir": dir}))
    }

    pub fn fork(&mut self, dir: &Path) -> Value {
        self.call(&json!({"cmd": "fork", "dir": dir}))
    }
}

pub fn pattern(a: u64, seed: u64) -> u64 {
    a.wrapping_mul(PATTERN_MUL) ^ seed
}

/// The guest's fork-mode checksum: `touch_mib` from 16 MiB (small guests: no MMIO gap),
/// first page re-seeded with the identity.
pub fn fork_checksum(touch_mib: u64, identity: u64) -> u64 {
    let mut h = FNV_OFFSET;
    let mut a = REGION_START;
    while a < REGION_START + touch_mib * MIB {
        let s = if a < REGION_START + PAGE { identity } else { 0 };
        h = (h ^ pattern(a, s)).wrapping_mul(FNV_PRIME);
        a += 8;
    }
    h
}

/// The guest's `ID=.. CHECKSUM=..` line for a fork child.
pub fn id_line(identity: u64, touch_mib: u64) -> String {
    format!("ID={identity} CHECKSUM={:#018x}", fork_checksum(touch_mib, identity))
}

/// A temporary directory named after the test crate (`grove-snapshot-..`, `grove-idle-..`).
pub fn tmp() -> tempfile::TempDir {
    let prefix = format!("grove-{}-", env!("CARGO_CRATE_NAME"));
    tempfile::Builder::new().prefix(&prefix).tempdir().expect("tempdir")
}
