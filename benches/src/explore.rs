//! `grove-bench explore`: fork exploration through agentd, Grove's way against the anchors'.
//!
//! For each N in `--children` (default 1, 4, 16), against a running agentd whose template
//! runs guest-init's agent, samples alternate between two flows that end in the same place
//! (N sandboxes forked from one running parent, each running the same per-child command,
//! `echo $GROVE_CHILD_INDEX` by default):
//!
//! - **A (Grove)**: one `SandboxService.ForkRun` of the running parent into N children, each
//!   child's command started by agentd (today once every child is Running: the fork is all
//!   or nothing); one stream carries every child's output.
//! - **B (the anchors' way, E2B-style)**: `Snapshot` of the parent, then N `Create`s from
//!   that snapshot at once, each followed as soon as it returns by `ProcessService.Start` of
//!   the same command (with `GROVE_CHILD_INDEX` set by the client), one stream per child.
//!
//! Timed from the first call (ForkRun; Snapshot) to each child's first output byte: the
//! first child's and the last child's (the headline: all N children have produced output).
//! Also reported: when all N were Running (A: the `forked` event; B: the last Create's
//! reply), the parent's pause (the snapshot's `pause_ms`), and the standby-pool misses per
//! flow (a miss is a cold restore: the pool is refilled before every sample, untimed).
//!
//! The children (and B's snapshot) are deleted after each sample, untimed. A snapshot of the
//! parent cannot be deleted while the parent's disk chain sits on it (agentd refuses), so the
//! bench creates its own parent per N from `--template` and, after that N's samples,
//! deletes the parent and then B's snapshots, newest first (A's fork snapshots go by
//! agentd's own collection). Each N thus starts from a parent with a fresh snapshot chain.

use std::time::{Duration, Instant};

use grove_agentd::client::{self, Clients};
use grove_proto::v1 as pb;
use serde::Serialize;

use crate::api::{metric, st};
use crate::stats::{flag, wants_json, Summary};
use crate::vmm_driver::{loadavg, mem_available_mib};

const DEFAULT_CMD: &str = "echo $GROVE_CHILD_INDEX";
/// Longest a sample may take (TCG test host: a 16-child sample takes tens of seconds).
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(600);

/// The first output byte of each child of one sample, in ms from the sample's first call,
/// and each child's output (to check that every child ran its own command).
#[derive(Debug, Clone)]
pub struct FirstBytes {
    at: Vec<Option<f64>>,
    out: Vec<Vec<u8>>,
}

impl FirstBytes {
    pub fn new(children: usize) -> Self {
        Self { at: vec![None; children], out: vec![Vec::new(); children] }
    }

    /// Output `data` of child `child` arrived at `ms`: the first non-empty chunk sets the
    /// child's first-byte time; every chunk is kept.
    pub fn output(&mut self, child: usize, ms: f64, data: &[u8]) -> Result<(), String> {
        let n = self.at.len();
        let slot =
            self.at.get_mut(child).ok_or_else(|| format!("output of child {child} of {n}"))?;
        if slot.is_none() && !data.is_empty() {
            *slot = Some(ms);
        }
        self.out[child].extend_from_slice(data);
        Ok(())
    }

    /// The earliest first byte of any child.
    pub fn first(&self) -> Option<f64> {
        self.at.iter().flatten().copied().min_by(f64::total_cmp)
    }

    /// The latest first byte, once every child has one: all N have produced output.
    pub fn last(&self) -> Option<f64> {
        if self.at.iter().any(Option::is_none) {
            return None;
        }
        self.at.iter().flatten().copied().max_by(f64::total_cmp)
    }

    /// The children without output yet.
    pub fn missing(&self) -> Vec<usize> {
        self.at.iter().enumerate().filter(|(_, t)| t.is_none()).map(|(i, _)| i).collect()
    }

    /// With the default command each child prints its own index and nothing else.
    pub fn check_indexes(&self) -> Result<(), String> {
        for (i, o) in self.out.iter().enumerate() {
            let text = String::from_utf8_lossy(o);
            if text.trim_end() != i.to_string() {
                return Err(format!("child {i} printed {text:?}, not its index"));
            }
        }
        Ok(())
    }
}

