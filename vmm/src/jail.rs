//! The jail `grove-jailer` puts a grove-vmm (or any program) in: a cgroup with memory, CPU and
//! pids limits, its own mount namespace whose root is a tmpfs holding only the paths it was
//! given (bind-mounted at the same absolute paths, so every path in requests and state files
//! stays valid), device nodes made for it, its own PID namespace (the program is PID 1 of
//! it), a dropped uid and gid, no capabilities and `no_new_privs`.
//!
//! Order (as root, in the jailer):
//! 1. the cgroup is made and limited, and the program's process is put in it before it does
//!    anything (it waits on a pipe until then);
//! 2. `unshare(CLONE_NEWPID)`, then `fork`: the parent stays outside (host mount namespace)
//!    as a thin supervisor (SIGTERM/SIGINT become SIGKILL for the program, it waits, removes
//!    the jail's root and cgroup, exits with the program's status), the child is PID 1 of
//!    the new namespace and dies with the parent (`PR_SET_PDEATHSIG`);
//! 3. the child unshares its mount namespace, makes mounts private, mounts a tmpfs as the
//!    new root, binds the given paths
//!    (read-only where asked), makes `/dev` nodes owned by the jail's uid, mounts a `/proc`
//!    of its PID namespace, `pivot_root`s into it and detaches the old root;
//! 4. it drops supplementary groups, gid and uid (capabilities go with uid 0), sets
//!    `no_new_privs`, and `execve`s the program (whose own seccomp filters then go on top).
//!
//! Cgroups: the v2 hierarchy when its root offers the controllers (`cgroup.controllers`
//! lists memory, cpu, pids), else the v1 hierarchies `memory`, `cpu` and `pids` (hybrid hosts,
//! like the machines this is developed on); a limit the host cannot apply is an error, not a
//! silent skip.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Errors of the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// A system call or file operation failed.
    #[error("{what}")]
    Os {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Os { what, source }
}

fn last_os(what: impl Into<String>) -> JailError {
    JailError::Os { what: what.into(), source: std::io::Error::last_os_error() }
}

/// Resource limits of the jail's cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of memory (cgroup `memory.max` / `memory.limit_in_bytes`).
    pub memory_bytes: Option<u64>,
    /// CPU time per 100 ms period, in microseconds (`cpu.max` / `cpu.cfs_quota_us`).
    pub cpu_quota_us: Option<u64>,
    /// Processes and threads (`pids.max`).
    pub pids: Option<u64>,
}

/// What a jail is made of.
#[derive(Debug, Clone, Default)]
pub struct JailSpec {
    /// Its name: `[a-z0-9-]`, 1 to 64 characters; names its root and its cgroup.
    pub id: String,
    /// Where jail roots are made (`BASE/ID`).
    pub root_base: PathBuf,
    /// The cgroup parent (relative to the hierarchy's root).
    pub cgroup_parent: String,
    /// Limits.
    pub limits: Limits,
    /// uid and gid the program runs as.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// Paths bound read-write (directories the program writes: its sockets, snapshots).
    pub rw: Vec<PathBuf>,
    /// Paths bound read-only (kernel, snapshots it restores from, the program, libraries).
    pub ro: Vec<PathBuf>,
    /// The program and its arguments (argv[0] is the program's absolute path).
    pub argv: Vec<String>,
}

/// Devices made in the jail's `/dev` when the host has them: KVM, tap, userfaultfd, and the
/// plain ones.
const DEVICES: &[&str] =
    &["/dev/kvm", "/dev/net/tun", "/dev/userfaultfd", "/dev/null", "/dev/zero", "/dev/urandom"];

/// Library directories bound read-only so a dynamically linked program runs.
const LIB_DIRS: &[&str] = &["/lib", "/lib64", "/usr/lib", "/usr/lib64"];

