//! `grove-bench boot --linux [--json] [--runs N] [--vcpus V] [--mem-mib M] [--kernel K]
//! [--initrd I] [--qemu BIN] [--no-qemu] [--timeout-s S]`: a Linux guest's boot, VMM start to
//! guest-init's ready mark, under grove-vmm beside QEMU `-M microvm -accel kvm` booting the
//! same kernel and initramfs on the same KVM in the same run.
//!
//! Needs a KVM that runs Linux guests (the test host: `scripts/testhost.sh bootbench`, or a
//! host with hardware virtualization). The guest kernel and initramfs are `--kernel` /
//! `--initrd`, else `GUEST_KERNEL` / `GUEST_INITRD` (as scripts/testhost.sh sets them); both
//! VMMs get the same files, vCPUs, memory and command line (`console=ttyS0 quiet`, guest-init
//! as PID 1 with vsock off). Runs alternate grove-vmm, QEMU, QEMU, grove-vmm, ... so a drift
//! in the host's load falls on both.
//!
//! Measured per boot, from just before the spawn:
//! - **to "guest-init: ready" on the serial console** (the VMM's stdout, read line by line):
//!   the same definition for both VMMs, and the figure compared;
//! - grove-vmm only: the **boot-timer** line (guest-init's write to port 0x440, timed by the
//!   VMM from its own start) and the client's time when that line arrived.
//!
//! Each VMM is killed by PID once its guest is ready (the guest has nothing else to do).
//! Timings are reported (median, p99 over the runs, ratio of the medians), never asserted.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::boot::{cpu_model, kvm_kind, lines, read_trim};
use crate::stats::{flag, wants_json, Summary};

/// The line guest-init prints on the console once it wrote the boot-timer port.
const READY_LINE: &str = "guest-init: ready";
const CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=-1 grove.vsock=off";

#[derive(Serialize)]
struct Conditions {
    kvm: String,
    host_cpu: String,
    host_kernel: String,
    host_cpus: usize,
    loadavg_before: String,
    loadavg_after: String,
    guest_kernel: String,
    guest_initrd: String,
    vcpus: u32,
    mem_mib: u64,
    cmdline: String,
    grove_vmm: String,
    qemu: Option<String>,
    qemu_machine: &'static str,
    runs: usize,
    order: &'static str,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    conditions: Conditions,
    /// grove-vmm: spawn → "guest-init: ready" on its serial (stdout).
    grove_spawn_to_ready_ms: Option<Summary>,
    /// grove-vmm's own boot-timer figure (VMM start → guest's port 0x440 write).
    grove_boot_timer_ms: Option<Summary>,
    /// QEMU: spawn → "guest-init: ready" on its serial (stdout).
    qemu_spawn_to_ready_ms: Option<Summary>,
    /// Median grove-vmm / median QEMU, both spawn → ready line.
    ratio_of_medians: Option<f64>,
    grove_samples_ms: Vec<f64>,
    qemu_samples_ms: Vec<f64>,
}

/// What one boot gave.
struct Boot {
    to_ready_ms: f64,
    boot_timer_ms: Option<f64>,
}

/// `guest ready X ms after VMM start` → X.
fn boot_timer_of(line: &str) -> Option<f64> {
    let rest = line.split("boot-timer: guest ready ").nth(1)?;
    rest.split(' ').next()?.parse().ok()
}

fn ratio(grove: Option<&Summary>, qemu: Option<&Summary>) -> Option<f64> {
    match (grove, qemu) {
        (Some(g), Some(q)) if q.median > 0.0 => Some(g.median / q.median),
        _ => None,
    }
}

