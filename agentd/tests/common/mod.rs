//! Helpers of agentd's end-to-end tests: a real agentd (the built binary) in a temporary
//! data directory, the test guest as a template, and cleanup that kills every VMM the test
//! started (by the pids in its data directory, checked against their command lines) even
//! when a test fails.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use grove_agentd::client::{self, Clients};
use grove_proto::v1 as pb;

pub const AGENTD: &str = env!("CARGO_BIN_EXE_agentd");
pub const GROVE: &str = env!("CARGO_BIN_EXE_grove");
/// Hang guard for waits (not a timing assertion).
pub const DEADLINE: Duration = Duration::from_secs(120);
/// Shorter guard for settling checks.
pub const SETTLE: Duration = Duration::from_secs(30);

#[path = "../../../testsupport/skip.rs"]
mod skip;

/// Whether /dev/kvm is usable. If not, the test fails with the reason unless
/// `GROVE_ALLOW_SKIP` names `kvm` (then it prints the skip and the caller returns).
pub fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !ok {
        skip::missing("kvm", "/dev/kvm is not available");
    }
    ok
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("agentd/ has a parent").to_path_buf()
}

/// grove-vmm: `GROVE_VMM`, else beside agentd (built here with the same profile if absent).
pub fn vmm() -> &'static Path {
    static VMM: OnceLock<PathBuf> = OnceLock::new();
    VMM.get_or_init(|| {
        if let Some(p) = std::env::var_os("GROVE_VMM").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        let beside = Path::new(AGENTD).with_file_name("grove-vmm");
        if !beside.is_file() {
            let release = AGENTD.contains("/release/");
            let mut c = Command::new(env!("CARGO"));
            c.args(["build", "-p", "grove-vmm", "--quiet"]).current_dir(repo_root());
            if release {
                c.arg("--release");
            }
            let st = c.status().expect("run cargo build -p grove-vmm");
            assert!(st.success(), "cargo build -p grove-vmm failed");
        }
        assert!(beside.is_file(), "no grove-vmm at {}", beside.display());
        beside
    })
}

/// The test guest ELF: `GROVE_TESTGUEST`, else scripts/build-testguest.sh.
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
        assert!(out.status.success(), "scripts/build-testguest.sh failed");
        let s = String::from_utf8(out.stdout).expect("utf-8");
        s.lines().last().expect("a path").trim().to_string()
    })
}

/// A running agentd over a temporary data directory.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub extra: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Agent {
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    pub fn sock(&self) -> PathBuf {
        self.dir.path().join("agentd.sock")
    }
    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.sock().display())
    }
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("agentd.log")
    }

    /// Starts agentd with a pool of `pool` standby VMMs per shape and `extra` flags.
    pub fn start(pool: u32, extra: &[&str]) -> Self {
        Self::start_env(pool, extra, &[])
    }

    pub fn start_env(pool: u32, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let dir =
            tempfile::Builder::new().prefix("agentd-test").tempdir_in("/tmp").expect("tempdir");
        let mut extra: Vec<String> = extra.iter().map(|s| (*s).to_string()).collect();
        extra.extend(["--pool-size".into(), pool.to_string()]);
        let env = env.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect();
        let mut a = Self { dir, child: None, extra, env };
        a.spawn();
        a
    }

    /// (Re)starts the agentd process on the same data directory and waits for its socket.
    pub fn spawn(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.log()).expect("log");
        let mut c = Command::new(AGENTD);
        c.arg("--data-dir")
            .arg(self.data())
            .arg("--listen")
            .arg(format!("unix:{}", self.sock().display()))
            .arg("--metrics-listen")
            .arg("")
            .arg("--vmm")
            .arg(vmm())
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        self.child = Some(c.spawn().expect("spawn agentd"));
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(self.sock()).is_err() {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "agentd exited with {st}: {}",
                    std::fs::read_to_string(self.log()).unwrap_or_default()
                );
            }
            assert!(t.elapsed() < DEADLINE, "agentd did not come up");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// kill -9 of agentd (its VMMs keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn clients(&self) -> Clients {
        client::connect(&self.endpoint(), None).await.expect("connect to agentd")
    }

    /// Pids of the VMMs running under this data directory (command line names it).
    pub fn vmm_pids(&self) -> Vec<u32> {
        vmm_pids_under(&self.data())
    }

    /// VMM directories (`data/vmm/*`).
    pub fn vmm_dirs(&self) -> Vec<String> {
        list(&self.data().join("vmm"))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        for pid in self.vmm_pids() {
            // SAFETY-free: plain kill(2) through std's Command-free path.
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    }
}

