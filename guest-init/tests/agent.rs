//! The guest agent as an ordinary process on the host (`--agent-only`), driven through
//! grove-proto's client over a unix socket.

#[path = "../../testsupport/skip.rs"]
mod skip;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use grove_proto::client::{ClientError, GuestClient};
use grove_proto::frame::{self, MAX_FRAME_LEN};
use grove_proto::guest::{
    exec_exit, request, response, Cancel, EnvVar, ErrorCode, ExecResize, ExecSignal, ExecStart,
    ExecStdin, FileKind, FileRead, FileWriteOpen, Hello, Ping, PostRestore, PtySize, Request, User,
    WatchKind,
};

/// A running agent; killed (by its PID) and its directory removed on drop.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Agent {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        // Traversable by other users (the EACCES tests run processes as nobody).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sock = dir.path().join("agent.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_guest-init"))
            .args(["--agent-only", "--listen"])
            .arg(format!("unix:{}", sock.display()))
            .arg("--root")
            .arg(&root)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.starts_with("listening unix:"), "{line}");
        Self { child, dir, sock }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn client(&self) -> GuestClient {
        GuestClient::connect(
            &format!("unix:{}", self.sock.display()),
            Some(Duration::from_secs(30)),
        )
        .unwrap()
    }

    fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

fn argv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_string()).collect()
}

