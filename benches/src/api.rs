//! `grove-bench api`: agentd's API against grove-vmm driven directly, in the same run.
//!
//! - **create**: `SandboxService.Create` from a warm template (request to reply: the VMM
//!   restored and the sandbox Running, persisted) vs the same restore sent straight to a
//!   pre-started `grove-vmm standby` (request to reply). Samples alternate, and before each
//!   API sample agentd's standby pool is full again, so both take the standby path.
//! - **fork(N)**: `SandboxService.Fork` (parent snapshot + N children Running) vs the
//!   VMM's `fork` plus N standby restores in parallel threads.
//! - **sustained**: W concurrent clients create and delete for `--seconds`; creates/s and
//!   the create latency under that load (pool misses say how often a create paid a cold
//!   restore because the pool could not keep up).
//!
//! agentd is the built binary (beside grove-bench, or `GROVE_AGENTD`), with its own data
//! directory under /tmp; everything it and the bench start is killed at the end.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use grove_agentd::client::{self, Clients};
use grove_proto::v1 as pb;
use serde::Serialize;
use serde_json::json;

use crate::stats::{flag, wants_json, Summary};
use crate::vmm_driver::{binaries, loadavg, s, Conditions, TempDir, Vmm};

const CMDLINE: &str = "tg.mode=ready tg.idle_us=1000";

#[derive(Serialize)]
struct Report {
    conditions: Conditions,
    mem_mib: u32,
    pool_size: u32,
    create_direct_ms: Option<Summary>,
    create_api_ms: Option<Summary>,
    create_overhead_p50_ms: f64,
    fork_children: u32,
    fork_direct_ms: Option<Summary>,
    fork_api_ms: Option<Summary>,
    sustained_seconds: f64,
    sustained_workers: u32,
    sustained_creates: u64,
    sustained_creates_per_s: f64,
    sustained_create_ms: Option<Summary>,
    sustained_pool_misses: u64,
    /// CPU time per sustained create (+ delete), from /proc: where the time goes.
    sustained_cpu_ms_per_create: CpuPerCreate,
}

/// CPU milliseconds per create + delete cycle of the sustained run.
#[derive(Serialize, Default)]
struct CpuPerCreate {
    /// agentd itself (user + system).
    agentd: f64,
    /// The VMMs agentd reaped (standby start, restore, run, exit: its children's user + system).
    vmms: f64,
    /// This bench's clients (gRPC).
    clients: f64,
    /// The sum: 2 host CPUs at 100 % give at most 2000 / total creates/s.
    total: f64,
}

/// (own user+system, reaped children's user+system) of a process, in ms.
fn cpu_ms(pid: &str) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at the state (field 3).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
    // SAFETY: sysconf reads a constant of the running system; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let t = |i: usize| f.get(i).copied().unwrap_or(0.0) * 1000.0 / hz;
    // utime, stime, cutime, cstime are fields 14..=17: indices 11..=14 from the state.
    (t(11) + t(12), t(13) + t(14))
}

struct Agentd {
    child: Child,
    data: PathBuf,
}

impl Drop for Agentd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its VMMs outlive it by design: kill them by the pids it recorded.
        if let Ok(rd) = std::fs::read_dir(self.data.join("vmm")) {
            for e in rd.flatten() {
                if let Some(pid) = std::fs::read_to_string(e.path().join("pid"))
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    if String::from_utf8_lossy(&cmd).contains(&*self.data.to_string_lossy()) {
                        // SAFETY: kill(2) has no memory effects; the pid's command line names
                        // this bench's data directory, so it is one of its VMMs.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
    }
}

fn agentd_path() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("GROVE_AGENTD") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let p = exe.with_file_name("agentd");
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("no agentd at {} (build it: cargo build --release -p grove-agentd, or set GROVE_AGENTD)", p.display()))
    }
}

/// A gRPC status as a one-line error naming the call (also grove-bench explore's).
pub(crate) fn st(what: &str) -> impl Fn(tonic::Status) -> String + '_ {
    move |e| format!("{what}: {:?}: {}", e.code(), e.message())
}