/// One sample of one flow.
#[derive(Debug, Default, Clone, Serialize)]
struct Sample {
    first_ms: f64,
    last_ms: f64,
    /// All N children Running (A: the `forked` event; B: the last Create's reply).
    running_ms: f64,
    /// The parent's pause for the snapshot.
    pause_ms: f64,
    /// Memory layers in the snapshot's chain.
    depth: u32,
    /// B only: the Snapshot call's reply (0 for A, whose fork is inside ForkRun).
    snapshot_ms: f64,
    /// Standby-pool misses during the sample.
    pool_misses: u64,
}

#[derive(Serialize)]
struct FlowSummary {
    first_byte_ms: Option<Summary>,
    /// The headline: every child has produced output.
    last_first_byte_ms: Option<Summary>,
    all_running_ms: Option<Summary>,
    parent_pause_ms: Option<Summary>,
    /// B only: the Snapshot call's reply.
    snapshot_call_ms: Option<Summary>,
    pool_misses: u64,
    samples: Vec<Sample>,
}

impl FlowSummary {
    fn of(s: &[Sample]) -> Self {
        let col = |f: fn(&Sample) -> f64| s.iter().map(f).collect::<Vec<_>>();
        Self {
            first_byte_ms: Summary::of("ms", &col(|x| x.first_ms)),
            last_first_byte_ms: Summary::of("ms", &col(|x| x.last_ms)),
            all_running_ms: Summary::of("ms", &col(|x| x.running_ms)),
            parent_pause_ms: Summary::of("ms", &col(|x| x.pause_ms)),
            snapshot_call_ms: Summary::of("ms", &col(|x| x.snapshot_ms))
                .filter(|_| s.iter().any(|x| x.snapshot_ms > 0.0)),
            pool_misses: s.iter().map(|x| x.pool_misses).sum(),
            samples: s.to_vec(),
        }
    }
}

#[derive(Serialize)]
struct Series {
    children: u32,
    grove_forkrun: FlowSummary,
    snapshot_create_exec: FlowSummary,
    /// B / A of the medians.
    ratio_first_p50: f64,
    ratio_last_p50: f64,
}

#[derive(Serialize)]
struct Conditions {
    /// Where agentd and its VMMs run (NodeInfo).
    agentd_host: String,
    agentd_kernel: String,
    kvm: String,
    agentd_version: String,
    /// Where this bench runs (the same machine over a Unix socket, or not).
    bench_host: String,
    host_cpus: usize,
    loadavg_start: String,
    loadavg_end: String,
    mem_available_mib_start: u64,
    endpoint: String,
    template: String,
    template_memory_mib: u32,
    template_vcpus: u32,
    /// Standby VMMs agentd keeps per shape (the template's).
    standby_pool_target: u32,
    command: String,
}

#[derive(Serialize)]
struct Report {
    conditions: Conditions,
    runs: usize,
    series: Vec<Series>,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string()
}

fn misses(text: &str) -> u64 {
    metric(text, "grove_standby_pool_misses_total")
}

async fn pool_misses(c: &mut Clients) -> Result<u64, String> {
    let t = c.node.metrics(pb::MetricsRequest {}).await.map_err(st("metrics"))?.into_inner().text;
    Ok(misses(&t))
}

