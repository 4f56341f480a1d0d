//! `grove-bench boot [--json] [--runs N] [--mem-mib M] [--touch-mib T] [--vcpus V]`
//!
//! Boots the test guest (vmm/testguest) in ready mode (`tg.mode=ready
//! tg.touch_mib=T`) under `grove-vmm run` N times and reports, per run:
//! - **spawn → READY**: from just before `spawn()` of the VMM process to the moment
//!   `READY` arrives on its stdout (host-observed; includes exec, KVM setup, the guest
//!   writing T MiB and the serial path);
//! - **spawn → boot-timer line**: to the arrival of the VMM's `boot-timer: ...` line
//!   on stderr (the guest writes the boot-timer port just before `READY`);
//! - **VMM-reported boot timer**: the milliseconds in that line (VMM start → the
//!   guest's port write, measured by the VMM itself);
//! - **VMM start → guest entry**: the VMM's `timing: first KVM_RUN <ms> ms` line
//!   (it prints its setup steps when `GROVE_VMM_TIMING=1`, which this bench sets);
//!   every other `timing:` step is summarised too;
//! - **RSS**, read once the guest prints `T`s: `VmRSS` from `/proc/PID/status`, the
//!   guest-memory share as the summed `Rss` of the guest-RAM mappings in
//!   `/proc/PID/smaps` (the `memfd:grove-guest-ram` mappings), and the VMM's own RSS
//!   beside guest memory = VmRSS − guest-memory Rss.
//!
//! The VMM is `$GROVE_VMM`, else `grove-vmm` next to this executable (same target
//! dir). The guest is `$GROVE_TESTGUEST`, else built by scripts/build-testguest.sh.
//! Each VMM is killed by PID once measured.
//!
//! With `FIRECRACKER_BIN` set, the same guest, command line and sizes are also booted
//! under Firecracker (`--no-api --config-file`, a temporary JSON config) and its
//! spawn → READY and RSS are reported beside grove-vmm's, with the ratio of the
//! medians. Firecracker is not installed on the project's hosts: that path was only
//! exercised with a stand-in script, never with a real Firecracker.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::stats::{flag, wants_json, Summary};

/// Hang guard for one boot.
const DEADLINE: Duration = Duration::from_secs(120);
/// `T`s to wait for after `READY` before reading RSS (the guest is then in its loop).
const TS_BEFORE_RSS: usize = 20;
/// Name of the VMM's guest-RAM memfd as it appears in /proc/PID/smaps.
const GUEST_RAM_MAPPING: &str = "memfd:grove-guest-ram";

#[derive(Serialize)]
struct Conditions {
    runs: usize,
    mem_mib: u64,
    touch_mib: u64,
    vcpus: u32,
    kvm: String,
    kernel: String,
    cpu: String,
    host_cpus: usize,
    vmm: String,
    guest: String,
    cmdline: String,
}

/// One `timing:` step of the VMM's start-up, in order of its median.
#[derive(Serialize)]
struct Step {
    step: String,
    #[serde(flatten)]
    ms: Summary,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    conditions: Conditions,
    spawn_to_ready_ms: Option<Summary>,
    spawn_to_boot_timer_line_ms: Option<Summary>,
    vmm_boot_timer_ms: Option<Summary>,
    vmm_start_to_guest_entry_ms: Option<Summary>,
    vmm_steps_ms: Vec<Step>,
    vm_rss_mib: Option<Summary>,
    guest_memory_rss_mib: Option<Summary>,
    vmm_rss_beside_guest_mib: Option<Summary>,
    rss_method: &'static str,
    /// The same work under Firecracker, when `FIRECRACKER_BIN` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    firecracker: Option<FirecrackerReport>,
    /// The same boots through `grove-jailer`, alternating with these, with `--jail`.
    #[serde(skip_serializing_if = "Option::is_none")]
    jailed: Option<JailedReport>,
}

/// Boots through `grove-jailer` (uid 65534, the guest bound read-only, a cgroup with a
/// memory limit), alternating with the plain boots of the same run.
#[derive(Serialize)]
struct JailedReport {
    jailer: String,
    spawn_to_ready_ms: Option<Summary>,
    vmm_boot_timer_ms: Option<Summary>,
    /// Jailed READY p50 over plain READY p50 (same run).
    jailed_over_plain_ready_p50: Option<f64>,
}

