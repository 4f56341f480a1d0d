//! The per-slot resolver: the only DNS server a guest can reach (the dataplane
//! drops DNS to anything else). It listens on the gateway address inside the
//! slot's namespace, decides by the slot's domain rules, forwards allowed
//! queries to the upstream server from the host namespace, and puts the A
//! records of allowed names into the slot's `dyn_allow` map for their TTL.
//!
//! Denied names get NXDOMAIN without any upstream query (no exfiltration through
//! lookups). AAAA queries of allowed names get an empty answer (the dataplane is
//! IPv4 only), so clients fall back to IPv4 at once. Concurrency is bounded
//! ([`MAX_INFLIGHT`] upstream queries per slot; more are dropped), every upstream
//! query times out after [`UPSTREAM_TIMEOUT`].

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use crate::dataplane::maps::DynVal;
use crate::dataplane::{monotonic_ns, SlotMaps};
use crate::dns;
use crate::netns::NsHandle;
use crate::policy::{Action, Cidr, NameVerdict, Policy, DOMAIN_RULE_BASE};

/// Upstream queries in flight per slot.
pub const MAX_INFLIGHT: usize = 32;
/// Time an upstream server has to answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Learnt addresses are kept at least this long, at most [`MAX_TTL`].
pub const MIN_TTL: u32 = 5;
/// See [`MIN_TTL`].
pub const MAX_TTL: u32 = 86_400;
/// Domain denials kept for reading.
pub const MAX_DOMAIN_DENIALS: usize = 1024;

/// A name the resolver refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DomainDenial {
    /// CLOCK_MONOTONIC nanoseconds.
    pub time_ns: u64,
    pub name: String,
    /// The deny rule (`domains[i]`), or `None` for the default action.
    pub rule: Option<usize>,
}

/// Resolver statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ResolverStats {
    pub queries: u64,
    pub malformed: u64,
    pub refused: u64,
    pub forwarded: u64,
    pub upstream_failures: u64,
    pub dropped_busy: u64,
    pub learnt: u64,
}

#[derive(Debug)]
struct Learnt {
    name: String,
    rule: usize,
}

