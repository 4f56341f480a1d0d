//! Boot tests: the `grove-vmm` binary boots the test guest (vmm/testguest) on
//! /dev/kvm, and its output and exit status are checked against the contract in
//! vmm/testguest/README.md. Error paths check the error text.
//!
//! The guest comes from `GROVE_TESTGUEST`, else `scripts/build-testguest.sh` builds
//! it. Without /dev/kvm the KVM tests print `skipped: /dev/kvm not available`.
//! No timing assertions: the deadlines below only keep a broken VMM from hanging
//! the test run, and every spawned VMM is killed (by PID) when its guard drops.

mod common;

use std::io::Read;
use std::process::{Child, ChildStdout, Command, ExitStatus};
use std::sync::mpsc::{self, Receiver};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{
    guest, kvm_available, repo_root, spawn_vmm, FNV_OFFSET, FNV_PRIME, MIB, PATTERN_MUL,
    REGION_START,
};

/// Hang guard for one VM run (not a timing assertion).
const DEADLINE: Duration = Duration::from_secs(300);

const GIB: u64 = 1 << 30;

/// Kills the VMM (by PID) and reaps it when dropped, whatever the test did.
struct VmmGuard {
    child: Child,
}

impl VmmGuard {
    fn spawn(args: &[&str]) -> Self {
        Self { child: spawn_vmm(args) }
    }

    /// Waits for the exit, killing the VMM at the hang-guard deadline.
    fn wait(&mut self) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return Some(st);
            }
            if start.elapsed() > DEADLINE {
                self.kill();
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn kill(&mut self) {
        // kill() sends SIGKILL to this child's PID only; an already-exited child is fine.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for VmmGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_all(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The outcome of a VM run to its exit.
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tail = |s: &str| s.chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev();
        write!(
            f,
            "status {}\n--- stdout (tail) ---\n{}\n--- stderr (tail) ---\n{}",
            self.status,
            tail(&self.stdout).collect::<String>(),
            tail(&self.stderr).collect::<String>()
        )
    }
}

/// Runs `grove-vmm <args>` to its exit.
fn run(args: &[&str]) -> Outcome {
    let mut vm = VmmGuard::spawn(args);
    let out = read_all(vm.child.stdout.take().expect("piped stdout"));
    let err = read_all(vm.child.stderr.take().expect("piped stderr"));
    let status = vm.wait();
    let stdout = out.join().expect("stdout reader");
    let stderr = err.join().expect("stderr reader");
    let Some(status) = status else {
        panic!(
            "grove-vmm {args:?} did not exit within {DEADLINE:?}; killed\nstdout: {stdout}\nstderr: {stderr}"
        );
    };
    Outcome { status, stdout, stderr }
}

/// Boots the test guest with `cmdline` and extra VMM flags.
fn boot(cmdline: &str, extra: &[&str]) -> Outcome {
    let kernel = guest().to_owned();
    let mut args = vec!["run", "--kernel", &kernel, "--cmdline", cmdline];
    args.extend_from_slice(extra);
    run(&args)
}

/// The region the contract defines for a guest with `mem_mib` MiB of RAM split at
/// 3 GiB (RAM above 3 GiB continues at 4 GiB): (start, len) chunks.
fn region(mem_mib: u64, touch_mib: u64) -> Vec<(u64, u64)> {
    let mem = mem_mib * MIB;
    let mut ram = vec![(0, mem.min(3 * GIB))];
    if mem > 3 * GIB {
        ram.push((4 * GIB, mem - 3 * GIB));
    }
    let mut left = touch_mib * MIB;
    let mut chunks = Vec::new();
    for (start, len) in ram {
        let s = start.max(REGION_START);
        let end = start + len;
        if s >= end || left == 0 {
            continue;
        }
        let take = (end - s).min(left);
        chunks.push((s, take));
        left -= take;
    }
    assert_eq!(left, 0, "the test asked for a region that does not fit");
    chunks
}

/// The contract's checksum of the region filled with the pattern (`seed`), with
/// the first page re-seeded by `first_page_seed` if given (fork mode).
fn expected_checksum(chunks: &[(u64, u64)], seed: u64, first_page_seed: Option<u64>) -> u64 {
    let first_page_end = chunks.first().map_or(0, |c| c.0 + 4096);
    let mut h = FNV_OFFSET;
    for &(start, len) in chunks {
        let mut a = start;
        while a < start + len {
            let s = match first_page_seed {
                Some(fs) if a < first_page_end => fs,
                _ => seed,
            };
            h = (h ^ (a.wrapping_mul(PATTERN_MUL) ^ s)).wrapping_mul(FNV_PRIME);
            a += 8;
        }
    }
    h
}

