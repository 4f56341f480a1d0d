//! Driving the real `grove-vmm` for the VMM-level benchmarks: processes whose output is
//! timestamped by reader threads as it arrives, the JSON-lines control socket, the VMM's
//! `timing:` marks, `/proc` readings (smaps_rollup, loadavg, MemAvailable) and the
//! conditions every report prints. Every process is killed by PID when its guard drops;
//! temporary directories are removed by [`TempDir`].

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::boot::{cpu_model, guest_path, kvm_kind, parse_kib, read_trim, vmm_path};

/// Hang guard for any single wait (not a timing assertion).
pub const DEADLINE: Duration = Duration::from_secs(60);
/// Bytes of the start of stdout kept for error messages and `READY` detection.
const KEEP: usize = 4096;

/// What a VMM's stdout showed so far.
#[derive(Default)]
struct Output {
    text: String,
    first_t: Option<Instant>,
    ts: usize,
    eof: bool,
    /// SIGSTOP the VMM when its first `T` arrives (see [`Vmm::stop_at_first_t`]).
    stop_at_first_t: bool,
    /// The VMM's PID (a jailed one's is known once the jailer wrote it).
    pid: u32,
}

struct Shared {
    out: Mutex<Output>,
    cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running grove-vmm; killed by PID (and reaped) on drop.
pub struct Vmm {
    child: Child,
    /// The VMM's PID (in a jail: read from the jailer's pid file; the jailer is `child`).
    pub pid: u32,
    out: Arc<Shared>,
    err: Arc<Mutex<Vec<String>>>,
    pub sock: Option<PathBuf>,
    /// Started through grove-jailer: its pid file.
    jail_pid_file: Option<PathBuf>,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(pid_file) = self.jail_pid_file.take() {
            // SIGTERM to the jailer: it SIGKILLs its VMM (PID 1 of the jail's namespace) and
            // removes the jail's root and cgroup; SIGKILL if that takes over 5 s.
            signal(self.child.id(), libc::SIGTERM);
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    let _ = std::fs::remove_file(pid_file);
                    return;
                }
                thread::sleep(Duration::from_millis(2));
            }
            let _ = std::fs::remove_file(pid_file);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The uid and gid jailed VMMs run as.
pub const JAIL_UID: u32 = 65534;

/// VMMs started through `grove-jailer` (root): uid and gid [`JAIL_UID`], a cgroup with a
/// memory limit of the guest's size + 1 GiB, `rw` and `ro` bound at their own paths.
#[derive(Clone, Debug)]
pub struct Jail {
    pub jailer: PathBuf,
    pub rw: Vec<PathBuf>,
    pub ro: Vec<PathBuf>,
    pub mem_mib: u64,
}

impl Jail {
    /// `grove-jailer` beside the VMM binary; root only.
    pub fn beside(vmm: &Path, mem_mib: u64) -> Result<Self, String> {
        let jailer = vmm.with_file_name("grove-jailer");
        if !jailer.is_file() {
            return Err(format!("--jail: no {} (cargo build --release)", jailer.display()));
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("--jail needs root (namespaces, mounts, cgroups)".into());
        }
        Ok(Self { jailer, rw: Vec::new(), ro: Vec::new(), mem_mib })
    }

    /// This jail with `rw` and `ro` added.
    pub fn with(&self, rw: &[&Path], ro: &[&Path]) -> Self {
        let mut j = self.clone();
        j.rw.extend(rw.iter().map(|p| p.to_path_buf()));
        j.ro.extend(ro.iter().map(|p| p.to_path_buf()));
        j
    }

