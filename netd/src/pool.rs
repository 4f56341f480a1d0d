//! Network slots and the pool that prepares them ahead.
//!
//! A slot is a network namespace `<prefix><i>` holding a persistent tap `tap0`
//! (for the VMM) and `veth0`, whose peer `<prefix><i>h` lives in the host
//! namespace. Slot `i` owns the `i`-th /30 of the pool's range: the host side
//! has `.1`, the slot side `.2` (the slot's unique address). Every guest uses
//! the same [`GuestAddressing`]; the programs translate between the guest's
//! address and the slot's. State: a record per slot (see [`crate::record`]),
//! maps pinned under `<pin root>/<slot>/`.
//!
//! [`SlotPool::open`] recovers: it adopts every slot whose record, namespace,
//! links and pins are all there, and removes everything else carrying the
//! pool's prefix (namespaces, host veths, pin directories, records).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::conntrack;
use crate::dataplane::maps::{CidrVal, SlotCfg, ACT_ALLOW, ACT_DENY, DIR_EGRESS, DIR_INGRESS};
use crate::dataplane::{self, Counters, DataplaneError, PacketDenial, SlotMaps};
use crate::links::{LinkError, Netlink};
use crate::netns::{self, NetnsError, NsHandle};
use crate::policy::{Action, Cidr, Policy, PolicyError, RuleRef, CIDR_RULE_BASE, RULE_ISOLATION};
use crate::record::{self, RecordError, SlotRecord, SlotState};
use crate::resolver::{DomainDenial, Resolver, ResolverState, ResolverStats};
use crate::tap::{self, TapError};

/// Name of the tap inside every slot.
pub const TAP_NAME: &str = "tap0";
/// Name of the slot-side veth inside every slot.
pub const VETH_NAME: &str = "veth0";

/// Errors of the pool and its slots.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool prefix {0:?} is invalid (1-9 chars of [a-z], then [a-z0-9]; names are <prefix><index>)")]
    BadPrefix(String),
    #[error("the pool's range {0} has no room for another slot")]
    Full(Cidr),
    #[error("slot {0} is not known to this pool")]
    UnknownSlot(String),
    #[error("slot {slot}: {step}")]
    Netns {
        slot: String,
        step: &'static str,
        #[source]
        source: NetnsError,
    },
    #[error("slot {slot}: {step}")]
    Link {
        slot: String,
        step: &'static str,
        #[source]
        source: LinkError,
    },
    #[error("slot {slot}: {step}")]
    Tap {
        slot: String,
        step: &'static str,
        #[source]
        source: TapError,
    },
    #[error("slot {slot}: dataplane")]
    Dataplane {
        slot: String,
        #[source]
        source: Box<DataplaneError>,
    },
    #[error("slot {slot}: {step}")]
    Io {
        slot: String,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("invalid policy")]
    Policy(#[from] PolicyError),
}

/// The addressing every guest of a pool uses (the same in every clone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GuestAddressing {
    pub guest_ip: Ipv4Addr,
    pub guest_mac: [u8; 6],
    /// The guest's gateway and DNS server (the tap's address in the slot).
    pub gateway_ip: Ipv4Addr,
    pub gateway_mac: [u8; 6],
    pub prefix_len: u8,
}

impl Default for GuestAddressing {
    fn default() -> Self {
        Self {
            guest_ip: Ipv4Addr::new(172, 31, 255, 2),
            guest_mac: [0x02, 0x67, 0x72, 0x00, 0x00, 0x02],
            gateway_ip: Ipv4Addr::new(172, 31, 255, 1),
            gateway_mac: [0x02, 0x67, 0x72, 0x00, 0x00, 0x01],
            prefix_len: 30,
        }
    }
}

