//! PID 1 duties: mounts, modules, switch_root, hostname, network, signals, power.
//!
//! Boot sequence (docs/guest.md):
//! 1. initramfs stage (`/init` in the initramfs, `root=` on the cmdline): mount /dev /proc
//!    /sys, load `grove.modules=` with finit_module (dependencies first, from the
//!    initramfs' own modules.dep), wait for the root device, mount it on /newroot, move
//!    /dev /proc /sys into it, switch_root (MS_MOVE to / + chroot) and exec
//!    `grove.init` (default /sbin/guest-init) with `--stage2`.
//!    Without `root=` the initramfs stays the root: `grove.modules=` are loaded, then the
//!    system stage runs in it.
//! 2. system stage: the remaining mounts, hostname, loopback + `ip=`, reaper and signal
//!    thread, agent listeners (vsock port 1024 and `grove.listen=`), boot-timer port write,
//!    `guest-init: ready` on the console.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grove_proto::guest::PowerAction;

use crate::agent::{self, Listen};
use crate::net::IfConfig;
use crate::sys;

/// The kernel command line as key -> value (flags map to "").
pub struct Cmdline(HashMap<String, String>);

impl Cmdline {
    pub fn parse(s: &str) -> Self {
        Self(
            s.split_whitespace()
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (kv.to_string(), String::new()),
                })
                .collect(),
        )
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
    pub fn has(&self, k: &str) -> bool {
        self.0.contains_key(k)
    }
}

fn log(msg: &str) {
    eprintln!("guest-init: {msg}");
}

fn mount_fs(src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) {
    let t = Path::new(target);
    let _ = fs::create_dir_all(t);
    match sys::mount(src, t, fstype, flags, data) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {} // already mounted
        Err(e) => log(&format!("mount {fstype} on {target}: {e}")),
    }
}