async fn pool_ready(c: &mut Clients) -> Result<(u32, u32), String> {
    let i = c.node.info(pb::InfoRequest {}).await.map_err(st("info"))?.into_inner();
    Ok(i.pools.iter().fold((0, 0), |(r, t), p| (r + p.ready, t + p.target)))
}

async fn wait_pool_full(c: &mut Clients) -> Result<(), String> {
    let t = Instant::now();
    loop {
        let (ready, target) = pool_ready(c).await?;
        if target > 0 && ready >= target {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(60) {
            return Err(format!("standby pool stuck at {ready}/{target}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn create_req() -> pb::CreateRequest {
    pb::CreateRequest {
        source: Some(pb::create_request::Source::Template("bench".into())),
        ..Default::default()
    }
}

/// A counter's value in agentd's metrics text (0 if absent).
pub(crate) fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
}

pub fn run(args: &[String]) -> Result<(), String> {
    let runs: usize = flag(args, "--runs")?.unwrap_or(30);
    let mem: u32 = flag(args, "--mem-mib")?.unwrap_or(128);
    let children: u32 = flag(args, "--fork")?.unwrap_or(4);
    let fork_runs: usize = flag(args, "--fork-runs")?.unwrap_or(10);
    let seconds: f64 = flag(args, "--seconds")?.unwrap_or(60.0);
    let workers: u32 = flag(args, "--workers")?.unwrap_or(8);
    let pool: u32 = flag(args, "--pool")?.unwrap_or(8.max(children));
    let (vmm, guest) = binaries()?;
    let agentd = agentd_path()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut cond = Conditions::now(&vmm, &guest);
    let tmp = TempDir::new("api")?;
    let data = tmp.join("data");
    let sock = tmp.join("agentd.sock");
    // GROVE_BENCH_AGENTD_LOG=PATH keeps agentd's log there, at debug level (its per-create
    // steps: restore and catalog commit times); otherwise warnings only, in the temp dir.
    let (log_path, level) = match std::env::var_os("GROVE_BENCH_AGENTD_LOG") {
        Some(p) => (PathBuf::from(p), "grove_agentd=debug,warn"),
        None => (tmp.join("agentd.log"), "warn"),
    };
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let child = Command::new(&agentd)
        .args(["--data-dir", s(&data)?, "--listen", &format!("unix:{}", s(&sock)?)])
        .args(["--metrics-listen", "", "--vmm", s(&vmm)?, "--pool-size", &pool.to_string()])
        .args(["--max-vcpus", "100000", "--max-sandboxes", "100000"])
        .env("RUST_LOG", level)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", agentd.display()))?;
    let agent = Agentd { child, data: data.clone() };
    let report = rt.block_on(async {
        let ep = format!("unix:{}", sock.display());
        let t = Instant::now();
        let mut c = loop {
            match client::connect(&ep, None).await {
                Ok(c) => break c,
                Err(e) if t.elapsed() > Duration::from_secs(30) => return Err(e.to_string()),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        c.template
            .register(pb::RegisterTemplateRequest {
                name: "bench".into(),
                kernel: guest.display().to_string(),
                cmdline: CMDLINE.into(),
                vcpus: 1,
                memory_mib: mem,
                ready_check: pb::ReadyCheck::SerialText.into(),
                ready_text: "READY".into(),
                ..Default::default()
            })
            .await
            .map_err(st("register"))?;
        let mut w = c
            .template
            .warm(pb::WarmRequest { name: "bench".into() })
            .await
            .map_err(st("warm"))?
            .into_inner();
        let mut snap = 0;
        while let Some(m) = w.message().await.map_err(st("warm"))? {
            if let Some(t) = m.template {
                snap = t.snapshot;
            }
        }
        let snap_dir = data.join("snapshots").join(snap.to_string());
        wait_pool_full(&mut c).await?;

        // --- create: direct standby restore vs API, alternating.
        let (mut direct, mut api) = (Vec::new(), Vec::new());
        for i in 0..runs {
            let dsock = tmp.join(&format!("direct-{i}.sock"));
            let mut sb = Vmm::spawn(
                &vmm,
                &[
                    "standby",
                    "--api-sock",
                    s(&dsock)?,
                    "--mem-mib",
                    &mem.to_string(),
                    "--serial",
                    "/dev/null",
                ],
                Some(dsock.clone()),
                0,
            )?;
            let mut a = sb.api()?;
            a.call(&json!({"cmd":"status"}))?;
            let t = Instant::now();
            a.call(&json!({"cmd":"restore","snapshot":snap_dir,"identity":1000 + i}))?;
            direct.push(t.elapsed().as_secs_f64() * 1e3);
            drop(sb);
            wait_pool_full(&mut c).await?;
            let t = Instant::now();
            let sbx = c.sandbox.create(create_req()).await.map_err(st("create"))?.into_inner();
            api.push(t.elapsed().as_secs_f64() * 1e3);
            c.sandbox
                .delete(pb::DeleteRequest { id: sbx.id, subtree: false })
                .await
                .map_err(st("delete"))?;
        }
        let create_direct = Summary::of("ms", &direct);
        let create_api = Summary::of("ms", &api);

        // --- fork(N).
        let (mut fdirect, mut fapi) = (Vec::new(), Vec::new());
        let parent =
            c.sandbox.create(create_req()).await.map_err(st("create parent"))?.into_inner();
        let psock = tmp.join("direct-parent.sock");
        let mut pvmm = Vmm::spawn(
            &vmm,
            &[
                "restore",
                "--snapshot",
                s(&snap_dir)?,
                "--api-sock",
                s(&psock)?,
                "--serial",
                "/dev/null",
            ],
            Some(psock.clone()),
            0,
        )?;
        let mut papi = pvmm.api()?;
        for i in 0..fork_runs {
            let mut sbs = Vec::new();
            let mut apis = Vec::new();
            for k in 0..children {
                let ks = tmp.join(&format!("fork-{i}-{k}.sock"));
                let mut v = Vmm::spawn(
                    &vmm,
                    &[
                        "standby",
                        "--api-sock",
                        s(&ks)?,
                        "--mem-mib",
                        &mem.to_string(),
                        "--serial",
                        "/dev/null",
                    ],
                    Some(ks.clone()),
                    0,
                )?;
                let mut a = v.api()?;
                a.call(&json!({"cmd":"status"}))?;
                apis.push(a);
                sbs.push(v);
            }
            let fdir = tmp.join(&format!("fork-{i}"));
            let t = Instant::now();
            papi.call(&json!({"cmd":"fork","dir":fdir}))?;
            let fd = fdir.clone();
            let handles: Vec<_> = apis
                .into_iter()
                .enumerate()
                .map(|(k, mut a)| {
                    let fd = fd.clone();
                    std::thread::spawn(move || {
                        a.call(&json!({"cmd":"restore","snapshot":fd,"identity":5000 + k}))
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| "restore thread panicked".to_string())??;
            }
            fdirect.push(t.elapsed().as_secs_f64() * 1e3);
            drop(sbs);
            wait_pool_full(&mut c).await?;
            let t = Instant::now();
            let r = c
                .sandbox
                .fork(pb::ForkRequest {
                    id: parent.id.clone(),
                    count: children,
                    ..Default::default()
                })
                .await
                .map_err(st("fork"))?
                .into_inner();
            fapi.push(t.elapsed().as_secs_f64() * 1e3);
            for ch in r.children {
                c.sandbox
                    .delete(pb::DeleteRequest { id: ch.id, subtree: false })
                    .await
                    .map_err(st("delete"))?;
            }
        }
        drop(pvmm);
        c.sandbox
            .delete(pb::DeleteRequest { id: parent.id, subtree: false })
            .await
            .map_err(st("delete"))?;

        // --- sustained create + delete.
        wait_pool_full(&mut c).await?;
        let before =
            c.node.metrics(pb::MetricsRequest {}).await.map_err(st("metrics"))?.into_inner().text;
        let agentd_pid = agent.child.id().to_string();
        let (a0, v0) = cpu_ms(&agentd_pid);
        let (c0, _) = cpu_ms("self");
        let until = Instant::now() + Duration::from_secs_f64(seconds);
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    let s =
                        c.sandbox.create(create_req()).await.map_err(st("create"))?.into_inner();
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                    c.sandbox
                        .delete(pb::DeleteRequest { id: s.id, subtree: false })
                        .await
                        .map_err(st("delete"))?;
                }
                Ok::<_, String>(lat)
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.map_err(|e| e.to_string())??);
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let (a1, v1) = cpu_ms(&agentd_pid);
        let (c1, _) = cpu_ms("self");
        let after =
            c.node.metrics(pb::MetricsRequest {}).await.map_err(st("metrics"))?.into_inner().text;
        let misses = metric(&after, "grove_standby_pool_misses_total")
            - metric(&before, "grove_standby_pool_misses_total");
        let n = lat.len() as u64;
        let per = |d: f64| if n == 0 { f64::NAN } else { d / n as f64 };
        let cpu = CpuPerCreate {
            agentd: per(a1 - a0),
            vmms: per(v1 - v0),
            clients: per(c1 - c0),
            total: per((a1 - a0) + (v1 - v0) + (c1 - c0)),
        };
        cond.loadavg_end = loadavg();
        let overhead = match (&create_api, &create_direct) {
            (Some(a), Some(d)) => a.median - d.median,
            _ => f64::NAN,
        };
        Ok::<_, String>(Report {
            conditions: cond,
            mem_mib: mem,
            pool_size: pool,
            create_direct_ms: create_direct,
            create_api_ms: create_api,
            create_overhead_p50_ms: overhead,
            fork_children: children,
            fork_direct_ms: Summary::of("ms", &fdirect),
            fork_api_ms: Summary::of("ms", &fapi),
            sustained_seconds: elapsed,
            sustained_workers: workers,
            sustained_creates: n,
            sustained_creates_per_s: n as f64 / elapsed,
            sustained_create_ms: Summary::of("ms", &lat),
            sustained_pool_misses: misses,
            sustained_cpu_ms_per_create: cpu,
        })
    })?;
    drop(agent);
    if wants_json(args) {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
        return Ok(());
    }
    let show = |name: &str, s: &Option<Summary>| match s {
        Some(s) => println!("  {name:<44} {s}"),
        None => println!("  {name:<44} (no samples)"),
    };
    println!(
        "grove-bench api: test guest, {} MiB, 1 vCPU, standby pool {} per shape",
        report.mem_mib, report.pool_size
    );
    show("create, direct standby restore (request->reply)", &report.create_direct_ms);
    show("create, agentd API (request->Running reply)", &report.create_api_ms);
    println!("  {:<44} {:.3} ms", "API overhead at p50", report.create_overhead_p50_ms);
    show(
        &format!(
            "fork({}), direct: VMM fork + {} restores",
            report.fork_children, report.fork_children
        ),
        &report.fork_direct_ms,
    );
    show(&format!("fork({}), agentd API", report.fork_children), &report.fork_api_ms);
    println!(
        "  sustained: {} creates (+deletes) in {:.1} s by {} clients = {:.1} creates/s; {} pool misses",
        report.sustained_creates, report.sustained_seconds, report.sustained_workers, report.sustained_creates_per_s, report.sustained_pool_misses
    );
    show("sustained create latency", &report.sustained_create_ms);
    let c = &report.sustained_cpu_ms_per_create;
    println!(
        "  CPU per create+delete: {:.2} ms (agentd {:.2}, VMMs {:.2}, clients {:.2})",
        c.total, c.agentd, c.vmms, c.clients
    );
    report.conditions.print();
    Ok(())
}