impl JailSpec {
    /// Checks the spec (names, absolute paths, uid not root).
    pub fn validate(&self) -> Result<(), JailError> {
        let ok_id = !self.id.is_empty()
            && self.id.len() <= 64
            && self.id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok_id {
            return Err(JailError::Invalid(format!("jail id {:?}: 1 to 64 of [a-z0-9-]", self.id)));
        }
        if self.uid == 0 || self.gid == 0 {
            return Err(JailError::Invalid("the jail's uid and gid must not be 0".into()));
        }
        let parent_ok = !self.cgroup_parent.is_empty()
            && self.cgroup_parent.split('/').all(|c| {
                !c.is_empty()
                    && c != ".."
                    && c != "."
                    && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !parent_ok {
            return Err(JailError::Invalid(format!("cgroup parent {:?}", self.cgroup_parent)));
        }
        for p in self.rw.iter().chain(&self.ro).chain(std::iter::once(&self.root_base)) {
            if !p.is_absolute() || p.components().any(|c| c.as_os_str() == "..") {
                return Err(JailError::Invalid(format!("{}: not an absolute path", p.display())));
            }
        }
        match self.argv.first() {
            Some(p) if Path::new(p).is_absolute() => Ok(()),
            _ => Err(JailError::Invalid("the program must be an absolute path".into())),
        }
    }

    /// The jail's root directory.
    pub fn root(&self) -> PathBuf {
        self.root_base.join(&self.id)
    }
}

/// Where the jail's cgroup lives and how its limits are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroup {
    /// One directory of the v2 hierarchy.
    V2(PathBuf),
    /// One directory in each v1 hierarchy used (memory, cpu, pids).
    V1(Vec<PathBuf>),
}

/// The cgroup hierarchy root (`/sys/fs/cgroup`, or `GROVE_CGROUP_ROOT` for tests).
fn cgroup_root() -> PathBuf {
    std::env::var_os("GROVE_CGROUP_ROOT").map_or_else(|| "/sys/fs/cgroup".into(), PathBuf::from)
}

/// Which hierarchy to use: v2 where its root offers the three controllers (at
/// `ROOT/cgroup.controllers` on a pure v2 host, `ROOT/unified/...` on a hybrid one), else v1.
pub fn pick_cgroup(root: &Path, parent: &str, id: &str) -> Cgroup {
    for v2 in [root.to_path_buf(), root.join("unified")] {
        let c = fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
        let have: Vec<&str> = c.split_whitespace().collect();
        if ["memory", "cpu", "pids"].iter().all(|k| have.contains(k)) {
            return Cgroup::V2(v2.join(parent).join(id));
        }
    }
    Cgroup::V1(
        ["memory", "cpu", "pids"].iter().map(|c| root.join(c).join(parent).join(id)).collect(),
    )
}

fn write_file(p: &Path, v: &str) -> Result<(), JailError> {
    fs::OpenOptions::new()
        .write(true)
        .open(p)
        .and_then(|mut f| f.write_all(v.as_bytes()))
        .map_err(os(format!("write {v:?} to {}", p.display())))
}

impl Cgroup {
    /// Makes the group(s), writes the limits and moves `pid` in.
    pub fn create(&self, limits: &Limits, pid: u32) -> Result<(), JailError> {
        const PERIOD_US: u64 = 100_000;
        match self {
            Cgroup::V2(dir) => {
                let parent = dir.parent().unwrap_or(dir);
                fs::create_dir_all(parent).map_err(os(format!("mkdir {}", parent.display())))?;
                // The controllers must be enabled in every level from the hierarchy's root
                // down to the parent (a systemd host has done the root; a bare one, like the
                // test host, has not). Best effort: a level that refuses shows up as a
                // missing limit file below, a clear error.
                let levels: Vec<&Path> = parent
                    .ancestors()
                    .take_while(|a| a.join("cgroup.controllers").exists())
                    .collect();
                for level in levels.iter().rev() {
                    let _ = write_file(&level.join("cgroup.subtree_control"), "+memory +cpu +pids");
                }
                fs::create_dir(dir).map_err(os(format!("mkdir {}", dir.display())))?;
                if let Some(m) = limits.memory_bytes {
                    write_file(&dir.join("memory.max"), &m.to_string())?;
                }
                if let Some(q) = limits.cpu_quota_us {
                    write_file(&dir.join("cpu.max"), &format!("{q} {PERIOD_US}"))?;
                }
                if let Some(n) = limits.pids {
                    write_file(&dir.join("pids.max"), &n.to_string())?;
                }
                write_file(&dir.join("cgroup.procs"), &pid.to_string())
            }
            Cgroup::V1(dirs) => {
                for d in dirs {
                    fs::create_dir_all(d).map_err(os(format!("mkdir {}", d.display())))?;
                }
                let file =
                    |name: &str| dirs.iter().find(|d| d.join(name).exists()).map(|d| d.join(name));
                let need = |name: &str| {
                    file(name).ok_or_else(|| {
                        JailError::Invalid(format!("this host's cgroups have no {name}"))
                    })
                };
                if let Some(m) = limits.memory_bytes {
                    write_file(&need("memory.limit_in_bytes")?, &m.to_string())?;
                }
                if let Some(q) = limits.cpu_quota_us {
                    write_file(&need("cpu.cfs_period_us")?, &PERIOD_US.to_string())?;
                    write_file(&need("cpu.cfs_quota_us")?, &q.to_string())?;
                }
                if let Some(n) = limits.pids {
                    write_file(&need("pids.max")?, &n.to_string())?;
                }
                for d in dirs {
                    write_file(&d.join("cgroup.procs"), &pid.to_string())?;
                }
                Ok(())
            }
        }
    }

