//! A test bed for netd's tests and `grove-bench net`: [`TestNet`], a world of
//! namespaces a test owns: a host namespace (where the slots' host-side veths
//! live, forwarding on) and a server namespace behind it, with a UDP echo
//! server, a TCP listener and a DNS zone. Everything carries a prefix unique to
//! the test and is removed when the guard drops, panics included.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::links::Netlink;
use crate::netns::{self, NsHandle};
use crate::packet::{self, Endpoints};
use crate::pool::{PoolConfig, Slot, SlotPool, TAP_NAME};
use crate::tap::TapPeer;
use crate::{dns, Cidr};

/// The server's address (in the server namespace).
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);
/// The host namespace's address towards the server.
pub const HOST_TO_SERVER: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
/// UDP echo port: replies "<source ip>:<port>|<payload>".
pub const ECHO_PORT: u16 = 7000;
/// TCP listener port.
pub const TCP_PORT: u16 = 7001;
/// Another address in the server namespace (DNS answers point there too).
pub const SERVER2: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 3);

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A pool prefix unique to this process and call (8 chars: `gt`, 5 hex digits
/// of the pid, a letter).
pub fn unique_prefix() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "gt{:05x}{}",
        std::process::id() & 0xfffff,
        (b'a' + u8::try_from(n % 26).unwrap()) as char
    )
}

/// The DNS zone the test server answers from, and how many queries reached it.
#[derive(Default)]
pub struct Zone {
    pub records: Mutex<HashMap<String, Vec<(Ipv4Addr, u32)>>>,
    pub queries: AtomicU64,
}

/// Removes a test's namespaces and pins when dropped.
pub struct Cleanup {
    pub prefix: String,
    pub pin_root: std::path::PathBuf,
    pub state_dir: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for n in netns::list(&self.prefix) {
            let _ = netns::delete(&n);
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
        if let Ok(d) = std::fs::read_dir(&self.pin_root) {
            for e in d.flatten() {
                if e.file_name().to_string_lossy().starts_with(&self.prefix) {
                    if let Ok(files) = std::fs::read_dir(e.path()) {
                        for f in files.flatten() {
                            let _ = std::fs::remove_file(f.path());
                        }
                    }
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    }
}

/// A test's own little network.
pub struct TestNet {
    pub prefix: String,
    pub host_ns: String,
    pub srv_ns: String,
    pub zone: Arc<Zone>,
    pub stop: Arc<AtomicBool>,
    // Dropped last (fields drop in declaration order).
    pub cleanup: Cleanup,
}

impl Drop for TestNet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl TestNet {
    /// Builds the host and server namespaces and starts the servers; panics on
    /// failure (it is a test bed).
    pub async fn new() -> Self {
        Self::with_prefix(unique_prefix()).await
    }

    /// Same, with a given prefix (at most 9 chars, see [`PoolConfig::prefix`]).
    pub async fn with_prefix(prefix: String) -> Self {
        let cleanup = Cleanup {
            prefix: prefix.clone(),
            pin_root: "/sys/fs/bpf/grove".into(),
            state_dir: std::env::temp_dir().join(format!("grove-netd-{prefix}")),
        };
        let host_ns = format!("{prefix}hst");
        let srv_ns = format!("{prefix}srv");
        netns::create(&host_ns).expect("host namespace");
        netns::create(&srv_ns).expect("server namespace");
        let host = NsHandle::named(&host_ns).unwrap();
        let srv = NsHandle::named(&srv_ns).unwrap();
        host.run(|| {
            netns::write_net_sysctl("ipv4/ip_forward", "1").unwrap();
            netns::write_net_sysctl("ipv6/conf/all/disable_ipv6", "1").unwrap();
            netns::write_net_sysctl("ipv6/conf/default/disable_ipv6", "1").unwrap();
        })
        .unwrap();
        srv.run(|| {
            netns::write_net_sysctl("ipv6/conf/all/disable_ipv6", "1").unwrap();
            netns::write_net_sysctl("ipv6/conf/default/disable_ipv6", "1").unwrap();
        })
        .unwrap();
        let hnl = Netlink::connect(&host).unwrap();
        hnl.add_veth("tosrv", "eth0", &srv).await.unwrap();
        hnl.add_addr("tosrv", HOST_TO_SERVER, 24).await.unwrap();
        hnl.up("tosrv").await.unwrap();
        hnl.up("lo").await.unwrap();
        let snl = Netlink::connect(&srv).unwrap();
        snl.add_addr("eth0", SERVER, 24).await.unwrap();
        snl.add_addr("eth0", SERVER2, 24).await.unwrap();
        snl.up("eth0").await.unwrap();
        snl.up("lo").await.unwrap();
        snl.add_default_route(HOST_TO_SERVER).await.unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let zone = Arc::new(Zone::default());
        let (echo, tcp, dns_sock) = srv
            .run(|| {
                (
                    UdpSocket::bind((SERVER, ECHO_PORT)).unwrap(),
                    std::net::TcpListener::bind((SERVER, TCP_PORT)).unwrap(),
                    UdpSocket::bind((SERVER, 53)).unwrap(),
                )
            })
            .unwrap();
        spawn_echo(echo, stop.clone());
        spawn_zone(dns_sock, zone.clone(), stop.clone());
        // Accepted connections are dropped; the kernel's SYN-ACK is what tests look at.
        std::thread::spawn(move || {
            tcp.set_nonblocking(true).unwrap();
            let _keep = tcp;
            std::thread::sleep(Duration::from_secs(600));
        });
        Self { prefix, host_ns, srv_ns, zone, stop, cleanup }
    }

    /// A pool configuration for this network.
    pub fn pool_config(&self) -> PoolConfig {
        PoolConfig {
            prefix: self.prefix.clone(),
            host_netns: Some(self.host_ns.clone()),
            state_dir: self.cleanup.state_dir.clone(),
            pin_root: self.cleanup.pin_root.clone(),
            range: Cidr::parse("10.201.0.0/16").unwrap(),
            upstream_dns: SocketAddr::from((SERVER, 53)),
            ..PoolConfig::default()
        }
    }

    /// Opens a pool on this network.
    pub async fn pool(&self) -> SlotPool {
        SlotPool::open(self.pool_config()).await.expect("pool opens").0
    }

    /// Runs `f` in the server namespace.
    pub fn in_server<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        NsHandle::named(&self.srv_ns).unwrap().run(f).unwrap()
    }
}

fn spawn_echo(sock: UdpSocket, stop: Arc<AtomicBool>) {
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let mut reply = format!("{from}|").into_bytes();
                reply.extend_from_slice(&buf[..n.min(64)]);
                let _ = sock.send_to(&reply, from);
            }
        }
    });
}