/// `CHECKSUM=0x<16 hex>` from the guest's output.
fn parse_checksum(stdout: &str) -> Option<u64> {
    let i = stdout.find("CHECKSUM=0x")? + "CHECKSUM=0x".len();
    u64::from_str_radix(stdout.get(i..i + 16)?, 16).ok()
}

/// MiB of memory available on the host (from /proc/meminfo).
fn mem_available_mib() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

fn assert_checksum(mem_mib: u64, touch_mib: u64, seed: u64) {
    let cmdline = format!("tg.mode=checksum tg.touch_mib={touch_mib} tg.seed={seed} tg.verbose=1");
    let mem = mem_mib.to_string();
    let o = boot(&cmdline, &["--mem-mib", &mem]);
    assert!(o.status.success(), "checksum run of {touch_mib} MiB failed:\n{o}");
    let got = parse_checksum(&o.stdout).unwrap_or_else(|| panic!("no CHECKSUM line:\n{o}"));
    let chunks = region(mem_mib, touch_mib);
    let want = expected_checksum(&chunks, seed, None);
    assert_eq!(
        got, want,
        "checksum of {touch_mib} MiB (seed {seed:#x}) in a {mem_mib} MiB guest: guest {got:#018x}, \
         host {want:#018x}; host region {chunks:x?}\n{o}"
    );
}

