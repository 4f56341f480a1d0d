//! `grove-bench disk --virtio [--json] [--mib N] [--ops N] [--dir PATH] [--kernel K]
//! [--initrd I] [--qemu BIN] [--qemu-machine q35|microvm] [--timeout-s S]`: guest-side disk
//! performance on grove-vmm's virtio-blk beside the same disk image on QEMU's own virtio-blk,
//! in one run.
//!
//! A Linux guest (Debian's kernel and the project's initramfs: `GUEST_KERNEL`,
//! `GUEST_INITRD`, as scripts/testhost.sh sets them) boots twice, once under each VMM, and runs
//! `grove-diskprobe` on its first virtio-blk disk (the probe `/probe/diskbench.sh`, started by
//! guest-init's `grove.run=`): sequential 1 MiB writes and reads, random 4 KiB writes and reads,
//! queue depth 1, `O_DIRECT` in the guest; the write tests end with an fdatasync. The JSON lines
//! it prints on the serial console are the results; the guest then powers off.
//!
//! The disk: an image of `--mib` MiB of pseudo-random data written here (so reads hit data,
//! not holes). grove-vmm serves it as the base of a layered disk (`--disk IMAGE,layer=...`: the
//! image is read, writes go to a fresh layer in the same directory, both through the host's
//! page cache); QEMU, which runs second, serves the image itself (`virtio-blk-pci`,
//! `cache=writeback`, `aio=threads`: the host's page cache too), the default a user would pick.
//! Both guests get 1 vCPU and 512 MiB.
//!
//! Needs a KVM that runs Linux guests (the test host: `scripts/testhost.sh diskbench`, or a
//! host with hardware virtualization); on this project's nested paravirtual KVM it says so.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::stats::{flag, wants_json};

const MIB: u64 = 1 << 20;

/// The KVM module behind /dev/kvm, from /sys/module.
fn kvm_module() -> String {
    for m in ["kvm_amd", "kvm_intel", "kvm_pvm"] {
        if Path::new("/sys/module").join(m).exists() {
            return m.to_string();
        }
    }
    "none".into()
}

/// One VMM's run: what the probe printed.
#[derive(Serialize)]
struct VmmRun {
    vmm: String,
    /// Seconds from spawning the VMM to its exit.
    wall_s: f64,
    /// The probe's lines (device, kernel, one per test).
    results: Vec<Value>,
}

impl VmmRun {
    fn test(&self, name: &str) -> Option<&Value> {
        self.results.iter().find(|v| v["test"] == name)
    }
}

#[derive(Serialize)]
struct Comparison {
    test: String,
    metric: &'static str,
    grove: f64,
    qemu: f64,
    /// grove / qemu: above 1 is better for throughput, below 1 for latency.
    ratio: f64,
}

#[derive(Serialize)]
struct Conditions {
    host_kernel: String,
    kvm_module: String,
    host_cpus: usize,
    guest_kernel: String,
    guest: &'static str,
    image_mib: u64,
    image_dir: String,
    image_dir_fs: String,
    random_ops: u64,
    io: &'static str,
    grove_disk: &'static str,
    qemu_disk: &'static str,
    qemu_version: String,
    loadavg_before: String,
    loadavg_after: String,
}

#[derive(Serialize)]
struct Report {
    conditions: Conditions,
    grove: VmmRun,
    qemu: VmmRun,
    comparison: Vec<Comparison>,
}

/// Writes `mib` MiB of xorshift data to `path`.
fn make_image(path: &Path, mib: u64) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..mib {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).map_err(|e| format!("write image: {e}"))?;
    }
    f.sync_all().map_err(|e| format!("fsync image: {e}"))
}

/// Runs `cmd` until it exits (at most `timeout`), then parses the `diskprobe: ` lines of the
/// serial log at `serial`.
fn run_vmm(
    name: &str,
    mut cmd: Command,
    serial: &Path,
    timeout: Duration,
) -> Result<VmmRun, String> {
    let t = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{name}: cannot start: {e}"))?;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| format!("{name}: {e}"))? {
            break s;
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{name}: no exit within {} s (serial: {})",
                timeout.as_secs(),
                serial.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let wall_s = t.elapsed().as_secs_f64();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    let log = std::fs::read_to_string(serial).unwrap_or_default();
    let results: Vec<Value> = log
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("diskprobe: "))
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect();
    if let Some(e) = results.iter().find_map(|v| v.get("error")) {
        return Err(format!("{name}: the probe failed: {e}"));
    }
    if !status.success() || !log.contains("diskprobe: done") {
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        return Err(format!(
            "{name}: exited {status} without the probe's results; stderr: {err}; first kernel \
             error: {}; serial tail: {}{}",
            first_kernel_error(&log).unwrap_or("none"),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            keep_serial(name, serial)
        ));
    }
    Ok(VmmRun { vmm: name.into(), wall_s, results })
}