    /// Removes the group(s) once empty (best effort).
    pub fn remove(&self) {
        let dirs = match self {
            Cgroup::V2(d) => std::slice::from_ref(d),
            Cgroup::V1(d) => d.as_slice(),
        };
        for d in dirs {
            let _ = fs::remove_dir(d);
        }
    }
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| JailError::Invalid(format!("{}: a NUL in the path", p.display())))
}

fn mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let src_c = src.map(cstr).transpose()?;
    let dst_c = cstr(dst)?;
    let fs_c = fstype.map(|f| CString::new(f).unwrap_or_default());
    let data_c = data.map(|d| CString::new(d).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string alive for the call; mount(2)
    // reads them and touches no other memory of this process.
    let r = unsafe {
        libc::mount(
            ptr(&src_c),
            dst_c.as_ptr(),
            ptr(&fs_c),
            flags,
            ptr(&data_c).cast::<libc::c_void>(),
        )
    };
    if r != 0 {
        return Err(last_os(format!(
            "mount {} on {}",
            src.map_or("-".into(), |s| s.display().to_string()),
            dst.display()
        )));
    }
    Ok(())
}

/// Makes `inside` (the same path under the new root) for the bind of `src`: a directory for a
/// directory, an empty file otherwise.
fn mount_point(src: &Path, inside: &Path) -> Result<(), JailError> {
    let is_dir = fs::metadata(src).map_err(os(format!("stat {}", src.display())))?.is_dir();
    if is_dir {
        fs::create_dir_all(inside).map_err(os(format!("mkdir {}", inside.display())))?;
    } else {
        if let Some(p) = inside.parent() {
            fs::create_dir_all(p).map_err(os(format!("mkdir {}", p.display())))?;
        }
        fs::File::create(inside).map_err(os(format!("create {}", inside.display())))?;
    }
    Ok(())
}

fn under(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// Binds `src` at the same path under `root`, read-only if asked.
fn bind(root: &Path, src: &Path, ro: bool) -> Result<(), JailError> {
    let inside = under(root, src);
    mount_point(src, &inside)?;
    mount(Some(src), &inside, None, libc::MS_BIND | libc::MS_REC, None)?;
    if ro {
        let f =
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
        mount(None, &inside, None, f, None)?;
    }
    Ok(())
}

/// Makes a device node like the host's `path` in the jail, owned by the jail's uid and gid.
fn device(root: &Path, path: &str, uid: u32, gid: u32) -> Result<(), JailError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(m) = fs::metadata(path) else { return Ok(()) };
    if !m.file_type().is_char_device() {
        return Ok(());
    }
    let inside = under(root, Path::new(path));
    if let Some(p) = inside.parent() {
        fs::create_dir_all(p).map_err(os(format!("mkdir {}", p.display())))?;
    }
    let c = cstr(&inside)?;
    // SAFETY: mknod and chown read the NUL-terminated path, alive for the calls.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, m.rdev()) };
    if r != 0 {
        return Err(last_os(format!("mknod {}", inside.display())));
    }
    // SAFETY: as above.
    if unsafe { libc::chown(c.as_ptr(), uid, gid) } != 0 {
        return Err(last_os(format!("chown {}", inside.display())));
    }
    Ok(())
}