fn spawn_zone(sock: UdpSocket, zone: Arc<Zone>, stop: Arc<AtomicBool>) {
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
            zone.queries.fetch_add(1, Ordering::Relaxed);
            let Ok(q) = dns::parse_query(&buf[..n]) else { continue };
            let recs = zone.records.lock().unwrap().get(&q.name).cloned();
            let reply = match recs {
                Some(r) => dns::build_answer(&buf[..n], &q, dns::RCODE_NOERROR, &r),
                None => dns::build_answer(&buf[..n], &q, dns::RCODE_NXDOMAIN, &[]),
            };
            let _ = sock.send_to(&reply, from);
        }
    });
}

/// The guest side of a slot: a raw-frame peer on its tap.
pub struct Guest {
    pub peer: TapPeer,
    pub slot: Slot,
}

impl Guest {
    /// Attaches to the slot's tap.
    pub fn attach(slot: &Slot) -> Self {
        let ns = NsHandle::named(slot.name()).unwrap();
        let peer = ns
            .run(|| {
                let peer = TapPeer::attach(TAP_NAME, false)?;
                crate::tap::wait_running(TAP_NAME, Duration::from_secs(3))?;
                Ok::<_, crate::tap::TapError>(peer)
            })
            .unwrap()
            .unwrap();
        Self { peer, slot: slot.clone() }
    }

    /// Endpoints from the guest to `dst` (through the gateway MAC).
    pub fn to(&self, dst: Ipv4Addr) -> Endpoints {
        let g = self.slot.guest();
        Endpoints { src_mac: g.guest_mac, dst_mac: g.gateway_mac, src_ip: g.guest_ip, dst_ip: dst }
    }

    /// Sends a UDP datagram from guest port `sport`.
    pub fn send_udp(&mut self, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) {
        let f = packet::udp_frame(&self.to(dst), sport, dport, payload);
        self.peer.send(&f).unwrap();
    }

    /// Waits for a UDP datagram to guest port `dport`; returns it parsed.
    pub fn recv_udp(&mut self, dport: u16, timeout: Duration) -> Option<packet::Parsed> {
        let f = self
            .peer
            .recv_matching(timeout, |f| {
                packet::parse(f).is_some_and(|p| {
                    p.proto == packet::PROTO_UDP && p.ports.is_some_and(|(_, d)| d == dport)
                })
            })
            .unwrap()?;
        packet::parse(&f)
    }

    /// Sends a UDP datagram and waits for the echo server's answer on the same port.
    pub fn echo(&mut self, sport: u16, payload: &[u8]) -> Option<packet::Parsed> {
        self.send_udp(SERVER, sport, ECHO_PORT, payload);
        self.recv_udp(sport, Duration::from_secs(2))
    }

    /// Resolves `name` through the slot's resolver: (rcode, A records).
    pub fn resolve(&mut self, name: &str, id: u16) -> Option<(u8, Vec<Ipv4Addr>)> {
        let q = dns::build_query(id, name, dns::TYPE_A);
        let gw = self.slot.guest().gateway_ip;
        let sport = 40000 + id % 1000;
        self.send_udp(gw, sport, 53, &q);
        let p = self.recv_udp(sport, Duration::from_secs(4))?;
        let parsed = dns::parse_query(&q).unwrap();
        let r = dns::parse_response(&p.payload, &parsed).ok()?;
        Some((r.rcode, r.addrs.into_iter().map(|(a, _)| a).collect()))
    }
}

