//! Crash and restart: a child process builds slots and dies (abort) mid-flight;
//! a new pool finds the slots again (the dataplane kept running meanwhile),
//! removes the half-built leftovers, and at the end nothing is left.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::time::Duration;

use common::{Guest, TestNet, SERVER};
use grove_netd::links::Netlink;
use grove_netd::netns::{self, NsHandle};
use grove_netd::{Action, Cidr, CidrRule, Policy, PoolConfig, SlotPool, SlotRequest};

const CHILD_ENV: &str = "GROVE_NETD_CRASH_CHILD";

fn denies_server() -> Policy {
    Policy {
        default: Action::Allow,
        cidrs: vec![CidrRule { cidr: Cidr::parse("10.250.0.3/32").unwrap(), action: Action::Deny }],
        ..Policy::default()
    }
}

fn config_from_env() -> PoolConfig {
    let v = std::env::var(CHILD_ENV).unwrap();
    let mut it = v.split(',');
    let (prefix, host, state) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    PoolConfig {
        prefix: prefix.into(),
        host_netns: Some(host.into()),
        state_dir: state.into(),
        pin_root: "/sys/fs/bpf/grove".into(),
        range: Cidr::parse("10.201.0.0/16").unwrap(),
        upstream_dns: std::net::SocketAddr::from((SERVER, 53)),
        ..PoolConfig::default()
    }
}

/// Run by `slots_survive_a_crash_and_leftovers_are_removed` in a child process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper: runs in a child process of the crash test, which sets its environment"]
async fn crash_child() {
    let cfg = config_from_env();
    let prefix = cfg.prefix.clone();
    let host = NsHandle::named(cfg.host_netns.as_deref().unwrap()).unwrap();
    let (pool, _) = SlotPool::open(cfg).await.unwrap();
    pool.fill(3).await.unwrap();
    pool.take(SlotRequest { owner: "sandbox-1".into(), policy: denies_server() }).await.unwrap();
    pool.take(SlotRequest { owner: "sandbox-2".into(), policy: Policy::default() }).await.unwrap();
    // Half-built slots, as a crash in the middle of `create` leaves them.
    netns::create(&format!("{prefix}77")).unwrap();
    let nl = Netlink::connect(&host).unwrap();
    let peer = NsHandle::named(&format!("{prefix}77")).unwrap();
    nl.add_veth(&format!("{prefix}78h"), "x", &peer).await.unwrap();
    std::fs::create_dir_all(format!("/sys/fs/bpf/grove/{prefix}79")).unwrap();
    std::process::abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_survive_a_crash_and_leftovers_are_removed() {
    if !common::host_ready("slots_survive_a_crash_and_leftovers_are_removed") {
        return;
    }
    let net = TestNet::new().await;
    let cfg = net.pool_config();
    let env = format!("{},{},{}", cfg.prefix, net.host_ns, cfg.state_dir.display());
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--ignored", "--nocapture"])
        .env(CHILD_ENV, env)
        .status()
        .unwrap();
    assert!(!status.success(), "the child aborts");

    let (pool, rec) = SlotPool::open(cfg.clone()).await.unwrap();
    let mut taken = rec.taken.clone();
    taken.sort();
    let p = &cfg.prefix;
    assert_eq!(
        taken,
        vec![
            (format!("{p}0"), "sandbox-1".to_string()),
            (format!("{p}1"), "sandbox-2".to_string())
        ]
    );
    assert_eq!(rec.free, vec![format!("{p}2")]);
    for leftover in ["77", "78", "79"] {
        assert!(
            rec.removed.iter().any(|r| r.ends_with(&format!("{p}{leftover}"))),
            "{leftover}: {:?}",
            rec.removed
        );
    }
    assert!(!netns::exists(&format!("{p}77")));
    let host = NsHandle::named(&net.host_ns).unwrap();
    let hnl = Netlink::connect(&host).unwrap();
    assert!(hnl.find(&format!("{p}78h")).await.unwrap().is_none());

    // The adopted slot kept its dataplane and its policy.
    let s1 = pool.adopt(&format!("{p}0")).unwrap();
    let mut g = Guest::attach(&s1);
    let r = g.echo(7300, b"after crash");
    let r = r.unwrap_or_else(|| {
        let o = std::process::Command::new("ip")
            .args(["-s", "-d", "-n", s1.name(), "link", "show", "tap0"])
            .output()
            .unwrap();
        panic!(
            "traffic flows after the restart: {:?} {}",
            s1.counters(),
            String::from_utf8_lossy(&o.stdout)
        )
    });
    assert!(String::from_utf8_lossy(&r.payload).starts_with(&s1.slot_ip().to_string()));
    g.send_udp(common::SERVER2, 7301, common::ECHO_PORT, b"still denied");
    assert!(g.recv_udp(7301, Duration::from_millis(500)).is_none());
    assert!(!s1.drain_denials().is_empty(), "denials are read from the pinned ring buffer");

    // A graceful restart adopts the same set, nothing removed.
    drop(g);
    drop(s1);
    drop(pool);
    let (pool, rec2) = SlotPool::open(cfg.clone()).await.unwrap();
    assert_eq!(rec2.taken.len(), 2);
    assert!(rec2.removed.is_empty(), "{:?}", rec2.removed);
    pool.destroy_all().await.unwrap();

    // Nothing of the pool is left: namespaces, host veths, pins, records.
    let ours = |n: &String| {
        n.strip_prefix(p.as_str()).is_some_and(|r| r.bytes().all(|b| b.is_ascii_digit()))
    };
    assert!(!netns::list(p).iter().any(ours), "{:?}", netns::list(p));
    assert!(hnl.list(p).await.unwrap().is_empty());
    let pins = std::fs::read_dir("/sys/fs/bpf/grove")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(p.as_str()))
        .count();
    assert_eq!(pins, 0);
    assert_eq!(std::fs::read_dir(&cfg.state_dir).map(Iterator::count).unwrap_or(0), 0);
}