/// Builds the jail's root and enters it (in the child, PID 1 of the new namespace).
fn enter_root(spec: &JailSpec) -> Result<(), JailError> {
    let root = spec.root();
    // SAFETY: unshare takes flags only; the child is single-threaded, as CLONE_NEWNS requires.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(last_os("unshare(CLONE_NEWNS)"));
    }
    // Nothing mounted here reaches the host's namespace.
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    fs::create_dir_all(&root).map_err(os(format!("mkdir {}", root.display())))?;
    let tmpfs = Some(Path::new("tmpfs"));
    mount(tmpfs, &root, Some("tmpfs"), libc::MS_NOSUID, Some("mode=0755,size=16m"))?;
    for d in LIB_DIRS {
        if Path::new(d).is_dir() {
            bind(&root, Path::new(d), true)?;
        }
    }
    let program = Path::new(&spec.argv[0]);
    bind(&root, program, true)?;
    for p in &spec.ro {
        bind(&root, p, true)?;
    }
    for p in &spec.rw {
        bind(&root, p, false)?;
    }
    for d in DEVICES {
        device(&root, d, spec.uid, spec.gid)?;
    }
    let proc_dir = root.join("proc");
    fs::create_dir_all(&proc_dir).map_err(os("mkdir proc"))?;
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(Some(Path::new("proc")), &proc_dir, Some("proc"), nosuid, None)?;
    let tmp = root.join("tmp");
    fs::create_dir_all(&tmp).map_err(os("mkdir tmp"))?;
    let old = root.join(".old-root");
    fs::create_dir_all(&old).map_err(os("mkdir .old-root"))?;
    let (new_c, old_c) = (cstr(&root)?, cstr(&old)?);
    // SAFETY: pivot_root reads two NUL-terminated paths alive for the call.
    let r = unsafe { libc::syscall(libc::SYS_pivot_root, new_c.as_ptr(), old_c.as_ptr()) };
    if r != 0 {
        return Err(last_os("pivot_root"));
    }
    std::env::set_current_dir("/").map_err(os("chdir /"))?;
    let old_in = CString::new("/.old-root").unwrap_or_default();
    // SAFETY: umount2 reads the NUL-terminated path.
    if unsafe { libc::umount2(old_in.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(last_os("umount the old root"));
    }
    let _ = fs::remove_dir("/.old-root");
    Ok(())
}

/// Drops to the jail's uid and gid, with no capabilities and `no_new_privs`.
fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    // SAFETY: setgroups with a count of 0 reads no memory; setresgid/setresuid take integers.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(last_os("setgroups"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(last_os("setresgid"));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(last_os("setresuid"));
        }
    }
    // A non-zero uid lost every capability at setresuid (no SECBIT_KEEP_CAPS); the bounding
    // set is moot for a process that can no longer execute anything privileged, and
    // no_new_privs keeps setuid binaries from bringing any back.
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(last_os("PR_SET_NO_NEW_PRIVS"));
    }
    Ok(())
}

/// The child's part: root, privileges, exec. Returns only on error.
fn child(spec: &JailSpec) -> JailError {
    // SAFETY: PR_SET_PDEATHSIG takes integers only: the program dies with the supervisor.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    if let Err(e) = enter_root(spec) {
        return e;
    }
    if let Err(e) = drop_privileges(spec.uid, spec.gid) {
        return e;
    }
    let args: Vec<CString> =
        spec.argv.iter().map(|a| CString::new(a.as_bytes()).unwrap_or_default()).collect();
    let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: argv is a null-terminated array of NUL-terminated strings alive for the call;
    // execv replaces the process image or returns -1.
    unsafe { libc::execv(ptrs[0], ptrs.as_ptr()) };
    last_os(format!("execv {}", spec.argv[0]))
}