/// State shared by a slot and its resolver task.
#[derive(Debug)]
pub struct ResolverState {
    policy: Mutex<Policy>,
    maps: Arc<Mutex<SlotMaps>>,
    learnt: Mutex<HashMap<Ipv4Addr, Learnt>>,
    denials: Mutex<VecDeque<DomainDenial>>,
    stats: Mutex<ResolverStats>,
    isolated: Cidr,
    upstream: SocketAddr,
    host_ns: Arc<NsHandle>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ResolverState {
    /// State for a slot whose maps are `maps`; `isolated` is the pool's range
    /// (learnt addresses never open it), `upstream` the server asked, from `host_ns`.
    pub fn new(
        maps: Arc<Mutex<SlotMaps>>,
        isolated: Cidr,
        upstream: SocketAddr,
        host_ns: Arc<NsHandle>,
    ) -> Self {
        Self {
            policy: Mutex::new(Policy::default()),
            maps,
            learnt: Mutex::new(HashMap::new()),
            denials: Mutex::new(VecDeque::new()),
            stats: Mutex::new(ResolverStats::default()),
            isolated,
            upstream,
            host_ns,
        }
    }

    /// Installs a new policy: learnt addresses whose name is no longer allowed
    /// (or now falls under a CIDR deny) are removed from the map.
    pub fn set_policy(&self, p: Policy) {
        let mut learnt = lock(&self.learnt);
        let mut maps = lock(&self.maps);
        learnt.retain(|addr, l| {
            let keep = matches!(p.name_verdict(&l.name), NameVerdict::AllowedBy(i) if i == l.rule)
                && !p.cidr_denies(*addr, Some(self.isolated));
            if !keep {
                let _ = maps.dyn_remove(*addr);
            }
            keep
        });
        *lock(&self.policy) = p;
    }

    /// Forgets everything learnt and logged (slot release).
    pub fn reset(&self) {
        let mut maps = lock(&self.maps);
        for (a, _) in lock(&self.learnt).drain() {
            let _ = maps.dyn_remove(a);
        }
        lock(&self.denials).clear();
        *lock(&self.stats) = ResolverStats::default();
        *lock(&self.policy) = Policy::default();
    }

    /// Removes expired learnt addresses (the programs ignore them already).
    pub fn sweep(&self) {
        let now = monotonic_ns();
        let mut maps = lock(&self.maps);
        let Ok(entries) = maps.dyn_entries() else { return };
        let mut learnt = lock(&self.learnt);
        for (a, v) in entries {
            if v.expires_ns <= now {
                let _ = maps.dyn_remove(a);
                learnt.remove(&a);
            }
        }
    }

    /// Takes the domain denials logged since the last call.
    pub fn drain_denials(&self) -> Vec<DomainDenial> {
        lock(&self.denials).drain(..).collect()
    }

    /// Statistics so far.
    pub fn stats(&self) -> ResolverStats {
        lock(&self.stats).clone()
    }

    fn deny(&self, name: &str, rule: Option<usize>) {
        let mut d = lock(&self.denials);
        if d.len() >= MAX_DOMAIN_DENIALS {
            d.pop_front();
        }
        d.push_back(DomainDenial { time_ns: monotonic_ns(), name: name.to_string(), rule });
    }

    fn learn(&self, name: &str, rule: usize, addrs: &[(Ipv4Addr, u32)]) {
        let policy = lock(&self.policy).clone();
        let now = monotonic_ns();
        let mut maps = lock(&self.maps);
        let mut learnt = lock(&self.learnt);
        let rule_id = DOMAIN_RULE_BASE + u32::try_from(rule).unwrap_or(0);
        for &(a, ttl) in addrs {
            if policy.cidr_denies(a, Some(self.isolated)) {
                continue; // an explicit CIDR deny (or another slot) is never opened by DNS
            }
            let ttl = u64::from(ttl.clamp(MIN_TTL, MAX_TTL));
            let v = DynVal { expires_ns: now + ttl * 1_000_000_000, rule_id, pad: 0 };
            if maps.dyn_insert(a, v).is_ok() {
                learnt.insert(a, Learnt { name: name.to_string(), rule });
                lock(&self.stats).learnt += 1;
            }
        }
    }
}

/// A running resolver; dropping it stops the task.
#[derive(Debug)]
pub struct Resolver {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Resolver {
    /// Serves `socket` (bound to the gateway address:53 inside the slot).
    pub fn spawn(socket: std::net::UdpSocket, state: Arc<ResolverState>) -> std::io::Result<Self> {
        socket.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(socket)?);
        let task = tokio::spawn(serve(socket, state));
        Ok(Self { task })
    }
}

async fn serve(socket: Arc<UdpSocket>, state: Arc<ResolverState>) {
    let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT));
    let mut buf = vec![0u8; dns::MAX_MESSAGE];
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    loop {
        let (n, from) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(v) => v,
                Err(_) => continue,
            },
            _ = sweep.tick() => {
                state.sweep();
                continue;
            }
        };
        let msg = buf[..n].to_vec();
        lock(&state.stats).queries += 1;
        let Ok(q) = dns::parse_query(&msg) else {
            lock(&state.stats).malformed += 1;
            continue;
        };
        let verdict = lock(&state.policy).name_verdict(&q.name);
        let allowed_rule = match verdict {
            NameVerdict::DeniedBy(i) => {
                refuse(&state, &socket, &msg, &q, from, Some(i)).await;
                continue;
            }
            NameVerdict::Default(Action::Deny) => {
                refuse(&state, &socket, &msg, &q, from, None).await;
                continue;
            }
            NameVerdict::AllowedBy(i) => Some(i),
            NameVerdict::Default(Action::Allow) => None,
        };
        if q.qtype == dns::TYPE_AAAA {
            let _ =
                socket.send_to(&dns::build_answer(&msg, &q, dns::RCODE_NOERROR, &[]), from).await;
            continue;
        }
        let Ok(permit) = inflight.clone().try_acquire_owned() else {
            lock(&state.stats).dropped_busy += 1;
            continue;
        };
        let (state, socket) = (state.clone(), socket.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match forward(&state, &msg, &q).await {
                Some((reply, resp)) => {
                    if let Some(rule) = allowed_rule {
                        state.learn(&q.name, rule, &resp.addrs);
                    }
                    lock(&state.stats).forwarded += 1;
                    let _ = socket.send_to(&reply, from).await;
                }
                None => {
                    lock(&state.stats).upstream_failures += 1;
                    let reply = dns::build_answer(&msg, &q, dns::RCODE_SERVFAIL, &[]);
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
    }
}

async fn refuse(
    state: &ResolverState,
    socket: &UdpSocket,
    msg: &[u8],
    q: &dns::Query,
    to: SocketAddr,
    rule: Option<usize>,
) {
    lock(&state.stats).refused += 1;
    state.deny(&q.name, rule);
    let _ = socket.send_to(&dns::build_answer(msg, q, dns::RCODE_NXDOMAIN, &[]), to).await;
}

/// Asks the upstream server from the host namespace; the validated reply.
async fn forward(
    state: &ResolverState,
    msg: &[u8],
    q: &dns::Query,
) -> Option<(Vec<u8>, dns::Response)> {
    let std_sock = state
        .host_ns
        .run(|| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(s)
        })
        .ok()?
        .ok()?;
    let sock = UdpSocket::from_std(std_sock).ok()?;
    sock.send_to(msg, state.upstream).await.ok()?;
    let mut buf = vec![0u8; dns::MAX_MESSAGE];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let (n, from) =
            tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await.ok()?.ok()?;
        if from != state.upstream {
            continue;
        }
        if let Ok(resp) = dns::parse_response(&buf[..n], q) {
            return Some((buf[..n].to_vec(), resp));
        }
    }
}