/// Chunks of stdout as they arrive.
fn stream(mut r: ChildStdout) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 || tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Collects chunks until `done` holds (true), EOF or the deadline (false).
fn wait_for(rx: &Receiver<String>, done: impl Fn(&str) -> bool) -> (String, bool) {
    let start = Instant::now();
    let mut seen = String::new();
    while start.elapsed() < DEADLINE {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(chunk) => {
                seen.push_str(&chunk);
                if done(&seen) {
                    return (seen, true);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    (seen, false)
}

/// The VMM's error for a failed run: non-zero status and exactly one line on
/// stderr besides the VMM's log lines (`boot-timer: ...`, `timing: ...`), returned.
fn one_line_error(o: &Outcome, what: &str) -> String {
    assert!(!o.status.success(), "{what}: expected a non-zero exit:\n{o}");
    let lines: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.starts_with("boot-timer:") && !l.starts_with("timing:"))
        .collect();
    assert_eq!(lines.len(), 1, "{what}: expected a one-line error on stderr:\n{o}");
    lines[0].to_lowercase()
}

#[cfg(test)]
mod kvm {
    use super::*;

    #[test]
    fn hello_prints_and_exits_zero() {
        if !kvm_available() {
            return;
        }
        let o = boot("tg.mode=hello", &[]);
        assert!(o.status.success(), "hello run failed:\n{o}");
        assert!(o.stdout.contains("hello"), "no hello line:\n{o}");
    }

    #[test]
    fn hello_with_two_vcpus() {
        if !kvm_available() {
            return;
        }
        let o = boot("tg.mode=hello", &["--vcpus", "2"]);
        assert!(o.status.success(), "2-vCPU hello run failed:\n{o}");
        assert!(o.stdout.contains("hello"), "no hello line:\n{o}");
    }

    #[test]
    fn checksums_match_the_host_formula() {
        if !kvm_available() {
            return;
        }
        assert_checksum(128, 0, 0);
        assert_checksum(128, 1, 0);
        assert_checksum(256, 64, 0);
        assert_checksum(512, 200, 0x1234_5678_9abc_def0);
    }

    #[test]
    fn checksum_region_crosses_the_mmio_gap() {
        if !kvm_available() {
            return;
        }
        // 4 GiB of guest RAM: [0, 3 GiB) and [4 GiB, 5 GiB). The region starts at 16 MiB, so
        // 3100 MiB ends 44 MiB above 4 GiB. Guest memory is sparse: only the touched part
        // (~3 GiB) becomes resident.
        let need = 3100 + 1024;
        let avail = mem_available_mib();
        if avail < need {
            common::skip::missing(
                "mem",
                &format!("{avail} MiB available, this test needs about {need} MiB"),
            );
            return;
        }
        assert_checksum(4096, 3100, 7);
    }

    #[test]
    fn ready_prints_ready_then_a_t_stream() {
        if !kvm_available() {
            return;
        }
        // busy mode is ready mode that also dirties pages between Ts.
        for mode in ["ready", "busy"] {
            let kernel = guest().to_owned();
            let cmdline = format!("tg.mode={mode} tg.touch_mib=16");
            let mut vm = VmmGuard::spawn(&[
                "run",
                "--kernel",
                &kernel,
                "--cmdline",
                &cmdline,
                "--mem-mib",
                "128",
            ]);
            let rx = stream(vm.child.stdout.take().expect("piped stdout"));
            let err = read_all(vm.child.stderr.take().expect("piped stderr"));
            let (seen, ok) = wait_for(&rx, |s| {
                s.find("READY\n").is_some_and(|i| s[i..].matches('T').count() >= 20)
            });
            vm.kill();
            let stderr = err.join().expect("stderr reader");
            assert!(
                ok,
                "{mode}: no READY and 20 Ts within {DEADLINE:?}\nstdout: {seen}\nstderr: {stderr}"
            );
            let after = &seen[seen.find("READY\n").expect("READY") + 6..];
            assert!(after.chars().all(|c| c == 'T'), "{mode}: only Ts after READY, got {after:?}");
            assert!(
                stderr.contains("boot-timer"),
                "{mode}: the boot-timer port write was not logged on stderr:\n{stderr}"
            );
        }
    }

    #[test]
    fn bad_guest_cmdline_fails_the_vm() {
        if !kvm_available() {
            return;
        }
        for (cmdline, why) in [
            ("tg.mode=bogus", "unknown tg.mode"),
            ("tg.mode=checksum tg.touch_mib=lots", "tg.touch_mib"),
        ] {
            let o = boot(cmdline, &[]);
            assert!(o.stdout.contains("tg: error:") && o.stdout.contains(why), "{cmdline}:\n{o}");
            assert!(!o.status.success(), "{cmdline}: the guest's triple fault fails the VM:\n{o}");
        }
    }

    #[test]
    fn fork_mode_reports_identity_zero_silently() {
        if !kvm_available() {
            return;
        }
        // On a fresh boot the identity port reads 0, so fork mode prints no ID line.
        let kernel = guest().to_owned();
        let mut vm = VmmGuard::spawn(&[
            "run",
            "--kernel",
            &kernel,
            "--cmdline",
            "tg.mode=fork tg.touch_mib=4",
            "--mem-mib",
            "64",
        ]);
        let rx = stream(vm.child.stdout.take().expect("piped stdout"));
        let (seen, ok) =
            wait_for(&rx, |s| s.find("READY\n").is_some_and(|i| s[i..].matches('T').count() >= 20));
        vm.kill();
        assert!(ok, "no READY and 20 Ts:\n{seen}");
        assert!(!seen.contains("ID="), "fresh boot must read identity 0:\n{seen}");
    }

    #[test]
    fn not_a_kernel_is_a_one_line_error() {
        if !kvm_available() {
            return;
        }
        let readme = repo_root().join("README.md");
        let o = run(&["run", "--kernel", readme.to_str().expect("utf-8 path")]);
        let line = one_line_error(&o, "README.md as kernel");
        assert!(line.contains("kernel") || line.contains("elf"), "error names the kernel: {line}");
        assert!(o.stdout.is_empty(), "nothing ran, so no guest output:\n{o}");
    }

    #[test]
    fn missing_kernel_file_is_a_one_line_error() {
        if !kvm_available() {
            return;
        }
        let o = run(&["run", "--kernel", "/nonexistent/grove-testguest"]);
        let line = one_line_error(&o, "missing kernel file");
        assert!(line.contains("nonexistent"), "error names the path: {line}");
    }

    /// A FIFO as kernel, initrd or state file blocked `open` forever (killed at the hang
    /// guard here); a directory as initrd said "guest memory too small". Each is now refused
    /// at once, naming what the path is.
    #[test]
    fn special_files_as_inputs_are_one_line_errors() {
        if !kvm_available() {
            return;
        }
        let d = tempfile::tempdir().expect("tempdir");
        let fifo = d.path().join("fifo");
        let st = Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo");
        assert!(st.success(), "mkfifo: {st}");
        let (f, dir) = (fifo.to_str().unwrap(), d.path().to_str().unwrap());
        let o = run(&["run", "--kernel", f]);
        assert!(one_line_error(&o, "FIFO kernel").contains("is a fifo, not a regular file"));
        for (rd, kind) in [(dir, "directory"), (f, "fifo")] {
            let o = run(&["run", "--kernel", guest(), "--initrd", rd]);
            let line = one_line_error(&o, "initrd");
            let want = format!("initrd {}: is a {kind}, not a regular file", rd.to_lowercase());
            assert!(line.contains(&want), "{line}");
        }
        // A snapshot directory whose state file is a FIFO, then a link to /dev/zero.
        let state = d.path().join("vmstate");
        std::fs::rename(&fifo, &state).expect("rename");
        let o = run(&["restore", "--snapshot", dir]);
        assert!(one_line_error(&o, "FIFO state file").contains("is a fifo"));
        std::fs::remove_file(&state).expect("remove");
        std::os::unix::fs::symlink("/dev/zero", &state).expect("symlink");
        let o = run(&["restore", "--snapshot", dir]);
        assert!(one_line_error(&o, "/dev/zero state file").contains("is a character device"));
    }

    #[test]
    fn too_little_memory_is_a_one_line_error() {
        if !kvm_available() {
            return;
        }
        let kernel = guest().to_owned();
        for mem in ["0", "1"] {
            let o = run(&["run", "--kernel", &kernel, "--mem-mib", mem]);
            let line = one_line_error(&o, &format!("--mem-mib {mem}"));
            assert!(line.contains("mem"), "error names the memory size: {line}");
        }
    }

    #[test]
    fn bad_flags_are_one_line_errors() {
        let kernel = guest().to_owned();
        let cases: [&[&str]; 5] = [
            &["run", "--kernel", &kernel, "--bogus-flag"],
            &["run"],
            &["run", "--kernel", &kernel, "--vcpus", "0"],
            &["run", "--kernel", &kernel, "--vcpus", "many"],
            &["frobnicate"],
        ];
        for args in cases {
            let o = run(args);
            one_line_error(&o, &format!("{args:?}"));
        }
    }

    #[test]
    fn triple_fault_is_an_error() {
        if !kvm_available() {
            return;
        }
        let o = boot("tg.mode=triplefault", &[]);
        assert!(o.stdout.contains("tg: triple fault requested"), "guest did not start:\n{o}");
        let line = one_line_error(&o, "triple-faulting guest");
        assert!(
            line.contains("triple fault") || line.contains("shutdown"),
            "error says shutdown/triple fault: {line}"
        );
    }

    #[test]
    fn guest_error_region_too_large_fails_the_vm() {
        if !kvm_available() {
            return;
        }
        let o = boot("tg.mode=checksum tg.touch_mib=100", &["--mem-mib", "64"]);
        assert!(o.stdout.contains("tg: error:"), "guest reports its error:\n{o}");
        assert!(!o.status.success(), "a guest that triple-faults makes the VMM fail:\n{o}");
    }

    #[test]
    fn mmio_outside_a_device_is_an_error() {
        if !kvm_available() {
            return;
        }
        // tg.mmio_boot_timer writes one byte into the 32-bit MMIO gap, where grove-vmm has no
        // device at this address.
        let o = boot("tg.mode=ready tg.mmio_boot_timer=0xe0000000", &[]);
        assert!(!o.stdout.contains("READY"), "stopped before READY:\n{o}");
        let line = one_line_error(&o, "MMIO write outside a device");
        assert!(line.contains("mmio"), "error says MMIO: {line}");
    }
}

#[cfg(test)]
mod formula {
    use super::{expected_checksum, parse_checksum, region, GIB, MIB};

    #[test]
    fn region_splits_at_the_mmio_gap() {
        assert_eq!(region(128, 0), vec![]);
        assert_eq!(region(128, 64), vec![(16 * MIB, 64 * MIB)]);
        assert_eq!(region(4096, 3100), vec![(16 * MIB, 3 * GIB - 16 * MIB), (4 * GIB, 44 * MIB)]);
    }

    #[test]
    fn checksum_of_one_mib_is_the_known_value() {
        // Cross-checked with an independent Python implementation of the formula.
        assert_eq!(expected_checksum(&region(128, 1), 0, None), 0xa810_9e07_e0f2_2325);
        assert_eq!(expected_checksum(&[], 0, None), 0xcbf2_9ce4_8422_2325);
        let plain = expected_checksum(&region(64, 16), 0, None);
        assert_eq!(expected_checksum(&region(64, 16), 0, Some(7)), 0x8b7c_4dab_8822_9925);
        assert_ne!(plain, 0x8b7c_4dab_8822_9925);
    }

    #[test]
    fn checksum_line_parses() {
        assert_eq!(parse_checksum("x\nCHECKSUM=0x00000000000000ff\n"), Some(255));
        assert_eq!(parse_checksum("CHECKSUM=0x12"), None);
        assert_eq!(parse_checksum("nothing"), None);
    }
}