/// Firecracker booting the same guest with the same command line and sizes.
#[derive(Serialize)]
struct FirecrackerReport {
    binary: String,
    spawn_to_ready_ms: Option<Summary>,
    vm_rss_mib: Option<Summary>,
    vmm_rss_beside_guest_mib: Option<Summary>,
    /// grove-vmm's spawn → READY median divided by Firecracker's.
    grove_over_firecracker_ready_p50: Option<f64>,
}

/// What one boot measured.
#[derive(Default)]
struct Sample {
    ready_ms: f64,
    boot_timer_line_ms: Option<f64>,
    vmm_boot_timer_ms: Option<f64>,
    steps: Vec<(String, f64)>,
    vm_rss_kib: u64,
    guest_rss_kib: Option<u64>,
}

/// Kills the VMM by PID when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        // SIGTERM, which ends grove-vmm and makes grove-jailer end its VMM and remove the
        // jail's root and cgroup; SIGKILL if that has not ended it in 5 s.
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill takes integers; the pid is this bench's own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(2));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(args: &[String]) -> Result<(), String> {
    let json = wants_json(args);
    let runs: usize = flag(args, "--runs")?.unwrap_or(20);
    let mem_mib: u64 = flag(args, "--mem-mib")?.unwrap_or(256);
    let touch_mib: u64 = flag(args, "--touch-mib")?.unwrap_or(64);
    let vcpus: u32 = flag(args, "--vcpus")?.unwrap_or(1);
    if runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    if touch_mib + 16 > mem_mib {
        return Err(format!(
            "--touch-mib {touch_mib} does not fit: the region starts at 16 MiB of {mem_mib} MiB"
        ));
    }
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm not available".into());
    }
    let vmm = vmm_path()?;
    let guest = guest_path()?;
    let cmdline = format!("tg.mode=ready tg.touch_mib={touch_mib}");
    let mem = mem_mib.to_string();
    let cpus = vcpus.to_string();
    let vmm_args = [
        "run",
        "--kernel",
        path_str(&guest)?,
        "--cmdline",
        &cmdline,
        "--mem-mib",
        &mem,
        "--vcpus",
        &cpus,
    ];

    let jailer = if args.iter().any(|a| a == "--jail") {
        Some(crate::vmm_driver::Jail::beside(&vmm, mem_mib)?.with(&[], &[&guest]))
    } else {
        None
    };
    let mut samples = Vec::with_capacity(runs);
    let mut jailed = Vec::new();
    for i in 0..runs {
        if let Some(j) = &jailer {
            // Jailed first on odd runs, second on even ones.
            let s = boot_jailed(j, &vmm, &vmm_args, mem_mib, i)
                .map_err(|e| format!("jailed run {}: {e}", i + 1))?;
            if !json {
                eprintln!("run {:>3}: jailed READY {:8.3} ms", i + 1, s.ready_ms);
            }
            jailed.push(s);
        }
        let mut cmd = Command::new(&vmm);
        cmd.args(vmm_args).env("GROVE_VMM_TIMING", "1");
        let s = boot_once(cmd, mem_mib, None).map_err(|e| format!("run {}: {e}", i + 1))?;
        if !json {
            eprintln!(
                "run {:>3}: READY {:8.3} ms  boot-timer (VMM) {}  RSS {:.1} MiB",
                i + 1,
                s.ready_ms,
                s.vmm_boot_timer_ms.map_or("-".into(), |v| format!("{v:.3} ms")),
                kib_to_mib(s.vm_rss_kib)
            );
        }
        samples.push(s);
    }

    let firecracker = match std::env::var_os("FIRECRACKER_BIN").filter(|p| !p.is_empty()) {
        Some(fc) => {
            Some(firecracker_runs(Path::new(&fc), &guest, &cmdline, mem_mib, vcpus, runs, json)?)
        }
        None => None,
    };

    let mut report = summarise(
        &samples,
        Conditions {
            runs,
            mem_mib,
            touch_mib,
            vcpus,
            kvm: kvm_kind(),
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            cpu: cpu_model(),
            host_cpus: thread::available_parallelism().map_or(0, std::num::NonZero::get),
            vmm: vmm.display().to_string(),
            guest: guest.display().to_string(),
            cmdline,
        },
    );
    if let (Some(fc), Some(ours)) = (firecracker, report.spawn_to_ready_ms.as_ref()) {
        let ratio = fc.spawn_to_ready_ms.as_ref().map(|f| ours.median / f.median);
        report.firecracker =
            Some(FirecrackerReport { grove_over_firecracker_ready_p50: ratio, ..fc });
    }
    if let Some(j) = &jailer {
        let ready = Summary::of("ms", &jailed.iter().map(|s| s.ready_ms).collect::<Vec<_>>());
        let timer: Vec<f64> = jailed.iter().filter_map(|s| s.vmm_boot_timer_ms).collect();
        let ratio =
            ready.as_ref().zip(report.spawn_to_ready_ms.as_ref()).map(|(j, p)| j.median / p.median);
        report.jailed = Some(JailedReport {
            jailer: j.jailer.display().to_string(),
            spawn_to_ready_ms: ready,
            vmm_boot_timer_ms: Summary::of("ms", &timer),
            jailed_over_plain_ready_p50: ratio,
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    } else {
        print_text(&report);
    }
    Ok(())
}

/// One boot through grove-jailer (`jail`: uid and gid 65534, the guest bound read-only, a
/// cgroup with a memory limit); RSS read from the VMM (the jailer's pid file).
fn boot_jailed(
    jail: &crate::vmm_driver::Jail,
    vmm: &Path,
    vmm_args: &[&str],
    mem_mib: u64,
    i: usize,
) -> Result<Sample, String> {
    let id = format!("bench-{}-{i}", std::process::id());
    let pid_file = std::env::temp_dir().join(format!("{id}.pid"));
    let mut cmd = jail.command(vmm, vmm_args, &pid_file, &id);
    cmd.env("GROVE_VMM_TIMING", "1");
    let r = boot_once(cmd, mem_mib, Some(&pid_file));
    let _ = std::fs::remove_file(&pid_file);
    r
}

fn summarise(samples: &[Sample], conditions: Conditions) -> Report {
    let col = |f: &dyn Fn(&Sample) -> Option<f64>| samples.iter().filter_map(f).collect::<Vec<_>>();
    let mut steps: Vec<(String, Vec<f64>)> = Vec::new();
    for s in samples {
        for (what, ms) in &s.steps {
            match steps.iter_mut().find(|(k, _)| k == what) {
                Some((_, v)) => v.push(*ms),
                None => steps.push((what.clone(), vec![*ms])),
            }
        }
    }
    let entry =
        steps.iter().find(|(k, _)| k == "first KVM_RUN").and_then(|(_, v)| Summary::of("ms", v));
    let mut step_summaries: Vec<Step> = steps
        .iter()
        .filter_map(|(k, v)| Some(Step { step: k.clone(), ms: Summary::of("ms", v)? }))
        .collect();
    step_summaries.sort_by(|a, b| a.ms.median.total_cmp(&b.ms.median));
    Report {
        benchmark: "boot",
        conditions,
        spawn_to_ready_ms: Summary::of("ms", &col(&|s| Some(s.ready_ms))),
        spawn_to_boot_timer_line_ms: Summary::of("ms", &col(&|s| s.boot_timer_line_ms)),
        vmm_boot_timer_ms: Summary::of("ms", &col(&|s| s.vmm_boot_timer_ms)),
        vmm_start_to_guest_entry_ms: entry,
        vmm_steps_ms: step_summaries,
        vm_rss_mib: Summary::of("MiB", &col(&|s| Some(kib_to_mib(s.vm_rss_kib)))),
        guest_memory_rss_mib: Summary::of("MiB", &col(&|s| s.guest_rss_kib.map(kib_to_mib))),
        vmm_rss_beside_guest_mib: Summary::of(
            "MiB",
            &col(&|s| s.guest_rss_kib.map(|g| kib_to_mib(s.vm_rss_kib.saturating_sub(g)))),
        ),
        rss_method:
            "VmRSS from /proc/PID/status once the guest prints T; guest memory = sum of Rss \
                     of the guest-RAM mappings in /proc/PID/smaps (anonymous mappings the size of \
                     a RAM region, or memfd:grove-guest-ram ones); VMM beside guest = VmRSS - \
                     guest memory",
        firecracker: None,
        jailed: None,
    }
}

fn print_text(r: &Report) {
    let c = &r.conditions;
    println!("grove-bench boot: {} runs, test guest in ready mode", c.runs);
    println!(
        "  conditions: {} MiB guest, {} MiB touched before READY, {} vCPU(s); KVM: {}; \
         kernel {}; CPU {} ({} host CPUs)",
        c.mem_mib, c.touch_mib, c.vcpus, c.kvm, c.kernel, c.cpu, c.host_cpus
    );
    println!("  vmm {}  guest {}", c.vmm, c.guest);
    let line = |name: &str, s: &Option<Summary>| match s {
        Some(s) => println!("  {name:<40} {s}"),
        None => println!("  {name:<40} (not reported)"),
    };
    line("spawn -> READY on stdout", &r.spawn_to_ready_ms);
    line("spawn -> boot-timer line on stderr", &r.spawn_to_boot_timer_line_ms);
    line("VMM start -> boot-timer (VMM's log)", &r.vmm_boot_timer_ms);
    line("VMM start -> guest entry (1st KVM_RUN)", &r.vmm_start_to_guest_entry_ms);
    for st in &r.vmm_steps_ms {
        println!("    step {:<35} {}", st.step, st.ms);
    }
    line("VmRSS", &r.vm_rss_mib);
    line("guest memory Rss", &r.guest_memory_rss_mib);
    line("VMM RSS beside guest memory", &r.vmm_rss_beside_guest_mib);
    println!("  RSS method: {}", r.rss_method);
    if let Some(fc) = &r.firecracker {
        println!("  Firecracker ({}), same guest, cmdline and sizes:", fc.binary);
        line("spawn -> READY on stdout", &fc.spawn_to_ready_ms);
        line("VmRSS", &fc.vm_rss_mib);
        line("VMM RSS beside guest memory", &fc.vmm_rss_beside_guest_mib);
        if let Some(x) = fc.grove_over_firecracker_ready_p50 {
            println!("  grove-vmm / Firecracker, spawn -> READY median: {x:.2}");
        }
    }
    if let Some(j) = &r.jailed {
        println!("  through grove-jailer ({}), alternating with the boots above:", j.jailer);
        line("spawn -> READY on stdout", &j.spawn_to_ready_ms);
        line("boot-timer (VMM)", &j.vmm_boot_timer_ms);
        if let Some(x) = j.jailed_over_plain_ready_p50 {
            println!("  jailed / plain, spawn -> READY median: {x:.2}");
        }
    }
}

/// Boots the guest `runs` times under Firecracker (`--no-api --config-file`), for a
/// side-by-side figure. Firecracker is not installed on the project's build hosts, so
/// this path has not been run there.
fn firecracker_runs(
    fc: &Path,
    guest: &Path,
    cmdline: &str,
    mem_mib: u64,
    vcpus: u32,
    runs: usize,
    json: bool,
) -> Result<FirecrackerReport, String> {
    let config = serde_json::json!({
        "boot-source": { "kernel_image_path": path_str(guest)?, "boot_args": cmdline },
        "drives": [],
        "machine-config": { "vcpu_count": vcpus, "mem_size_mib": mem_mib },
    });
    let file = std::env::temp_dir().join(format!("grove-bench-fc-{}.json", std::process::id()));
    std::fs::write(&file, config.to_string())
        .map_err(|e| format!("write {}: {e}", file.display()))?;
    let mut samples = Vec::with_capacity(runs);
    let mut result = Ok(());
    for i in 0..runs {
        let mut cmd = Command::new(fc);
        cmd.arg("--no-api").arg("--config-file").arg(&file);
        match boot_once(cmd, mem_mib, None) {
            Ok(s) => {
                if !json {
                    eprintln!("firecracker run {:>3}: READY {:8.3} ms", i + 1, s.ready_ms);
                }
                samples.push(s);
            }
            Err(e) => {
                result = Err(format!("firecracker run {}: {e}", i + 1));
                break;
            }
        }
    }
    let _ = std::fs::remove_file(&file);
    result?;
    let col = |f: &dyn Fn(&Sample) -> Option<f64>| samples.iter().filter_map(f).collect::<Vec<_>>();
    Ok(FirecrackerReport {
        binary: fc.display().to_string(),
        spawn_to_ready_ms: Summary::of("ms", &col(&|s| Some(s.ready_ms))),
        vm_rss_mib: Summary::of("MiB", &col(&|s| Some(kib_to_mib(s.vm_rss_kib)))),
        vmm_rss_beside_guest_mib: Summary::of(
            "MiB",
            &col(&|s| s.guest_rss_kib.map(|g| kib_to_mib(s.vm_rss_kib.saturating_sub(g)))),
        ),
        grove_over_firecracker_ready_p50: None,
    })
}

/// One boot: spawn, wait for READY and some Ts, read RSS, kill.
/// One boot of `cmd` to READY; RSS from its process, or from the PID in `pid_file` (a jailed
/// VMM).
fn boot_once(mut cmd: Command, mem_mib: u64, pid_file: Option<&Path>) -> Result<Sample, String> {
    let t0 = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", cmd.get_program().to_string_lossy()))?;
    let mut guard = Guard(child);
    let pid = guard.0.id();
    let out_rx = chunks(guard.0.stdout.take().ok_or("no stdout pipe")?);
    let err_rx = lines(guard.0.stderr.take().ok_or("no stderr pipe")?);

    let mut seen = String::new();
    let mut ready_at = None;
    let mut ready_ms = 0.0;
    while t0.elapsed() < DEADLINE {
        match out_rx.recv_timeout(Duration::from_millis(50)) {
            Ok((at, chunk)) => {
                seen.push_str(&chunk);
                if ready_at.is_none() {
                    if let Some(i) = seen.find("READY") {
                        ready_ms = ms(at - t0);
                        ready_at = Some(i);
                    }
                }
                if let Some(i) = ready_at {
                    if seen[i..].matches('T').count() > TS_BEFORE_RSS {
                        break;
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let vmm_pid = pid_file
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(pid);
    let rss = read_rss(vmm_pid, mem_mib);
    // Kill (by PID) before draining stderr, so the reader sees EOF.
    drop(guard);
    let err_lines: Vec<(Instant, String)> = err_rx.try_iter().collect();
    if ready_at.is_none() {
        let stderr: Vec<&str> = err_lines.iter().map(|l| l.1.as_str()).collect();
        return Err(format!(
            "no READY from the guest; stdout {:?}; stderr: {}",
            seen.chars().take(300).collect::<String>(),
            stderr.join(" | ")
        ));
    }
    let (vm_rss_kib, guest_rss_kib) = rss?;

    let mut s = Sample { ready_ms, vm_rss_kib, guest_rss_kib, ..Sample::default() };
    for (at, line) in &err_lines {
        if let Some(rest) = line.strip_prefix("boot-timer:") {
            s.boot_timer_line_ms = Some(ms(*at - t0));
            s.vmm_boot_timer_ms = number_before_ms(rest);
        } else if let Some(rest) = line.strip_prefix("timing:") {
            if let Some(v) = number_before_ms(rest) {
                let what = rest.trim().rsplit_once(' ').map_or(rest, |(a, _)| a);
                let what = what.trim().rsplit_once(' ').map_or(what, |(a, _)| a).trim();
                s.steps.push((what.to_string(), v));
            }
        }
    }
    Ok(s)
}

/// The number just before the first " ms" in `s`.
fn number_before_ms(s: &str) -> Option<f64> {
    let head = &s[..s.find(" ms")?];
    head.rsplit(' ').next()?.parse().ok()
}

/// (VmRSS, guest-memory Rss) in KiB.
fn read_rss(pid: u32, mem_mib: u64) -> Result<(u64, Option<u64>), String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("read /proc/{pid}/status: {e}"))?;
    let vm_rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(parse_kib)
        .ok_or("no VmRSS in /proc/PID/status")?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    Ok((vm_rss, guest_rss_from_smaps(&smaps, &ram_region_kib(mem_mib))))
}

/// Sum of `Rss:` over the guest-RAM mappings: those named like the VMM's guest-RAM
/// memfd, or anonymous mappings whose size is one of `ram_kib` (the RAM regions:
/// the VMM maps each region separately, anonymous + THP on a fresh boot).
fn guest_rss_from_smaps(smaps: &str, ram_kib: &[u64]) -> Option<u64> {
    let mut total = None;
    let mut named = false;
    let mut anon = false;
    let mut is_guest = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && first.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            // "start-end perms offset dev inode [path]"
            let path = fields.nth(4).unwrap_or("");
            named = line.contains(GUEST_RAM_MAPPING);
            anon = path.is_empty();
            is_guest = named;
        } else if let Some(v) = line.strip_prefix("Size:").and_then(parse_kib) {
            is_guest = named || (anon && ram_kib.contains(&v));
        } else if is_guest {
            if let Some(v) = line.strip_prefix("Rss:").and_then(parse_kib) {
                *total.get_or_insert(0) += v;
            }
        }
    }
    total
}

/// Sizes in KiB of the RAM regions of a `mem_mib` guest split at 3 GiB, and the whole.
fn ram_region_kib(mem_mib: u64) -> Vec<u64> {
    let low = mem_mib.min(3072);
    let mut v = vec![low * 1024, mem_mib * 1024];
    if mem_mib > 3072 {
        v.push((mem_mib - 3072) * 1024);
    }
    v
}

pub(crate) fn parse_kib(v: &str) -> Option<u64> {
    v.trim().trim_end_matches("kB").trim().parse().ok()
}

#[allow(clippy::cast_precision_loss)] // KiB counts of a process are far below 2^52.
fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn chunks(mut r: impl Read + Send + 'static) -> Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0
                || tx
                    .send((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()))
                    .is_err()
            {
                break;
            }
        }
    });
    rx
}

