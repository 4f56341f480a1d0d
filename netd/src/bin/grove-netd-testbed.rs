//! `grove-netd-testbed`: netd's test bed as a process, for scenarios that run real guests
//! (scripts/testhost/scenarios/net.sh): a host and a server namespace of its own (netd's
//! `testbed`: UDP echo, DNS zone, plus TCP whoami, barrier and sink servers), a slot pool in
//! them, N slots taken with a policy. It writes what a VMM and a guest need as shell
//! variables, prints `testbed: ready`, and runs until SIGTERM or SIGINT; then it prints each
//! slot's counters and denials and the servers' log, and removes everything it made.
//!
//! usage: grove-netd-testbed --slots N [--deny CIDR]... [--barrier K] --env FILE

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use grove_netd::testbed::{
    TestNet, BARRIER_PORT, ECHO_PORT, SERVER, SERVER2, SINK_PORT, TCP_PORT, WHOAMI_PORT,
};
use grove_netd::{Action, Cidr, CidrRule, Policy, SlotRequest};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

struct Args {
    slots: usize,
    deny: Vec<Cidr>,
    barrier: usize,
    env: String,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args { slots: 1, deny: Vec::new(), barrier: 2, env: String::new() };
    let mut it = args.iter();
    while let Some(f) = it.next() {
        let mut v = || it.next().cloned().ok_or(format!("{f} needs a value"));
        match f.as_str() {
            "--slots" => a.slots = v()?.parse().map_err(|e| format!("--slots: {e}"))?,
            "--deny" => a.deny.push(Cidr::parse(&v()?).map_err(|e| format!("--deny: {e}"))?),
            "--barrier" => a.barrier = v()?.parse().map_err(|e| format!("--barrier: {e}"))?,
            "--env" => a.env = v()?,
            _ => return Err(format!("unknown flag {f}")),
        }
    }
    if a.env.is_empty() || a.slots == 0 || a.slots > 16 {
        return Err(
            "usage: grove-netd-testbed --slots 1..16 [--deny CIDR]... [--barrier K] --env FILE"
                .into(),
        );
    }
    Ok(a)
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

async fn run(a: Args) -> Result<(), String> {
    let net = TestNet::new().await;
    let servers = net.start_tcp_servers(a.barrier);
    let (pool, _) = grove_netd::SlotPool::open(net.pool_config())
        .await
        .map_err(|e| format!("pool: {}", chain(&e)))?;
    let policy = Policy {
        default: Action::Allow,
        cidrs: a.deny.iter().map(|c| CidrRule { cidr: *c, action: Action::Deny }).collect(),
        ..Policy::default()
    };
    let mut slots = Vec::new();
    for i in 0..a.slots {
        let req = SlotRequest { owner: format!("scenario-{i}"), policy: policy.clone() };
        let slot = pool.take(req).await.map_err(|e| format!("take: {}", chain(&e)))?;
        slots.push(slot);
    }
    let g = slots[0].guest();
    let mask = u32::MAX.checked_shl(32 - u32::from(g.prefix_len)).unwrap_or(0);
    let mut env = format!(
        "TESTBED_PREFIX={}\nSERVER={SERVER}\nSERVER2={SERVER2}\nECHO_PORT={ECHO_PORT}\nTCP_PORT={TCP_PORT}\n\
         WHOAMI_PORT={WHOAMI_PORT}\nBARRIER_PORT={BARRIER_PORT}\nSINK_PORT={SINK_PORT}\n\
         GUEST_IP={}\nGUEST_MAC={}\nGATEWAY={}\nNETMASK={}\nSLOTS={}\n",
        net.prefix,
        g.guest_ip,
        mac(g.guest_mac),
        g.gateway_ip,
        std::net::Ipv4Addr::from(mask),
        slots.len(),
    );
    for (i, s) in slots.iter().enumerate() {
        env.push_str(&format!(
            "SLOT{i}_NAME={}\nSLOT{i}_NETNS={}\nSLOT{i}_TAP={}\nSLOT{i}_IP={}\n",
            s.name(),
            s.netns_path().display(),
            s.tap_name(),
            s.slot_ip()
        ));
    }
    std::fs::write(&a.env, env).map_err(|e| format!("{}: {e}", a.env))?;
    println!("testbed: ready ({} slots, prefix {})", slots.len(), net.prefix);
    let _ = std::io::stdout().flush();
    while !STOP.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for line in servers.log.lock().map(|l| l.clone()).unwrap_or_default() {
        println!("testbed: {line}");
    }
    for s in &slots {
        match s.counters() {
            Ok(c) => println!(
                "testbed: counters {} {}",
                s.name(),
                serde_json::to_string(&c).unwrap_or_default()
            ),
            Err(e) => println!("testbed: counters {}: {}", s.name(), chain(&e)),
        }
        for d in s.drain_denials() {
            println!("testbed: denial {}", serde_json::to_string(&d).unwrap_or_default());
        }
    }
    for s in slots {
        pool.destroy(s).await.map_err(|e| format!("destroy: {}", chain(&e)))?;
    }
    pool.destroy_all().await.map_err(|e| format!("destroy: {}", chain(&e)))?;
    drop(net);
    println!("testbed: removed");
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = match parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("grove-netd-testbed: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let rt =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("grove-netd-testbed: tokio: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
    match rt.block_on(run(a)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("grove-netd-testbed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
