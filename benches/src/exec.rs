//! `grove-bench exec [--json] [--boots N] [--restores N] [--execs N] [--files N]
//!  [--file-mib M] [--mem-mib M] [--kernel PATH] [--initrd PATH]`
//!
//! The guest-agent path end to end: a Linux guest (kernel and initramfs with guest-init,
//! `$GUEST_KERNEL` / `$GUEST_INITRD` or the flags) under `grove-vmm` with a virtio-vsock
//! device, driven with grove-proto's client over the VM's vsock socket. Needs a KVM that
//! boots Linux (the test host: `scripts/testhost.sh execbench`). Reports medians and p99s
//! with the conditions:
//! - **cold boot → first exec answered**: from just before spawning `grove-vmm run` to the
//!   answer of the first `true` (connect retried while the guest boots);
//! - **restore → first exec answered**, cold: from spawning `grove-vmm restore` of a fork
//!   snapshot to the first answered `true` (the VMM refreshes the guest's clock and entropy
//!   first); standby: from the `restore` request to a prepared standby VMM to the first
//!   answered `true`, with the post-restore refresh's own time from the reply;
//! - **exec round trip of `true`**: on an open connection, and with a new connection each
//!   (connect, hello, exec);
//! - **64 MiB file write and read** through the guest agent (MiB/s; the data's checksum is
//!   checked after each read, outside the timing).
//!
//! `true` is the guest's `true`, or busybox's when the guest has none (an initramfs root).
//! Every VMM is killed by PID when measured; temporary directories are removed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use grove_proto::client::{ClientError, GuestClient};
use grove_proto::guest::{ExecStart, FileRead, FileWriteOpen};
use serde::Serialize;

use crate::stats::{flag, wants_json, Summary};
use crate::vmm_driver::{loadavg, mem_available_mib, s, TempDir, Vmm};

/// Hang guard for a Linux boot under emulation (not a timing assertion).
const BOOT_DEADLINE: Duration = Duration::from_secs(600);
/// Hang guard for one exec or transfer.
const OP_TIMEOUT: Duration = Duration::from_secs(300);
const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 grove.modules=virtio_mmio,vmw_vsock_virtio_transport";

#[derive(Serialize)]
struct Conditions {
    kvm: String,
    host_kernel: String,
    host_cpus: usize,
    loadavg_start: String,
    loadavg_end: String,
    mem_available_mib_start: u64,
    guest_kernel: String,
    guest_initrd: String,
    guest_mem_mib: u64,
    guest_vcpus: u32,
    true_argv: Vec<String>,
    file_mib: usize,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    conditions: Conditions,
    cold_boot_to_first_exec_ms: Option<Summary>,
    cold_restore_to_first_exec_ms: Option<Summary>,
    standby_restore_to_first_exec_ms: Option<Summary>,
    standby_post_restore_ms: Option<Summary>,
    exec_true_round_trip_ms: Option<Summary>,
    exec_true_new_connection_ms: Option<Summary>,
    file_write_mib_s: Option<Summary>,
    file_read_mib_s: Option<Summary>,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn env_or_flag(args: &[String], name: &str, env: &str) -> Result<PathBuf, String> {
    let p: Option<String> = flag(args, name)?;
    p.or_else(|| std::env::var(env).ok())
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .ok_or_else(|| format!("no guest {}: give {name} or set {env}", &name[2..]))
}

fn cerr(what: &str) -> impl Fn(ClientError) -> String + '_ {
    move |e| {
        let mut m = format!("{what}: {e}");
        let mut src = std::error::Error::source(&e);
        while let Some(x) = src {
            m = format!("{m}: {x}");
            src = x.source();
        }
        m
    }
}

fn addr(vsock: &Path) -> String {
    format!("vsock-uds:{}:{}", vsock.display(), grove_proto::GUEST_VSOCK_PORT)
}

/// Connects (retrying until `deadline`) and runs `argv`, which must exit 0.
fn first_exec(vsock: &Path, argv: &[String], deadline: Instant) -> Result<GuestClient, String> {
    let mut c = GuestClient::connect_retry(
        &addr(vsock),
        deadline,
        Duration::from_secs(2),
        Some(OP_TIMEOUT),
    )
    .map_err(cerr("connect"))?;
    run_true(&mut c, argv)?;
    Ok(c)
}

fn run_true(c: &mut GuestClient, argv: &[String]) -> Result<(), String> {
    let r = c
        .exec(ExecStart { argv: argv.to_vec(), ..Default::default() }, None)
        .map_err(cerr("exec"))?;
    match r.code() {
        Some(0) => Ok(()),
        other => Err(format!("{argv:?} exited {other:?}: {}", String::from_utf8_lossy(&r.stderr))),
    }
}

/// `true`, or busybox's when the guest has no `true` of its own.
fn true_argv(c: &mut GuestClient) -> Result<Vec<String>, String> {
    let plain = vec!["true".to_string()];
    match c.exec(ExecStart { argv: plain.clone(), ..Default::default() }, None) {
        Ok(r) if r.code() == Some(0) => Ok(plain),
        Ok(_) | Err(ClientError::Guest { .. }) => Ok(vec!["busybox".into(), "true".into()]),
        Err(e) => Err(cerr("exec true")(e)),
    }
}

struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
    mem_mib: u64,
}

fn boot(vmm: &Path, g: &Guest, dir: &TempDir, name: &str) -> Result<(Vmm, PathBuf), String> {
    let vsock = dir.join(&format!("{name}.vsock"));
    let api = dir.join(&format!("{name}.api"));
    let mem = g.mem_mib.to_string();
    let serial = dir.join(&format!("{name}.serial"));
    let args = [
        "run",
        "--kernel",
        s(&g.kernel)?,
        "--initrd",
        s(&g.initrd)?,
        "--cmdline",
        CMDLINE,
        "--mem-mib",
        &mem,
        "--serial",
        s(&serial)?,
        "--vsock-uds",
        s(&vsock)?,
        "--api-sock",
        s(&api)?,
    ];
    Ok((Vmm::spawn(vmm, &args, Some(api.clone()), 0)?, vsock))
}

/// Runs the benchmark.
pub fn run(args: &[String]) -> Result<(), String> {
    let boots: usize = flag(args, "--boots")?.unwrap_or(3);
    let restores: usize = flag(args, "--restores")?.unwrap_or(10);
    let execs: usize = flag(args, "--execs")?.unwrap_or(200);
    let files: usize = flag(args, "--files")?.unwrap_or(3);
    let file_mib: usize = flag(args, "--file-mib")?.unwrap_or(64);
    let g = Guest {
        kernel: env_or_flag(args, "--kernel", "GUEST_KERNEL")?,
        initrd: env_or_flag(args, "--initrd", "GUEST_INITRD")?,
        mem_mib: flag(args, "--mem-mib")?.unwrap_or(512),
    };
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm not available".into());
    }
    let vmm = crate::boot::vmm_path()?;
    let dir = TempDir::new("exec")?;
    let mut cond = Conditions {
        kvm: crate::boot::kvm_kind(),
        host_kernel: crate::boot::read_trim("/proc/sys/kernel/osrelease"),
        host_cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
        mem_available_mib_start: mem_available_mib(),
        guest_kernel: g.kernel.display().to_string(),
        guest_initrd: g.initrd.display().to_string(),
        guest_mem_mib: g.mem_mib,
        guest_vcpus: 1,
        true_argv: Vec::new(),
        file_mib,
    };

    // Cold boots; the last one stays up for the rest.
    let mut boot_ms = Vec::new();
    let mut kept = None;
    for i in 0..boots.max(1) {
        let t = Instant::now();
        let (vm, vsock) = boot(&vmm, &g, &dir, &format!("boot{i}"))?;
        let mut c = GuestClient::connect_retry(
            &addr(&vsock),
            t + BOOT_DEADLINE,
            Duration::from_secs(2),
            Some(OP_TIMEOUT),
        )
        .map_err(cerr("connect to the booting guest"))?;
        if cond.true_argv.is_empty() {
            cond.true_argv = true_argv(&mut c)?;
        } else {
            run_true(&mut c, &cond.true_argv)?;
        }
        boot_ms.push(ms(t));
        eprintln!("exec: boot {i}: first exec answered after {:.0} ms", boot_ms[i]);
        kept = Some((vm, vsock, c));
    }
    let Some((mut parent, vsock, mut c)) = kept else { return Err("no boot".into()) };
    let argv = cond.true_argv.clone();

    // Exec round trips.
    let mut rt = Vec::new();
    for _ in 0..execs {
        let t = Instant::now();
        run_true(&mut c, &argv)?;
        rt.push(ms(t));
    }
    let mut rt_new = Vec::new();
    for _ in 0..execs.min(50) {
        let t = Instant::now();
        let mut c2 =
            GuestClient::connect(&addr(&vsock), Some(OP_TIMEOUT)).map_err(cerr("connect"))?;
        run_true(&mut c2, &argv)?;
        rt_new.push(ms(t));
    }

    // Files.
    let data: Vec<u8> = {
        let mut d = vec![0u8; file_mib << 20];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut d))
            .map_err(|e| e.to_string())?;
        d
    };
    let (mut wr, mut rd) = (Vec::new(), Vec::new());
    let mib = file_mib as f64;
    for _ in 0..files {
        let t = Instant::now();
        let open = FileWriteOpen { path: "/tmp/grove-bench.dat".into(), ..Default::default() };
        let n = c.write_file_from(open, &mut data.as_slice()).map_err(cerr("write"))?;
        wr.push(mib / t.elapsed().as_secs_f64());
        if n != data.len() as u64 {
            return Err(format!("wrote {n} of {} bytes", data.len()));
        }
        let mut sink = Compare { want: &data, at: 0, same: true };
        let t = Instant::now();
        c.read_file_to(
            FileRead { path: "/tmp/grove-bench.dat".into(), ..Default::default() },
            &mut sink,
        )
        .map_err(cerr("read"))?;
        rd.push(mib / t.elapsed().as_secs_f64());
        if !sink.same || sink.at != data.len() {
            return Err("the file read back differs from what was written".into());
        }
    }
    let _ = c.remove("/tmp/grove-bench.dat", false);
    drop(data);

    // Restores of a fork snapshot.
    let snap = dir.join("fork");
    let mut api = parent.api()?;
    let rep = api.call(&serde_json::json!({"cmd": "fork", "dir": s(&snap)?}))?;
    eprintln!("exec: fork snapshot: {rep}");
    let mut cold = Vec::new();
    let mut standby = Vec::new();
    let mut refresh = Vec::new();
    for i in 0..restores {
        let v = dir.join(&format!("r{i}.vsock"));
        let serial = dir.join(&format!("r{i}.serial"));
        let t = Instant::now();
        let vm = Vmm::spawn(
            &vmm,
            &["restore", "--snapshot", s(&snap)?, "--vsock-uds", s(&v)?, "--serial", s(&serial)?],
            None,
            0,
        )?;
        first_exec(&v, &argv, t + OP_TIMEOUT)?;
        cold.push(ms(t));
        drop(vm);

        let sapi = dir.join(&format!("s{i}.api"));
        let v = dir.join(&format!("s{i}.vsock"));
        let serial = dir.join(&format!("s{i}.serial"));
        let mem = g.mem_mib.to_string();
        let mut sb = Vmm::spawn(
            &vmm,
            &[
                "standby",
                "--api-sock",
                s(&sapi)?,
                "--vcpus",
                "1",
                "--mem-mib",
                &mem,
                "--serial",
                s(&serial)?,
            ],
            Some(sapi.clone()),
            0,
        )?;
        let mut sa = sb.api()?;
        let t = Instant::now();
        let rep = sa.call(
            &serde_json::json!({"cmd": "restore", "snapshot": s(&snap)?, "vsock_uds": s(&v)?}),
        )?;
        first_exec(&v, &argv, t + OP_TIMEOUT)?;
        standby.push(ms(t));
        if rep.pointer("/restored/guest/outcome").and_then(|o| o.as_str()) != Some("acknowledged") {
            return Err(format!("standby restore: the guest did not acknowledge: {rep}"));
        }
        if let Some(x) = rep.pointer("/restored/guest/ms").and_then(serde_json::Value::as_f64) {
            refresh.push(x);
        }
        drop(sb);
    }
    drop(c);
    drop(parent);
    cond.loadavg_end = loadavg();

    let report = Report {
        benchmark: "exec",
        conditions: cond,
        cold_boot_to_first_exec_ms: Summary::of("ms", &boot_ms),
        cold_restore_to_first_exec_ms: Summary::of("ms", &cold),
        standby_restore_to_first_exec_ms: Summary::of("ms", &standby),
        standby_post_restore_ms: Summary::of("ms", &refresh),
        exec_true_round_trip_ms: Summary::of("ms", &rt),
        exec_true_new_connection_ms: Summary::of("ms", &rt_new),
        file_write_mib_s: Summary::of("MiB/s", &wr),
        file_read_mib_s: Summary::of("MiB/s", &rd),
    };
    if wants_json(args) {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
        return Ok(());
    }
    let c = &report.conditions;
    println!("grove-bench exec: Linux guest agent over virtio-vsock");
    println!(
        "  conditions: KVM {}; host kernel {} ({} CPUs); load average {} at start, {} at end; MemAvailable {} MiB",
        c.kvm, c.host_kernel, c.host_cpus, c.loadavg_start, c.loadavg_end, c.mem_available_mib_start
    );
    println!(
        "  guest: {} + {}, {} MiB, {} vCPU; `true` = {:?}; files {} MiB",
        c.guest_kernel, c.guest_initrd, c.guest_mem_mib, c.guest_vcpus, c.true_argv, c.file_mib
    );
    let line = |name: &str, s: &Option<Summary>| {
        if let Some(s) = s {
            println!("  {name:<40} {s}");
        }
    };
    line("cold boot -> first exec answered", &report.cold_boot_to_first_exec_ms);
    line("cold restore -> first exec answered", &report.cold_restore_to_first_exec_ms);
    line("standby restore -> first exec answered", &report.standby_restore_to_first_exec_ms);
    line("  of which post-restore refresh", &report.standby_post_restore_ms);
    line("exec `true`, open connection", &report.exec_true_round_trip_ms);
    line("exec `true`, new connection each", &report.exec_true_new_connection_ms);
    line("file write", &report.file_write_mib_s);
    line("file read", &report.file_read_mib_s);
    Ok(())
}

/// A writer that compares what it gets with `want`.
struct Compare<'a> {
    want: &'a [u8],
    at: usize,
    same: bool,
}

impl Write for Compare<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let end = self.at + buf.len();
        self.same &= self.want.get(self.at..end) == Some(buf);
        self.at = end;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