/// How a pool is set up.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Slot names are `<prefix><index>` (namespace, pin dir); host veths add `h`.
    pub prefix: String,
    /// Named namespace the host-side veths live in; `None`: netd's own.
    pub host_netns: Option<String>,
    /// Slot records (a tmpfs: `/run/grove/netd` by default).
    pub state_dir: PathBuf,
    /// Pin root on bpffs (`/sys/fs/bpf/grove` by default).
    pub pin_root: PathBuf,
    /// Addresses of the slots, one /30 each; also denied to every guest
    /// (slots cannot reach each other or the host side).
    pub range: Cidr,
    pub guest: GuestAddressing,
    /// The server the resolvers ask (from the host namespace).
    pub upstream_dns: SocketAddr,
    /// Create taps with `IFF_MULTI_QUEUE` (the VMM must then open them so too).
    pub multi_queue_tap: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            prefix: "grove".into(),
            host_netns: None,
            state_dir: "/run/grove/netd".into(),
            pin_root: "/sys/fs/bpf/grove".into(),
            range: Cidr { addr: Ipv4Addr::new(10, 201, 0, 0), len: 16 },
            guest: GuestAddressing::default(),
            upstream_dns: SocketAddr::from(([127, 0, 0, 53], 53)),
            multi_queue_tap: false,
        }
    }
}

/// What a caller asks of a slot.
#[derive(Debug, Clone, Default)]
pub struct SlotRequest {
    /// Who holds the slot (the sandbox id), kept in the record for re-adoption.
    pub owner: String,
    pub policy: Policy,
}

/// What [`SlotPool::open`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Recovery {
    /// Slots adopted back into the pool (free).
    pub free: Vec<String>,
    /// Slots adopted as taken: (slot, owner); get them with [`SlotPool::adopt`].
    pub taken: Vec<(String, String)>,
    /// Leftovers removed: namespaces, host links, pin dirs, records.
    pub removed: Vec<String>,
}

/// A denial, packet or name, with its rule decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Denial {
    Packet { slot: String, rule: RuleRef, packet: PacketDenial },
    Domain { slot: String, denial: DomainDenial },
}

struct SlotInner {
    name: String,
    index: u32,
    host_if: String,
    host_ip: Ipv4Addr,
    slot_ip: Ipv4Addr,
    guest: GuestAddressing,
    pin_dir: PathBuf,
    maps: Arc<Mutex<SlotMaps>>,
    resolver_state: Arc<ResolverState>,
    resolver_socket: Mutex<Option<std::net::UdpSocket>>,
    resolver: Mutex<Option<Resolver>>,
    owner: Mutex<Option<String>>,
}

