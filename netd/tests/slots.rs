//! Slots end to end on this host, no guest: a userspace peer on each slot's tap
//! sends and reads raw frames (standing in for the guest) against servers in
//! another namespace. Needs root, tun, bpffs and BTF (see common::host_ready).
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Guest, TestNet, ECHO_PORT, SERVER, SERVER2, TCP_PORT};
use grove_netd::dataplane::{Direction, DropReason};
use grove_netd::packet::{self, PROTO_TCP};
use grove_netd::policy::RuleRef;
use grove_netd::{
    Action, Cidr, CidrRule, Denial, DomainPattern, DomainRule, Exposure, Policy, Proto, RateLimit,
    SlotRequest,
};

fn allow_all() -> SlotRequest {
    SlotRequest { owner: "test".into(), policy: Policy::default() }
}

/// The echo server's view of the sender: "ip:port".
fn seen_from(p: &packet::Parsed) -> String {
    let s = String::from_utf8_lossy(&p.payload);
    s.split('|').next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_identical_guests_are_translated_both_ways_at_once() {
    if !common::host_ready("two_identical_guests_are_translated_both_ways_at_once") {
        return;
    }
    let net = TestNet::new().await;
    let pool = net.pool().await;
    let mut policy = Policy::default();
    policy.expose.push(Exposure { proto: Proto::Udp, slot_port: 8080, guest_port: 80 });
    let s1 = pool.take(SlotRequest { owner: "a".into(), policy: policy.clone() }).await.unwrap();
    let s2 = pool.take(SlotRequest { owner: "b".into(), policy }).await.unwrap();
    assert_ne!(s1.slot_ip(), s2.slot_ip());
    assert_eq!(s1.guest(), s2.guest(), "every guest keeps the same address and MAC");
    let mut g1 = Guest::attach(&s1);
    let mut g2 = Guest::attach(&s2);

    // The same frame from both guests (same IP, MAC, port) ...
    g1.send_udp(SERVER, 5555, ECHO_PORT, b"one");
    g2.send_udp(SERVER, 5555, ECHO_PORT, b"two");
    let r1 = g1.recv_udp(5555, Duration::from_secs(3)).expect("guest 1 gets its echo");
    let r2 = g2.recv_udp(5555, Duration::from_secs(3)).expect("guest 2 gets its echo");
    // ... is seen by the server from each slot's unique address ...
    assert_eq!(seen_from(&r1), format!("{}:5555", s1.slot_ip()));
    assert_eq!(seen_from(&r2), format!("{}:5555", s2.slot_ip()));
    assert!(r1.payload.ends_with(b"one") && r2.payload.ends_with(b"two"));
    // ... and the replies come back to the guest's own address, checksums valid.
    for (r, s) in [(&r1, &s1), (&r2, &s2)] {
        assert_eq!(r.dst_ip, s.guest().guest_ip);
        assert_eq!(r.src_ip, SERVER);
        assert_eq!(r.dst_mac, s.guest().guest_mac);
        assert_eq!(r.src_mac, s.guest().gateway_mac);
        assert!(r.ip_csum_ok && r.l4_csum_ok, "checksums after NAT: {r:?}");
    }

    // TCP: the server's kernel answers a SYN only if its checksum is right.
    let syn = packet::tcp_frame(&g1.to(SERVER), 6000, TCP_PORT, 1000, 0x02, &[]);
    g1.peer.send(&syn).unwrap();
    let f = g1
        .peer
        .recv_matching(Duration::from_secs(3), |f| {
            packet::parse(f).is_some_and(|p| p.proto == PROTO_TCP)
        })
        .unwrap()
        .expect("SYN-ACK through the NAT");
    let p = packet::parse(&f).unwrap();
    assert_eq!(p.ports, Some((TCP_PORT, 6000)));
    assert!(p.ip_csum_ok && p.l4_csum_ok);
    assert_eq!(p.dst_ip, s1.guest().guest_ip);

    // Both guests are reachable at once through their exposed port.
    let (a1, a2) = (s1.slot_ip(), s2.slot_ip());
    net.in_server(move || {
        let s = std::net::UdpSocket::bind((SERVER, 9999)).unwrap();
        s.send_to(b"hello-1", (a1, 8080)).unwrap();
        s.send_to(b"hello-2", (a2, 8080)).unwrap();
    });
    for (g, want) in [(&mut g1, b"hello-1"), (&mut g2, b"hello-2")] {
        let p = g.recv_udp(80, Duration::from_secs(3)).expect("inbound to the exposed port");
        assert_eq!(p.payload, want);
        assert_eq!(p.ports, Some((9999, 80)));
        assert!(p.ip_csum_ok && p.l4_csum_ok);
    }
    // The guest answers from port 80; the server sees slot port 8080.
    let a1s = a1;
    let got = net.in_server(move || {
        let s = std::net::UdpSocket::bind((SERVER, 9998)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(b"ping", (a1s, 8080)).unwrap();
        s
    });
    let p = g1.recv_udp(80, Duration::from_secs(3)).unwrap();
    let (sport, _) = p.ports.unwrap();
    g1.send_udp(SERVER, 80, sport, b"pong");
    let mut buf = [0u8; 64];
    let (n, from) = got.recv_from(&mut buf).expect("reply from the exposed port");
    assert_eq!(&buf[..n], b"pong");
    assert_eq!(from, std::net::SocketAddr::from((a1, 8080)));

    pool.destroy_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cidr_policy_allows_denies_counts_and_logs_exactly() {
    if !common::host_ready("cidr_policy_allows_denies_counts_and_logs_exactly") {
        return;
    }
    let net = TestNet::new().await;
    let pool = net.pool().await;
    let slot = pool.take(allow_all()).await.unwrap();
    let mut g = Guest::attach(&slot);
    let before = slot.counters().unwrap();

    // 5 allowed echoes: exact packets and bytes both ways.
    let payload = [7u8; 100];
    for i in 0..5 {
        assert!(g.echo(6000 + i, &payload).is_some(), "echo {i}");
    }
    let frame_len =
        u64::try_from(packet::udp_frame(&g.to(SERVER), 1, ECHO_PORT, &payload).len()).unwrap();
    let c = slot.counters().unwrap();
    assert_eq!(c.egress.packets - before.egress.packets, 5);
    assert_eq!(c.egress.bytes - before.egress.bytes, 5 * frame_len);
    assert_eq!(c.ingress.packets - before.ingress.packets, 5);

    // Deny the server's /32 while allowing its /24: the longest prefix wins,
    // on the next packet of the same flow.
    let p = Policy {
        default: Action::Allow,
        cidrs: vec![
            CidrRule { cidr: Cidr::parse("10.250.0.0/24").unwrap(), action: Action::Allow },
            CidrRule { cidr: Cidr::parse("10.250.0.2/32").unwrap(), action: Action::Deny },
        ],
        ..Policy::default()
    };
    pool.update_policy(&slot, &p).unwrap();
    for i in 0..3 {
        assert!(g.echo(6000 + i, &payload).is_none(), "denied echo {i}");
    }
    let c2 = slot.counters().unwrap();
    assert_eq!(c2.egress.dropped(DropReason::Policy) - c.egress.dropped(DropReason::Policy), 3);
    assert_eq!(c2.egress.packets, c.egress.packets, "nothing else passed");
    let denials: Vec<Denial> = slot.drain_denials();
    let pk: Vec<_> = denials
        .iter()
        .filter_map(|d| match d {
            Denial::Packet { rule, packet, .. } => Some((rule.clone(), packet.clone())),
            Denial::Domain { .. } => None,
        })
        .collect();
    assert_eq!(pk.len(), 3, "{denials:?}");
    for (rule, d) in &pk {
        assert_eq!(*rule, RuleRef::Cidr(1));
        assert_eq!(
            (d.remote, d.port, d.proto, d.direction),
            (SERVER, ECHO_PORT, 17, Direction::Egress)
        );
    }
    // SERVER2 is still allowed by the /24.
    g.send_udp(SERVER2, 6100, ECHO_PORT, b"x");
    let c3 = slot.counters().unwrap();
    assert_eq!(c3.egress.packets, c2.egress.packets + 1);

    // Default deny; DNS straight to a server is dropped whatever the policy.
    pool.update_policy(&slot, &Policy { default: Action::Deny, ..Policy::default() }).unwrap();
    assert!(g.echo(6200, b"x").is_none());
    let q0 = net.zone.queries.load(Ordering::Relaxed);
    pool.update_policy(&slot, &Policy::default()).unwrap();
    g.send_udp(SERVER, 6300, 53, &grove_netd::dns::build_query(1, "www.allowed.test", 1));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(net.zone.queries.load(Ordering::Relaxed), q0, "DNS to another server never leaves");
    let c4 = slot.counters().unwrap();
    assert_eq!(c4.egress.dropped(DropReason::Dns), 1);
    assert_eq!(c4.egress.dropped(DropReason::Policy), c3.egress.dropped(DropReason::Policy) + 1);
    // Another slot of the pool is never reachable (isolation), default allow or not.
    g.send_udp(Ipv4Addr::new(10, 201, 0, 6), 6400, 9, b"x");
    let iso = slot.drain_denials();
    assert!(
        iso.iter().any(|d| matches!(d, Denial::Packet { rule: RuleRef::Isolation, .. })),
        "{iso:?}"
    );

    // Release scrubs: counters zero, rules gone, dataplane off until taken again.
    pool.release(slot.clone()).await.unwrap();
    let c5 = slot.counters().unwrap();
    assert_eq!(c5.egress.packets + c5.ingress.packets, 0);
    assert!(slot.drain_denials().is_empty());
    g.send_udp(SERVER, 6500, ECHO_PORT, b"x");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(slot.counters().unwrap().egress.dropped(DropReason::Unconfigured), 1);
    let again = pool.take(allow_all()).await.unwrap();
    assert_eq!(again.name(), slot.name(), "the scrubbed slot is reused");
    assert!(g.echo(6600, b"y").is_some());
    pool.destroy_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_policy_is_enforced_by_the_slot_resolver() {
    if !common::host_ready("domain_policy_is_enforced_by_the_slot_resolver") {
        return;
    }
    let net = TestNet::new().await;
    {
        let mut z = net.zone.records.lock().unwrap();
        z.insert("www.allowed.test".into(), vec![(SERVER, 30)]);
        z.insert("evil.allowed.test".into(), vec![(SERVER2, 30)]);
        z.insert("other.test".into(), vec![(SERVER2, 30)]);
    }
    let pool = net.pool().await;
    let policy = Policy {
        default: Action::Deny,
        domains: vec![
            DomainRule {
                pattern: DomainPattern::parse("*.allowed.test").unwrap(),
                action: Action::Allow,
            },
            DomainRule {
                pattern: DomainPattern::parse("evil.allowed.test").unwrap(),
                action: Action::Deny,
            },
        ],
        ..Policy::default()
    };
    let slot = pool.take(SlotRequest { owner: "d".into(), policy }).await.unwrap();
    let mut g = Guest::attach(&slot);

    // Before any lookup the server is not reachable (default deny).
    assert!(g.echo(7100, b"early").is_none());
    // An allowed name resolves and opens its address, for every port.
    let (rcode, addrs) = g.resolve("www.allowed.test", 1).expect("resolver answers");
    assert_eq!((rcode, addrs), (0, vec![SERVER]));
    let learnt = slot.learnt_addresses().unwrap();
    assert_eq!(learnt.iter().map(|(a, _)| *a).collect::<Vec<_>>(), vec![SERVER]);
    assert!(g.echo(7101, b"now").is_some(), "allowed after resolution");
    // A denied name: NXDOMAIN, asked of no one, logged.
    let q0 = net.zone.queries.load(Ordering::Relaxed);
    assert_eq!(g.resolve("evil.allowed.test", 2).unwrap().0, grove_netd::dns::RCODE_NXDOMAIN);
    // An unlisted name under default deny: same.
    assert_eq!(g.resolve("other.test", 3).unwrap().0, grove_netd::dns::RCODE_NXDOMAIN);
    assert_eq!(net.zone.queries.load(Ordering::Relaxed), q0, "refused names never reach upstream");
    g.send_udp(SERVER2, 7102, ECHO_PORT, b"x");
    // DNS to the zone server directly is dropped.
    g.send_udp(SERVER, 7103, 53, &grove_netd::dns::build_query(4, "www.allowed.test", 1));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(net.zone.queries.load(Ordering::Relaxed), q0);
    let denials = slot.drain_denials();
    let names: Vec<_> = denials
        .iter()
        .filter_map(|d| match d {
            Denial::Domain { denial, .. } => Some((denial.name.clone(), denial.rule)),
            Denial::Packet { .. } => None,
        })
        .collect();
    assert_eq!(
        names,
        vec![("evil.allowed.test".to_string(), Some(1)), ("other.test".to_string(), None)]
    );
    assert!(denials.iter().any(|d| matches!(d, Denial::Packet { rule: RuleRef::Dns, .. })));
    assert!(denials
        .iter()
        .any(|d| matches!(d, Denial::Packet { packet, rule: RuleRef::Default, .. } if packet.remote == SERVER2)));
    let c = slot.counters().unwrap();
    assert_eq!(c.egress.dropped(DropReason::Dns), 1);

    // Changing the domain rules at runtime withdraws learnt addresses.
    pool.update_policy(&slot, &Policy { default: Action::Deny, ..Policy::default() }).unwrap();
    assert!(slot.learnt_addresses().unwrap().is_empty());
    assert!(g.echo(7104, b"gone").is_none());
    pool.destroy_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_rate_limit_holds_within_tolerance() {
    if !common::host_ready("egress_rate_limit_holds_within_tolerance") {
        return;
    }
    let net = TestNet::new().await;
    let pool = net.pool().await;
    let rate = 200_000u64;
    let burst = 20_000u64;
    let policy = Policy {
        egress_rate: Some(RateLimit { bytes_per_sec: rate, burst_bytes: burst }),
        ..Policy::default()
    };
    let slot = pool.take(SlotRequest { owner: "r".into(), policy }).await.unwrap();
    let mut g = Guest::attach(&slot);
    let frame = packet::udp_frame(&g.to(SERVER), 7200, 9, &[0u8; 1000]);
    let len = u64::try_from(frame.len()).unwrap();
    let before = slot.counters().unwrap();
    // Send as fast as possible, stamping each frame with CLOCK_MONOTONIC (the
    // programs' clock) right after the write that ran the program.
    let start = Instant::now();
    let mut stamps = Vec::new();
    while start.elapsed() < Duration::from_millis(1500) {
        g.peer.send(&frame).unwrap();
        stamps.push(grove_netd::dataplane::monotonic_ns());
    }
    let secs = start.elapsed().as_secs_f64();
    let c = slot.counters().unwrap();
    let passed = c.egress.bytes - before.egress.bytes;
    let limited = c.egress.dropped(DropReason::Rate) - before.egress.dropped(DropReason::Rate);
    // The same token bucket, run over the send times: what should have passed,
    // whatever the scheduler did to the sender on this shared machine.
    let (mut tokens, mut last, mut model) = (u128::from(burst) * 1_000_000_000, stamps[0], 0u64);
    for &t in &stamps {
        let cap = u128::from(burst) * 1_000_000_000;
        tokens = (tokens + u128::from(t - last) * u128::from(rate)).min(cap);
        last = t;
        if tokens >= u128::from(len) * 1_000_000_000 {
            tokens -= u128::from(len) * 1_000_000_000;
            model += len;
        }
    }
    #[allow(clippy::cast_precision_loss)]
    let ratio = passed as f64 / model as f64;
    #[allow(clippy::cast_precision_loss)]
    let ceiling = burst as f64 + rate as f64 * secs + len as f64;
    println!(
        "rate limit {rate} B/s, burst {burst} B: sent {} frames in {secs:.3} s, passed {passed} bytes, \
         model over the send times {model} bytes, ratio {ratio:.3} (tolerance 0.90..=1.10), \
         ceiling burst + rate x time {ceiling:.0}",
        stamps.len()
    );
    assert!(limited > 0, "the sender must outrun the limit for the test to mean anything");
    #[allow(clippy::cast_precision_loss)]
    let over = passed as f64 > ceiling;
    assert!(!over, "passed {passed} > {ceiling}");
    assert!((0.90..=1.10).contains(&ratio), "ratio {ratio}");
    pool.destroy_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taking_and_releasing_slots_cleans_up_even_after_a_failed_test() {
    if !common::host_ready("taking_and_releasing_slots_cleans_up_even_after_a_failed_test") {
        return;
    }
    // A test body that panics with slots taken: the guards still remove it all.
    let prefix = {
        let net = TestNet::new().await;
        let prefix = net.prefix.clone();
        let pool = net.pool().await;
        pool.fill(2).await.unwrap();
        let _slot = pool.take(allow_all()).await.unwrap();
        assert_eq!(grove_netd::netns::list(&prefix).len(), 2 + 2);
        let r = tokio::task::spawn(async move {
            let _net = net;
            let _pool = pool;
            panic!("simulated test failure");
        })
        .await;
        assert!(r.is_err());
        prefix
    };
    assert!(
        grove_netd::netns::list(&prefix).is_empty(),
        "namespaces left: {:?}",
        grove_netd::netns::list(&prefix)
    );
    let pins = std::fs::read_dir("/sys/fs/bpf/grove")
        .map(|d| {
            d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&prefix)).count()
        })
        .unwrap_or(0);
    assert_eq!(pins, 0, "pin directories left");
}

/// Makes the kernel track connections in namespace `ns` (conntrack hooks are registered per
/// namespace only when a rule needs them): an nftables forward chain with a `ct state` rule.
/// Fails with the reason when `nft` is missing, unless GROVE_ALLOW_SKIP names `test`.
fn track_connections_in(ns: &str, test: &str) -> bool {
    use std::io::Write;
    let rules = "table ip grove_ct_test {\n  chain track {\n    type filter hook forward priority 0; policy accept;\n    ct state new,established counter\n  }\n}\n";
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let allowed = std::env::var("GROVE_ALLOW_SKIP")
                .unwrap_or_default()
                .split(',')
                .any(|s| s == test || s == "all" || s == "netd");
            assert!(allowed, "{test}: needs ip and nft (nftables): {e}");
            println!("skipped: {test}: needs ip and nft: {e}");
            return false;
        }
    };
    child.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
    let st = child.wait().unwrap();
    assert!(
        st.success(),
        "{test}: nft -f refused the tracking rule ({st}); is nftables installed?"
    );
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_deletes_the_slots_conntrack_entries() {
    let test = "release_deletes_the_slots_conntrack_entries";
    if !common::host_ready(test) {
        return;
    }
    let net = TestNet::new().await;
    if !track_connections_in(&net.host_ns, test) {
        return;
    }
    let pool = net.pool().await;
    let s1 = pool.take(allow_all()).await.unwrap();
    let s2 = pool.take(allow_all()).await.unwrap();
    let (a1, a2) = (s1.slot_ip(), s2.slot_ip());
    {
        let mut g1 = Guest::attach(&s1);
        let mut g2 = Guest::attach(&s2);
        // Real entries from traffic: UDP echoes from both slots, and a TCP handshake's
        // first two packets from slot 1.
        assert!(g1.echo(5601, b"ct").is_some(), "slot 1 echo");
        assert!(g2.echo(5602, b"ct").is_some(), "slot 2 echo");
        let syn = packet::tcp_frame(&g1.to(SERVER), 6001, TCP_PORT, 7, 0x02, &[]);
        g1.peer.send(&syn).unwrap();
        g1.peer
            .recv_matching(Duration::from_secs(3), |f| {
                packet::parse(f).is_some_and(|p| p.proto == PROTO_TCP)
            })
            .unwrap()
            .expect("SYN-ACK through the NAT");
    }
    let host = grove_netd::netns::NsHandle::named(&net.host_ns).unwrap();
    let count = |a: Ipv4Addr| host.run(move || grove_netd::conntrack::count_involving(a)).unwrap();
    let before = (count(a1).unwrap(), count(a2).unwrap());
    assert!(before.0 >= 2, "host conntrack entries of slot 1 (UDP + TCP): {}", before.0);
    assert!(before.1 >= 1, "host conntrack entries of slot 2 (UDP): {}", before.1);

    pool.release(s1).await.unwrap();
    assert_eq!(count(a1).unwrap(), 0, "slot 1's entries are gone after its release");
    assert_eq!(count(a2).unwrap(), before.1, "slot 2's entries are untouched");
    pool.release(s2).await.unwrap();
    assert_eq!(count(a2).unwrap(), 0, "slot 2's entries are gone after its release");
    println!(
        "{test}: host conntrack entries before release: slot 1 {}, slot 2 {}",
        before.0, before.1
    );
}
