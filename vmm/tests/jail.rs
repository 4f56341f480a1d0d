//! grove-jailer (issue 14, part 5): a jailed grove-vmm boots the test guest, is fork-
//! snapshotted, and its child restores in a jail of its own; each runs as an unprivileged uid
//! with no capabilities, `no_new_privs` and its seccomp filters, as PID 1 of its own PID
//! namespace, in its own mount namespace whose root holds only the paths it was given, in a
//! cgroup with the limits asked for; the jailer removes the jail's root and cgroup when the
//! VMM ends. Needs root and KVM (else it fails unless GROVE_ALLOW_SKIP allows `root`/`kvm`).

// Integration tests: each file is a test crate of its own.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{guest, id_line, kvm_available, skip, tmp, Api, Vmm};

const JAILER: &str = env!("CARGO_BIN_EXE_grove-jailer");
const VMM: &str = env!("CARGO_BIN_EXE_grove-vmm");
/// The unprivileged user the VMMs run as (`nobody`).
const UID: u32 = 65534;
const CGROUP_PARENT: &str = "grove-test";
const MEMORY: u64 = 512 << 20;

fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    let ok = unsafe { libc::geteuid() } == 0;
    if !ok {
        skip::missing("root", "the jail needs root (namespaces, mounts, cgroups)");
    }
    ok
}

/// A jail started by this test: its id, the jailer's process guard and the pid file.
struct Jail {
    id: String,
    vmm: Vmm,
    pid_file: PathBuf,
    roots: PathBuf,
}