static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// SIGTERM and SIGINT end the program: as PID 1 of its namespace it ignores every signal it
/// has no handler for (grove-vmm handles neither), so they are passed on as SIGKILL, what
/// they do to a grove-vmm that is not jailed.
extern "C" fn forward(_: libc::c_int) {
    let pid = CHILD.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe and takes integers.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Waits for `pid` to end; its wait status (0 if it cannot be waited for).
fn wait_for(pid: libc::pid_t) -> libc::c_int {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status integer it is given.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return status;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 0;
        }
    }
}

/// Runs `spec.argv` in a jail; returns the exit status to end with (the program's, or 128 +
/// its signal). `pid_file` gets the program's host PID once it is started.
pub fn run(spec: &JailSpec, pid_file: Option<&Path>) -> Result<i32, JailError> {
    spec.validate()?;
    let cg = pick_cgroup(&cgroup_root(), &spec.cgroup_parent, &spec.id);
    // The child waits on this pipe until it is in its cgroup (a byte), or ends (EOF).
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(last_os("pipe2"));
    }
    let [go_r, go_w] = fds;
    // SAFETY: unshare takes flags only. CLONE_NEWPID puts the next child, not this process,
    // in the new namespace; the mount namespace is the child's own (below), so this process
    // keeps the host's view for its cleanup.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(last_os("unshare(CLONE_NEWPID)"));
    }
    // SAFETY: fork in a single-threaded process; the child only calls async-signal-safe
    // code and allocation before execv (as single-threaded Rust programs may).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_os("fork"));
    }
    if pid == 0 {
        let mut b = [0u8; 1];
        // SAFETY: close and read take the pipe's descriptors and a 1-byte buffer.
        let got = unsafe {
            libc::close(go_w);
            libc::read(go_r, b.as_mut_ptr().cast(), 1)
        };
        if got != 1 {
            // SAFETY: as below.
            unsafe { libc::_exit(1) };
        }
        let e = child(spec);
        let _ = writeln!(std::io::stderr(), "grove-jailer: error: {}", crate::one_line(&e));
        // SAFETY: _exit ends the child without running the parent's atexit handlers.
        unsafe { libc::_exit(1) };
    }
    // SAFETY: closes this process's copy of the read end.
    unsafe { libc::close(go_r) };
    let child_pid = u32::try_from(pid).unwrap_or(0);
    let placed = cg.create(&spec.limits, child_pid);
    if let Err(e) = placed {
        // SAFETY: kill and close take integers; the child ends at EOF on the pipe anyway.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::close(go_w);
        }
        wait_for(pid);
        cg.remove();
        return Err(e);
    }
    // SAFETY: write reads one byte of the buffer; close takes the descriptor.
    unsafe {
        libc::write(go_w, [1u8].as_ptr().cast(), 1);
        libc::close(go_w);
    }
    CHILD.store(pid, std::sync::atomic::Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: `forward` only calls kill(2), which is async-signal-safe.
        unsafe { libc::signal(sig, forward as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
    if let Some(f) = pid_file {
        fs::write(f, format!("{pid}\n")).map_err(os(format!("write {}", f.display())))?;
    }
    let status = wait_for(pid);
    // The mounts went with the child's namespace: left are the empty mount point and the
    // cgroup, now empty.
    let _ = fs::remove_dir_all(spec.root());
    cg.remove();
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    })
}