/// The first line of a kernel log that starts an oops, a panic, a BUG or a WARNING (the
/// serial tail only shows the end of its backtrace).
fn first_kernel_error(log: &str) -> Option<&str> {
    log.lines()
        .find(|l| {
            ["Kernel panic", "BUG:", "Oops", "WARNING:", "general protection"]
                .iter()
                .any(|k| l.contains(k))
        })
        .map(str::trim)
}

/// Copies a failed run's serial log to `$GROVE_OUT` (the test host's output directory, which
/// outlives the scratch directory); says where, or nothing.
fn keep_serial(name: &str, serial: &Path) -> String {
    let Some(out) = std::env::var_os("GROVE_OUT").filter(|v| !v.is_empty()) else {
        return String::new();
    };
    let dest = Path::new(&out).join(format!("diskbench-{name}.serial"));
    match std::fs::copy(serial, &dest) {
        Ok(_) => format!(" (whole serial log: {})", dest.display()),
        Err(_) => String::new(),
    }
}

fn compare(g: &VmmRun, q: &VmmRun) -> Vec<Comparison> {
    let mut out = Vec::new();
    for (test, metric) in [
        ("seq-write", "mib_s"),
        ("seq-read", "mib_s"),
        ("rand-write-4k", "iops"),
        ("rand-read-4k", "iops"),
        ("rand-write-4k", "lat_us_p50"),
        ("rand-write-4k", "lat_us_p99"),
        ("rand-read-4k", "lat_us_p50"),
        ("rand-read-4k", "lat_us_p99"),
    ] {
        let v = |r: &VmmRun| r.test(test).and_then(|t| t[metric].as_f64());
        if let (Some(grove), Some(qemu)) = (v(g), v(q)) {
            let ratio = if qemu > 0.0 { grove / qemu } else { f64::NAN };
            out.push(Comparison { test: test.into(), metric, grove, qemu, ratio });
        }
    }
    out
}