/// Waits until the template's shape has its whole standby pool (untimed, before a sample).
async fn wait_pool_full(c: &mut Clients, vcpus: u32, mem: u32) -> Result<(), String> {
    let t = Instant::now();
    loop {
        let i = c.node.info(pb::InfoRequest {}).await.map_err(st("info"))?.into_inner();
        let p = i.pools.iter().find(|p| p.vcpus == vcpus && p.memory_mib == mem);
        match p {
            None => return Ok(()), // no pool for this shape (pool size 0)
            Some(p) if p.ready >= p.target => return Ok(()),
            Some(p) if t.elapsed() > Duration::from_secs(300) => {
                return Err(format!("standby pool stuck at {}/{}", p.ready, p.target))
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn delete_all(c: &Clients, ids: Vec<String>) -> Result<(), String> {
    let tasks: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let mut c = c.clone();
            tokio::spawn(async move {
                c.sandbox
                    .delete(pb::DeleteRequest { id: id.clone(), subtree: false })
                    .await
                    .map_err(st("delete"))
                    .map_err(|e| format!("{id}: {e}"))
            })
        })
        .collect();
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Flow A: one ForkRun; returns the sample and the children's ids.
async fn flow_a(
    c: &mut Clients,
    parent: &str,
    n: u32,
    argv: &[String],
    check: bool,
) -> Result<(Sample, Vec<String>), String> {
    let req = pb::ForkRunRequest {
        id: parent.into(),
        count: n,
        argv: argv.to_vec(),
        labels: [("grove.bench".to_string(), "explore".to_string())].into(),
        ..Default::default()
    };
    let misses0 = pool_misses(c).await?;
    let t0 = Instant::now();
    let mut stream = c.sandbox.fork_run(req).await.map_err(st("ForkRun"))?.into_inner();
    let mut fb = FirstBytes::new(n as usize);
    let mut sample = Sample::default();
    let mut ids = Vec::new();
    let mut exited = 0;
    let run = async {
        while let Some(ev) = stream.message().await.map_err(st("ForkRun stream"))? {
            let child = ev.child as usize;
            match ev.event {
                Some(pb::fork_run_event::Event::Forked(f)) => {
                    sample.running_ms = ms(t0);
                    let s = f.snapshot.unwrap_or_default();
                    sample.pause_ms = s.pause_ms;
                    sample.depth = s.depth;
                    ids = f.children.into_iter().map(|c| c.id).collect();
                }
                Some(pb::fork_run_event::Event::Process(p)) => match p.event {
                    Some(pb::process_event::Event::Output(o)) => {
                        fb.output(child, ms(t0), &o.data)?;
                    }
                    Some(pb::process_event::Event::Exit(x)) => {
                        if !x.error.is_empty()
                            || x.status != Some(pb::process_exit::Status::Code(0))
                        {
                            return Err(format!("child {child}'s command ended with {x:?}"));
                        }
                        exited += 1;
                    }
                    _ => {}
                },
                Some(pb::fork_run_event::Event::Error(e)) => {
                    return Err(format!("child {child} ({}): {e}", ev.sandbox_id))
                }
                None => {}
            }
            if exited == n && fb.missing().is_empty() {
                break;
            }
        }
        Ok::<_, String>(())
    };
    let r = match tokio::time::timeout(SAMPLE_TIMEOUT, run).await {
        Ok(r) => r,
        Err(_) => Err(format!("ForkRun({n}): no output from children {:?} in time", fb.missing())),
    };
    drop(stream);
    let ids = finish(c, &mut sample, misses0, r, ids, &fb, check.then(|| format!("ForkRun({n})")))
        .await?;
    Ok((sample, ids))
}

/// The end of a sample of either flow: the pool misses during it; on `outcome`'s error its
/// children deleted; each child's output checked to be its index (with `check`: the flow's
/// name); the first and last child's first byte. The children's ids back.
async fn finish(
    c: &mut Clients,
    sample: &mut Sample,
    misses0: u64,
    outcome: Result<(), String>,
    ids: Vec<String>,
    fb: &FirstBytes,
    check: Option<String>,
) -> Result<Vec<String>, String> {
    sample.pool_misses = pool_misses(c).await?.saturating_sub(misses0);
    if let Err(e) = outcome {
        let _ = delete_all(c, ids).await;
        return Err(e);
    }
    if let Some(flow) = check {
        fb.check_indexes().map_err(|e| format!("{flow}: {e}"))?;
    }
    sample.first_ms = fb.first().unwrap_or(f64::NAN);
    sample.last_ms =
        fb.last().ok_or_else(|| format!("children {:?} printed nothing", fb.missing()))?;
    Ok(ids)
}

/// One child of flow B: Create from the snapshot, then Start; (id, created ms, output
/// chunks with their ms). The id comes back even when Start fails, for the cleanup.
async fn b_child(
    mut c: Clients,
    snapshot: u64,
    index: u32,
    argv: Vec<String>,
    t0: Instant,
) -> (Option<String>, Result<(f64, Vec<(f64, Vec<u8>)>), String>) {
    let create = pb::CreateRequest {
        source: Some(pb::create_request::Source::SnapshotId(snapshot)),
        labels: [("grove.bench".to_string(), "explore".to_string())].into(),
        ..Default::default()
    };
    let sb = match c.sandbox.create(create).await {
        Ok(r) => r.into_inner(),
        Err(e) => return (None, Err(st("Create")(e))),
    };
    let created = ms(t0);
    let id = sb.id.clone();
    let env: std::collections::HashMap<String, String> = [
        ("GROVE_CHILD_INDEX".to_string(), index.to_string()),
        ("GROVE_SANDBOX_ID".to_string(), id.clone()),
    ]
    .into();
    let start = pb::StartProcessRequest { sandbox_id: id.clone(), argv, env, ..Default::default() };
    let r = async {
        let mut s = c.process.start(start).await.map_err(st("Start"))?.into_inner();
        let mut out = Vec::new();
        while let Some(ev) = s.message().await.map_err(st("Start stream"))? {
            match ev.event {
                Some(pb::process_event::Event::Output(o)) => out.push((ms(t0), o.data)),
                Some(pb::process_event::Event::Exit(x)) => {
                    if !x.error.is_empty() || x.status != Some(pb::process_exit::Status::Code(0)) {
                        return Err(format!("child {index}'s command ended with {x:?}"));
                    }
                    return Ok((created, out));
                }
                _ => {}
            }
        }
        Err(format!("child {index}: the stream ended without an exit"))
    }
    .await;
    (Some(id), r)
}

/// Flow B: Snapshot, N Creates at once, Start in each as it comes up; returns the sample,
/// the children's ids and the snapshot.
async fn flow_b(
    c: &mut Clients,
    parent: &str,
    n: u32,
    argv: &[String],
    check: bool,
) -> Result<(Sample, Vec<String>, u64), String> {
    let misses0 = pool_misses(c).await?;
    let t0 = Instant::now();
    let snap = c
        .sandbox
        .snapshot(pb::SnapshotRequest {
            id: parent.into(),
            labels: [("grove.bench".to_string(), "explore".to_string())].into(),
        })
        .await
        .map_err(st("Snapshot"))?
        .into_inner();
    let snapshot_ms = ms(t0);
    let tasks: Vec<_> =
        (0..n).map(|i| tokio::spawn(b_child(c.clone(), snap.id, i, argv.to_vec(), t0))).collect();
    let mut fb = FirstBytes::new(n as usize);
    let mut sample =
        Sample { pause_ms: snap.pause_ms, depth: snap.depth, snapshot_ms, ..Default::default() };
    let mut ids = Vec::new();
    let mut first_err = None;
    let all = async {
        let mut v = Vec::new();
        for t in tasks {
            v.push(t.await);
        }
        v
    };
    let results = tokio::time::timeout(SAMPLE_TIMEOUT, all)
        .await
        .map_err(|_| format!("snapshot + {n} creates + exec: not done in time"))?;
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Err(e) => first_err = first_err.or(Some(format!("child {i}: task: {e}"))),
            Ok((id, r)) => {
                ids.extend(id);
                match r {
                    Err(e) => first_err = first_err.or(Some(e)),
                    Ok((created, out)) => {
                        sample.running_ms = sample.running_ms.max(created);
                        for (t, d) in out {
                            fb.output(i, t, &d)?;
                        }
                    }
                }
            }
        }
    }
    let outcome = first_err.map_or(Ok(()), Err);
    let flow = check.then(|| format!("snapshot + create({n})"));
    let ids = finish(c, &mut sample, misses0, outcome, ids, &fb, flow).await?;
    Ok((sample, ids, snap.id))
}

fn ratio(b: &Option<Summary>, a: &Option<Summary>) -> f64 {
    match (b, a) {
        (Some(b), Some(a)) if a.median > 0.0 => b.median / a.median,
        _ => f64::NAN,
    }
}

/// A parent for one N: created from the template, its agent answering (a `sh -c :` run).
async fn new_parent(c: &mut Clients, template: &str) -> Result<String, String> {
    let p = c
        .sandbox
        .create(pb::CreateRequest {
            source: Some(pb::create_request::Source::Template(template.into())),
            labels: [("grove.bench".to_string(), "explore-parent".to_string())].into(),
            ..Default::default()
        })
        .await
        .map_err(st("create parent"))?
        .into_inner();
    let start = pb::StartProcessRequest {
        sandbox_id: p.id.clone(),
        argv: vec!["sh".into(), "-c".into(), ":".into()],
        ..Default::default()
    };
    let mut pc = c.clone();
    let first = async move {
        let mut s = pc.process.start(start).await?.into_inner();
        while s.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    };
    if let Err(e) = first.await {
        let _ = c.sandbox.delete(pb::DeleteRequest { id: p.id, subtree: true }).await;
        return Err(st("parent: first command")(e));
    }
    Ok(p.id)
}

/// Deletes the parent, then B's snapshots newest first (each one's fork snapshots above it
/// go by agentd's collection once nothing uses them).
async fn drop_parent(c: &mut Clients, parent: String, snaps: &[u64]) -> Result<(), String> {
    c.sandbox
        .delete(pb::DeleteRequest { id: parent, subtree: true })
        .await
        .map_err(st("delete parent"))?;
    for &id in snaps.iter().rev() {
        c.sandbox
            .delete_snapshot(pb::DeleteSnapshotRequest { id })
            .await
            .map_err(st("delete snapshot"))
            .map_err(|e| format!("snapshot {id}: {e}"))?;
    }
    Ok(())
}

pub fn run(args: &[String]) -> Result<(), String> {
    let runs: usize = flag(args, "--runs")?.unwrap_or(5);
    let endpoint: String =
        flag(args, "--endpoint")?.unwrap_or_else(|| client::DEFAULT_ENDPOINT.to_string());
    let token = match flag::<String>(args, "--token-file")? {
        Some(f) => {
            Some(std::fs::read_to_string(&f).map_err(|e| format!("{f}: {e}"))?.trim().to_string())
        }
        None => None,
    };
    let template: String = flag(args, "--template")?.unwrap_or_else(|| "linux".into());
    let list: String = flag(args, "--children")?.unwrap_or_else(|| "1,4,16".into());
    let ns = list
        .split(',')
        .map(|v| v.trim().parse::<u32>().map_err(|_| format!("--children: cannot parse '{v}'")))
        .collect::<Result<Vec<_>, _>>()?;
    if ns.iter().any(|&n| n == 0 || n > 100) {
        return Err("--children: each N in 1..=100".into());
    }
    let cmd: String = flag(args, "--cmd")?.unwrap_or_else(|| DEFAULT_CMD.into());
    let check = cmd == DEFAULT_CMD;
    // The JSON report into a file as well (the text still on stdout).
    let json_out: Option<String> = flag(args, "--json-out")?;
    let argv = vec!["sh".to_string(), "-c".to_string(), cmd.clone()];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let loadavg_start = loadavg();
    let mem_start = mem_available_mib();
    let report = rt.block_on(async {
        let mut c = client::connect(&endpoint, token.as_deref()).await.map_err(|e| e.to_string())?;
        let info = c.node.info(pb::InfoRequest {}).await.map_err(st("info"))?.into_inner();
        let tmpl = c
            .template
            .list(pb::ListTemplatesRequest {})
            .await
            .map_err(st("templates"))?
            .into_inner()
            .templates
            .into_iter()
            .find(|t| t.name == template)
            .ok_or_else(|| format!("no template {template}"))?;
        if !tmpl.guest_agent || tmpl.snapshot == 0 {
            return Err(format!(
                "template {template} needs guest-init's agent and a warm snapshot (guest_agent {}, snapshot {})",
                tmpl.guest_agent, tmpl.snapshot
            ));
        }
        let (vcpus, mem) = (tmpl.vcpus, tmpl.memory_mib);
        let pool = info
            .pools
            .iter()
            .find(|p| p.vcpus == vcpus && p.memory_mib == mem)
            .map_or(0, |p| p.target);
        let mut series = Vec::new();
        for &n in &ns {
            eprintln!("explore: N={n}: parent from template {template}");
            let parent = new_parent(&mut c, &template).await?;
            let (mut a, mut b, mut snaps) = (Vec::new(), Vec::new(), Vec::new());
            let mut failed = None;
            for r in 0..runs {
                wait_pool_full(&mut c, vcpus, mem).await?;
                match flow_a(&mut c, &parent, n, &argv, check).await {
                    Ok((s, ids)) => {
                        eprintln!(
                            "explore: N={n} run {r} A: first {:.1} ms, last {:.1} ms, running {:.1} ms, pause {:.1} ms, misses {}",
                            s.first_ms, s.last_ms, s.running_ms, s.pause_ms, s.pool_misses
                        );
                        a.push(s);
                        delete_all(&c, ids).await?;
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
                wait_pool_full(&mut c, vcpus, mem).await?;
                match flow_b(&mut c, &parent, n, &argv, check).await {
                    Ok((s, ids, snap)) => {
                        eprintln!(
                            "explore: N={n} run {r} B: first {:.1} ms, last {:.1} ms, running {:.1} ms, snapshot {:.1} ms, pause {:.1} ms, misses {}",
                            s.first_ms, s.last_ms, s.running_ms, s.snapshot_ms, s.pause_ms, s.pool_misses
                        );
                        b.push(s);
                        snaps.push(snap);
                        delete_all(&c, ids).await?;
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            // The snapshot of a failed B sample is the parent's last one too.
            if failed.is_some() {
                if let Ok(l) = c.sandbox.list_snapshots(pb::ListSnapshotsRequest {}).await {
                    for s in l.into_inner().snapshots {
                        if s.sandbox == parent
                            && s.labels.get("grove.bench").map(String::as_str) == Some("explore")
                            && !snaps.contains(&s.id)
                        {
                            snaps.push(s.id);
                        }
                    }
                    snaps.sort_unstable();
                }
            }
            drop_parent(&mut c, parent, &snaps).await?;
            if let Some(e) = failed {
                return Err(e);
            }
            let ga = FlowSummary::of(&a);
            let gb = FlowSummary::of(&b);
            series.push(Series {
                children: n,
                ratio_first_p50: ratio(&gb.first_byte_ms, &ga.first_byte_ms),
                ratio_last_p50: ratio(&gb.last_first_byte_ms, &ga.last_first_byte_ms),
                grove_forkrun: ga,
                snapshot_create_exec: gb,
            });
        }
        let conditions = Conditions {
            agentd_host: info.hostname,
            agentd_kernel: info.kernel,
            kvm: info.kvm,
            agentd_version: info.agentd_version,
            bench_host: hostname(),
            host_cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            loadavg_start,
            loadavg_end: loadavg(),
            mem_available_mib_start: mem_start,
            endpoint: endpoint.clone(),
            template: template.clone(),
            template_memory_mib: mem,
            template_vcpus: vcpus,
            standby_pool_target: pool,
            command: cmd.clone(),
        };
        Ok::<_, String>(Report { conditions, runs, series })
    })?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    if let Some(path) = json_out {
        std::fs::write(&path, format!("{json}\n")).map_err(|e| format!("{path}: {e}"))?;
    }
    if wants_json(args) {
        println!("{json}");
        return Ok(());
    }
    print_text(&report);
    Ok(())
}

fn print_text(r: &Report) {
    let c = &r.conditions;
    println!(
        "grove-bench explore: template {} ({} MiB, {} vCPU), command {:?}, {} runs per N, flows alternating",
        c.template, c.template_memory_mib, c.template_vcpus, c.command, r.runs
    );
    println!(
        "  A = ForkRun(N) of a running parent; B = Snapshot + N Creates from it + Start in each"
    );
    println!(
        "  times in ms from the first call (ForkRun; Snapshot) to a child's first output byte"
    );
    let p = |s: &Option<Summary>| match s {
        Some(s) => format!("{:9.1} {:9.1}", s.median, s.p99),
        None => format!("{:>9} {:>9}", "-", "-"),
    };
    println!(
        "  {:>3} {:<5} {:>19} {:>19} {:>19} {:>19} {:>19} {:>6}",
        "N",
        "flow",
        "first child p50/p99",
        "last child p50/p99",
        "all running p50/p99",
        "parent pause",
        "Snapshot reply",
        "misses"
    );
    for s in &r.series {
        for (name, f) in [("A", &s.grove_forkrun), ("B", &s.snapshot_create_exec)] {
            println!(
                "  {:>3} {:<5} {:>19} {:>19} {:>19} {:>19} {:>19} {:>6}",
                s.children,
                name,
                p(&f.first_byte_ms),
                p(&f.last_first_byte_ms),
                p(&f.all_running_ms),
                p(&f.parent_pause_ms),
                p(&f.snapshot_call_ms),
                f.pool_misses
            );
        }
        println!(
            "  {:>3} B/A   first child p50 {:.2}x, last child p50 {:.2}x",
            s.children, s.ratio_first_p50, s.ratio_last_p50
        );
    }
    println!(
        "  conditions: agentd and its VMMs on {} (kernel {}, KVM {}, agentd {}); bench on {} ({} CPUs) via {}; load average {} at start, {} at end; MemAvailable {} MiB; standby pool {} per shape",
        c.agentd_host,
        c.agentd_kernel,
        c.kvm,
        c.agentd_version,
        c.bench_host,
        c.host_cpus,
        c.endpoint,
        c.loadavg_start,
        c.loadavg_end,
        c.mem_available_mib_start,
        c.standby_pool_target
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_keep_each_childs_first_non_empty_chunk() {
        let mut fb = FirstBytes::new(3);
        assert_eq!(fb.first(), None);
        fb.output(1, 5.0, b"").unwrap(); // an empty chunk is no byte
        fb.output(1, 7.0, b"1").unwrap();
        fb.output(1, 9.0, b"\n").unwrap(); // later chunks do not move the time
        assert_eq!(fb.first(), Some(7.0));
        assert_eq!(fb.last(), None, "not every child has output yet");
        assert_eq!(fb.missing(), vec![0, 2]);
        fb.output(2, 3.0, b"2\n").unwrap();
        fb.output(0, 12.0, b"0\n").unwrap();
        assert!(fb.missing().is_empty());
        assert_eq!(fb.first(), Some(3.0));
        assert_eq!(fb.last(), Some(12.0));
        fb.check_indexes().unwrap();
        assert!(fb.output(3, 1.0, b"x").is_err(), "a child beyond N is refused");
    }

    #[test]
    fn index_check_catches_a_child_printing_another_index() {
        let mut fb = FirstBytes::new(2);
        fb.output(0, 1.0, b"0\n").unwrap();
        fb.output(1, 1.0, b"0\n").unwrap();
        assert!(fb.check_indexes().unwrap_err().contains("child 1"));
    }

    #[test]
    fn pool_misses_parse_from_the_metrics_text() {
        let t = "# HELP grove_standby_pool_misses_total x\ngrove_standby_pool_misses_total 3\n";
        assert_eq!(misses(t), 3);
        assert_eq!(misses(""), 0);
    }

    #[test]
    fn summaries_and_ratio_of_two_flows() {
        let s = |ms: f64| Sample { first_ms: ms, last_ms: 2.0 * ms, ..Default::default() };
        let a = FlowSummary::of(&[s(10.0), s(20.0), s(30.0)]);
        let b = FlowSummary::of(&[s(40.0), s(60.0), s(50.0)]);
        assert!((ratio(&b.first_byte_ms, &a.first_byte_ms) - 2.5).abs() < 1e-9);
        assert!((ratio(&b.last_first_byte_ms, &a.last_first_byte_ms) - 2.5).abs() < 1e-9);
        assert!(ratio(&None, &a.first_byte_ms).is_nan());
    }
}