/// `--flag value` arguments of `grove-jailer`, then `--` and the program.
pub fn parse_args(args: &[String]) -> Result<(JailSpec, Option<PathBuf>), JailError> {
    let mut spec = JailSpec {
        root_base: "/run/grove-jail".into(),
        cgroup_parent: "grove".into(),
        ..JailSpec::default()
    };
    let mut pid_file = None;
    let mut it = args.iter();
    let num = |f: &str, v: &str| {
        v.parse::<u64>().map_err(|_| JailError::Invalid(format!("{f} {v:?}: not a number")))
    };
    let id32 = |f: &str, v: &str| {
        v.parse::<u32>().map_err(|_| JailError::Invalid(format!("{f} {v:?}: not a 32-bit id")))
    };
    while let Some(a) = it.next() {
        if a == "--" {
            spec.argv = it.cloned().collect();
            break;
        }
        let v = it.next().ok_or_else(|| JailError::Invalid(format!("{a} needs a value")))?;
        match a.as_str() {
            "--id" => spec.id.clone_from(v),
            "--root-base" => spec.root_base = v.into(),
            "--cgroup-parent" => spec.cgroup_parent.clone_from(v),
            "--uid" => spec.uid = id32(a, v)?,
            "--gid" => spec.gid = id32(a, v)?,
            "--memory-bytes" => spec.limits.memory_bytes = Some(num(a, v)?),
            "--cpu-quota-us" => spec.limits.cpu_quota_us = Some(num(a, v)?),
            "--pids" => spec.limits.pids = Some(num(a, v)?),
            "--bind" => spec.rw.push(v.into()),
            "--bind-ro" => spec.ro.push(v.into()),
            "--pid-file" => pid_file = Some(PathBuf::from(v)),
            _ => return Err(JailError::Invalid(format!("unknown flag {a}"))),
        }
    }
    spec.validate()?;
    Ok((spec, pid_file))
}