/// `grove-bench disk --virtio`.
pub fn run(args: &[String]) -> Result<(), String> {
    let mib: u64 = flag(args, "--mib")?.unwrap_or(64);
    let ops: u64 = flag(args, "--ops")?.unwrap_or(2000);
    let timeout = Duration::from_secs(flag(args, "--timeout-s")?.unwrap_or(900));
    let env_or = |f: &str, e: &str| -> Result<String, String> {
        flag::<String>(args, f)?
            .or_else(|| std::env::var(e).ok().filter(|v| !v.is_empty()))
            .ok_or_else(|| format!("{f} or {e} is required"))
    };
    let kernel = env_or("--kernel", "GUEST_KERNEL")?;
    let initrd = env_or("--initrd", "GUEST_INITRD")?;
    let vmm = std::env::var("GROVE_VMM").unwrap_or_else(|_| "target/release/grove-vmm".into());
    let qemu: String = flag(args, "--qemu")?.unwrap_or_else(|| "qemu-system-x86_64".into());
    // q35 + virtio-blk-pci (default), or microvm + virtio-blk-device (virtio-mmio, which
    // QEMU's microvm describes in its ACPI tables, as grove-vmm does).
    let machine: String = flag(args, "--qemu-machine")?.unwrap_or_else(|| "q35".into());
    let blk_device = match machine.as_str() {
        "q35" => "virtio-blk-pci,drive=d0",
        "microvm" => "virtio-blk-device,drive=d0",
        other => return Err(format!("--qemu-machine: q35 or microvm, not '{other}'")),
    };
    let parent = PathBuf::from(flag::<String>(args, "--dir")?.unwrap_or_else(|| "/tmp".into()));
    if mib == 0 || ops == 0 {
        return Err("--mib and --ops must be positive".into());
    }
    let kvm = kvm_module();
    if kvm != "kvm_amd" && kvm != "kvm_intel" {
        return Err(format!(
            "a Linux guest needs a hardware-style KVM (kvm_amd or kvm_intel); this host has \
             {kvm}: run it in the test host: scripts/testhost.sh diskbench"
        ));
    }
    let load_before = super::disk::loadavg();
    let work = super::disk::Scratch::new(&parent)?;
    let dir = work.path();
    // The image leaves room past the tested range (the probe needs at least --mib MiB).
    let img = dir.join("disk.img");
    make_image(&img, mib + 16)?;
    let cmdline = format!(
        "console=ttyS0 quiet reboot=k panic=-1 grove.vsock=off grove.run=/probe/diskbench.sh,{mib},{ops}"
    );

    let serial = dir.join("grove.serial");
    let disk = format!("{},layer={},id=bench", img.display(), dir.join("layer").display());
    let mut g = Command::new(&vmm);
    g.args(["run", "--kernel", &kernel, "--initrd", &initrd, "--cmdline", &cmdline])
        .args(["--vcpus", "1", "--mem-mib", "512", "--disk", &disk, "--serial"])
        .arg(&serial);
    let grove = run_vmm("grove-vmm", g, &serial, timeout)?;

    let qserial = dir.join("qemu.serial");
    let mut q = Command::new(&qemu);
    q.args(["-accel", "kvm", "-cpu", "host", "-M", &machine, "-smp", "1", "-m", "512"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", qserial.display()))
        .args(["-kernel", &kernel, "-initrd", &initrd, "-append", &cmdline])
        .arg("-drive")
        .arg(format!("file={},if=none,id=d0,format=raw,cache=writeback,aio=threads", img.display()))
        .args(["-device", blk_device]);
    let qemu_run = run_vmm("qemu", q, &qserial, timeout)?;
    let qemu_version = Command::new(&qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string))
        .unwrap_or_default();

    let comparison = compare(&grove, &qemu_run);
    let guest_kernel = grove
        .results
        .iter()
        .find_map(|v| v["kernel"].as_str().map(str::to_string))
        .unwrap_or_default();
    let report = Report {
        conditions: Conditions {
            host_kernel: super::disk::kernel(),
            kvm_module: kvm,
            host_cpus: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            guest_kernel,
            guest: "1 vCPU, 512 MiB, initramfs (guest-init), probe grove-diskprobe",
            image_mib: mib + 16,
            image_dir: parent.display().to_string(),
            image_dir_fs: super::disk::fs_type(&parent),
            random_ops: ops,
            io: "guest: O_DIRECT, queue depth 1, one thread; sequential 1 MiB requests over the first --mib MiB, random 4 KiB requests in them; write tests end with fdatasync",
            grove_disk: "virtio-blk over virtio-mmio; layered disk: the image as base (read), a fresh 4 KiB-chunk layer (written), host page cache",
            qemu_disk: if machine == "microvm" {
                "-M microvm, virtio-blk-device (virtio-mmio), the image itself, cache=writeback, aio=threads (host page cache)"
            } else {
                "-M q35, virtio-blk-pci, the image itself, cache=writeback, aio=threads (host page cache)"
            },
            qemu_version,
            loadavg_before: load_before,
            loadavg_after: super::disk::loadavg(),
        },
        grove,
        qemu: qemu_run,
        comparison,
    };
    if wants_json(args) {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
        return Ok(());
    }
    let c = &report.conditions;
    println!(
        "disk --virtio: guest {} on {} ({}), image {} MiB on {} ({}), {} random ops; load {} -> {}",
        c.guest_kernel,
        c.host_kernel,
        c.kvm_module,
        c.image_mib,
        c.image_dir,
        c.image_dir_fs,
        c.random_ops,
        c.loadavg_before,
        c.loadavg_after
    );
    println!("  grove-vmm: {}\n  qemu:      {} ({})", c.grove_disk, c.qemu_disk, c.qemu_version);
    println!("{:<15} {:<11} {:>12} {:>12} {:>8}", "test", "metric", "grove-vmm", "qemu", "ratio");
    for x in &report.comparison {
        println!(
            "{:<15} {:<11} {:>12.1} {:>12.1} {:>8.2}",
            x.test, x.metric, x.grove, x.qemu, x.ratio
        );
    }
    println!(
        "  wall time: grove-vmm {:.1} s, qemu {:.1} s (boot, probe and power-off)",
        report.grove.wall_s, report.qemu.wall_s
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(lines: &[&str]) -> VmmRun {
        VmmRun {
            vmm: "x".into(),
            wall_s: 1.0,
            results: lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect(),
        }
    }

    #[test]
    fn comparisons_are_grove_over_qemu_for_each_metric_both_have() {
        let g = run_of(&[
            r#"{"test":"seq-read","mib_s":300.0}"#,
            r#"{"test":"rand-read-4k","iops":1000.0,"lat_us_p50":90.0,"lat_us_p99":400.0}"#,
        ]);
        let q = run_of(&[
            r#"{"test":"seq-read","mib_s":200.0}"#,
            r#"{"test":"rand-read-4k","iops":500.0,"lat_us_p50":180.0,"lat_us_p99":800.0}"#,
        ]);
        let c = compare(&g, &q);
        let r = |t: &str, m: &str| c.iter().find(|x| x.test == t && x.metric == m).unwrap().ratio;
        assert!((r("seq-read", "mib_s") - 1.5).abs() < 1e-9);
        assert!((r("rand-read-4k", "iops") - 2.0).abs() < 1e-9);
        assert!((r("rand-read-4k", "lat_us_p50") - 0.5).abs() < 1e-9);
        assert_eq!(c.len(), 4, "seq-write and rand-write are in neither");
    }

    #[test]
    fn the_first_kernel_error_line_is_found() {
        let log = "[ 1.0] ok\n[ 2.0] BUG: kernel NULL pointer dereference\n[ 2.1] Kernel panic - not syncing\n";
        assert_eq!(first_kernel_error(log), Some("[ 2.0] BUG: kernel NULL pointer dereference"));
        assert_eq!(first_kernel_error("[ 1.0] all fine\n"), None);
    }

    #[test]
    fn images_are_data_not_holes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("i");
        make_image(&p, 2).unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(b.len(), 2 << 20);
        assert!(b.chunks(4096).all(|c| c.iter().any(|&x| x != 0)));
    }
}