    /// `grove-jailer … -- VMM ARGS` for jail `id`, the VMM's PID to `pid_file`.
    pub fn command(&self, vmm: &Path, args: &[&str], pid_file: &Path, id: &str) -> Command {
        let mut cmd = Command::new(&self.jailer);
        let uid = JAIL_UID.to_string();
        cmd.args(["--id", id, "--uid", &uid, "--gid", &uid, "--memory-bytes"])
            .arg(((self.mem_mib + 1024) << 20).to_string())
            .arg("--pid-file")
            .arg(pid_file);
        for p in &self.rw {
            cmd.arg("--bind").arg(p);
        }
        for p in &self.ro {
            cmd.arg("--bind-ro").arg(p);
        }
        cmd.arg("--").arg(vmm).args(args);
        cmd
    }
}

/// Makes `dir` (and gives it to [`JAIL_UID`]) for a jailed VMM to write in.
pub fn jail_writable_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    std::os::unix::fs::chown(dir, Some(JAIL_UID), Some(JAIL_UID))
        .map_err(|e| format!("chown {}: {e}", dir.display()))
}

/// Counts the `T`s the guest prints after a restore (every stdout byte of a restored
/// ready-mode guest is a `T`) or after `READY` of a fresh one.
fn count_ts(chunk: &str) -> usize {
    chunk.bytes().filter(|&b| b == b'T').count()
}

impl Vmm {
    /// Spawns `vmm args…` with `GROVE_VMM_TIMING=1`. The stdout reader stops (closing the
    /// pipe; the VMM then drops guest output) once `read_ts` `T`s were seen, so that many
    /// spinning guests do not keep this process busy reading.
    pub fn spawn(
        vmm: &Path,
        args: &[&str],
        sock: Option<PathBuf>,
        read_ts: usize,
    ) -> Result<Self, String> {
        Self::spawn_in(vmm, args, sock, read_ts, None)
    }

