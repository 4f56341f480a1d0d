//! guest-init: PID 1 and the guest agent inside every Grove sandbox.
//!
//! As PID 1 it boots the guest (see `pid1`) and serves guest.proto on vsock port 1024 and
//! on the addresses named by `grove.listen=` on the kernel cmdline. As an ordinary process
//! (`--agent-only`) it only serves the protocol, for tests and container-style runtimes:
//!
//! ```text
//! guest-init --agent-only --listen unix:/run/agent.sock [--listen tcp:127.0.0.1:0]
//!            [--listen vsock:1024] [--root DIR]
//! ```
//! It prints `listening <addr>` on stdout for every bound address.

mod agent;
mod net;
mod pid1;
mod reaper;
mod sys;

use std::io::Write;

fn usage() -> ! {
    eprintln!("usage: guest-init [--agent-only --listen unix:PATH|tcp:HOST:PORT|vsock:PORT ... [--root DIR]]");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version") {
        println!("guest-init {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    if std::process::id() == 1 {
        pid1::run(args.iter().any(|a| a == "--stage2"));
    }
    // `--inb PORT`: one byte from an I/O port, in decimal (the test host's probes read the
    // Grove identity and generation ports with it where the kernel has no /dev/port).
    if let [flag, port] = args.as_slice() {
        if flag == "--inb" {
            let p = port
                .strip_prefix("0x")
                .map_or_else(|| port.parse(), |h| u16::from_str_radix(h, 16));
            match p.map_err(|e| e.to_string()).and_then(|p| sys::inb(p).map_err(|e| e.to_string()))
            {
                Ok(v) => println!("{v}"),
                Err(e) => {
                    eprintln!("guest-init --inb {port}: {e}");
                    std::process::exit(1);
                }
            }
            return;
        }
    }
    if !args.iter().any(|a| a == "--agent-only") {
        eprintln!("guest-init: not PID 1; pass --agent-only to run only the agent");
        usage();
    }
    let mut listens = Vec::new();
    let mut root = std::path::PathBuf::from("/");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--agent-only" => {}
            "--listen" => match it.next().map(|s| s.parse::<agent::Listen>()) {
                Some(Ok(l)) => listens.push(l),
                Some(Err(e)) => {
                    eprintln!("guest-init: {e}");
                    usage();
                }
                None => usage(),
            },
            "--root" => root = it.next().map_or_else(|| usage(), Into::into),
            _ => usage(),
        }
    }
    if listens.is_empty() {
        usage();
    }
    let ctx = match agent::Ctx::new(root.clone(), false) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("guest-init: allowed root {}: {e}", root.display());
            std::process::exit(1);
        }
    };
    crate::reaper::start();
    let mut out = std::io::stdout();
    for l in &listens {
        match agent::listen(&ctx, l) {
            Ok(name) => {
                let _ = writeln!(out, "listening {name}");
                let _ = out.flush();
            }
            Err(e) => {
                eprintln!("guest-init: listen: {e}");
                std::process::exit(1);
            }
        }
    }
    loop {
        std::thread::park();
    }
}