/// TCP port where the server answers "from <address>:<port>" (who the guest is seen as), on
/// [`SERVER`] and [`SERVER2`].
pub const WHOAMI_PORT: u16 = 7002;
/// TCP port where the server holds connections until [`Servers::barrier`] distinct sources
/// are connected at once, then answers each "barrier ok peers=<a>,<b> you=<address>".
pub const BARRIER_PORT: u16 = 7003;
/// TCP port where the server reads until EOF and records an [`Upload`].
pub const SINK_PORT: u16 = 7004;
/// How long the barrier holds a connection before answering "barrier timeout".
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(120);

/// One connection the sink read to its end.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Upload {
    /// Who sent it (the slot address for a guest).
    pub peer: SocketAddr,
    /// Bytes read.
    pub bytes: u64,
    /// Seconds from the first byte to EOF.
    pub secs: f64,
}

/// The TCP servers guests talk to (in the server namespace), and what they saw.
pub struct Servers {
    /// Distinct sources the barrier waits for.
    pub barrier: usize,
    /// Uploads the sink finished.
    pub uploads: Arc<Mutex<Vec<Upload>>>,
    /// One line per event (connections, barrier releases, uploads).
    pub log: Arc<Mutex<Vec<String>>>,
}

fn note(log: &Mutex<Vec<String>>, line: String) {
    log.lock().unwrap().push(line);
}

impl TestNet {
    /// Starts the whoami, barrier and sink servers on [`SERVER`]; they stop with the test
    /// net. Panics when a port cannot be bound (it is a test bed).
    pub fn start_tcp_servers(&self, barrier: usize) -> Servers {
        let (who, bar, sink) = self.in_server(|| {
            let l = |a: Ipv4Addr, p| {
                let l = std::net::TcpListener::bind((a, p)).unwrap();
                l.set_nonblocking(true).unwrap();
                l
            };
            // whoami on every address of the server namespace (SERVER2 too: a policy test
            // then sees a refusal as the policy's, not a missing server).
            (l(Ipv4Addr::UNSPECIFIED, WHOAMI_PORT), l(SERVER, BARRIER_PORT), l(SERVER, SINK_PORT))
        });
        let s = Servers { barrier, uploads: Arc::default(), log: Arc::default() };
        let (stop, log) = (self.stop.clone(), s.log.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match who.accept() {
                    Ok((mut c, peer)) => {
                        let _ = c.set_nonblocking(false);
                        let _ =
                            std::io::Write::write_all(&mut c, format!("from {peer}\n").as_bytes());
                        note(&log, format!("whoami: {peer}"));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        let (stop, log, want) = (self.stop.clone(), s.log.clone(), barrier.max(1));
        std::thread::spawn(move || {
            let mut held: Vec<(std::net::TcpStream, SocketAddr, std::time::Instant)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match bar.accept() {
                    Ok((c, peer)) => {
                        note(&log, format!("barrier: {peer} waits"));
                        held.push((c, peer, std::time::Instant::now()));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
                let mut ips: Vec<std::net::IpAddr> = held.iter().map(|h| h.1.ip()).collect();
                ips.sort();
                ips.dedup();
                if ips.len() >= want {
                    let peers = ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
                    note(&log, format!("barrier: released peers={peers}"));
                    for (mut c, peer, _) in held.drain(..) {
                        let _ = c.set_nonblocking(false);
                        let line = format!("barrier ok peers={peers} you={peer}\n");
                        let _ = std::io::Write::write_all(&mut c, line.as_bytes());
                    }
                }
                held.retain_mut(|(c, peer, t)| {
                    if t.elapsed() < BARRIER_TIMEOUT {
                        return true;
                    }
                    note(&log, format!("barrier: {peer} timed out"));
                    let _ = c.set_nonblocking(false);
                    let _ = std::io::Write::write_all(c, b"barrier timeout\n");
                    false
                });
            }
        });
        let (stop, log, uploads) = (self.stop.clone(), s.log.clone(), s.uploads.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut c, peer)) = sink.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let (stop, log, uploads) = (stop.clone(), log.clone(), uploads.clone());
                std::thread::spawn(move || {
                    let _ = c.set_nonblocking(false);
                    let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
                    let mut buf = vec![0u8; 256 * 1024];
                    let (mut bytes, mut first) = (0u64, None);
                    loop {
                        match std::io::Read::read(&mut c, &mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                first.get_or_insert_with(std::time::Instant::now);
                                bytes += n as u64;
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::Interrupted
                                        | std::io::ErrorKind::WouldBlock
                                        | std::io::ErrorKind::TimedOut
                                ) && !stop.load(Ordering::Relaxed) => {}
                            Err(_) => return,
                        }
                    }
                    let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
                    note(&log, format!("sink: {peer} sent {bytes} bytes in {secs:.3} s"));
                    uploads.lock().unwrap().push(Upload { peer, bytes, secs });
                });
            }
        });
        s
    }
}
