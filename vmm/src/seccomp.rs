//! seccomp filters, one per thread kind (issue 14 part 4).
//!
//! The policy is data: `vmm/seccomp/x86_64.json` (seccompiler's JSON format, a comment per
//! syscall), compiled to BPF at build time by `build.rs` (`seccompiler::compile_from_json`),
//! once with `trap` and once with `log` as the action for a syscall not on the list. Each
//! thread installs its own filter ([`install_or_exit`]) before it handles anything the guest
//! controls:
//! - [`Kind::Vcpu`]: each vCPU thread, first thing, before its first `KVM_RUN`;
//! - [`Kind::PageServer`]: the uffd page server (grove-memory), first thing in its thread;
//! - [`Kind::Refresh`]: the post-restore refresh helper, first thing in its thread;
//! - [`Kind::Vmm`]: the VMM thread (event loop, devices, control socket), after the last
//!   thread is started and before it dispatches a single event of a running guest.
//!
//! A filter is inherited by threads created afterwards (and stacked filters intersect), which
//! is why the VMM thread takes its filter last and never starts a thread afterwards. The
//! short-lived tap-opening thread (`net::tap`) ends before any guest runs and has none.
//!
//! Modes (`--seccomp MODE`, else `GROVE_SECCOMP`, else `kill`): `kill` traps a forbidden
//! syscall into a `SIGSYS` handler that writes one line,
//! `grove-vmm: seccomp: thread KIND made forbidden syscall NR; exiting`, and ends the process
//! with status [`EXIT_STATUS`]; `log` lets it through and has the kernel log it
//! (`SECCOMP_RET_LOG`, for finding what a new code path needs); `off` installs nothing. The
//! library's default is `off`: only the binary calls [`init`].
//!
//! Test hook: `GROVE_SECCOMP_SELFTEST=KIND` makes a thread of that kind call `personality(2)`
//! (on no list) right after installing its filter (`vmm/tests/seccomp.rs`).

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

/// One BPF instruction: (code, jt, jf, k) of a `sock_filter`.
type Insn = (u16, u8, u8, u32);

/// A thread kind's name and its BPF program.
type Filter = (&'static str, &'static [Insn]);

/// The filters compiled by build.rs: `TRAP` and `LOG`, each `(kind, BPF instructions)`.
mod compiled {
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

/// Status of a process ended by a forbidden syscall (128 + SIGSYS, what a shell shows for a
/// process killed by SIGSYS).
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// The environment variable read when `--seccomp` is not given.
pub const MODE_ENV: &str = "GROVE_SECCOMP";

/// The test-only environment variable naming the thread kind that makes a forbidden call.
pub const SELFTEST_ENV: &str = "GROVE_SECCOMP_SELFTEST";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// Not a mode.
    #[error("bad seccomp mode {0:?} (off, log or kill)")]
    BadMode(String),
    /// build.rs compiled no filter for this kind (a policy file without it).
    #[error("no seccomp filter for thread kind {0}")]
    NoFilter(&'static str),
    /// The SIGSYS handler could not be installed.
    #[error("installing the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// The kernel refused the filter.
    #[error("installing the seccomp filter of thread kind {kind}")]
    Install {
        /// Thread kind.
        kind: &'static str,
        /// seccompiler's error.
        #[source]
        source: seccompiler::Error,
    },
}

/// What a forbidden syscall does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No filter.
    Off,
    /// Allowed and logged by the kernel (`SECCOMP_RET_LOG`).
    Log,
    /// The SIGSYS handler logs it and ends the process (`SECCOMP_RET_TRAP`).
    Kill,
}

impl Mode {
    /// Parses `off`, `log` or `kill`.
    pub fn parse(s: &str) -> Result<Self, SeccompError> {
        match s {
            "off" => Ok(Self::Off),
            "log" => Ok(Self::Log),
            "kill" => Ok(Self::Kill),
            _ => Err(SeccompError::BadMode(s.to_string())),
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::Off => 0,
            Self::Log => 1,
            Self::Kill => 2,
        }
    }
}

