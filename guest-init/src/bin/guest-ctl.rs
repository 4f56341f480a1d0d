//! guest-ctl: drives a guest agent over the guest protocol from a shell (smoke tests,
//! test-host scenarios, debugging).
//!
//! ```text
//! guest-ctl --connect ADDR [--wait SECS] [--timeout SECS] COMMAND
//!   ping | info
//!   exec [-i] ARG...        run; stdout/stderr stream out as they come; exit with the
//!                           process's code (128+N for signal N); -i feeds stdin to it
//!   exec-pty [-i] ARG...    the same on a new 24x80 PTY
//!   post-restore HOSTNAME   64 bytes of host entropy, the host's wall clock, the hostname
//!   write PATH              stream stdin into PATH
//!   read PATH               stream PATH to stdout
//!   poweroff | reboot
//! ```
//! ADDR: `vsock-uds:/path/to/vm.sock:1024` (a grove-vmm's vsock socket), `unix:PATH`,
//! `tcp:HOST:PORT`. `--wait` retries connect + hello until the agent answers (a booting or
//! just-restored guest). `--timeout` bounds each wait for an answer (default: none).
//! Exit status: the command's, 1 for an error, 3 when the guest is gone.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use grove_proto::client::{ClientError, ExecEvent, GuestClient};
use grove_proto::guest::{ExecStart, PowerAction, PtySize, Stream};

fn die(msg: &str) -> ! {
    eprintln!("guest-ctl: {msg}");
    std::process::exit(1);
}

fn fail(e: &ClientError) -> ! {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    eprintln!("guest-ctl: {msg}");
    std::process::exit(if e.is_gone() { 3 } else { 1 });
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut addr = None;
    let mut wait = 0u64;
    let mut timeout = None;
    while args.len() >= 2 && args[0].starts_with("--") {
        let v = args.remove(1);
        match args.remove(0).as_str() {
            "--connect" => addr = Some(v),
            "--wait" => wait = v.parse().unwrap_or_else(|_| die("bad --wait")),
            "--timeout" => {
                timeout =
                    Some(Duration::from_secs(v.parse().unwrap_or_else(|_| die("bad --timeout"))));
            }
            o => die(&format!("unknown option {o}")),
        }
    }
    let addr = addr.unwrap_or_else(|| die("--connect ADDR is required"));
    if args.is_empty() {
        die("no command");
    }
    let t0 = Instant::now();
    let c = if wait > 0 {
        // While a guest boots (or a restored one re-listens), connections are refused or
        // reset; short attempts get through as soon as the agent answers.
        let c = GuestClient::connect_retry(
            &addr,
            t0 + Duration::from_secs(wait),
            Duration::from_secs(1),
            timeout,
        );
        if let Ok(c) = &c {
            eprintln!(
                "guest-ctl: connected to {} after {} ms (guest uptime {} ms)",
                c.hello.agent,
                t0.elapsed().as_millis(),
                c.hello.uptime_ms
            );
        }
        c
    } else {
        GuestClient::connect(&addr, timeout)
    };
    let mut c = c.unwrap_or_else(|e| fail(&e));
    match args[0].as_str() {
        "ping" => c.ping().unwrap_or_else(|e| fail(&e)),
        "info" => println!("{:#?}", c.info().unwrap_or_else(|e| fail(&e))),
        "exec" | "exec-pty" => exec(&mut c, args[0] == "exec-pty", &args[1..]),
        "write" => {
            let path = args.get(1).unwrap_or_else(|| die("write PATH"));
            let open =
                grove_proto::guest::FileWriteOpen { path: path.clone(), ..Default::default() };
            c.write_file_from(open, &mut std::io::stdin().lock()).unwrap_or_else(|e| fail(&e));
        }
        "read" => {
            let path = args.get(1).unwrap_or_else(|| die("read PATH"));
            let req = grove_proto::guest::FileRead { path: path.clone(), ..Default::default() };
            let mut out = std::io::stdout().lock();
            c.read_file_to(req, &mut out).unwrap_or_else(|e| fail(&e));
            out.flush().ok();
        }
        "post-restore" => {
            let hostname = args.get(1).cloned().unwrap_or_default();
            let mut entropy = vec![0u8; 64];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut entropy))
                .unwrap_or_else(|e| die(&e.to_string()));
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let req = grove_proto::guest::PostRestore {
                wall_clock_ns: i64::try_from(now.as_nanos()).ok(),
                entropy,
                hostname,
                net: None,
            };
            c.post_restore(req).unwrap_or_else(|e| fail(&e));
        }
        "poweroff" => c.power(PowerAction::Poweroff).unwrap_or_else(|e| fail(&e)),
        "reboot" => c.power(PowerAction::Reboot).unwrap_or_else(|e| fail(&e)),
        o => die(&format!("unknown command {o}")),
    }
}

/// Runs a command, streaming its output; with `-i`, stdin is fed from a second thread (an
/// interactive session: output keeps coming while input is typed).
fn exec(c: &mut GuestClient, pty: bool, args: &[String]) -> ! {
    let (feed, argv) = match args.first().map(String::as_str) {
        Some("-i") => (true, &args[1..]),
        _ => (false, args),
    };
    if argv.is_empty() {
        die("exec ARG...");
    }
    let req = ExecStart {
        argv: argv.to_vec(),
        pty: pty.then_some(PtySize { rows: 24, cols: 80 }),
        stdin: feed,
        ..Default::default()
    };
    let id = c.exec_start(req).unwrap_or_else(|e| fail(&e));
    if feed {
        let sender = c.sender();
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = sender.stdin(id, &[], true);
                        return;
                    }
                    Ok(n) => {
                        if sender.stdin(id, &buf[..n], false).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    loop {
        match c.exec_next(id).unwrap_or_else(|e| fail(&e)) {
            ExecEvent::Started(_) => {}
            ExecEvent::Output { stream: Stream::Stderr, data, .. } => {
                err.write_all(&data).ok();
            }
            ExecEvent::Output { data, .. } => {
                // Whoever reads our stdout is gone: end (closing the connection ends the
                // exec's stream) instead of draining the guest's output into nothing.
                if let Err(e) = out.write_all(&data).and_then(|()| out.flush()) {
                    eprintln!("guest-ctl: stdout: {e}");
                    std::process::exit(1);
                }
            }
            ExecEvent::Exit(e) => {
                out.flush().ok();
                match (grove_proto::client::exit_code(&e), e.status) {
                    (Some(code), _) => std::process::exit(code),
                    (_, Some(grove_proto::guest::exec_exit::Status::Signal(sig))) => {
                        eprintln!("guest-ctl: killed by signal {sig}");
                        std::process::exit(128 + sig);
                    }
                    _ => die("no exit status"),
                }
            }
        }
    }
}