impl Jail {
    fn start(roots: &Path, name: &str, rw: &[&Path], ro: &[&Path], vmm_args: &[&str]) -> Jail {
        let id = format!("t{}-{name}", std::process::id());
        let pid_file = roots.with_file_name(format!("{id}.pid"));
        let mut args: Vec<String> = [
            "--id",
            &id,
            "--uid",
            &UID.to_string(),
            "--gid",
            &UID.to_string(),
            "--root-base",
            roots.to_str().unwrap(),
            "--cgroup-parent",
            CGROUP_PARENT,
            "--memory-bytes",
            &MEMORY.to_string(),
            "--cpu-quota-us",
            "100000",
            "--pids",
            "64",
            "--pid-file",
            pid_file.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        for p in rw {
            args.extend(["--bind".into(), p.display().to_string()]);
        }
        for p in ro {
            args.extend(["--bind-ro".into(), p.display().to_string()]);
        }
        args.push("--".into());
        args.push(VMM.into());
        args.extend(vmm_args.iter().map(|s| (*s).to_string()));
        let vmm = Vmm::spawn_program(JAILER, &args, None, Stdio::piped(), &[]);
        Jail { id, vmm, pid_file, roots: roots.to_path_buf() }
    }

    /// The VMM's host PID (from the jailer's pid file).
    fn vmm_pid(&self) -> u32 {
        let t = Instant::now();
        loop {
            if let Some(p) =
                std::fs::read_to_string(&self.pid_file).ok().and_then(|s| s.trim().parse().ok())
            {
                return p;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no pid file\n{}", self.vmm.dump());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let root = Path::new("/sys/fs/cgroup");
        let mut v: Vec<PathBuf> = ["memory", "cpu", "pids", "unified", ""]
            .iter()
            .map(|h| root.join(h).join(CGROUP_PARENT).join(&self.id))
            .collect();
        v.dedup();
        v
    }

    /// Ends the jail as agentd would (SIGTERM to the jailer) and waits for the jailer.
    fn stop(&mut self) -> bool {
        // SAFETY: kill takes integers; the pid is the jailer this test started.
        unsafe { libc::kill(i32::try_from(self.vmm.pid()).unwrap(), libc::SIGTERM) };
        self.vmm.wait_exit().0
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        // A failed test still leaves nothing: the VMM dies with its jailer (PDEATHSIG), and
        // what the jailer did not remove is removed here.
        // SAFETY: as in `stop`.
        unsafe { libc::kill(i32::try_from(self.vmm.pid()).unwrap(), libc::SIGTERM) };
        let _ = self.vmm.wait_exit();
        for d in self.cgroup_dirs() {
            let _ = std::fs::remove_dir(d);
        }
        let _ = std::fs::remove_dir(self.roots.join(&self.id));
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

fn status_field(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// What a jailed VMM's process shows from the host.
fn assert_jailed(pid: u32, jail: &Jail, only: &[&Path], not: &[&Path]) {
    let uid = UID.to_string();
    let ids = |k| status_field(pid, k).split_whitespace().map(String::from).collect::<Vec<_>>();
    assert_eq!(ids("Uid"), vec![uid.clone(); 4], "real, effective, saved, fs uid");
    assert_eq!(ids("Gid"), vec![uid.clone(); 4], "gids");
    assert_eq!(status_field(pid, "Groups"), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2", "grove-vmm's own filters, on by default");
    // PID 1 of its own PID namespace, in its own mount namespace.
    let nspid = ids("NSpid");
    assert_eq!(nspid.len(), 2, "{nspid:?}");
    assert_eq!(nspid[1], "1");
    let p = pid.to_string();
    assert_ne!(ns(&p, "mnt"), ns("self", "mnt"));
    assert_ne!(ns(&p, "pid_for_children"), ns("self", "pid"));
    // Its root holds what it was given, and not the host's files.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    for host_only in ["etc", "home", "root", "var", "sbin", "boot"] {
        assert!(!top.contains(&host_only.to_string()), "/{host_only} in the jail: {top:?}");
    }
    for p in only {
        assert!(root.join(p.strip_prefix("/").unwrap()).exists(), "{} missing", p.display());
    }
    for p in not {
        assert!(!root.join(p.strip_prefix("/").unwrap()).exists(), "{} visible", p.display());
    }
    // Its /proc is its PID namespace's: PID 1 is itself.
    assert!(root.join("dev/kvm").exists() && root.join("proc/1/status").exists());
    // The cgroup, with its limits.
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let want = format!("/{CGROUP_PARENT}/{}", jail.id);
    assert!(cg.lines().any(|l| l.ends_with(&want)), "not in {want}:\n{cg}");
    // v1 names its files per controller, v2 its own way; whichever the host has.
    let limit = |v1: &str, v2: &str| {
        jail.cgroup_dirs().iter().find_map(|d| {
            std::fs::read_to_string(d.join(v1))
                .or_else(|_| std::fs::read_to_string(d.join(v2)))
                .ok()
                .map(|s| s.trim().to_string())
        })
    };
    let memory = limit("memory.limit_in_bytes", "memory.max");
    assert_eq!(memory.as_deref(), Some(MEMORY.to_string().as_str()));
    assert_eq!(limit("pids.max", "pids.max").as_deref(), Some("64"));
    let cpu = limit("cpu.cfs_quota_us", "cpu.max");
    assert!(matches!(cpu.as_deref(), Some("100000" | "100000 100000")), "cpu limit {cpu:?}");
}

#[test]
fn a_jailed_vmm_boots_forks_and_its_child_restores_in_a_jail_of_its_own() {
    if !kvm_available() || !is_root() {
        return;
    }
    let d = tmp();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let roots = d.path().join("jails");
    let (pdir, cdir) = (d.path().join("parent"), d.path().join("child"));
    for dir in [&pdir, &cdir] {
        std::fs::create_dir(dir).unwrap();
        std::os::unix::fs::chown(dir, Some(UID), Some(UID)).unwrap();
    }
    let gt = Path::new(guest());
    let psock = pdir.join("api.sock");
    let mut parent = Jail::start(
        &roots,
        "p",
        &[&pdir],
        &[gt],
        &[
            "run",
            "--kernel",
            guest(),
            "--cmdline",
            "tg.mode=fork tg.touch_mib=1",
            "--mem-mib",
            "64",
            "--api-sock",
            psock.to_str().unwrap(),
        ],
    );
    parent.vmm.wait_for("READY", |s| s.contains("READY"));
    parent.vmm.wait_ts(20);
    let ppid = parent.vmm_pid();
    assert_jailed(ppid, &parent, &[&pdir, gt], &[&cdir]);

    // A fork snapshot (the parent runs on), into its own directory.
    let snap = pdir.join("snap");
    Api::connect(&psock).fork(&snap);
    parent.vmm.wait_ts(20);

    // The child: the snapshot read-only, its own directory read-write.
    let csock = cdir.join("api.sock");
    let mut child = Jail::start(
        &roots,
        "c",
        &[&cdir],
        &[&snap],
        &[
            "restore",
            "--snapshot",
            snap.to_str().unwrap(),
            "--identity",
            "3",
            "--api-sock",
            csock.to_str().unwrap(),
        ],
    );
    let want = id_line(3, 1);
    child.vmm.wait_for(&want, |s| s.contains(&want));
    let cpid = child.vmm_pid();
    assert_jailed(cpid, &child, &[&cdir, &snap], &[&psock, gt]);
    assert_ne!(ns(&cpid.to_string(), "mnt"), ns(&ppid.to_string(), "mnt"), "a jail each");
    assert_eq!(
        Api::connect(&csock).call(&serde_json::json!({"cmd": "status"}))["state"],
        "running"
    );

    // SIGTERM to a jailer ends its VMM; the jailer removes the root and the cgroup.
    for j in [&mut child, &mut parent] {
        j.stop();
        assert!(!roots.join(&j.id).exists(), "{} root left", j.id);
        for c in j.cgroup_dirs() {
            assert!(!c.exists(), "{} left", c.display());
        }
    }
    for pid in [ppid, cpid] {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "VMM {pid} still runs");
    }
    // The parent group the jailer made (if no other test's jail is in it).
    for h in ["memory", "cpu", "pids", "unified", ""] {
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(h).join(CGROUP_PARENT));
    }
}

#[test]
fn bad_jails_are_refused_before_anything_is_made() {
    for (id, uid, why) in [("../x", "1", "jail id"), ("x", "0", "must not be 0")] {
        let out = std::process::Command::new(JAILER)
            .args(["--id", id, "--uid", uid, "--gid", uid, "--", VMM])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{id} {uid}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(why), "{id} {uid}");
    }
}