/// The kinds of thread, each with its filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The VMM thread: event loop, devices' queues, control socket, snapshots.
    Vmm,
    /// A vCPU thread: `KVM_RUN`, port and MMIO exits, vCPU state for snapshots.
    Vcpu,
    /// The uffd page server.
    PageServer,
    /// The post-restore refresh helper (talks to the guest over the vsock socket).
    Refresh,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Self; 4] = [Self::Vmm, Self::Vcpu, Self::PageServer, Self::Refresh];

    /// The name used in the policy file, logs and `GROVE_SECCOMP_SELFTEST`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vmm => "vmm",
            Self::Vcpu => "vcpu",
            Self::PageServer => "page-server",
            Self::Refresh => "refresh",
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::Vmm => 1,
            Self::Vcpu => 2,
            Self::PageServer => 3,
            Self::Refresh => 4,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == c)
    }
}

static MODE: AtomicU8 = AtomicU8::new(0);
static SELFTEST: AtomicU8 = AtomicU8::new(0);

thread_local! {
    /// The kind whose filter this thread installed (0: none). Read by the SIGSYS handler: a
    /// const-initialised `Cell` without destructor is a plain thread-local load.
    static INSTALLED: Cell<u8> = const { Cell::new(0) };
}

/// The mode in force.
pub fn mode() -> Mode {
    match MODE.load(Ordering::Relaxed) {
        1 => Mode::Log,
        2 => Mode::Kill,
        _ => Mode::Off,
    }
}

/// Sets the process's mode (the binary calls this once, before any thread starts), installs
/// the SIGSYS handler for `kill`, and reads `GROVE_SECCOMP_SELFTEST`.
pub fn init(mode: Mode) -> Result<(), SeccompError> {
    if mode == Mode::Kill {
        install_sigsys_handler().map_err(SeccompError::Handler)?;
    }
    let selftest = std::env::var(SELFTEST_ENV).ok();
    let kind = Kind::ALL.into_iter().find(|k| selftest.as_deref() == Some(k.name()));
    SELFTEST.store(kind.map_or(0, Kind::code), Ordering::Relaxed);
    MODE.store(mode.code(), Ordering::Relaxed);
    Ok(())
}

/// The BPF program of `kind` for `mode` (`None` for `off`).
fn program(kind: Kind, mode: Mode) -> Result<Option<seccompiler::BpfProgram>, SeccompError> {
    let table = match mode {
        Mode::Off => return Ok(None),
        Mode::Log => compiled::LOG,
        Mode::Kill => compiled::TRAP,
    };
    let (_, insns) = table
        .iter()
        .find(|(name, _)| *name == kind.name())
        .ok_or(SeccompError::NoFilter(kind.name()))?;
    Ok(Some(
        insns
            .iter()
            .map(|&(code, jt, jf, k)| seccompiler::sock_filter { code, jt, jf, k })
            .collect(),
    ))
}

/// Installs `kind`'s filter on the calling thread (nothing in mode `off`, nothing if this
/// thread already has one).
pub fn install(kind: Kind) -> Result<(), SeccompError> {
    if INSTALLED.with(Cell::get) != 0 {
        return Ok(());
    }
    let Some(prog) = program(kind, mode())? else { return Ok(()) };
    INSTALLED.with(|c| c.set(kind.code()));
    if let Err(source) = seccompiler::apply_filter(&prog) {
        INSTALLED.with(|c| c.set(0));
        return Err(SeccompError::Install { kind: kind.name(), source });
    }
    if SELFTEST.load(Ordering::Relaxed) == kind.code() {
        crate::errln!("grove-vmm: seccomp self-test: thread {} calls personality(2)", kind.name());
        // SAFETY: personality(0xffffffff) only queries the persona; no memory is passed.
        unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffff_u64) };
    }
    Ok(())
}

/// [`install`], or the process ends with one line and status 1: a thread must not run
/// without the filter it was meant to have.
pub fn install_or_exit(kind: Kind) {
    if let Err(e) = install(kind) {
        crate::errln!("grove-vmm: error: {}", crate::one_line(&e));
        std::process::exit(1);
    }
}

/// The `SIGSYS` part of `siginfo_t` (`_sigsys` in the kernel's `siginfo.h`, x86_64).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// Appends `s` to `buf` at `*len` (cut at the end of `buf`).
fn push(buf: &mut [u8], len: &mut usize, s: &[u8]) {
    for &b in s {
        if let Some(slot) = buf.get_mut(*len) {
            *slot = b;
            *len += 1;
        }
    }
}