/// A spawned VMM, killed (by its PID, through `Child`) and reaped on drop.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` (stdout = the guest's serial console) and waits for the ready line; with
/// `timer`, also for grove-vmm's boot-timer line on stderr.
fn boot_once(
    name: &str,
    mut cmd: Command,
    timer: bool,
    deadline: Duration,
) -> Result<Boot, String> {
    let t0 = Instant::now();
    let mut child = Spawned(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{name}: cannot start: {e}"))?,
    );
    let out = lines(child.0.stdout.take().ok_or("no stdout pipe")?);
    let err = lines(child.0.stderr.take().ok_or("no stderr pipe")?);
    let mut tail: Vec<String> = Vec::new();
    let mut ready = None;
    let mut boot_timer = None;
    let mut out_open = true;
    let mut err_open = true;
    while ready.is_none() || (timer && boot_timer.is_none()) {
        let left = deadline.checked_sub(t0.elapsed()).ok_or_else(|| {
            format!(
                "{name}: no '{READY_LINE}' within {} s; last lines: {}",
                deadline.as_secs(),
                tail.join(" | ")
            )
        })?;
        // Both pipes are polled in short slices so neither starves.
        let slice = left.min(Duration::from_millis(20));
        if out_open {
            match out.recv_timeout(slice) {
                Ok((at, l)) => {
                    if ready.is_none() && l.contains(READY_LINE) {
                        ready = Some(at.duration_since(t0).as_secs_f64() * 1e3);
                    }
                    keep_tail(&mut tail, l);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => out_open = false,
            }
        }
        while err_open {
            match err.try_recv() {
                Ok((_, l)) => {
                    if let Some(v) = boot_timer_of(&l) {
                        boot_timer = Some(v);
                    }
                    keep_tail(&mut tail, l);
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => err_open = false,
            }
        }
        if !out_open && !err_open {
            let status = child.0.wait().map_err(|e| format!("{name}: wait: {e}"))?;
            return Err(format!(
                "{name} exited ({status}) before '{READY_LINE}'{}; last lines: {}",
                if timer && ready.is_some() { " and its boot-timer line" } else { "" },
                tail.join(" | ")
            ));
        }
        if !out_open {
            thread::sleep(slice);
        }
    }
    Ok(Boot { to_ready_ms: ready.unwrap_or_default(), boot_timer_ms: boot_timer })
}

fn keep_tail(tail: &mut Vec<String>, l: String) {
    if tail.len() == 20 {
        tail.remove(0);
    }
    tail.push(l);
}

fn qemu_version(qemu: &str) -> String {
    Command::new(qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// `grove-bench boot --linux`.
pub fn run(args: &[String]) -> Result<(), String> {
    let json = wants_json(args);
    let runs: usize = flag(args, "--runs")?.unwrap_or(5);
    let vcpus: u32 = flag(args, "--vcpus")?.unwrap_or(1);
    let mem_mib: u64 = flag(args, "--mem-mib")?.unwrap_or(512);
    let deadline = Duration::from_secs(flag(args, "--timeout-s")?.unwrap_or(600));
    if runs == 0 || runs > 1000 || vcpus == 0 || vcpus > 64 || !(64..=65536).contains(&mem_mib) {
        return Err("--runs 1..=1000, --vcpus 1..=64, --mem-mib 64..=65536".into());
    }
    let env_or = |f: &str, e: &str| -> Result<String, String> {
        let v = flag::<String>(args, f)?
            .or_else(|| std::env::var(e).ok().filter(|v| !v.is_empty()))
            .ok_or_else(|| format!("{f} or {e} is required"))?;
        if Path::new(&v).is_file() {
            Ok(v)
        } else {
            Err(format!("{f}: {v} is not a file"))
        }
    };
    let kernel = env_or("--kernel", "GUEST_KERNEL")?;
    let initrd = env_or("--initrd", "GUEST_INITRD")?;
    let vmm = crate::boot::vmm_path()?;
    let qemu: Option<String> = if args.iter().any(|a| a == "--no-qemu") {
        None
    } else {
        Some(flag(args, "--qemu")?.unwrap_or_else(|| "qemu-system-x86_64".into()))
    };
    let kvm = kvm_kind();
    if !(kvm.starts_with("kvm_amd") || kvm.starts_with("kvm_intel")) {
        return Err(format!(
            "a Linux guest needs a hardware-style KVM (kvm_amd or kvm_intel); this host has {kvm}: \
             run it in the test host: scripts/testhost.sh bootbench"
        ));
    }
    let cmdline = CMDLINE.to_string();
    let (vc, mem) = (vcpus.to_string(), mem_mib.to_string());
    let grove_cmd = || {
        let mut c = Command::new(&vmm);
        c.args(["run", "--kernel", &kernel, "--initrd", &initrd, "--cmdline", &cmdline])
            .args(["--vcpus", &vc, "--mem-mib", &mem, "--serial", "stdout"])
            .env("GROVE_VMM_TIMING", "1");
        c
    };
    let qemu_cmd = |q: &str| {
        let mut c = Command::new(q);
        c.args(["-M", "microvm", "-accel", "kvm", "-cpu", "host", "-smp", &vc, "-m", &mem])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            .args(["-serial", "stdio", "-kernel", &kernel, "-initrd", &initrd])
            .args(["-append", &cmdline]);
        c
    };
    let loadavg_before = read_trim("/proc/loadavg");
    let mut grove = Vec::new();
    let mut grove_timer = Vec::new();
    let mut qemu_ms = Vec::new();
    for i in 0..runs {
        // grove-vmm first on even runs, QEMU first on odd ones.
        let mut order = vec![true];
        if qemu.is_some() {
            order.push(false);
            if i % 2 == 1 {
                order.reverse();
            }
        }
        for is_grove in order {
            let b = if is_grove {
                boot_once("grove-vmm", grove_cmd(), true, deadline)
            } else {
                boot_once("qemu", qemu_cmd(qemu.as_deref().unwrap_or_default()), false, deadline)
            }
            .map_err(|e| format!("run {}: {e}", i + 1))?;
            if is_grove {
                grove.push(b.to_ready_ms);
                grove_timer.extend(b.boot_timer_ms);
            } else {
                qemu_ms.push(b.to_ready_ms);
            }
            if !json {
                eprintln!(
                    "run {:>3}: {:<9} spawn -> ready {:9.1} ms{}",
                    i + 1,
                    if is_grove { "grove-vmm" } else { "qemu" },
                    b.to_ready_ms,
                    b.boot_timer_ms.map_or(String::new(), |v| format!("  boot-timer {v:.1} ms"))
                );
            }
        }
    }
    let g = Summary::of("ms", &grove);
    let q = Summary::of("ms", &qemu_ms);
    let report = Report {
        benchmark: "boot --linux",
        conditions: Conditions {
            kvm,
            host_cpu: cpu_model(),
            host_kernel: read_trim("/proc/sys/kernel/osrelease"),
            host_cpus: thread::available_parallelism().map_or(1, std::num::NonZero::get),
            loadavg_before,
            loadavg_after: read_trim("/proc/loadavg"),
            guest_kernel: kernel.clone(),
            guest_initrd: initrd.clone(),
            vcpus,
            mem_mib,
            cmdline: cmdline.clone(),
            grove_vmm: vmm.display().to_string(),
            qemu: qemu.as_deref().map(|q| format!("{q} ({})", qemu_version(q))),
            qemu_machine: "-M microvm -accel kvm -cpu host -nodefaults -no-reboot -serial stdio",
            runs,
            order: "alternating per run: grove-vmm, qemu / qemu, grove-vmm",
        },
        ratio_of_medians: ratio(g.as_ref(), q.as_ref()),
        grove_spawn_to_ready_ms: g,
        grove_boot_timer_ms: Summary::of("ms", &grove_timer),
        qemu_spawn_to_ready_ms: q,
        grove_samples_ms: grove,
        qemu_samples_ms: qemu_ms,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
        return Ok(());
    }
    let c = &report.conditions;
    println!(
        "grove-bench boot --linux: {} runs, {} vCPU(s), {} MiB, guest kernel {}, initrd {}",
        c.runs, c.vcpus, c.mem_mib, c.guest_kernel, c.guest_initrd
    );
    println!(
        "  host: {} on {} ({} CPUs, kernel {}); load {} -> {}",
        c.kvm, c.host_cpu, c.host_cpus, c.host_kernel, c.loadavg_before, c.loadavg_after
    );
    println!("  cmdline: {}", c.cmdline);
    let show = |what: &str, s: Option<&Summary>| {
        if let Some(s) = s {
            println!("  {what:<44} {s}");
        }
    };
    show("grove-vmm: spawn -> 'guest-init: ready'", report.grove_spawn_to_ready_ms.as_ref());
    show("grove-vmm: boot-timer (VMM's own)", report.grove_boot_timer_ms.as_ref());
    if let Some(q) = &c.qemu {
        println!("  reference: {q} {}", c.qemu_machine);
    }
    show("qemu microvm: spawn -> 'guest-init: ready'", report.qemu_spawn_to_ready_ms.as_ref());
    if let Some(r) = report.ratio_of_medians {
        println!("  grove-vmm / qemu (medians): {r:.2}x");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_timer_lines_parse() {
        assert_eq!(
            boot_timer_of("boot-timer: guest ready 8123.456 ms after VMM start"),
            Some(8123.456)
        );
        assert_eq!(boot_timer_of("timing: first KVM_RUN 39.7 ms"), None);
        assert_eq!(boot_timer_of("boot-timer: guest ready soon"), None);
    }

    #[test]
    fn ratio_is_of_the_medians_and_needs_both() {
        let g = Summary::of("ms", &[10.0, 20.0, 30.0]);
        let q = Summary::of("ms", &[40.0, 40.0, 50.0]);
        assert!((ratio(g.as_ref(), q.as_ref()).unwrap() - 0.5).abs() < 1e-9);
        assert!(ratio(g.as_ref(), None).is_none());
    }

    #[test]
    fn a_vmm_that_exits_without_the_ready_line_is_an_error() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo booting; echo oops >&2; exit 3"]);
        let e = boot_once("sh", c, false, Duration::from_secs(30)).err().unwrap();
        assert!(e.contains("exited") && e.contains("oops"), "{e}");
    }

    #[test]
    fn the_ready_line_and_the_boot_timer_are_read() {
        let mut c = Command::new("sh");
        c.args([
            "-c",
            "echo 'boot-timer: guest ready 12.5 ms after VMM start' >&2; echo 'guest-init: ready'; exec sleep 30",
        ]);
        let b = boot_once("sh", c, true, Duration::from_secs(30)).unwrap();
        assert_eq!(b.boot_timer_ms, Some(12.5));
        assert!(b.to_ready_ms >= 0.0);
    }
}