fn code(e: &ClientError) -> ErrorCode {
    e.code().unwrap_or_else(|| panic!("not a guest error: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_output_exit_code_env_cwd() {
        let a = Agent::start();
        let mut c = a.client();
        assert!(!c.hello.pid1);
        let r = c.run(&["sh", "-c", "echo out; echo err >&2; exit 7"]).unwrap();
        assert_eq!(r.stdout, b"out\n");
        assert_eq!(r.stderr, b"err\n");
        assert_eq!(r.code(), Some(7));
        assert!(r.pid > 0);

        let r = c
            .exec(
                ExecStart {
                    argv: argv(&["sh", "-c", "echo $FOO; pwd"]),
                    env: vec![EnvVar { name: "FOO".into(), value: "bar baz".into() }],
                    cwd: a.root().display().to_string(),
                    ..Default::default()
                },
                None,
            )
            .unwrap();
        assert_eq!(
            String::from_utf8(r.stdout.clone()).unwrap(),
            format!("bar baz\n{}\n", a.root().display())
        );
        assert_eq!(r.code(), Some(0));

        // A program that does not exist: an error reply, and the agent keeps serving.
        let e = c.run(&["/nonexistent/program"]).unwrap_err();
        assert_eq!(code(&e), ErrorCode::SpawnFailed);
        assert!(matches!(e, ClientError::Guest { errno, .. } if errno == libc::ENOENT));
        let e = c.run(&[]).unwrap_err();
        assert_eq!(code(&e), ErrorCode::BadRequest);
        c.ping().unwrap();
    }

    #[test]
    fn exec_as_user() {
        if !is_root() {
            skip::missing("root", "switching users needs root");
            return;
        }
        let a = Agent::start();
        let mut c = a.client();
        let r = c
            .exec(
                ExecStart {
                    argv: argv(&["sh", "-c", "id -u; id -g"]),
                    user: Some(User { name: String::new(), uid: Some(65534), gid: Some(65534) }),
                    ..Default::default()
                },
                None,
            )
            .unwrap();
        assert_eq!(r.stdout, b"65534\n65534\n");
        // By name, from /etc/passwd: HOME and USER follow the user.
        let r = c
            .exec(
                ExecStart {
                    argv: argv(&["sh", "-c", "id -un; echo $USER"]),
                    user: Some(User { name: "nobody".into(), uid: None, gid: None }),
                    ..Default::default()
                },
                None,
            )
            .unwrap();
        assert_eq!(r.stdout, b"nobody\nnobody\n");
        let e = c
            .exec(
                ExecStart {
                    argv: argv(&["true"]),
                    user: Some(User { name: "no-such-user-grove".into(), uid: None, gid: None }),
                    ..Default::default()
                },
                None,
            )
            .unwrap_err();
        assert_eq!(code(&e), ErrorCode::BadRequest);
        // EACCES from inside the process: nobody cannot read a 0600 root file.
        let secret = a.root().join("secret");
        std::fs::write(&secret, "s").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let r = c
            .exec(
                ExecStart {
                    argv: argv(&["cat", &secret.display().to_string()]),
                    user: Some(User { name: String::new(), uid: Some(65534), gid: Some(65534) }),
                    ..Default::default()
                },
                None,
            )
            .unwrap();
        assert_eq!(r.code(), Some(1));
        assert!(String::from_utf8_lossy(&r.stderr).contains("Permission denied"), "{r:?}");
    }

    #[test]
    fn exec_stdin_large() {
        let a = Agent::start();
        let mut c = a.client();
        let data: Vec<u8> = (0..3 * 1024 * 1024 + 17)
            .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let r =
            c.exec(ExecStart { argv: argv(&["cat"]), ..Default::default() }, Some(&data)).unwrap();
        assert_eq!(r.code(), Some(0));
        assert_eq!(r.stdout.len(), data.len());
        assert!(r.stdout == data);
        // Empty stdin closes at once.
        let r = c
            .exec(ExecStart { argv: argv(&["wc", "-c"]), ..Default::default() }, Some(b""))
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "0");
    }

    #[test]
    fn exec_signal_and_timeout() {
        let a = Agent::start();
        let mut c = a.client();
        let id = c
            .send(request::Body::ExecStart(ExecStart {
                argv: argv(&["sleep", "100"]),
                ..Default::default()
            }))
            .unwrap();
        let started = c.recv().unwrap();
        assert!(matches!(started.body, Some(response::Body::ExecStarted(_))), "{started:?}");
        c.send_with_id(id, request::Body::ExecSignal(ExecSignal { signal: libc::SIGTERM }))
            .unwrap();
        let r = c.collect_exec(id).unwrap();
        assert_eq!(r.signal(), Some(libc::SIGTERM));
        assert!(!r.exit.timed_out);

        let r = c
            .exec(
                ExecStart { argv: argv(&["sleep", "100"]), timeout_ms: 300, ..Default::default() },
                None,
            )
            .unwrap();
        assert!(r.exit.timed_out);
        assert_eq!(r.signal(), Some(libc::SIGKILL));
        assert!(r.exit.duration_us >= 300_000);

        // Signals and stdin for an id that is not a live exec.
        c.send_with_id(999, request::Body::ExecSignal(ExecSignal { signal: 9 })).unwrap();
        let e = c.recv().unwrap();
        assert!(
            matches!(e.body, Some(response::Body::Error(ref x)) if x.code() == ErrorCode::UnknownId),
            "{e:?}"
        );
        assert_eq!(e.id, 999);

        // Cancel kills the process; its ExecExit still arrives.
        let id = c
            .send(request::Body::ExecStart(ExecStart {
                argv: argv(&["sleep", "100"]),
                ..Default::default()
            }))
            .unwrap();
        c.send_with_id(id, request::Body::Cancel(Cancel {})).unwrap();
        let r = c.collect_exec(id);
        // The Ok for the cancel is skipped by collect_exec only if it is not for this id; it is.
        match r {
            Err(ClientError::Unexpected(m)) => {
                assert!(m.contains("Ok"), "{m}");
                let r = c.collect_exec(id).unwrap();
                assert_eq!(r.signal(), Some(libc::SIGKILL));
            }
            Ok(r) => assert_eq!(r.signal(), Some(libc::SIGKILL)),
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn exec_pty_and_resize() {
        let a = Agent::start();
        let mut c = a.client();
        let r = c
            .exec(
                ExecStart {
                    argv: argv(&[
                        "sh",
                        "-c",
                        "stty size; [ -t 0 ] && [ -t 1 ] && echo isatty; echo to-stderr >&2",
                    ]),
                    pty: Some(PtySize { rows: 33, cols: 101 }),
                    ..Default::default()
                },
                None,
            )
            .unwrap();
        let out = String::from_utf8_lossy(&r.stdout);
        assert!(out.contains("33 101"), "{out:?}");
        assert!(out.contains("isatty"), "{out:?}");
        assert!(out.contains("to-stderr"), "stderr goes to the terminal too: {out:?}");
        assert!(r.stderr.is_empty());
        assert_eq!(r.code(), Some(0));

        // Resize while running, then let it print the new size.
        let id = c
            .send(request::Body::ExecStart(ExecStart {
                argv: argv(&["sh", "-c", "read x; stty size"]),
                pty: Some(PtySize { rows: 10, cols: 20 }),
                stdin: true,
                ..Default::default()
            }))
            .unwrap();
        c.send_with_id(
            id,
            request::Body::ExecResize(ExecResize { size: Some(PtySize { rows: 40, cols: 120 }) }),
        )
        .unwrap();
        c.send_with_id(
            id,
            request::Body::ExecStdin(ExecStdin { data: b"go\n".to_vec(), eof: false }),
        )
        .unwrap();
        let r = c.collect_exec(id).unwrap();
        let out = String::from_utf8_lossy(&r.stdout);
        assert!(out.contains("40 120"), "{out:?}");
        // Resizing a pipe-based exec is a bad request.
        let id = c
            .send(request::Body::ExecStart(ExecStart {
                argv: argv(&["sleep", "1"]),
                ..Default::default()
            }))
            .unwrap();
        c.send_with_id(
            id,
            request::Body::ExecResize(ExecResize { size: Some(PtySize { rows: 1, cols: 1 }) }),
        )
        .unwrap();
        let mut saw_error = false;
        loop {
            let r = c.recv().unwrap();
            match r.body {
                Some(response::Body::Error(e)) => {
                    assert_eq!(e.code(), ErrorCode::BadRequest);
                    saw_error = true;
                }
                Some(response::Body::ExecExit(e)) => {
                    assert_eq!(e.status, Some(exec_exit::Status::Code(0)));
                    break;
                }
                _ => {}
            }
        }
        assert!(saw_error);
    }

    #[test]
    fn exec_interleaved() {
        let a = Agent::start();
        let mut c = a.client();
        let slow = c
            .send(request::Body::ExecStart(ExecStart {
                argv: argv(&["sh", "-c", "sleep 1; echo slow"]),
                ..Default::default()
            }))
            .unwrap();
        let fast = c
            .send(request::Body::ExecStart(ExecStart {
                argv: argv(&["echo", "fast"]),
                ..Default::default()
            }))
            .unwrap();
        let mut out = std::collections::HashMap::<u64, Vec<u8>>::new();
        let mut exited = Vec::new();
        let mut seqs = std::collections::HashMap::<u64, Vec<u64>>::new();
        while exited.len() < 2 {
            let r = c.recv().unwrap();
            match r.body {
                Some(response::Body::ExecOutput(o)) => {
                    out.entry(r.id).or_default().extend_from_slice(&o.data);
                    seqs.entry(r.id).or_default().push(o.seq);
                }
                Some(response::Body::ExecExit(_)) => exited.push(r.id),
                _ => {}
            }
        }
        assert_eq!(exited, vec![fast, slow]);
        assert_eq!(out[&fast], b"fast\n");
        assert_eq!(out[&slow], b"slow\n");
        for s in seqs.values() {
            let mut sorted = s.clone();
            sorted.sort_unstable();
            assert_eq!(&sorted, &(0..s.len() as u64).collect::<Vec<_>>());
        }
    }

    #[test]
    fn files_large_and_ops() {
        let a = Agent::start();
        let mut c = a.client();
        let data: Vec<u8> = (0..5 * 1024 * 1024 + 3)
            .map(|i: u32| (i.wrapping_mul(0x9E37_79B9) >> 24) as u8)
            .collect();
        assert_eq!(c.write_file("/big.bin", &data, 0o600).unwrap(), data.len() as u64);
        let host = std::fs::read(a.root().join("big.bin")).unwrap();
        assert!(host == data);
        assert_eq!(
            std::fs::metadata(a.root().join("big.bin")).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let back = c.read_file("/big.bin").unwrap();
        assert!(back == data);
        let part = c
            .read_file_with(FileRead {
                path: "/big.bin".into(),
                offset: 1_000_000,
                length: 700_000,
                chunk_size: 4096,
                user: None,
            })
            .unwrap();
        assert!(part[..] == data[1_000_000..1_700_000]);
        let st = c.stat("/big.bin").unwrap();
        assert_eq!((st.size, st.kind(), st.mode), (data.len() as u64, FileKind::Regular, 0o600));
        // Empty file.
        c.write_file("/empty", b"", 0).unwrap();
        assert_eq!(c.read_file("/empty").unwrap(), b"");

        c.mkdir("/a/b/c", true).unwrap();
        c.write_file_with(FileWriteOpen { path: "/a/b/c/f".into(), ..Default::default() }, b"1")
            .unwrap();
        c.write_file_with(
            FileWriteOpen { path: "/a/b/c/f".into(), append: true, ..Default::default() },
            b"2",
        )
        .unwrap();
        assert_eq!(c.read_file("/a/b/c/f").unwrap(), b"12");
        c.write_file_with(
            FileWriteOpen { path: "/n/e/w".into(), mkdir_parents: true, ..Default::default() },
            b"x",
        )
        .unwrap();
        let names: Vec<String> = c.list("/").unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["a", "big.bin", "empty", "n"]);
        c.rename("/a/b/c/f", "/moved").unwrap();
        assert_eq!(c.read_file("/moved").unwrap(), b"12");
        assert_eq!(code(&c.remove("/a", false).unwrap_err()), ErrorCode::AlreadyExists); // ENOTEMPTY
        c.remove("/a", true).unwrap();
        assert!(!a.root().join("a").exists());
        std::os::unix::fs::symlink("moved", a.root().join("link")).unwrap();
        let st = c.stat("/link").unwrap();
        assert_eq!((st.kind(), st.symlink_target.as_str()), (FileKind::Symlink, "moved"));
        // A listing larger than one batch.
        c.mkdir("/many", false).unwrap();
        for i in 0..2500 {
            std::fs::write(a.root().join(format!("many/{i:05}")), "").unwrap();
        }
        let l = c.list("/many").unwrap();
        assert_eq!(l.len(), 2500);
        assert_eq!(l[2499].name, "02499");
        // Entries whose encoding is large (4000-byte link targets): more than 1 MiB in all,
        // split over frames by size.
        c.mkdir("/links", false).unwrap();
        let target = "t".repeat(4000);
        for i in 0..400 {
            std::os::unix::fs::symlink(&target, a.root().join(format!("links/{i:03}"))).unwrap();
        }
        let l = c.list("/links").unwrap();
        assert_eq!(l.len(), 400);
        assert!(l.iter().all(|e| e.symlink_target == target && e.kind() == FileKind::Symlink));
    }

    #[test]
    fn file_errors() {
        let a = Agent::start();
        let mut c = a.client();
        assert_eq!(code(&c.read_file("/missing").unwrap_err()), ErrorCode::NotFound);
        assert_eq!(code(&c.stat("/missing/x").unwrap_err()), ErrorCode::NotFound);
        c.mkdir("/d", false).unwrap();
        assert_eq!(code(&c.mkdir("/d", false).unwrap_err()), ErrorCode::AlreadyExists);
        assert_eq!(code(&c.read_file("/d").unwrap_err()), ErrorCode::IsADirectory);
        c.write_file("/f", b"x", 0).unwrap();
        assert_eq!(code(&c.list("/f").unwrap_err()), ErrorCode::NotADirectory);
        assert_eq!(code(&c.remove("/", true).unwrap_err()), ErrorCode::BadRequest);

        // Escaping the allowed root lexically is refused.
        for p in ["/../etc/passwd", "../../etc/hostname", "/d/../../x"] {
            assert_eq!(code(&c.read_file(p).unwrap_err()), ErrorCode::OutsideRoot, "{p}");
        }
        assert_eq!(code(&c.rename("/f", "/../f").unwrap_err()), ErrorCode::OutsideRoot);
        // Symlinks resolve inside the root (chroot semantics, openat2 RESOLVE_IN_ROOT): an
        // absolute link to /etc and a relative one climbing above the root both land in
        // <root>/etc, never in the host's /etc.
        std::os::unix::fs::symlink("/etc", a.root().join("etc-link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", a.root().join("passwd-link")).unwrap();
        std::os::unix::fs::symlink("../../../../../../..", a.root().join("d/up")).unwrap();
        for p in ["/etc-link/passwd", "/passwd-link", "/d/up/etc/passwd"] {
            assert_eq!(code(&c.read_file(p).unwrap_err()), ErrorCode::NotFound, "{p}");
        }
        assert_eq!(
            code(&c.write_file("/etc-link/grove-test", b"x", 0).unwrap_err()),
            ErrorCode::NotFound
        );
        assert_eq!(code(&c.list("/etc-link").unwrap_err()), ErrorCode::NotFound);
        assert_eq!(code(&c.mkdir("/etc-link/x", true).unwrap_err()), ErrorCode::NotFound);
        assert!(!Path::new("/etc/grove-test").exists() && !Path::new("/etc/x").exists());
        std::fs::create_dir(a.root().join("etc")).unwrap();
        std::fs::write(a.root().join("etc/passwd"), "inside").unwrap();
        for p in ["/etc-link/passwd", "/passwd-link", "/d/up/etc/passwd"] {
            assert_eq!(c.read_file(p).unwrap(), b"inside", "{p}");
        }
        c.write_file("/etc-link/new", b"n", 0).unwrap();
        assert_eq!(std::fs::read(a.root().join("etc/new")).unwrap(), b"n");
        let names: Vec<String> = c.list("/d/up/etc").unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["new", "passwd"]);
        // stat and remove act on the link itself, not on its target.
        assert_eq!(c.stat("/etc-link").unwrap().kind(), FileKind::Symlink);
        c.remove("/etc-link", true).unwrap();
        assert!(a.root().join("etc/passwd").exists());
        // rm -r does not follow a link inside the tree.
        c.mkdir("/t/sub", true).unwrap();
        std::os::unix::fs::symlink(a.root().join("etc"), a.root().join("t/sub/l")).unwrap();
        c.remove("/t", true).unwrap();
        assert!(!a.root().join("t").exists());
        assert!(a.root().join("etc/passwd").exists());
        assert!(Path::new("/etc/passwd").exists());

        if !is_root() {
            skip::missing("root", "EACCES checks need root (to act as another user)");
            return;
        }
        // EACCES: file operations as nobody (per-thread fsuid) on root-owned files.
        let nobody = Some(User { name: String::new(), uid: Some(65534), gid: Some(65534) });
        std::fs::write(a.root().join("secret"), "s").unwrap();
        std::fs::set_permissions(a.root().join("secret"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let e = c
            .read_file_with(FileRead {
                path: "/secret".into(),
                user: nobody.clone(),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(code(&e), ErrorCode::PermissionDenied);
        assert!(matches!(e, ClientError::Guest { errno, .. } if errno == libc::EACCES));
        let e = c
            .write_file_with(
                FileWriteOpen { path: "/d/new".into(), user: nobody.clone(), ..Default::default() },
                b"x",
            )
            .unwrap_err();
        assert_eq!(code(&e), ErrorCode::PermissionDenied);
        assert!(!a.root().join("d/new").exists());
        // The same thread serves the next request with full rights again.
        assert_eq!(c.read_file("/secret").unwrap(), b"s");
        // And nobody may write where nobody owns the directory.
        std::fs::set_permissions(a.root().join("d"), std::fs::Permissions::from_mode(0o777))
            .unwrap();
        c.write_file_with(
            FileWriteOpen { path: "/d/new".into(), user: nobody, ..Default::default() },
            b"x",
        )
        .unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(a.root().join("d/new")).unwrap().uid(), 65534);
    }

    #[test]
    fn watch_directory() {
        let a = Agent::start();
        let mut c = a.client();
        c.mkdir("/w", false).unwrap();
        // The client's calls (agentd's FilesystemService.Watch uses them): in place once
        // watch_start returns, events in order, cancelled from another thread's sender.
        let id = c.watch_start("/w").unwrap();
        std::fs::write(a.root().join("w/new"), "x").unwrap();
        std::fs::rename(a.root().join("w/new"), a.root().join("w/old")).unwrap();
        std::fs::remove_file(a.root().join("w/old")).unwrap();
        let mut seen = Vec::new();
        while !seen.contains(&(WatchKind::Removed, "old".to_string())) {
            let e = c.watch_next(id).unwrap().expect("the watch runs");
            if seen.last() != Some(&(e.kind(), e.name.clone())) {
                seen.push((e.kind(), e.name.clone()));
            }
        }
        let names = |v: &[(WatchKind, String)]| {
            v.iter().map(|(k, n)| format!("{k:?} {n}")).collect::<Vec<_>>().join(", ")
        };
        assert_eq!(
            names(&seen),
            "Created new, Modified new, MovedFrom new, MovedTo old, Removed old",
            "{seen:?}"
        );
        c.sender().cancel(id).unwrap();
        while c.watch_next(id).unwrap().is_some() {}
        // Gone after the cancel: the connection serves the next request.
        c.ping().unwrap();
        let e = c.watch_start("/nope").unwrap_err();
        assert_eq!(code(&e), ErrorCode::NotFound);
        std::fs::write(a.root().join("w/file"), "x").unwrap();
        let e = c.watch_start("/w/file").unwrap_err();
        assert_eq!(code(&e), ErrorCode::NotADirectory, "{e}");
    }

    fn recv_error(s: &mut UnixStream) -> (u64, ErrorCode) {
        let p = frame::read_frame(s).unwrap();
        let r = frame::decode_response(&p).unwrap();
        match r.body {
            Some(response::Body::Error(e)) => (r.id, e.code()),
            o => panic!("expected an error, got {o:?}"),
        }
    }

    fn hello_req(magic: u32, version: u32) -> Request {
        Request {
            id: 1,
            body: Some(request::Body::Hello(Hello { magic, version, client: "raw".into() })),
        }
    }

    #[test]
    fn malformed_frames_get_errors_and_the_agent_keeps_serving() {
        let a = Agent::start();
        let mut s = a.raw();
        // Before hello.
        frame::write_frame(&mut s, &Request { id: 5, body: Some(request::Body::Ping(Ping {})) })
            .unwrap();
        assert_eq!(recv_error(&mut s), (5, ErrorCode::Protocol));
        // Wrong magic, wrong version.
        frame::write_frame(&mut s, &hello_req(0xdead_beef, 1)).unwrap();
        assert_eq!(recv_error(&mut s), (1, ErrorCode::Protocol));
        frame::write_frame(&mut s, &hello_req(grove_proto::GUEST_MAGIC, 99)).unwrap();
        assert_eq!(recv_error(&mut s), (1, ErrorCode::Protocol));
        frame::write_frame(&mut s, &hello_req(grove_proto::GUEST_MAGIC, 1)).unwrap();
        let h = frame::decode_response(&frame::read_frame(&mut s).unwrap()).unwrap();
        assert!(
            matches!(h.body, Some(response::Body::Hello(ref r)) if r.max_frame_len == MAX_FRAME_LEN)
        );

        // Garbage payload.
        let garbage = [0xffu8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        s.write_all(&u32::try_from(garbage.len()).unwrap().to_le_bytes()).unwrap();
        s.write_all(&garbage).unwrap();
        assert_eq!(recv_error(&mut s), (0, ErrorCode::BadFrame));
        // A truncated message: field 2 (hello) claims 50 bytes, 3 follow.
        let trunc = [0x08, 0x07, 0x12, 50, 1, 2, 3];
        s.write_all(&u32::try_from(trunc.len()).unwrap().to_le_bytes()).unwrap();
        s.write_all(&trunc).unwrap();
        assert_eq!(recv_error(&mut s), (0, ErrorCode::BadFrame));
        // An empty request (no body).
        frame::write_frame(&mut s, &Request { id: 9, body: None }).unwrap();
        assert_eq!(recv_error(&mut s), (9, ErrorCode::BadRequest));
        // Oversized: the payload is skipped, the stream stays in sync.
        let len = MAX_FRAME_LEN + 1;
        s.write_all(&len.to_le_bytes()).unwrap();
        let writer = {
            let mut w = s.try_clone().unwrap();
            std::thread::spawn(move || {
                w.write_all(&vec![0x5a; len as usize]).unwrap();
            })
        };
        assert_eq!(recv_error(&mut s), (0, ErrorCode::FrameTooLarge));
        writer.join().unwrap();
        frame::write_frame(&mut s, &Request { id: 10, body: Some(request::Body::Ping(Ping {})) })
            .unwrap();
        let r = frame::decode_response(&frame::read_frame(&mut s).unwrap()).unwrap();
        assert_eq!(r.id, 10);
        assert!(matches!(r.body, Some(response::Body::Pong(_))));

        // A connection that dies inside a frame does not take the agent down.
        let mut t = a.raw();
        t.write_all(&100u32.to_le_bytes()).unwrap();
        t.write_all(&[1, 2, 3]).unwrap();
        drop(t);
        let mut c = a.client();
        c.ping().unwrap();
        assert_eq!(c.run(&["true"]).unwrap().code(), Some(0));
    }

    #[test]
    fn info_post_restore_and_power() {
        let a = Agent::start();
        let mut c = a.client();
        let i = c.info().unwrap();
        assert!(i.mem_total > 0 && i.mem_available <= i.mem_total);
        assert!(i.disk_total > 0 && i.uptime_ms > 0 && !i.kernel.is_empty());
        // Machine-wide steps are refused outside a guest; entropy too large is a bad request.
        let e = c
            .post_restore(PostRestore { wall_clock_ns: Some(0), ..Default::default() })
            .unwrap_err();
        assert_eq!(code(&e), ErrorCode::Unsupported);
        let e = c
            .post_restore(PostRestore { entropy: vec![0; 5000], ..Default::default() })
            .unwrap_err();
        assert_eq!(code(&e), ErrorCode::BadRequest);
        if is_root() {
            // Adding entropy and reseeding is harmless on the host.
            c.post_restore(PostRestore { entropy: vec![7; 64], ..Default::default() }).unwrap();
        }
        // In agent-only mode, poweroff ends the agent process.
        let mut a = a;
        c.power(grove_proto::guest::PowerAction::Poweroff).unwrap();
        let st = a.child.wait().unwrap();
        assert!(st.success());
    }

    #[test]
    fn hybrid_vsock_connect() {
        // A stand-in for a VMM's userspace vsock: accepts on a unix socket, answers
        // `CONNECT 1024` with `OK 1`, then splices to the agent.
        let a = Agent::start();
        let vs = a.dir.path().join("vsock.sock");
        let l = std::os::unix::net::UnixListener::bind(&vs).unwrap();
        let agent_sock = a.sock.clone();
        std::thread::spawn(move || {
            for mut host in l.incoming().flatten() {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while std::io::Read::read(&mut host, &mut b).unwrap() == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                if line != b"CONNECT 1024" {
                    host.write_all(b"ERR\n").unwrap();
                    continue;
                }
                host.write_all(b"OK 1\n").unwrap();
                let guest = UnixStream::connect(&agent_sock).unwrap();
                let (mut h2, mut g2) = (host.try_clone().unwrap(), guest.try_clone().unwrap());
                std::thread::spawn(move || std::io::copy(&mut h2, &mut g2));
                std::thread::spawn(move || std::io::copy(&mut { guest }, &mut { host }));
            }
        });
        let mut c = GuestClient::connect(
            &format!("vsock-uds:{}:1024", vs.display()),
            Some(Duration::from_secs(30)),
        )
        .unwrap();
        assert_eq!(c.run(&["echo", "via vsock"]).unwrap().stdout, b"via vsock\n");
        let e = GuestClient::connect(
            &format!("vsock-uds:{}:9", vs.display()),
            Some(Duration::from_secs(30)),
        );
        assert!(matches!(e, Err(ClientError::Connect { .. })));
    }

    #[test]
    fn many_concurrent_execs() {
        // The reaper hands every exit status to the right exec, whatever the interleaving
        // (a lost or swapped status would show as a wrong code or a read timeout).
        let a = Agent::start();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let mut c = a.client();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        let code = (t * 25 + i) % 200;
                        let r = c.run(&["sh", "-c", &format!("echo {code}; exit {code}")]).unwrap();
                        assert_eq!(r.code(), Some(code));
                        assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), code.to_string());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn exec_user_gets_supplementary_groups() {
        if !is_root() {
            skip::missing("root", "switching users needs root");
            return;
        }
        // Any group of this host's /etc/group with a member that /etc/passwd knows.
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
        let users: Vec<&str> = passwd.lines().filter_map(|l| l.split(':').next()).collect();
        let group = std::fs::read_to_string("/etc/group").unwrap();
        let pair = group.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let member = f.get(3)?.split(',').find(|m| users.contains(m))?;
            Some((member.to_string(), f[2].to_string()))
        });
        let Some((user, gid)) = pair else {
            println!("skipped: no user of /etc/passwd is listed as a group member in /etc/group");
            return;
        };
        let a = Agent::start();
        let mut c = a.client();
        let r = c
            .exec(
                ExecStart {
                    argv: argv(&["id", "-G"]),
                    user: Some(User { name: user.clone(), uid: None, gid: None }),
                    ..Default::default()
                },
                None,
            )
            .unwrap();
        let groups = String::from_utf8_lossy(&r.stdout).into_owned();
        assert!(
            groups.split_whitespace().any(|g| g == gid),
            "{user}: id -G = {groups:?}, want {gid}"
        );
        // Root's own groups are not leaked into a process run as nobody.
        let r = c
            .exec(
                ExecStart {
                    argv: argv(&["id", "-G"]),
                    user: Some(User { name: String::new(), uid: Some(65534), gid: Some(65534) }),
                    ..Default::default()
                },
                None,
            )
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "65534");
    }

    // ---- the client's streaming side (grove-proto::client) ---------------------------------

    #[test]
    fn an_interactive_exec_streams_while_another_thread_types() {
        let a = Agent::start();
        let mut c = a.client();
        let id = c
            .exec_start(ExecStart {
                argv: argv(&["sh", "-c", "while read l; do echo got-$l; done; echo bye"]),
                stdin: true,
                ..Default::default()
            })
            .unwrap();
        let tx = c.sender();
        tx.stdin(id, b"a\n", false).unwrap();
        // The answer to the first line arrives before any more input is sent.
        let mut out = Vec::new();
        while !out.ends_with(b"got-a\n") {
            match c.exec_next(id).unwrap() {
                grove_proto::client::ExecEvent::Output { data, .. } => out.extend(data),
                grove_proto::client::ExecEvent::Exit(e) => panic!("exited early: {e:?}"),
                grove_proto::client::ExecEvent::Started(_) => {}
            }
        }
        let typist = std::thread::spawn(move || tx.stdin(id, b"b\nc\n", true).unwrap());
        let mut code = None;
        while code.is_none() {
            match c.exec_next(id).unwrap() {
                grove_proto::client::ExecEvent::Output { data, .. } => out.extend(data),
                grove_proto::client::ExecEvent::Exit(e) => {
                    code = grove_proto::client::exit_code(&e);
                }
                grove_proto::client::ExecEvent::Started(_) => {}
            }
        }
        typist.join().unwrap();
        assert_eq!(String::from_utf8_lossy(&out), "got-a\ngot-b\ngot-c\nbye\n");
        assert_eq!(code, Some(0));
    }

    #[test]
    fn large_stdin_and_large_output_at_once_do_not_deadlock() {
        // cat writes while it reads: a client that sent all stdin before reading would stall
        // once both directions' buffers are full.
        let a = Agent::start();
        let mut c = a.client();
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        let r =
            c.exec(ExecStart { argv: argv(&["cat"]), ..Default::default() }, Some(&data)).unwrap();
        assert_eq!(r.code(), Some(0));
        assert!(r.stdout == data, "cat returned {} bytes of {}", r.stdout.len(), data.len());
    }

    #[test]
    fn a_slow_reader_gets_all_output_before_the_exit() {
        // The process leaves 1 MiB in its pipe (enlarged with F_SETPIPE_SZ) and exits at
        // once; the client then takes ~5 s to read it. The agent must not send ExecExit
        // before the output, however long the client takes, as long as it keeps reading.
        let a = Agent::start();
        let mut c = a.client();
        let id = c
            .exec_start(ExecStart {
                argv: argv(&[
                    "perl",
                    "-e",
                    "fcntl(STDOUT, 1031, 1 << 20) or die \"F_SETPIPE_SZ: $!\"; \
                     print \"x\" x (1 << 20)",
                ]),
                ..Default::default()
            })
            .unwrap();
        let mut got = 0usize;
        let exit = loop {
            std::thread::sleep(Duration::from_millis(300));
            match c.exec_next(id).unwrap() {
                grove_proto::client::ExecEvent::Output { data, .. } => got += data.len(),
                grove_proto::client::ExecEvent::Exit(e) => break e,
                grove_proto::client::ExecEvent::Started(_) => {}
            }
        };
        assert!(matches!(exit.status, Some(exec_exit::Status::Code(0))), "{exit:?}");
        assert_eq!(got, 1 << 20, "output after the exit was lost to the client");
    }

    #[test]
    fn files_stream_through_readers_and_writers() {
        let a = Agent::start();
        let mut c = a.client();
        let data: Vec<u8> = (0..(3u32 << 20) + 12345).map(|i| (i % 251) as u8).collect();
        let open = FileWriteOpen { path: "/big".into(), ..Default::default() };
        assert_eq!(c.write_file_from(open, &mut data.as_slice()).unwrap(), data.len() as u64);
        assert_eq!(std::fs::read(a.root().join("big")).unwrap(), data);
        let mut back = Vec::new();
        let n = c
            .read_file_to(FileRead { path: "/big".into(), ..Default::default() }, &mut back)
            .unwrap();
        assert_eq!(n, data.len() as u64);
        assert!(back == data);
        // An empty source makes an empty file.
        let open = FileWriteOpen { path: "/empty".into(), ..Default::default() };
        assert_eq!(c.write_file_from(open, &mut std::io::empty()).unwrap(), 0);
        assert_eq!(std::fs::metadata(a.root().join("empty")).unwrap().len(), 0);
    }

    #[test]
    fn a_signal_sent_from_another_thread_ends_the_exec() {
        let a = Agent::start();
        let mut c = a.client();
        let id = c
            .exec_start(ExecStart { argv: argv(&["sleep", "100"]), ..Default::default() })
            .unwrap();
        assert!(matches!(c.exec_next(id).unwrap(), grove_proto::client::ExecEvent::Started(_)));
        let tx = c.sender();
        std::thread::spawn(move || tx.signal(id, libc::SIGTERM).unwrap()).join().unwrap();
        let r = c.collect_exec(id).unwrap();
        assert_eq!(r.signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn a_client_whose_agent_died_gets_gone() {
        let mut a = Agent::start();
        let mut c = a.client();
        let id = c
            .exec_start(ExecStart { argv: argv(&["sleep", "100"]), ..Default::default() })
            .unwrap();
        a.child.kill().unwrap();
        a.child.wait().unwrap();
        let e = loop {
            match c.exec_next(id) {
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert!(e.is_gone(), "{e:?}");
        let e = c.ping().unwrap_err();
        assert!(e.is_gone(), "{e:?}");
    }

    #[test]
    fn connect_retry_waits_for_an_agent_that_starts_late() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("late.sock");
        let addr = format!("unix:{}", sock.display());
        let t = std::time::Instant::now();
        let s2 = sock.clone();
        let starter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            Command::new(env!("CARGO_BIN_EXE_guest-init"))
                .args(["--agent-only", "--listen"])
                .arg(format!("unix:{}", s2.display()))
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        });
        let mut c = GuestClient::connect_retry(
            &addr,
            t + Duration::from_secs(30),
            Duration::from_secs(5),
            Some(Duration::from_secs(30)),
        )
        .unwrap();
        let mut child = starter.join().unwrap();
        assert_eq!(c.run(&["echo", "late"]).unwrap().stdout, b"late\n");
        let _ = child.kill();
        let _ = child.wait();
    }
}
