//! `grove-bench net`: network slots and the eBPF dataplane, on this host, no guest.
//!
//! - slot take + release, from a pool prepared ahead vs cold (built on take);
//! - policy update latency (`update_policy` with N CIDR rules, N domain rules);
//! - per-packet program cost (`BPF_PROG_TEST_RUN`, kernel-measured average);
//! - UDP throughput from a userspace peer on the tap to a sink in another
//!   namespace: through a slot (programs attached: NAT, policy, counters) vs a
//!   plain namespace with a tap, a veth and kernel forwarding (no programs).
//!
//! Everything runs in namespaces the bench creates (netd's test bed) and is
//! removed at the end.

use std::net::{Ipv4Addr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grove_netd::dataplane::{self, maps::SlotCfg, program_fd, test_run, SlotMaps};
use grove_netd::links::Netlink;
use grove_netd::netns::{self, NsHandle};
use grove_netd::packet::{self, Endpoints};
use grove_netd::tap::TapPeer;
use grove_netd::testbed::{Guest, TestNet, SERVER};
use grove_netd::{Action, Cidr, CidrRule, DomainPattern, DomainRule, Policy, SlotRequest};
use serde::Serialize;

use crate::stats::{flag, wants_json, Summary};

const SINK_PORT: u16 = 7009;

#[derive(Serialize)]
struct Throughput {
    payload: usize,
    /// Frames the peer wrote per second.
    offered_pps: Summary,
    /// Datagrams the sink received per second.
    delivered_pps: Summary,
    /// Payload megabits per second at the sink.
    delivered_mbps: Summary,
}

#[derive(Serialize)]
struct Report {
    conditions: serde_json::Value,
    take_pool_ms: Summary,
    release_ms: Summary,
    take_cold_ms: Summary,
    destroy_ms: Summary,
    policy_update_ms: Vec<(usize, Summary)>,
    prog_ns_per_packet: Vec<(String, Summary)>,
    slot: Vec<Throughput>,
    baseline: Vec<Throughput>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs the benchmark.
pub fn run(args: &[String]) -> Result<(), String> {
    let runs: usize = flag(args, "--runs")?.unwrap_or(20);
    let secs: f64 = flag(args, "--seconds")?.unwrap_or(1.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let report = rt.block_on(bench(runs, secs))?;
    if wants_json(args) {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    } else {
        println!("conditions: {}", report.conditions);
        println!("slot take, pooled       {}", report.take_pool_ms);
        println!("slot release (scrub)    {}", report.release_ms);
        println!("slot take, cold         {}", report.take_cold_ms);
        println!("slot destroy            {}", report.destroy_ms);
        for (n, s) in &report.policy_update_ms {
            println!("policy update, {n:>3} rules {s}");
        }
        for (p, s) in &report.prog_ns_per_packet {
            println!("program {p:<22} {s}");
        }
        for (name, list) in
            [("slot (programs)", &report.slot), ("baseline (none)", &report.baseline)]
        {
            for t in list {
                println!(
                    "{name} payload {:>4} B: offered {:.0} pps, delivered {:.0} pps, {:.1} Mbit/s (medians)",
                    t.payload, t.offered_pps.median, t.delivered_pps.median, t.delivered_mbps.median
                );
            }
        }
    }
    Ok(())
}

fn summary(unit: &'static str, v: &[f64]) -> Result<Summary, String> {
    Summary::of(unit, v).ok_or_else(|| "no samples".to_string())
}

async fn bench(runs: usize, secs: f64) -> Result<Report, String> {
    let net = TestNet::with_prefix(format!("gb{:05x}", std::process::id() & 0xfffff)).await;
    let pool = net.pool().await;
    let e = |e: grove_netd::PoolError| format!("{e}");

    // Pooled take/release.
    pool.fill(1).await.map_err(e)?;
    let (mut take, mut release) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let s = pool
            .take(SlotRequest { owner: "bench".into(), policy: Policy::default() })
            .await
            .map_err(e)?;
        take.push(ms(t.elapsed()));
        let t = Instant::now();
        pool.release(s).await.map_err(e)?;
        release.push(ms(t.elapsed()));
    }
    pool.destroy_all().await.map_err(e)?;
    // Cold: built on take, destroyed after.
    let (mut cold, mut destroy) = (Vec::new(), Vec::new());
    for _ in 0..runs.min(10) {
        let t = Instant::now();
        let s = pool
            .take(SlotRequest { owner: "bench".into(), policy: Policy::default() })
            .await
            .map_err(e)?;
        cold.push(ms(t.elapsed()));
        let t = Instant::now();
        pool.destroy(s).await.map_err(e)?;
        destroy.push(ms(t.elapsed()));
    }

    // Policy updates of growing size.
    let slot = pool
        .take(SlotRequest { owner: "bench".into(), policy: Policy::default() })
        .await
        .map_err(e)?;
    let mut policy_update = Vec::new();
    for n in [1usize, 16, 128] {
        let mut v = Vec::new();
        for r in 0..runs {
            let p = Policy {
                default: Action::Allow,
                cidrs: (0..n)
                    .map(|i| CidrRule {
                        cidr: Cidr {
                            addr: Ipv4Addr::new(
                                100,
                                u8::try_from(r % 200).unwrap_or(0),
                                u8::try_from(i % 250).unwrap_or(0),
                                0,
                            ),
                            len: 24,
                        },
                        action: Action::Deny,
                    })
                    .collect(),
                domains: (0..n)
                    .map(|i| DomainRule {
                        pattern: DomainPattern::parse(&format!("*.d{i}.example"))
                            .expect("valid pattern"),
                        action: Action::Allow,
                    })
                    .collect(),
                ..Policy::default()
            };
            let t = Instant::now();
            pool.update_policy(&slot, &p).map_err(e)?;
            v.push(ms(t.elapsed()));
        }
        policy_update.push((n, summary("ms", &v)?));
    }
    pool.update_policy(&slot, &Policy::default()).map_err(e)?;

    let prog_ns_per_packet = program_costs(runs)?;

    // Throughput through the slot.
    let sink = Sink::start(&net)?;
    let mut g = Guest::attach(&slot);
    let mut slot_tp = Vec::new();
    let mut base_tp = Vec::new();
    let mut base = Baseline::build(&net).await?;
    for payload in [64usize, 1400] {
        let (mut so, mut sd, mut sm, mut bo, mut bd, mut bm) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..runs.clamp(1, 5) {
            // Alternate so both see the same background load.
            let f = packet::udp_frame(&g.to(SERVER), 5000, SINK_PORT, &vec![0u8; payload]);
            let (o, d) = blast(&mut g.peer, &f, &sink, secs)?;
            so.push(o);
            sd.push(d);
            sm.push(mbps(d, payload));
            let f = packet::udp_frame(&base.endpoints(), 5000, SINK_PORT, &vec![0u8; payload]);
            let (o, d) = blast(&mut base.peer, &f, &sink, secs)?;
            bo.push(o);
            bd.push(d);
            bm.push(mbps(d, payload));
        }
        slot_tp.push(Throughput {
            payload,
            offered_pps: summary("pps", &so)?,
            delivered_pps: summary("pps", &sd)?,
            delivered_mbps: summary("Mbit/s", &sm)?,
        });
        base_tp.push(Throughput {
            payload,
            offered_pps: summary("pps", &bo)?,
            delivered_pps: summary("pps", &bd)?,
            delivered_mbps: summary("Mbit/s", &bm)?,
        });
    }
    drop(g);
    drop(slot);
    base.remove();
    pool.destroy_all().await.map_err(e)?;

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpus = std::thread::available_parallelism().map(std::num::NonZero::get).unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    Ok(Report {
        conditions: serde_json::json!({
            "kernel": kernel,
            "cpus": cpus,
            "loadavg_at_end": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            "runs": runs,
            "seconds_per_throughput_run": secs,
            "peer": "userspace raw frames on the tap (write(2) per frame, no vnet header)",
            "sink": "UDP socket in a second namespace behind the host namespace",
        }),
        take_pool_ms: summary("ms", &take)?,
        release_ms: summary("ms", &release)?,
        take_cold_ms: summary("ms", &cold)?,
        destroy_ms: summary("ms", &destroy)?,
        policy_update_ms: policy_update,
        prog_ns_per_packet,
        slot: slot_tp,
        baseline: base_tp,
    })
}

#[allow(clippy::cast_precision_loss)]
fn mbps(pps: f64, payload: usize) -> f64 {
    pps * payload as f64 * 8.0 / 1e6
}

/// The kernel's own per-run average of each program on a UDP frame.
fn program_costs(runs: usize) -> Result<Vec<(String, Summary)>, String> {
    let dir = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/grove/gb{}cost",
        std::process::id() & 0xffff
    ));
    let bpf = dataplane::load(
        dataplane::SLOT_OBJECT,
        &dir,
        &[dataplane::EGRESS_PROGRAM, dataplane::INGRESS_PROGRAM],
    )
    .map_err(|e| format!("{e}"))?;
    let result = (|| {
        let mut maps = SlotMaps::open(&dir).map_err(|e| format!("{e}"))?;
        let guest = Ipv4Addr::new(172, 31, 255, 2);
        let slot = Ipv4Addr::new(10, 201, 0, 2);
        maps.set_config(&SlotCfg {
            guest_ip: dataplane::ip_key(guest),
            slot_ip: dataplane::ip_key(slot),
            gw_ip: dataplane::ip_key(Ipv4Addr::new(172, 31, 255, 1)),
            guest_mac: [2, 0x67, 0x72, 0, 0, 2],
            default_allow: 1,
            enabled: 1,
            ..SlotCfg::default()
        })
        .map_err(|e| format!("{e}"))?;
        let remote = Ipv4Addr::new(192, 0, 2, 1);
        let out = Endpoints {
            src_mac: [2, 0x67, 0x72, 0, 0, 2],
            dst_mac: [2; 6],
            src_ip: guest,
            dst_ip: remote,
        };
        let inb = Endpoints { src_mac: [2; 6], dst_mac: [4; 6], src_ip: remote, dst_ip: slot };
        let mut res = Vec::new();
        for (label, prog, frame) in [
            ("egress udp 64 B", dataplane::EGRESS_PROGRAM, packet::udp_frame(&out, 1, 2, &[0; 64])),
            (
                "egress udp 1400 B",
                dataplane::EGRESS_PROGRAM,
                packet::udp_frame(&out, 1, 2, &[0; 1400]),
            ),
            (
                "ingress udp 64 B",
                dataplane::INGRESS_PROGRAM,
                packet::udp_frame(&inb, 2, 1, &[0; 64]),
            ),
        ] {
            let fd = program_fd(&bpf, prog).map_err(|e| format!("{e}"))?;
            let mut v = Vec::new();
            for _ in 0..runs {
                let r = test_run(fd, &frame, 10_000).map_err(|e| format!("{e}"))?;
                v.push(f64::from(r.duration_ns));
            }
            res.push((label.to_string(), summary("ns", &v)?));
        }
        Ok(res)
    })();
    if let Ok(d) = std::fs::read_dir(&dir) {
        for f in d.flatten() {
            let _ = std::fs::remove_file(f.path());
        }
    }
    let _ = std::fs::remove_dir(&dir);
    result
}