/// A network slot: what a VMM needs to plug in, and the handle to its policy,
/// counters and denials. Cheap to clone.
#[derive(Clone)]
pub struct Slot {
    inner: Arc<SlotInner>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("name", &self.inner.name)
            .field("slot_ip", &self.inner.slot_ip)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Slot {
    /// Slot name (also its namespace name and pin directory name).
    pub fn name(&self) -> &str {
        &self.inner.name
    }
    /// The namespace to run the VMM in (`/run/netns/<name>`).
    pub fn netns_path(&self) -> PathBuf {
        netns::path_of(&self.inner.name)
    }
    /// The tap inside the namespace the VMM attaches to (`TUNSETIFF`).
    pub fn tap_name(&self) -> &'static str {
        TAP_NAME
    }
    /// The guest's addressing (same for every slot of the pool).
    pub fn guest(&self) -> GuestAddressing {
        self.inner.guest
    }
    /// The slot's unique address: the guest is seen, and reached, there.
    pub fn slot_ip(&self) -> Ipv4Addr {
        self.inner.slot_ip
    }
    /// The host side of the slot's veth.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.inner.host_ip
    }
    /// The host-side veth's name.
    pub fn host_if(&self) -> &str {
        &self.inner.host_if
    }
    /// Where the slot's maps are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.inner.pin_dir
    }

    fn dp_err(&self) -> impl FnOnce(DataplaneError) -> PoolError + '_ {
        move |source| PoolError::Dataplane {
            slot: self.inner.name.clone(),
            source: Box::new(source),
        }
    }

    /// Replaces the policy; takes effect on the next packet of every connection.
    pub fn set_policy(&self, p: &Policy, range: Cidr) -> Result<(), PoolError> {
        p.validate()?;
        let mut desired: HashMap<(Ipv4Addr, u8), CidrVal> = HashMap::new();
        for (i, r) in p.cidrs.iter().enumerate() {
            let action = if r.action == Action::Allow { ACT_ALLOW } else { ACT_DENY };
            let rule_id = CIDR_RULE_BASE + u32::try_from(i).unwrap_or(0);
            desired.insert((r.cidr.addr, r.cidr.len), CidrVal { rule_id, action, pad: [0; 3] });
        }
        desired.insert(
            (range.addr, range.len),
            CidrVal { rule_id: RULE_ISOLATION, action: ACT_DENY, pad: [0; 3] },
        );
        {
            let mut maps = lock(&self.inner.maps);
            let e = self.dp_err();
            let current = maps.cidr_entries().map_err(e)?;
            for (&(a, l), v) in &desired {
                maps.cidr_insert(a, l, *v).map_err(self.dp_err())?;
            }
            let mut cfg = maps.config().map_err(self.dp_err())?;
            cfg.default_allow = u8::from(p.default == Action::Allow);
            cfg.enabled = 1;
            maps.set_config(&cfg).map_err(self.dp_err())?;
            for (a, l, _) in current {
                if !desired.contains_key(&(a, l)) {
                    maps.cidr_remove(a, l).map_err(self.dp_err())?;
                }
            }
            for (dir, rl) in [(DIR_EGRESS, p.egress_rate), (DIR_INGRESS, p.ingress_rate)] {
                let (r, b) = rl.map_or((0, 0), |r| (r.bytes_per_sec, r.burst_bytes));
                maps.set_rate(dir, r, b).map_err(self.dp_err())?;
            }
            let ex: Vec<(u8, u16, u16)> =
                p.expose.iter().map(|x| (x.proto.number(), x.slot_port, x.guest_port)).collect();
            maps.set_exposures(&ex).map_err(self.dp_err())?;
        }
        self.inner.resolver_state.set_policy(p.clone());
        Ok(())
    }

    /// Counters so far.
    pub fn counters(&self) -> Result<Counters, PoolError> {
        lock(&self.inner.maps).counters().map_err(self.dp_err())
    }

    /// Resolver statistics so far.
    pub fn resolver_stats(&self) -> ResolverStats {
        self.inner.resolver_state.stats()
    }

    /// Denials logged since the last call: packets (from the programs' ring
    /// buffer) and names (from the resolver).
    pub fn drain_denials(&self) -> Vec<Denial> {
        let slot = self.inner.name.clone();
        let mut out: Vec<Denial> = lock(&self.inner.maps)
            .drain_denials()
            .into_iter()
            .map(|packet| Denial::Packet {
                slot: slot.clone(),
                rule: RuleRef::from_id(packet.rule_id),
                packet,
            })
            .collect();
        out.extend(
            self.inner
                .resolver_state
                .drain_denials()
                .into_iter()
                .map(|denial| Denial::Domain { slot: slot.clone(), denial }),
        );
        out
    }

    /// Addresses currently allowed through the resolver (address, expiry ns).
    pub fn learnt_addresses(&self) -> Result<Vec<(Ipv4Addr, u64)>, PoolError> {
        let maps = lock(&self.inner.maps);
        Ok(maps
            .dyn_entries()
            .map_err(self.dp_err())?
            .into_iter()
            .map(|(a, v)| (a, v.expires_ns))
            .collect())
    }

    fn start_resolver(&self) -> Result<(), PoolError> {
        let sock = lock(&self.inner.resolver_socket).as_ref().map(std::net::UdpSocket::try_clone);
        if let Some(s) = sock {
            let s = s.map_err(|source| PoolError::Io {
                slot: self.inner.name.clone(),
                step: "clone resolver socket",
                source,
            })?;
            let r = Resolver::spawn(s, self.inner.resolver_state.clone()).map_err(|source| {
                PoolError::Io { slot: self.inner.name.clone(), step: "start resolver", source }
            })?;
            *lock(&self.inner.resolver) = Some(r);
        }
        Ok(())
    }
}

struct PoolInner {
    free: VecDeque<Slot>,
    taken: HashMap<String, Slot>,
    /// Indexes in use (free, taken, or being built).
    used: BTreeSet<u32>,
}

/// The pool of slots of one prefix.
pub struct SlotPool {
    cfg: PoolConfig,
    host_ns: Arc<NsHandle>,
    host_nl: Netlink,
    inner: Mutex<PoolInner>,
}