/// The handler's line, built without allocating.
fn sigsys_line(buf: &mut [u8; 128], kind: Option<Kind>, nr: i64) -> usize {
    let mut len = 0;
    push(buf, &mut len, b"grove-vmm: seccomp: thread ");
    push(buf, &mut len, kind.map_or("unknown", Kind::name).as_bytes());
    push(buf, &mut len, b" made forbidden syscall ");
    if nr < 0 {
        push(buf, &mut len, b"-");
    }
    let mut digits = [0u8; 20];
    let mut n = nr.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + u8::try_from(n % 10).unwrap_or(0);
        n /= 10;
        if n == 0 {
            break;
        }
    }
    push(buf, &mut len, &digits[i..]);
    push(buf, &mut len, b"; exiting\n");
    len
}

/// The SIGSYS handler: one line on stderr, then `exit_group` (both allowed in every filter).
/// Only async-signal-safe work: a thread-local load, a stack buffer, `write`, `_exit`.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; for a
        // seccomp SIGSYS its union holds `_sigsys`, whose layout SigsysInfo mirrors.
        i64::from(unsafe { (*info.cast::<SigsysInfo>()).syscall })
    };
    let kind = Kind::from_code(INSTALLED.with(Cell::get));
    let mut buf = [0u8; 128];
    let len = sigsys_line(&mut buf, kind, nr);
    // SAFETY: write(2) reads `len` bytes of `buf`, which lives for the call; _exit(2) does not
    // return. Both are async-signal-safe.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_STATUS);
    }
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags) that is then
    // filled in; `on_sigsys` has the SA_SIGINFO handler signature and only does
    // async-signal-safe work; sigaction(2) reads the struct for the duration of the call.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
        act.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGSYS, &raw const act, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_filter_in_both_modes() {
        for kind in Kind::ALL {
            for mode in [Mode::Log, Mode::Kill] {
                let prog = program(kind, mode).unwrap().unwrap();
                assert!(prog.len() > 10, "{kind:?} {mode:?}: {} instructions", prog.len());
            }
            assert!(program(kind, Mode::Off).unwrap().is_none());
        }
        assert_eq!(compiled::TRAP.len(), Kind::ALL.len(), "a filter for no known kind");
    }

    #[test]
    fn the_two_modes_differ_only_in_the_mismatch_action() {
        for kind in Kind::ALL {
            let trap = program(kind, Mode::Kill).unwrap().unwrap();
            let log = program(kind, Mode::Log).unwrap().unwrap();
            assert_eq!(trap.len(), log.len());
            let differ: Vec<u32> = trap
                .iter()
                .zip(&log)
                .filter(|(a, b)| a.k != b.k || a.code != b.code)
                .map(|(a, _)| a.k)
                .collect();
            // SECCOMP_RET_TRAP where the other has SECCOMP_RET_LOG, nothing else.
            assert!(!differ.is_empty());
            assert!(differ.iter().all(|&k| k == 0x0003_0000), "{kind:?}: {differ:x?}");
        }
    }

    #[test]
    fn modes_and_kinds_parse_and_name() {
        assert_eq!(Mode::parse("kill").unwrap(), Mode::Kill);
        assert_eq!(Mode::parse("log").unwrap(), Mode::Log);
        assert_eq!(Mode::parse("off").unwrap(), Mode::Off);
        assert!(Mode::parse("on").is_err());
        for k in Kind::ALL {
            assert_eq!(Kind::from_code(k.code()), Some(k));
        }
        assert_eq!(Kind::from_code(0), None);
    }

    #[test]
    fn the_handler_line_names_thread_and_syscall() {
        let mut buf = [0u8; 128];
        let n = sigsys_line(&mut buf, Some(Kind::PageServer), 135);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "grove-vmm: seccomp: thread page-server made forbidden syscall 135; exiting\n"
        );
        let n = sigsys_line(&mut buf, None, 0);
        assert!(std::str::from_utf8(&buf[..n]).unwrap().contains("thread unknown"));
    }
}