/// A UDP sink in the server namespace counting datagrams.
struct Sink {
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Sink {
    fn start(net: &TestNet) -> Result<Self, String> {
        let sock = net
            .in_server(|| UdpSocket::bind((SERVER, SINK_PORT)))
            .map_err(|e| format!("sink: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(50))).map_err(|e| e.to_string())?;
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if sock.recv(&mut buf).is_ok() {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(Self { count, stop })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Writes `frame` for `secs`; (offered pps, delivered pps).
fn blast(peer: &mut TapPeer, frame: &[u8], sink: &Sink, secs: f64) -> Result<(f64, f64), String> {
    let before = sink.count.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        peer.send(frame).map_err(|e| format!("{e}"))?;
        sent += 1;
    }
    let el = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(100));
    let got = sink.count.load(Ordering::Relaxed) - before;
    #[allow(clippy::cast_precision_loss)]
    Ok((sent as f64 / el, got as f64 / el))
}

/// A namespace with a tap and a veth and kernel forwarding: the path without
/// programs. The "guest" uses 172.30.0.2, routed (not translated).
struct Baseline {
    name: String,
    peer: TapPeer,
}

const BASE_GUEST: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 2);
const BASE_GW: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
const BASE_MAC: [u8; 6] = [2, 0x62, 0, 0, 0, 2];
const BASE_GW_MAC: [u8; 6] = [2, 0x62, 0, 0, 0, 1];

impl Baseline {
    async fn build(net: &TestNet) -> Result<Self, String> {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let name = format!("{}base", net.prefix);
        netns::create(&name).map_err(|x| e(&x))?;
        let ns = NsHandle::named(&name).map_err(|x| e(&x))?;
        ns.run(|| -> Result<(), String> {
            netns::write_net_sysctl("ipv4/ip_forward", "1").map_err(|x| e(&x))?;
            netns::write_net_sysctl("ipv6/conf/all/disable_ipv6", "1").map_err(|x| e(&x))?;
            netns::write_net_sysctl("ipv6/conf/default/disable_ipv6", "1").map_err(|x| e(&x))?;
            grove_netd::tap::create_persistent("tap0", false).map_err(|x| e(&x))
        })
        .map_err(|x| e(&x))??;
        let host = NsHandle::named(&net.host_ns).map_err(|x| e(&x))?;
        let hnl = Netlink::connect(&host).map_err(|x| e(&x))?;
        hnl.add_veth("basehost", "veth0", &ns).await.map_err(|x| e(&x))?;
        hnl.add_addr("basehost", Ipv4Addr::new(10, 251, 0, 1), 30).await.map_err(|x| e(&x))?;
        hnl.up("basehost").await.map_err(|x| e(&x))?;
        hnl.add_route(Ipv4Addr::new(172, 30, 0, 0), 30, Ipv4Addr::new(10, 251, 0, 2))
            .await
            .map_err(|x| e(&x))?;
        let nl = Netlink::connect(&ns).map_err(|x| e(&x))?;
        nl.add_addr("veth0", Ipv4Addr::new(10, 251, 0, 2), 30).await.map_err(|x| e(&x))?;
        nl.up("veth0").await.map_err(|x| e(&x))?;
        nl.set_mac("tap0", BASE_GW_MAC).await.map_err(|x| e(&x))?;
        nl.add_addr("tap0", BASE_GW, 30).await.map_err(|x| e(&x))?;
        nl.up("tap0").await.map_err(|x| e(&x))?;
        nl.add_neigh("tap0", BASE_GUEST, BASE_MAC).await.map_err(|x| e(&x))?;
        nl.add_default_route(Ipv4Addr::new(10, 251, 0, 1)).await.map_err(|x| e(&x))?;
        let peer = ns
            .run(|| {
                let p = TapPeer::attach("tap0", false)?;
                grove_netd::tap::wait_running("tap0", Duration::from_secs(3))?;
                Ok::<_, grove_netd::tap::TapError>(p)
            })
            .map_err(|x| e(&x))?
            .map_err(|x| e(&x))?;
        Ok(Self { name, peer })
    }

    fn endpoints(&self) -> Endpoints {
        Endpoints { src_mac: BASE_MAC, dst_mac: BASE_GW_MAC, src_ip: BASE_GUEST, dst_ip: SERVER }
    }

    fn remove(self) {
        drop(self.peer);
        let _ = netns::delete(&self.name);
    }
}
