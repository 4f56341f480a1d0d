//! guest-ctl: drives a guest agent over the guest protocol from a shell (smoke tests, debugging).
//!
//! ```text
//! guest-ctl --connect tcp:127.0.0.1:7000 [--wait SECS] COMMAND
//!   ping | info
//!   exec ARG...             run, print stdout/stderr, exit with the process's code
//!   exec-pty ARG...         the same on a new 24x80 PTY
//!   post-restore HOSTNAME   64 bytes of host entropy, the host's wall clock, the hostname
//!   write PATH              write stdin to PATH
//!   read PATH               print PATH to stdout
//!   poweroff | reboot
//! ```
//! `--wait` retries connect + hello until the agent answers (a booting guest).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use grove_proto::client::GuestClient;
use grove_proto::guest::PowerAction;

fn die(msg: &str) -> ! {
    eprintln!("guest-ctl: {msg}");
    std::process::exit(1);
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut addr = None;
    let mut wait = 0u64;
    while args.len() >= 2 && args[0].starts_with("--") {
        let v = args.remove(1);
        match args.remove(0).as_str() {
            "--connect" => addr = Some(v),
            "--wait" => wait = v.parse().unwrap_or_else(|_| die("bad --wait")),
            o => die(&format!("unknown option {o}")),
        }
    }
    let addr = addr.unwrap_or_else(|| die("--connect ADDR is required"));
    if args.is_empty() {
        die("no command");
    }
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(wait);
    // While a guest boots, QEMU's user-mode network accepts the host side at once and keeps
    // retrying the guest side with TCP backoff; short probes get through as soon as the
    // agent listens instead of waiting out the backoff.
    if wait > 0 {
        loop {
            match GuestClient::connect(&addr, Some(Duration::from_secs(1))) {
                Ok(_) => break,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => die(&format!(
                    "{e}: {}",
                    std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default()
                )),
            }
        }
    }
    let mut c = GuestClient::connect(&addr, Some(Duration::from_secs(60))).unwrap_or_else(|e| {
        die(&format!(
            "{e}: {}",
            std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default()
        ))
    });
    if wait > 0 {
        eprintln!(
            "guest-ctl: connected to {} after {} ms (guest uptime {} ms)",
            c.hello.agent,
            t0.elapsed().as_millis(),
            c.hello.uptime_ms
        );
    }
    let fail = |e: grove_proto::client::ClientError| -> ! { die(&e.to_string()) };
    match args[0].as_str() {
        "ping" => c.ping().unwrap_or_else(|e| fail(e)),
        "info" => println!("{:#?}", c.info().unwrap_or_else(|e| fail(e))),
        "exec" | "exec-pty" => {
            let req = grove_proto::guest::ExecStart {
                argv: args[1..].to_vec(),
                pty: (args[0] == "exec-pty")
                    .then_some(grove_proto::guest::PtySize { rows: 24, cols: 80 }),
                ..Default::default()
            };
            let r = c.exec(req, None).unwrap_or_else(|e| fail(e));
            std::io::stdout().write_all(&r.stdout).ok();
            std::io::stderr().write_all(&r.stderr).ok();
            match (r.code(), r.signal()) {
                (Some(code), _) => std::process::exit(code),
                (_, Some(sig)) => die(&format!("killed by signal {sig}")),
                _ => die("no exit status"),
            }
        }
        "write" => {
            let path = args.get(1).unwrap_or_else(|| die("write PATH"));
            let mut data = Vec::new();
            std::io::stdin().read_to_end(&mut data).unwrap_or_else(|e| die(&e.to_string()));
            c.write_file(path, &data, 0).unwrap_or_else(|e| fail(e));
        }
        "read" => {
            let path = args.get(1).unwrap_or_else(|| die("read PATH"));
            let d = c.read_file(path).unwrap_or_else(|e| fail(e));
            std::io::stdout().write_all(&d).ok();
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
            c.post_restore(req).unwrap_or_else(|e| fail(e));
        }
        "poweroff" => c.power(PowerAction::Poweroff).unwrap_or_else(|e| fail(e)),
        "reboot" => c.power(PowerAction::Reboot).unwrap_or_else(|e| fail(e)),
        o => die(&format!("unknown command {o}")),
    }
}