impl std::fmt::Debug for SlotPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotPool").field("prefix", &self.cfg.prefix).finish()
    }
}

fn valid_prefix(p: &str) -> bool {
    (1..=9).contains(&p.len())
        && p.as_bytes()[0].is_ascii_lowercase()
        && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl SlotPool {
    /// Opens the pool: recovers what a previous netd left (see the module doc).
    pub async fn open(cfg: PoolConfig) -> Result<(Self, Recovery), PoolError> {
        if !valid_prefix(&cfg.prefix) {
            return Err(PoolError::BadPrefix(cfg.prefix.clone()));
        }
        let pool_err = |step| {
            let slot = cfg.prefix.clone();
            move |source| PoolError::Netns { slot, step, source }
        };
        let host_ns = Arc::new(match &cfg.host_netns {
            Some(n) => NsHandle::named(n).map_err(pool_err("open the host namespace"))?,
            None => NsHandle::current().map_err(pool_err("open the host namespace"))?,
        });
        dataplane::ensure_bpffs().map_err(|source| PoolError::Dataplane {
            slot: cfg.prefix.clone(),
            source: Box::new(source),
        })?;
        let host_nl = Netlink::connect(&host_ns).map_err(|source| PoolError::Link {
            slot: cfg.prefix.clone(),
            step: "netlink",
            source,
        })?;
        let pool = Self {
            cfg,
            host_ns,
            host_nl,
            inner: Mutex::new(PoolInner {
                free: VecDeque::new(),
                taken: HashMap::new(),
                used: BTreeSet::new(),
            }),
        };
        let rec = pool.recover().await?;
        Ok((pool, rec))
    }

    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// Slot name of `index`.
    fn name_of(&self, index: u32) -> String {
        format!("{}{index}", self.cfg.prefix)
    }

    /// The index in `name`, if it is one of this pool's slot names.
    fn index_in(&self, name: &str) -> Option<u32> {
        let digits = name.strip_prefix(&self.cfg.prefix)?;
        if digits.is_empty()
            || !digits.bytes().all(|b| b.is_ascii_digit())
            || (digits.len() > 1 && digits.starts_with('0'))
        {
            return None;
        }
        digits.parse().ok()
    }

    fn addresses(&self, index: u32) -> Result<(Ipv4Addr, Ipv4Addr), PoolError> {
        let size = 1u64 << (32 - u32::from(self.cfg.range.len));
        if u64::from(index) * 4 + 4 > size {
            return Err(PoolError::Full(self.cfg.range));
        }
        let base = u32::from(self.cfg.range.addr) + index * 4;
        Ok((Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2)))
    }

    fn reserve_index(&self) -> Result<u32, PoolError> {
        let mut inner = lock(&self.inner);
        let mut i = 0;
        while inner.used.contains(&i) {
            i += 1;
        }
        self.addresses(i)?;
        inner.used.insert(i);
        Ok(i)
    }

    /// Prepares `n` more free slots.
    pub async fn fill(&self, n: usize) -> Result<(), PoolError> {
        for _ in 0..n {
            let index = self.reserve_index()?;
            match self.create(index).await {
                Ok(slot) => lock(&self.inner).free.push_back(slot),
                Err(e) => {
                    lock(&self.inner).used.remove(&index);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Free slots ready to be taken.
    pub fn free_count(&self) -> usize {
        lock(&self.inner).free.len()
    }

    /// Slots given out.
    pub fn taken(&self) -> Vec<Slot> {
        lock(&self.inner).taken.values().cloned().collect()
    }

    /// Gives out a slot, prepared ahead if one is free, built now otherwise.
    pub async fn take(&self, req: SlotRequest) -> Result<Slot, PoolError> {
        req.policy.validate()?;
        let pooled = lock(&self.inner).free.pop_front();
        let slot = match pooled {
            Some(s) => s,
            None => {
                let index = self.reserve_index()?;
                match self.create(index).await {
                    Ok(s) => s,
                    Err(e) => {
                        lock(&self.inner).used.remove(&index);
                        return Err(e);
                    }
                }
            }
        };
        let given = (|| {
            slot.set_policy(&req.policy, self.cfg.range)?;
            self.store(
                &slot,
                SlotState::Taken { owner: req.owner.clone(), policy: req.policy.clone() },
            )?;
            slot.start_resolver()
        })();
        if let Err(e) = given {
            let _ = self.destroy_slot(&slot).await;
            lock(&self.inner).used.remove(&slot.inner.index);
            return Err(e);
        }
        *lock(&slot.inner.owner) = Some(req.owner);
        lock(&self.inner).taken.insert(slot.name().to_string(), slot.clone());
        Ok(slot)
    }

    /// A slot found taken by [`SlotPool::open`], by name.
    pub fn adopt(&self, name: &str) -> Result<Slot, PoolError> {
        lock(&self.inner)
            .taken
            .get(name)
            .cloned()
            .ok_or_else(|| PoolError::UnknownSlot(name.to_string()))
    }

    /// Replaces a taken slot's policy (and records it for a restart).
    pub fn update_policy(&self, slot: &Slot, p: &Policy) -> Result<(), PoolError> {
        slot.set_policy(p, self.cfg.range)?;
        let owner = lock(&slot.inner.owner).clone().unwrap_or_default();
        self.store(slot, SlotState::Taken { owner, policy: p.clone() })
    }

    /// Returns a slot to the pool, scrubbed: dataplane disabled, rules,
    /// exposures, learnt addresses, rate limits, counters and pending denials
    /// cleared, conntrack entries of the slot (its namespace, and the host
    /// namespace's for its address) deleted.
    pub async fn release(&self, slot: Slot) -> Result<(), PoolError> {
        let name = slot.name().to_string();
        if lock(&self.inner).taken.remove(&name).is_none() {
            return Err(PoolError::UnknownSlot(name));
        }
        *lock(&slot.inner.resolver) = None;
        *lock(&slot.inner.owner) = None;
        if let Err(e) = self.scrub(&slot) {
            let _ = self.destroy_slot(&slot).await;
            lock(&self.inner).used.remove(&slot.inner.index);
            return Err(e);
        }
        self.store(&slot, SlotState::Free)?;
        lock(&self.inner).free.push_back(slot);
        Ok(())
    }

    fn scrub(&self, slot: &Slot) -> Result<(), PoolError> {
        slot.inner.resolver_state.reset();
        {
            let mut maps = lock(&slot.inner.maps);
            let e = || slot.dp_err();
            let mut cfg = maps.config().map_err(e())?;
            cfg.enabled = 0;
            cfg.default_allow = 0;
            maps.set_config(&cfg).map_err(e())?;
            for (a, l, _) in maps.cidr_entries().map_err(e())? {
                maps.cidr_remove(a, l).map_err(e())?;
            }
            for (a, _) in maps.dyn_entries().map_err(e())? {
                maps.dyn_remove(a).map_err(e())?;
            }
            maps.set_exposures(&[]).map_err(e())?;
            maps.set_rate(DIR_EGRESS, 0, 0).map_err(e())?;
            maps.set_rate(DIR_INGRESS, 0, 0).map_err(e())?;
            maps.reset_counters().map_err(e())?;
            maps.drain_denials();
        }
        let ct = |r: Result<Result<(), conntrack::ConntrackError>, NetnsError>, step| match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(PoolError::Io {
                slot: slot.name().to_string(),
                step,
                source: std::io::Error::other(e),
            }),
            Err(source) => Err(PoolError::Netns { slot: slot.name().to_string(), step, source }),
        };
        let ns = NsHandle::named(slot.name()).map_err(|source| PoolError::Netns {
            slot: slot.name().to_string(),
            step: "open",
            source,
        })?;
        ct(ns.run(conntrack::flush), "flush conntrack")?;
        let addr = slot.slot_ip();
        ct(
            self.host_ns.run(move || conntrack::delete_involving(addr).map(|_| ())),
            "delete host conntrack entries",
        )
    }

    fn store(&self, slot: &Slot, state: SlotState) -> Result<(), PoolError> {
        Ok(record::store(
            &self.cfg.state_dir,
            &SlotRecord {
                name: slot.name().to_string(),
                index: slot.inner.index,
                host_ip: slot.inner.host_ip,
                slot_ip: slot.inner.slot_ip,
                state,
            },
        )?)
    }

    /// Destroys a slot for good (taken or free).
    pub async fn destroy(&self, slot: Slot) -> Result<(), PoolError> {
        {
            let mut inner = lock(&self.inner);
            inner.taken.remove(slot.name());
            inner.free.retain(|s| s.name() != slot.name());
        }
        let r = self.destroy_slot(&slot).await;
        lock(&self.inner).used.remove(&slot.inner.index);
        r
    }

    /// Destroys every slot of the pool (free and taken).
    pub async fn destroy_all(&self) -> Result<(), PoolError> {
        let all: Vec<Slot> = {
            let mut inner = lock(&self.inner);
            let mut v: Vec<Slot> = inner.free.drain(..).collect();
            v.extend(inner.taken.drain().map(|(_, s)| s));
            v
        };
        let mut first_err = None;
        for s in all {
            if let Err(e) = self.destroy_slot(&s).await {
                first_err.get_or_insert(e);
            }
            lock(&self.inner).used.remove(&s.inner.index);
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn destroy_slot(&self, slot: &Slot) -> Result<(), PoolError> {
        *lock(&slot.inner.resolver) = None;
        *lock(&slot.inner.resolver_socket) = None;
        self.remove_by_name(slot.name()).await
    }

    /// Removes whatever exists of the slot `name`: host veth, namespace, pins, record.
    async fn remove_by_name(&self, name: &str) -> Result<(), PoolError> {
        let host_if = format!("{name}h");
        let link = self.host_nl.delete(&host_if).await;
        let ns = netns::delete(name);
        let pins = remove_pins(&self.cfg.pin_root.join(name));
        let rec = record::remove(&self.cfg.state_dir, name);
        link.map_err(|source| PoolError::Link {
            slot: name.to_string(),
            step: "delete host veth",
            source,
        })?;
        ns.map_err(|source| PoolError::Netns {
            slot: name.to_string(),
            step: "delete namespace",
            source,
        })?;
        pins.map_err(|source| PoolError::Io {
            slot: name.to_string(),
            step: "remove pins",
            source,
        })?;
        rec?;
        Ok(())
    }

    /// Builds slot `index` from nothing. On failure, removes what was built.
    async fn create(&self, index: u32) -> Result<Slot, PoolError> {
        let name = self.name_of(index);
        // Leftovers of a crash under the same name go first.
        self.remove_by_name(&name).await?;
        match self.build(index, &name).await {
            Ok(s) => Ok(s),
            Err(e) => {
                let _ = self.remove_by_name(&name).await;
                Err(e)
            }
        }
    }

    async fn build(&self, index: u32, name: &str) -> Result<Slot, PoolError> {
        let (host_ip, slot_ip) = self.addresses(index)?;
        let g = self.cfg.guest;
        let nserr = |step| move |source| PoolError::Netns { slot: name.to_string(), step, source };
        let lerr = |step| move |source| PoolError::Link { slot: name.to_string(), step, source };
        let ioerr = |step| move |source| PoolError::Io { slot: name.to_string(), step, source };
        netns::create(name).map_err(nserr("create namespace"))?;
        let ns = NsHandle::named(name).map_err(nserr("open namespace"))?;
        let mq = self.cfg.multi_queue_tap;
        ns.run(|| -> Result<(), PoolError> {
            for k in ["ipv6/conf/all/disable_ipv6", "ipv6/conf/default/disable_ipv6"] {
                netns::write_net_sysctl(k, "1").map_err(ioerr("disable IPv6"))?;
            }
            tap::create_persistent(TAP_NAME, mq).map_err(|source| PoolError::Tap {
                slot: name.to_string(),
                step: "create tap",
                source,
            })
        })
        .map_err(nserr("enter namespace"))??;

        let host_if = format!("{name}h");
        self.host_nl.add_veth(&host_if, VETH_NAME, &ns).await.map_err(lerr("create veth"))?;
        let key = format!("ipv6/conf/{host_if}/disable_ipv6");
        self.host_ns
            .run(|| netns::write_net_sysctl(&key, "1"))
            .map_err(nserr("enter host namespace"))?
            .map_err(ioerr("disable IPv6 on the host veth"))?;
        self.host_nl.add_addr(&host_if, host_ip, 30).await.map_err(lerr("host veth address"))?;
        let host_link = self.host_nl.up(&host_if).await.map_err(lerr("host veth up"))?;

        let nl = Netlink::connect(&ns).map_err(lerr("netlink in slot"))?;
        nl.up("lo").await.map_err(lerr("lo up"))?;
        nl.add_addr(VETH_NAME, slot_ip, 30).await.map_err(lerr("veth address"))?;
        let veth = nl.up(VETH_NAME).await.map_err(lerr("veth up"))?;
        nl.set_mac(TAP_NAME, g.gateway_mac).await.map_err(lerr("tap MAC"))?;
        nl.add_addr(TAP_NAME, g.gateway_ip, g.prefix_len).await.map_err(lerr("tap address"))?;
        let tap_link = nl.up(TAP_NAME).await.map_err(lerr("tap up"))?;
        nl.add_neigh(TAP_NAME, g.guest_ip, g.guest_mac).await.map_err(lerr("guest neighbour"))?;
        nl.add_default_route(host_ip).await.map_err(lerr("default route"))?;

        let pin_dir = self.cfg.pin_root.join(name);
        let gw = g.gateway_ip;
        let (loaded, sock) = ns
            .run(|| {
                let loaded = dataplane::load(
                    dataplane::SLOT_OBJECT,
                    &pin_dir,
                    &[dataplane::EGRESS_PROGRAM, dataplane::INGRESS_PROGRAM],
                )
                .and_then(|mut bpf| {
                    dataplane::attach_ingress(&mut bpf, dataplane::EGRESS_PROGRAM, TAP_NAME)?;
                    dataplane::attach_ingress(&mut bpf, dataplane::INGRESS_PROGRAM, VETH_NAME)
                });
                (loaded, std::net::UdpSocket::bind((gw, 53)))
            })
            .map_err(nserr("enter namespace"))?;
        loaded.map_err(|source| PoolError::Dataplane {
            slot: name.to_string(),
            source: Box::new(source),
        })?;
        let sock = sock.map_err(ioerr("bind the resolver socket"))?;

        let mut maps = SlotMaps::open(&pin_dir).map_err(|source| PoolError::Dataplane {
            slot: name.to_string(),
            source: Box::new(source),
        })?;
        let cfg = SlotCfg {
            guest_ip: dataplane::ip_key(g.guest_ip),
            slot_ip: dataplane::ip_key(slot_ip),
            gw_ip: dataplane::ip_key(g.gateway_ip),
            tap_ifindex: tap_link.index,
            veth_ifindex: veth.index,
            guest_mac: g.guest_mac,
            tap_mac: g.gateway_mac,
            veth_mac: veth.mac,
            host_mac: host_link.mac,
            default_allow: 0,
            enabled: 0,
            pad: [0; 6],
        };
        maps.set_config(&cfg).map_err(|source| PoolError::Dataplane {
            slot: name.to_string(),
            source: Box::new(source),
        })?;
        let slot = self.slot_handle(index, name, host_ip, slot_ip, maps, Some(sock));
        self.store(&slot, SlotState::Free)?;
        Ok(slot)
    }

    fn slot_handle(
        &self,
        index: u32,
        name: &str,
        host_ip: Ipv4Addr,
        slot_ip: Ipv4Addr,
        maps: SlotMaps,
        sock: Option<std::net::UdpSocket>,
    ) -> Slot {
        let maps = Arc::new(Mutex::new(maps));
        let resolver_state = Arc::new(ResolverState::new(
            maps.clone(),
            self.cfg.range,
            self.cfg.upstream_dns,
            self.host_ns.clone(),
        ));
        Slot {
            inner: Arc::new(SlotInner {
                name: name.to_string(),
                index,
                host_if: format!("{name}h"),
                host_ip,
                slot_ip,
                guest: self.cfg.guest,
                pin_dir: self.cfg.pin_root.join(name),
                maps,
                resolver_state,
                resolver_socket: Mutex::new(sock),
                resolver: Mutex::new(None),
                owner: Mutex::new(None),
            }),
        }
    }

    /// Adopts a recorded slot if all of it is there.
    async fn adopt_record(&self, r: &SlotRecord) -> Option<Slot> {
        let (host_ip, slot_ip) = self.addresses(r.index).ok()?;
        if self.index_in(&r.name) != Some(r.index) || host_ip != r.host_ip || slot_ip != r.slot_ip {
            return None;
        }
        let ns = NsHandle::named(&r.name).ok()?;
        self.host_nl.find(&format!("{}h", r.name)).await.ok()??;
        let nl = Netlink::connect(&ns).ok()?;
        nl.find(TAP_NAME).await.ok()??;
        nl.find(VETH_NAME).await.ok()??;
        let pin_dir = self.cfg.pin_root.join(&r.name);
        let maps = SlotMaps::open(&pin_dir).ok()?;
        let gw = self.cfg.guest.gateway_ip;
        let sock = ns.run(|| std::net::UdpSocket::bind((gw, 53))).ok()?.ok()?;
        Some(self.slot_handle(r.index, &r.name, host_ip, slot_ip, maps, Some(sock)))
    }

    async fn recover(&self) -> Result<Recovery, PoolError> {
        let mut rec = Recovery::default();
        let (records, bad) = record::load_all(&self.cfg.state_dir, &self.cfg.prefix);
        let mut keep = BTreeSet::new();
        for (name, _) in bad {
            self.remove_by_name(&name).await?;
            rec.removed.push(format!("record {name} (unreadable)"));
        }
        for r in records {
            let Some(slot) = self.adopt_record(&r).await else {
                self.remove_by_name(&r.name).await?;
                rec.removed.push(format!("slot {} (incomplete)", r.name));
                continue;
            };
            keep.insert(r.name.clone());
            lock(&self.inner).used.insert(r.index);
            match r.state {
                SlotState::Free => {
                    // Scrub again: the crash may have come in the middle of a release.
                    if self.scrub(&slot).is_err() {
                        self.remove_by_name(&r.name).await?;
                        lock(&self.inner).used.remove(&r.index);
                        rec.removed.push(format!("slot {} (scrub failed)", r.name));
                        continue;
                    }
                    rec.free.push(r.name.clone());
                    lock(&self.inner).free.push_back(slot);
                }
                SlotState::Taken { owner, policy } => {
                    slot.set_policy(&policy, self.cfg.range)?;
                    slot.start_resolver()?;
                    *lock(&slot.inner.owner) = Some(owner.clone());
                    rec.taken.push((r.name.clone(), owner));
                    lock(&self.inner).taken.insert(r.name.clone(), slot);
                }
            }
        }
        // Leftovers: anything of ours without an adopted record.
        let mut names: BTreeSet<String> = netns::list(&self.cfg.prefix).into_iter().collect();
        let host_links = self.host_nl.list(&self.cfg.prefix).await.map_err(|source| {
            PoolError::Link { slot: self.cfg.prefix.clone(), step: "list host links", source }
        })?;
        names
            .extend(host_links.into_iter().filter_map(|l| l.strip_suffix('h').map(str::to_string)));
        if let Ok(dir) = std::fs::read_dir(&self.cfg.pin_root) {
            names.extend(dir.filter_map(|e| e.ok()?.file_name().into_string().ok()));
        }
        for n in names {
            if self.index_in(&n).is_some() && !keep.contains(&n) {
                self.remove_by_name(&n).await?;
                rec.removed.push(format!("leftover {n}"));
            }
        }
        Ok(rec)
    }
}

/// Removes a slot's pin directory (the pinned maps and nothing else).
fn remove_pins(dir: &Path) -> std::io::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                std::fs::remove_file(e?.path())?;
            }
            std::fs::remove_dir(dir)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_checked() {
        for ok in ["grove", "gt1a2b3c4", "a"] {
            assert!(valid_prefix(ok), "{ok}");
        }
        for bad in ["", "1abc", "Grove", "gro-ve", "abcdefghij"] {
            assert!(!valid_prefix(bad), "{bad}");
        }
    }
}