pub fn list(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .map(|it| {
            it.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Pids of live (not zombie) processes whose command line contains `dir`.
pub fn vmm_pids_under(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    for e in list(Path::new("/proc")) {
        let Ok(pid) = e.parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let argv0 = cmd.split(|&b| b == 0).next().unwrap_or_default();
        let is_vmm = Path::new(&*String::from_utf8_lossy(argv0))
            .file_name()
            .is_some_and(|n| n == "grove-vmm");
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !is_vmm || !cmd.contains(&needle) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state =
            stat.rsplit_once(") ").map(|(_, r)| r.chars().next().unwrap_or('?')).unwrap_or('?');
        if state != 'Z' && state != 'X' {
            out.push(pid);
        }
    }
    out
}

/// Registers the test guest as template `name` (ready check: READY on serial) and warms it.
pub async fn warm_test_guest(
    c: &mut Clients,
    name: &str,
    cmdline: &str,
    mem_mib: u32,
) -> pb::Template {
    c.template
        .register(pb::RegisterTemplateRequest {
            name: name.into(),
            kernel: guest().into(),
            cmdline: cmdline.into(),
            vcpus: 1,
            memory_mib: mem_mib,
            ready_check: pb::ReadyCheck::SerialText.into(),
            ready_text: "READY".into(),
            ..Default::default()
        })
        .await
        .expect("register template");
    let mut s =
        c.template.warm(pb::WarmRequest { name: name.into() }).await.expect("warm").into_inner();
    let mut last = None;
    while let Some(m) = s.message().await.expect("warm progress") {
        last = Some(m);
    }
    let last = last.expect("warm sent progress");
    assert_eq!(last.stage(), pb::warm_progress::Stage::Done);
    last.template.expect("the last message carries the template")
}

pub fn create_req(template: &str) -> pb::CreateRequest {
    pb::CreateRequest {
        source: Some(pb::create_request::Source::Template(template.into())),
        ..Default::default()
    }
}

/// Waits until `cond` holds (hang guard only).
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The guest console of a sandbox's VMM (by the VMM directory of its pid).
pub fn serial_of(agent: &Agent, pid: u32) -> String {
    for d in agent.vmm_dirs() {
        let p = agent.data().join("vmm").join(&d);
        if std::fs::read_to_string(p.join("pid")).ok().and_then(|s| s.trim().parse::<u32>().ok())
            == Some(pid)
        {
            return std::fs::read_to_string(p.join("serial.log")).unwrap_or_default();
        }
    }
    panic!("no VMM directory for pid {pid}");
}

pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        !stat.contains(") Z ")
    }
}

/// Every VMM process under the data dir has a directory, and every directory belongs to a
/// sandbox (live, or stopped/failed keeping its logs) or a standby VMM (the pool's size).
pub async fn assert_no_strays(agent: &Agent, c: &mut Clients) {
    let info = c.node.info(pb::InfoRequest {}).await.unwrap().into_inner();
    let standby: usize = info.pools.iter().map(|p| p.ready as usize).sum();
    let all = c.sandbox.list(pb::ListRequest::default()).await.unwrap().into_inner().sandboxes;
    let live: Vec<u32> = all.iter().filter(|s| s.vmm_pid != 0).map(|s| s.vmm_pid).collect();
    // Stopped and failed sandboxes keep their VMM directory (logs) until deleted.
    let dead = all.len() - live.len();
    let t = Instant::now();
    loop {
        let pids = agent.vmm_pids();
        let starting = pids.len().saturating_sub(live.len() + standby);
        // The pool may be starting replacements; wait until processes and dirs agree.
        if agent.vmm_dirs().len() == pids.len() + dead
            && live.iter().all(|p| pids.contains(p))
            && starting <= 4
        {
            let info = c.node.info(pb::InfoRequest {}).await.unwrap().into_inner();
            let standby_now: usize = info.pools.iter().map(|p| p.ready as usize).sum();
            if pids.len() == live.len() + standby_now {
                return;
            }
        }
        if t.elapsed() > SETTLE {
            let cmds: Vec<String> = pids
                .iter()
                .map(|p| {
                    let c = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                    format!("{p}: {}", String::from_utf8_lossy(&c).replace('\0', " "))
                })
                .collect();
            panic!(
                "stray VMMs: pids {pids:?}, sandboxes {live:?}, dirs {:?}:\n{}",
                agent.vmm_dirs(),
                cmds.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