    /// [`Self::spawn`], through grove-jailer when `jail` is given (the returned `pid` is then
    /// the VMM's, from the jailer's pid file; the output timestamps are the reader threads',
    /// so waiting for that file here does not move them).
    pub fn spawn_in(
        vmm: &Path,
        args: &[&str],
        sock: Option<PathBuf>,
        read_ts: usize,
        jail: Option<&Jail>,
    ) -> Result<Self, String> {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let mut jail_pid_file = None;
        let mut cmd = match jail {
            None => Command::new(vmm),
            Some(j) => {
                let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let id = format!("bench-{}-{n}", std::process::id());
                let pid_file = std::env::temp_dir().join(format!("grove-{id}.pid"));
                let _ = std::fs::remove_file(&pid_file);
                let cmd = j.command(vmm, args, &pid_file, &id);
                jail_pid_file = Some(pid_file);
                cmd
            }
        };
        if jail.is_none() {
            cmd.args(args);
        }
        let mut child = cmd
            .env("GROVE_VMM_TIMING", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", vmm.display()))?;
        let pid = child.id();
        let out = Arc::new(Shared {
            out: Mutex::new(Output { pid, ..Output::default() }),
            cv: Condvar::new(),
        });
        let err = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let o = out.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = stdout.read(&mut buf).unwrap_or(0);
                let at = Instant::now();
                let mut g = lock(&o.out);
                if n == 0 {
                    g.eof = true;
                    o.cv.notify_all();
                    return;
                }
                let chunk = String::from_utf8_lossy(&buf[..n]);
                let ready_seen = g.text.contains("READY");
                if g.text.len() < KEEP {
                    g.text.push_str(&chunk);
                }
                // Ts count once the guest is past READY (a restored guest never prints it).
                let ts = if ready_seen || !g.text.contains("READY") {
                    count_ts(&chunk)
                } else {
                    g.text.rsplit_once("READY").map_or(0, |(_, after)| count_ts(after))
                };
                if ts > 0 && g.first_t.is_none() {
                    g.first_t = Some(at);
                    if g.stop_at_first_t {
                        signal(g.pid, libc::SIGSTOP);
                    }
                }
                g.ts += ts;
                let done = g.ts >= read_ts;
                g.eof = done;
                o.cv.notify_all();
                if done {
                    return; // drops the pipe
                }
            }
        });
        let e = err.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                lock(&e).push(line);
            }
        });
        let mut v = Self { child, pid, out, err, sock, jail_pid_file };
        if let Some(f) = v.jail_pid_file.clone() {
            v.pid = v.read_pid_file(&f)?;
            lock(&v.out.out).pid = v.pid;
        }
        Ok(v)
    }

    /// The VMM's host PID from a jailer's pid file, once written.
    fn read_pid_file(&mut self, f: &Path) -> Result<u32, String> {
        let t = Instant::now();
        loop {
            if let Some(p) =
                std::fs::read_to_string(f).ok().and_then(|s| s.trim().parse::<u32>().ok())
            {
                return Ok(p);
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("grove-jailer exited ({st}): {}", self.stderr().join(" | ")));
            }
            if t.elapsed() > DEADLINE {
                return Err(format!("no pid in {} from grove-jailer", f.display()));
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until `pred` holds on (stdout text, T count); error with the output at the
    /// deadline or when stdout ends first.
    fn wait(&mut self, what: &str, pred: impl Fn(&str, usize) -> bool) -> Result<(), String> {
        let t = Instant::now();
        let mut g = lock(&self.out.out);
        loop {
            if pred(&g.text, g.ts) {
                return Ok(());
            }
            if g.eof || t.elapsed() > DEADLINE {
                let text: String = g.text.chars().take(300).collect();
                drop(g);
                let why = if t.elapsed() > DEADLINE { "timed out" } else { "stdout ended" };
                return Err(format!(
                    "{why} waiting for {what}; stdout {text:?}; stderr: {}",
                    self.stderr().join(" | ")
                ));
            }
            g = self
                .out
                .cv
                .wait_timeout(g, Duration::from_millis(20))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Waits for `READY` and `n` `T`s after it.
    pub fn wait_ready(&mut self, n: usize) -> Result<(), String> {
        self.wait("READY and Ts", |s, ts| s.contains("READY") && ts >= n)
    }

    /// Waits for the first `T`; returns when the reader saw it arrive.
    pub fn wait_first_t(&mut self) -> Result<Instant, String> {
        self.wait("the first T", |_, ts| ts >= 1)?;
        lock(&self.out.out).first_t.ok_or_else(|| "no T time".into())
    }

    /// Stops the VMM (SIGSTOP) as soon as its guest printed its first `T` (at once if it
    /// already did): stands in for a guest that goes idle after starting, which the
    /// spinning test guest cannot do. It stays stopped until [`Self::cont`] or the kill.
    pub fn stop_at_first_t(&self) {
        let mut g = lock(&self.out.out);
        g.stop_at_first_t = true;
        if g.first_t.is_some() {
            signal(self.pid, libc::SIGSTOP);
        }
    }

    /// SIGSTOP now.
    pub fn stop(&self) {
        signal(self.pid, libc::SIGSTOP);
    }

    /// SIGCONT.
    pub fn cont(&self) {
        signal(self.pid, libc::SIGCONT);
    }

    /// The stderr lines so far.
    pub fn stderr(&self) -> Vec<String> {
        lock(&self.err).clone()
    }

    /// Waits (briefly) for the stderr line starting `timing: <what>` and returns its ms.
    pub fn timing_mark(&self, what: &str) -> Option<f64> {
        let t = Instant::now();
        loop {
            let found =
                self.stderr().iter().filter_map(|l| parse_timing(l)).find(|(w, _)| w == what);
            if let Some((_, v)) = found {
                return Some(v);
            }
            if t.elapsed() > Duration::from_millis(500) {
                return None;
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Connects to the control socket (retrying while the VMM starts).
    pub fn api(&mut self) -> Result<Api, String> {
        let sock = self.sock.clone().ok_or("started without --api-sock")?;
        let t = Instant::now();
        loop {
            match UnixStream::connect(&sock) {
                Ok(s) => return Api::new(s),
                Err(e) => {
                    if let Ok(Some(st)) = self.child.try_wait() {
                        return Err(format!(
                            "grove-vmm exited ({st}): {}",
                            self.stderr().join(" | ")
                        ));
                    }
                    if t.elapsed() > DEADLINE {
                        return Err(format!("connect {}: {e}", sock.display()));
                    }
                    thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
}

/// Sends `sig` to a VMM this process started (by its PID, while its `Child` is unreaped;
/// a jailed VMM is the child of its jailer, our unreaped child, which reaps it only as it
/// exits itself).
fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(p) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory effects; `p` is the PID of our own unreaped child
        // (the guard reaps it only after killing it), or of a jailed VMM whose jailer is
        // that child and reaps it only on its way out, so it cannot name another process.
        unsafe { libc::kill(p, sig) };
    }
}

/// One control-socket connection (JSON lines).
pub struct Api {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Api {
    fn new(s: UnixStream) -> Result<Self, String> {
        s.set_read_timeout(Some(DEADLINE)).map_err(|e| e.to_string())?;
        let r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        Ok(Self { w: s, r })
    }

    /// Sends one request without waiting for the reply.
    pub fn send(&mut self, req: &Value) -> Result<(), String> {
        let mut line = req.to_string();
        line.push('\n');
        self.w.write_all(line.as_bytes()).map_err(|e| format!("send {req}: {e}"))
    }

    /// Reads one reply; an `ok: false` reply is an error.
    pub fn recv(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        self.r.read_line(&mut line).map_err(|e| format!("read reply: {e}"))?;
        parse_reply(&line)
    }

    /// Request and reply.
    pub fn call(&mut self, req: &Value) -> Result<Value, String> {
        self.send(req)?;
        self.recv()
    }
}

/// A reply line (grove-vmm-api's format): the reply it carries as JSON (`{"snapshot":{..}}`,
/// `{"status":{..}}`, ...), or the VMM's error as text.
pub fn parse_reply(line: &str) -> Result<Value, String> {
    match grove_vmm_api::decode_reply(line) {
        Ok(Ok(r)) => serde_json::to_value(r).map_err(|e| format!("reply to JSON: {e}")),
        Ok(Err(e)) => Err(format!("grove-vmm refused: {e}")),
        Err(e) => Err(format!("bad reply {:?}: {e}", line.trim())),
    }
}

/// A number in a reply at a JSON pointer (e.g. `/snapshot/pause_ms`).
pub fn reply_f64(v: &Value, ptr: &str) -> Result<f64, String> {
    v.pointer(ptr).and_then(Value::as_f64).ok_or_else(|| format!("reply has no {ptr}: {v}"))
}

/// `timing: <what> <ms> ms` → (what, ms).
pub fn parse_timing(line: &str) -> Option<(String, f64)> {
    let rest = line.strip_prefix("timing: ")?.strip_suffix(" ms")?;
    let (what, v) = rest.rsplit_once(' ')?;
    Some((what.trim().to_string(), v.parse().ok()?))
}

/// `key: value kB` lines of /proc/PID/smaps_rollup (or meminfo) → (key, KiB).
pub fn parse_kib_fields(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), parse_kib(v)?))
        })
        .collect()
}

fn field(fields: &[(String, u64)], key: &str) -> Option<u64> {
    fields.iter().find(|(k, _)| k == key).map(|&(_, v)| v)
}

/// Memory of one process from /proc/PID/smaps_rollup, KiB.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Rollup {
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub pss_anon_kib: u64,
    pub pss_file_kib: u64,
}

pub fn rollup(pid: u32) -> Result<Rollup, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .map_err(|e| format!("read /proc/{pid}/smaps_rollup: {e}"))?;
    let f = parse_kib_fields(&text);
    Ok(Rollup {
        rss_kib: field(&f, "Rss").unwrap_or(0),
        pss_kib: field(&f, "Pss").ok_or("no Pss in smaps_rollup")?,
        pss_anon_kib: field(&f, "Pss_Anon").unwrap_or(0),
        pss_file_kib: field(&f, "Pss_File").unwrap_or(0),
    })
}

/// MemAvailable in MiB.
pub fn mem_available_mib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    field(&parse_kib_fields(&text), "MemAvailable").unwrap_or(0) / 1024
}

/// The three load averages.
pub fn loadavg() -> String {
    read_trim("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// Host and software conditions of a VMM-level run.
#[derive(Serialize)]
pub struct Conditions {
    pub kvm: String,
    pub kernel: String,
    pub cpu: String,
    pub host_cpus: usize,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub mem_available_mib_start: u64,
    pub vmm: String,
    pub guest: String,
}

impl Conditions {
    pub fn now(vmm: &Path, guest: &Path) -> Self {
        Self {
            kvm: kvm_kind(),
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            cpu: cpu_model(),
            host_cpus: thread::available_parallelism().map_or(0, std::num::NonZero::get),
            loadavg_start: loadavg(),
            loadavg_end: String::new(),
            mem_available_mib_start: mem_available_mib(),
            vmm: vmm.display().to_string(),
            guest: guest.display().to_string(),
        }
    }

    pub fn print(&self) {
        println!(
            "  conditions: KVM {}; kernel {}; CPU {} ({} host CPUs); load average {} at start, {} at end; MemAvailable {} MiB",
            self.kvm,
            self.kernel,
            self.cpu,
            self.host_cpus,
            self.loadavg_start,
            self.loadavg_end,
            self.mem_available_mib_start
        );
        println!("  vmm {}  guest {}", self.vmm, self.guest);
    }
}

/// The VMM binary and the test guest, after checking /dev/kvm.
pub fn binaries() -> Result<(PathBuf, PathBuf), String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm not available".into());
    }
    Ok((vmm_path()?, guest_path()?))
}

/// A directory removed (recursively) on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self, String> {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("grove-bench-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).map_err(|e| format!("mkdir {}: {e}", p.display()))?;
        Ok(Self(p))
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Path as &str (the VMM's arguments).
pub fn s(p: &Path) -> Result<&str, String> {
    p.to_str().ok_or_else(|| format!("non-UTF-8 path {}", p.display()))
}

pub fn ms_since(t: Instant, at: Instant) -> f64 {
    at.saturating_duration_since(t).as_secs_f64() * 1e3
}

/// A comma-separated list of numbers.
pub fn parse_list<T: std::str::FromStr>(v: &str, name: &str) -> Result<Vec<T>, String> {
    v.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| x.trim().parse().map_err(|_| format!("{name}: bad value '{x}'")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_timing_marks() {
        assert_eq!(
            parse_timing("timing: first guest serial output 12.345 ms"),
            Some(("first guest serial output".into(), 12.345))
        );
        assert_eq!(
            parse_timing("timing: restore request 3 ms"),
            Some(("restore request".into(), 3.0))
        );
        assert_eq!(parse_timing("boot-timer: guest ready 1 ms after VMM start"), None);
        assert_eq!(parse_timing("timing: no number ms"), None);
    }

    #[test]
    fn parses_smaps_rollup() {
        let text = "\
55d0c0000000-7ffd00000000 ---p 00000000 00:00 0                          [rollup]
Rss:                2512 kB
Pss:                 431 kB
Pss_Anon:            180 kB
Pss_File:            251 kB
Pss_Shmem:             0 kB
";
        let f = parse_kib_fields(text);
        assert_eq!(field(&f, "Pss"), Some(431));
        assert_eq!(field(&f, "Pss_Anon"), Some(180));
        assert_eq!(field(&f, "Rss"), Some(2512));
        assert_eq!(field(&f, "Swap"), None);
    }

    #[test]
    fn parses_replies_and_lists() {
        let line = r#"{"ok":true,"reply":{"snapshot":{"dir":"/s","depth":1,"pages":3,"pause_ms":0.5,"total_ms":2.0}}}"#;
        let v = parse_reply(line).unwrap();
        assert!((reply_f64(&v, "/snapshot/pause_ms").unwrap() - 0.5).abs() < f64::EPSILON);
        assert!(reply_f64(&v, "/snapshot/nothing").is_err());
        let e = parse_reply(
            r#"{"ok":false,"error":{"code":"failed-precondition","message":"diff without a base"}}"#,
        )
        .unwrap_err();
        assert!(e.contains("diff without a base"), "{e}");
        assert!(parse_reply("not json").is_err());
        assert_eq!(parse_list::<u32>("1,4, 16,64", "--children").unwrap(), vec![1, 4, 16, 64]);
        assert!(parse_list::<u32>("1,x", "--children").is_err());
        assert_eq!(count_ts("TTxT"), 3);
    }
}