fn ensure_console() {
    if !sys::fd_valid(1) || !sys::fd_valid(2) {
        if let Ok(f) = fs::OpenOptions::new().read(true).write(true).open("/dev/console") {
            let _ = sys::redirect_stdio(&f);
        }
    }
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

fn early_mounts() {
    mount_fs("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
    mount_fs("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, "");
    mount_fs("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, "");
}

/// Entry point when running as PID 1.
pub fn run(stage2: bool) -> ! {
    let t0 = Instant::now();
    // Before any thread exists, so every thread inherits the mask.
    let sigset = sys::block_signals(&[
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGPWR,
    ])
    .ok();
    early_mounts();
    ensure_console();
    let cmdline = Cmdline::parse(&fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if !stage2 && cmdline.has("root") && Path::new("/newroot").is_dir() {
        if let Err(e) = initramfs_stage(&cmdline) {
            log(&format!("initramfs stage failed: {e}; powering off"));
            power(PowerAction::Poweroff);
        }
    } else if !stage2 {
        // The initramfs is the root (no `root=`): its modules are loaded here, before the
        // agent binds its vsock listener.
        if let Some(m) = cmdline.get("grove.modules") {
            let t = Instant::now();
            load_modules(m);
            log(&format!("modules loaded in {} ms (initramfs root)", t.elapsed().as_millis()));
        }
    }
    system_stage(&cmdline, sigset, t0)
}

/// The order to load `names` (comma separated) in: every module after its dependencies, each
/// once, from a modules.dep in fetch-kernel.sh's format (`name: dep dep`).
pub fn module_load_order(dep_text: &str, names: &str) -> Vec<String> {
    fn visit(
        m: &str,
        deps: &HashMap<&str, Vec<&str>>,
        seen: &mut std::collections::HashSet<String>,
        out: &mut Vec<String>,
        depth: u32,
    ) {
        if depth > 32 || !seen.insert(m.to_string()) {
            return;
        }
        for d in deps.get(m).into_iter().flatten() {
            visit(&d.replace('-', "_"), deps, seen, out, depth + 1);
        }
        out.push(m.to_string());
    }
    let deps: HashMap<&str, Vec<&str>> = dep_text
        .lines()
        .filter_map(|l| {
            let (m, d) = l.split_once(':')?;
            Some((m.trim(), d.split_whitespace().collect()))
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for m in names.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        visit(&m.replace('-', "_"), &deps, &mut seen, &mut out, 0);
    }
    out
}

fn load_modules(names: &str) {
    let dep_text = fs::read_to_string("/lib/modules/modules.dep").unwrap_or_default();
    for m in module_load_order(&dep_text, names) {
        if m.contains('/') {
            continue;
        }
        match File::open(format!("/lib/modules/{m}.ko")) {
            Ok(f) => match sys::finit_module(&f, "") {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => log(&format!("finit_module {m}: {e}")),
            },
            Err(_) => log(&format!("module {m}: not in the initramfs (built in?)")),
        }
    }
}

fn initramfs_stage(c: &Cmdline) -> Result<(), String> {
    let t = Instant::now();
    if let Some(m) = c.get("grove.modules") {
        load_modules(m);
    }
    log(&format!("initramfs: modules loaded in {} ms", t.elapsed().as_millis()));
    let root = c.get("root").unwrap_or_default();
    let dev = if let Some(label) = root.strip_prefix("LABEL=") {
        format!("/dev/disk/by-label/{label}")
    } else {
        root.to_string()
    };
    let wait: u64 = c.get("grove.rootwait_ms").and_then(|v| v.parse().ok()).unwrap_or(30_000);
    let deadline = Instant::now() + Duration::from_millis(wait);
    while !Path::new(&dev).exists() {
        if Instant::now() > deadline {
            return Err(format!("root device {dev} did not appear within {wait} ms"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let fstype = c.get("rootfstype").unwrap_or("ext4");
    let flags = if c.has("ro") { libc::MS_RDONLY } else { 0 };
    let opts = c.get("rootflags").unwrap_or("");
    sys::mount(&dev, Path::new("/newroot"), fstype, flags, opts)
        .map_err(|e| format!("mount {dev} ({fstype}): {e}"))?;
    for d in ["/dev", "/proc", "/sys"] {
        let target = format!("/newroot{d}");
        let _ = fs::create_dir_all(&target);
        if let Err(e) = sys::mount(d, Path::new(&target), "", libc::MS_MOVE, "") {
            log(&format!("move {d}: {e}"));
        }
    }
    // switch_root: the new root replaces the initramfs' rootfs mount.
    std::env::set_current_dir("/newroot").map_err(|e| format!("chdir /newroot: {e}"))?;
    sys::mount(".", Path::new("/"), "", libc::MS_MOVE, "")
        .map_err(|e| format!("move newroot to /: {e}"))?;
    sys::chroot(Path::new(".")).map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    log(&format!("switched root to {dev} in {} ms", t.elapsed().as_millis()));
    let init = c.get("grove.init").unwrap_or("/sbin/guest-init");
    let e = sys::exec(init, &[init, "--stage2"]);
    log(&format!("exec {init}: {e}; continuing with the initramfs binary"));
    Ok(())
}

fn system_stage(c: &Cmdline, sigset: Option<libc::sigset_t>, t0: Instant) -> ! {
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    );
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    mount_fs("tmpfs", "/dev/shm", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777");
    mount_fs("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=0755");
    mount_fs("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777");
    mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", NOSUID_NODEV_NOEXEC, "");
    let _ = sys::disable_cad();

    // `ip=` on the cmdline, else the same syntax in the image's /etc/grove/ip.
    let ip_file = fs::read_to_string("/etc/grove/ip").ok().map(|s| s.trim().to_string());
    let ipcfg = c.get("ip").or(ip_file.as_deref()).map(IfConfig::parse_cmdline);
    let hostname = c
        .get("grove.hostname")
        .map(str::to_string)
        .or_else(|| ipcfg.as_ref().and_then(|r| r.as_ref().ok()).and_then(|i| i.hostname.clone()))
        .or_else(|| fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_string()))
        .filter(|h| crate::net::validate_hostname(h).is_ok());
    if let Some(h) = hostname {
        if let Err(e) = sys::sethostname(&h) {
            log(&format!("sethostname: {e}"));
        }
    }
    if let Err(e) = sys::if_up("lo") {
        log(&format!("lo up: {e}"));
    }
    match ipcfg {
        Some(Ok(cfg)) => {
            // The NIC may need a moment after its driver loaded.
            let mut r = cfg.apply();
            for _ in 0..100 {
                if r.is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
                r = cfg.apply();
            }
            match r {
                Ok(()) => log(&format!(
                    "network: {} {}/{} gw {:?}",
                    cfg.iface, cfg.addr, cfg.mask, cfg.gateway
                )),
                Err(e) => log(&format!("network {}: {e}", cfg.iface)),
            }
        }
        Some(Err(e)) => log(&e),
        None => {}
    }

    crate::reaper::start();
    if let Some(set) = sigset {
        std::thread::spawn(move || signal_loop(&set));
    }

    let root = c.get("grove.root").unwrap_or("/");
    let ctx = match agent::Ctx::new(root.into(), true) {
        Ok(c) => c,
        Err(e) => {
            log(&format!("allowed root {root}: {e}; using /"));
            agent::Ctx::new("/".into(), true).expect("/ exists")
        }
    };
    let mut listens = Vec::new();
    match c.get("grove.vsock") {
        Some("off") => {}
        Some(p) => {
            listens.push(p.parse().map(Listen::Vsock).map_err(|_| format!("bad grove.vsock={p}")));
        }
        None => listens.push(Ok(Listen::Vsock(grove_proto::GUEST_VSOCK_PORT))),
    }
    for l in c.get("grove.listen").unwrap_or_default().split(',').filter(|s| !s.is_empty()) {
        listens.push(l.parse());
    }
    for l in listens {
        match l.map(|l| agent::listen(&ctx, &l).map_err(|e| e.to_string())) {
            Ok(Ok(name)) => log(&format!("agent listening on {name}")),
            Ok(Err(e)) | Err(e) => log(&format!("agent listen: {e}")),
        }
    }
    // Only under grove-vmm, which asks on the command line: under QEMU the write has
    // faulted with #GP after a successful ioperm (docs/testing.md).
    if c.get("grove.boot_timer") == Some("1") {
        if let Err(e) = sys::boot_timer_ready() {
            log(&format!("boot timer port: {e}"));
        }
    }
    log(&format!(
        "ready (uptime {} ms, guest-init stage {} ms)",
        agent::uptime_ms(),
        t0.elapsed().as_millis()
    ));
    if let Some(run) = c.get("grove.run") {
        start_run(run);
    }
    let _keep: Arc<agent::Ctx> = ctx;
    loop {
        std::thread::park();
    }
}

/// `grove.run=PATH[,ARG...]`: one program started after the ready mark, on the console, in its
/// own session (a test scenario's probe inside the guest, until devices bring the agent). Its
/// exit is logged; PID 1 goes on either way (the program asks for a reboot or poweroff with
/// SIGINT or SIGPWR to PID 1 if it wants one).
fn start_run(spec: &str) {
    let mut parts = spec.split(',').filter(|s| !s.is_empty());
    let Some(prog) = parts.next() else {
        log("grove.run: empty");
        return;
    };
    let mut cmd = std::process::Command::new(prog);
    cmd.args(parts).env_clear().env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin").env("HOME", "/");
    // SAFETY: the closure runs in the forked child before exec and only calls
    // sys::child_setup, which makes async-signal-safe syscalls and does not allocate (new
    // session, PID 1's blocked signals unblocked).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || sys::child_setup(false, None));
    }
    match crate::reaper::spawn(&mut cmd) {
        Ok((child, rx)) => {
            log(&format!("grove.run: started {prog} (pid {})", child.id()));
            let prog = prog.to_string();
            std::thread::spawn(move || {
                if let Ok(status) = rx.recv() {
                    log(&format!("grove.run: {prog} exited (wait status {status:#x})"));
                }
            });
        }
        Err(e) => log(&format!("grove.run: cannot start {prog}: {e}")),
    }
}

fn signal_loop(set: &libc::sigset_t) {
    loop {
        let sig = sys::wait_signal(set);
        match sig {
            libc::SIGPWR => power(PowerAction::Poweroff),
            libc::SIGINT => power(PowerAction::Reboot), // Ctrl-Alt-Del
            s => {
                // Forward to every process (kill(-1) skips PID 1 itself).
                let _ = sys::kill(-1, s);
            }
        }
    }
}

fn other_processes() -> usize {
    let me = std::process::id().to_string();
    fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.bytes().all(|b| b.is_ascii_digit())
                        && n != "1"
                        && n != me
                        // Kernel threads have an empty cmdline.
                        && fs::read(e.path().join("cmdline")).map(|c| !c.is_empty()).unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

/// Clean shutdown: SIGTERM everyone, wait up to 2 s, SIGKILL, sync, remount / read-only,
/// then power off or reboot. Does not return.
pub fn power(action: PowerAction) -> ! {
    log(&format!("{action:?}: stopping processes"));
    let _ = sys::kill(-1, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(2);
    while other_processes() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = sys::kill(-1, libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(20));
    sys::sync();
    for m in ["/tmp", "/run", "/dev/shm"] {
        let _ = sys::umount(Path::new(m), libc::MNT_DETACH);
    }
    if let Err(e) = sys::mount("", Path::new("/"), "", libc::MS_REMOUNT | libc::MS_RDONLY, "") {
        log(&format!("remount / read-only: {e}"));
    }
    sys::sync();
    log(&format!("{action:?}"));
    let cmd = if action == PowerAction::Reboot {
        libc::LINUX_REBOOT_CMD_RESTART
    } else {
        libc::LINUX_REBOOT_CMD_POWER_OFF
    };
    let e = sys::reboot(cmd);
    log(&format!("reboot(2): {e}"));
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_and_module_order() {
        let c = Cmdline::parse("console=ttyS0 root=/dev/vda rw grove.modules=virtio_blk,virtio-net ip=1.2.3.4:::::eth0:off");
        assert_eq!(c.get("root"), Some("/dev/vda"));
        assert!(c.has("rw") && !c.has("ro"));
        assert_eq!(c.get("ip"), Some("1.2.3.4:::::eth0:off"));
        let deps = "virtio_ring: \nvirtio: virtio_ring\nvirtio_blk: virtio virtio_ring\n\
                    failover: \nnet_failover: failover\nvirtio_net: virtio_ring virtio net_failover\n\
                    loop_a: loop_b\nloop_b: loop_a\n";
        assert_eq!(
            module_load_order(deps, c.get("grove.modules").unwrap()),
            ["virtio_ring", "virtio", "virtio_blk", "failover", "net_failover", "virtio_net"]
        );
        // Unknown modules are still tried (they may be built in); cycles terminate.
        assert_eq!(module_load_order(deps, "ext4"), ["ext4"]);
        assert_eq!(module_load_order(deps, "loop_a"), ["loop_b", "loop_a"]);
        assert!(module_load_order(deps, ",,").is_empty());
    }
}