/// `grove-jailer`'s usage.
pub const USAGE: &str = "usage: grove-jailer --id ID --uid N --gid N [--root-base DIR] \
[--cgroup-parent NAME] [--memory-bytes N] [--cpu-quota-us N (per 100 ms)] [--pids N] \
[--bind PATH]... [--bind-ro PATH]... [--pid-file PATH] -- PROGRAM [ARGS...]";

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_string()).collect()
    }

    #[test]
    fn arguments_parse_and_are_checked() {
        let (spec, pid) = parse_args(&s(&[
            "--id",
            "vm-1",
            "--uid",
            "1000",
            "--gid",
            "1000",
            "--memory-bytes",
            "268435456",
            "--cpu-quota-us",
            "50000",
            "--pids",
            "64",
            "--bind",
            "/tmp/a",
            "--bind-ro",
            "/tmp/k",
            "--pid-file",
            "/tmp/p",
            "--",
            "/usr/bin/grove-vmm",
            "run",
            "--kernel",
        ]))
        .unwrap();
        assert_eq!(spec.id, "vm-1");
        assert_eq!(
            spec.limits,
            Limits { memory_bytes: Some(256 << 20), cpu_quota_us: Some(50_000), pids: Some(64) }
        );
        assert_eq!(spec.argv, s(&["/usr/bin/grove-vmm", "run", "--kernel"]));
        assert_eq!(pid, Some(PathBuf::from("/tmp/p")));
        assert_eq!(spec.root(), PathBuf::from("/run/grove-jail/vm-1"));
        for bad in [
            &["--id", "VM", "--uid", "1", "--gid", "1", "--", "/x"][..],
            &["--id", "a/b", "--uid", "1", "--gid", "1", "--", "/x"],
            &["--id", "a", "--uid", "0", "--gid", "1", "--", "/x"],
            &["--id", "a", "--uid", "1", "--gid", "1", "--", "x"],
            &["--id", "a", "--uid", "1", "--gid", "1", "--bind", "rel", "--", "/x"],
            &["--id", "a", "--uid", "1", "--gid", "1", "--bind", "/a/../etc", "--", "/x"],
            &["--id", "a", "--uid", "1", "--gid", "1", "--cgroup-parent", "..", "--", "/x"],
            &["--id", "a", "--uid", "1", "--gid", "1", "--pids", "many", "--", "/x"],
            &["--id", "a", "--uid", "1", "--gid", "1", "--what", "1", "--", "/x"],
            &["--id", "a", "--uid", "1", "--gid", "1"],
        ] {
            assert!(parse_args(&s(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_hierarchy_is_v2_only_with_its_controllers() {
        let t = tempfile::tempdir().unwrap();
        // A hybrid host: v1 controllers, an empty unified hierarchy.
        fs::create_dir_all(t.path().join("unified")).unwrap();
        fs::write(t.path().join("unified/cgroup.controllers"), "").unwrap();
        let v1 = pick_cgroup(t.path(), "grove", "a");
        assert_eq!(
            v1,
            Cgroup::V1(vec![
                t.path().join("memory/grove/a"),
                t.path().join("cpu/grove/a"),
                t.path().join("pids/grove/a")
            ])
        );
        fs::write(t.path().join("unified/cgroup.controllers"), "cpuset cpu io memory pids\n")
            .unwrap();
        assert_eq!(
            pick_cgroup(t.path(), "grove", "a"),
            Cgroup::V2(t.path().join("unified/grove/a"))
        );
        fs::write(t.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        assert_eq!(pick_cgroup(t.path(), "grove", "a"), Cgroup::V2(t.path().join("grove/a")));
    }

    #[test]
    fn v2_controllers_are_enabled_from_the_root_down() {
        // A bare v2 host (no systemd): the root's subtree_control is empty, so the grove
        // parent's children would get no memory.max unless every level enables them.
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        fs::write(t.path().join("cgroup.subtree_control"), "").unwrap();
        let cg = pick_cgroup(t.path(), "grove", "a");
        let Cgroup::V2(dir) = &cg else { panic!("{cg:?}") };
        let parent = dir.parent().unwrap();
        fs::create_dir_all(parent).unwrap();
        fs::write(parent.join("cgroup.controllers"), "cpu memory pids").unwrap();
        fs::write(parent.join("cgroup.subtree_control"), "").unwrap();
        // A regular directory has no limit files: the first limit is the error, after the
        // controllers were enabled at both levels.
        let l = Limits { memory_bytes: Some(1 << 28), ..Limits::default() };
        let e = cg.create(&l, 4242).unwrap_err();
        assert!(e.to_string().contains("memory.max"), "{e}");
        for level in [t.path(), parent] {
            let got = fs::read_to_string(level.join("cgroup.subtree_control")).unwrap();
            assert_eq!(got, "+memory +cpu +pids", "{}", level.display());
        }
        // Above the hierarchy's root (no cgroup.controllers) nothing is written.
        assert!(!t.path().parent().unwrap().join("cgroup.subtree_control").exists());
    }

    #[test]
    fn v1_limits_are_written_where_the_controllers_are() {
        let t = tempfile::tempdir().unwrap();
        let cg = pick_cgroup(t.path(), "grove", "a");
        let Cgroup::V1(dirs) = &cg else { panic!("{cg:?}") };
        // What the kernel would show in a new group of each hierarchy.
        for (d, files) in dirs.iter().zip([
            &["memory.limit_in_bytes", "cgroup.procs"][..],
            &["cpu.cfs_period_us", "cpu.cfs_quota_us", "cgroup.procs"],
            &["pids.max", "cgroup.procs"],
        ]) {
            fs::create_dir_all(d).unwrap();
            for f in files {
                fs::write(d.join(f), "").unwrap();
            }
        }
        let l = Limits { memory_bytes: Some(1 << 28), cpu_quota_us: Some(50_000), pids: Some(32) };
        cg.create(&l, 4242).unwrap();
        let read = |p: PathBuf| fs::read_to_string(p).unwrap();
        assert_eq!(read(dirs[0].join("memory.limit_in_bytes")), "268435456");
        assert_eq!(read(dirs[1].join("cpu.cfs_quota_us")), "50000");
        assert_eq!(read(dirs[1].join("cpu.cfs_period_us")), "100000");
        assert_eq!(read(dirs[2].join("pids.max")), "32");
        assert_eq!(read(dirs[2].join("cgroup.procs")), "4242");
        // A limit whose controller is missing is an error, not a skip.
        fs::remove_file(dirs[2].join("pids.max")).unwrap();
        let e = cg.create(&Limits { pids: Some(1), ..Limits::default() }, 1).unwrap_err();
        assert!(e.to_string().contains("pids.max"), "{e}");
    }
}