/// Lines of `r`, each with the instant it was read, until EOF.
pub(crate) fn lines(r: impl Read + Send + 'static) -> Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    rx
}

fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str().ok_or_else(|| format!("non-UTF-8 path {}", p.display()))
}

/// `$GROVE_VMM`, else `grove-vmm` beside this executable.
pub(crate) fn vmm_path() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("GROVE_VMM").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let p = exe.with_file_name("grove-vmm");
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} not found: build it (cargo build --release -p grove-vmm) or set GROVE_VMM",
            p.display()
        ))
    }
}

/// `$GROVE_TESTGUEST`, else the last line of scripts/build-testguest.sh.
pub(crate) fn guest_path() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("GROVE_TESTGUEST").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-testguest.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed: {}", script.display(), out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().ok_or("build-testguest.sh printed nothing")?.trim();
    Ok(PathBuf::from(last))
}

/// Which KVM module is loaded, and what it means.
pub(crate) fn kvm_kind() -> String {
    let loaded = |m: &str| Path::new("/sys/module").join(m).exists();
    if loaded("kvm_pvm") {
        "kvm_pvm (nested, paravirtual: CPL0 guest code emulated, CPL3 native)".into()
    } else if loaded("kvm_intel") {
        "kvm_intel (hardware VMX)".into()
    } else if loaded("kvm_amd") {
        "kvm_amd (hardware SVM)".into()
    } else if loaded("kvm") {
        "kvm (no vendor module found)".into()
    } else {
        "unknown".into()
    }
}

pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub(crate) fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path).map_or_else(|_| "unknown".into(), |s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vmm_log_lines() {
        assert_eq!(number_before_ms(" guest ready 228.133 ms after VMM start"), Some(228.133));
        assert_eq!(number_before_ms(" first KVM_RUN 39.728 ms"), Some(39.728));
        assert_eq!(number_before_ms(" no number here"), None);
    }

    #[test]
    fn guest_rss_sums_only_guest_ram_mappings() {
        let smaps = "\
7f0000000000-7f0010000000 rw-s 00000000 00:01 5 /memfd:grove-guest-ram (deleted)
Size:             262144 kB
Rss:               66000 kB
7f0020000000-7f0020001000 r-xp 00000000 08:01 7 /usr/bin/grove-vmm
Size:                  4 kB
Rss:                   4 kB
7f0030000000-7f0040000000 rw-p 00000000 00:00 0 
Size:             262144 kB
Rss:                 100 kB
7f0050000000-7f0050100000 rw-p 00000000 00:00 0 
Size:               1024 kB
Rss:                  16 kB
";
        assert_eq!(guest_rss_from_smaps(smaps, &ram_region_kib(256)), Some(66100));
        assert_eq!(guest_rss_from_smaps(smaps, &ram_region_kib(512)), Some(66000));
        assert_eq!(guest_rss_from_smaps("55-66 r-xp 0 0:0 1 /bin/x\nRss: 4 kB\n", &[4]), None);
        assert_eq!(ram_region_kib(4096), vec![3072 * 1024, 4096 * 1024, 1024 * 1024]);
    }
}
