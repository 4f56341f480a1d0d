//! The slot dataplane: the eBPF programs of `bpf/slot.c` (compiled by build.rs),
//! loaded and attached with aya (tc clsact, direct action, netlink cls_bpf so the
//! attachment outlives netd), their maps pinned under `<pin root>/<slot>/`, and
//! typed access to those maps: configuration, policy, rate limits, counters,
//! denials. [`test_run`] drives a program with `BPF_PROG_TEST_RUN`.

pub mod maps;

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues, RingBuf};
use aya::programs::tc::{self, NlOptions, SchedClassifier, TcAttachOptions, TcAttachType};
use aya::programs::ProgramError;
use aya::{Ebpf, EbpfLoader};
use serde::{Deserialize, Serialize};

use maps::{Bucket, CidrVal, DenialRaw, DynVal, PortKey, PortVal, SlotCfg};

/// The slot programs' object file.
pub static SLOT_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/slot.o"));
/// A program the verifier refuses, for tests of load errors.
pub static BAD_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bad.o"));
/// On the tap's tc ingress: frames from the guest.
pub const EGRESS_PROGRAM: &str = "grove_egress";
/// On the slot-side veth's tc ingress: frames for the guest.
pub const INGRESS_PROGRAM: &str = "grove_ingress";
/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Errors of the dataplane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("cannot parse or set up the BPF object")]
    Object(#[source] aya::EbpfError),
    #[error("BPF program {0} is not in the object")]
    MissingProgram(&'static str),
    #[error("the kernel refused BPF program {program}: {reason}")]
    ProgramLoad {
        program: &'static str,
        /// The verifier's last words (the full log is in `log`).
        reason: String,
        log: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load BPF program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot add the clsact qdisc on {iface}")]
    Qdisc {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot attach {program} to {iface}")]
    Attach {
        program: &'static str,
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("pinned map {map} under {dir}")]
    Map {
        map: &'static str,
        dir: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{what}: {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("BPF_PROG_TEST_RUN failed")]
    TestRun(#[source] std::io::Error),
}

/// Mounts bpffs on /sys/fs/bpf if nothing is mounted there yet.
pub fn ensure_bpffs() -> Result<(), DataplaneError> {
    let st = nix::sys::statfs::statfs(BPFFS).map_err(|e| DataplaneError::Io {
        what: "statfs",
        path: BPFFS.into(),
        source: e.into(),
    })?;
    if st.filesystem_type().0 == 0xcafe_4a11 {
        return Ok(());
    }
    nix::mount::mount(Some("bpf"), BPFFS, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| DataplaneError::Io {
            what: "mount bpffs",
            path: BPFFS.into(),
            source: e.into(),
        })
}

/// The verifier's reason: the last meaningful lines of its log (the ones that
/// are not instruction dumps or statistics).
fn verifier_reason(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with("processed ")
                && !l.starts_with("verification time")
                && !l.starts_with("stack depth")
                && !l.starts_with("-- ")
                && !l.starts_with(';')
                && !l.split(':').next().is_some_and(|p| p.chars().all(|c| c.is_ascii_digit()))
        })
        .collect();
    let tail = &lines[lines.len().saturating_sub(2)..];
    if tail.is_empty() {
        "no verifier log (see the io error)".to_string()
    } else {
        tail.join(" / ")
    }
}

/// Loads the object's programs into the kernel, its maps pinned (or reused if
/// already pinned) under `pin_dir`. Nothing is attached.
pub fn load(
    object: &[u8],
    pin_dir: &Path,
    programs: &[&'static str],
) -> Result<Ebpf, DataplaneError> {
    ensure_bpffs()?;
    std::fs::create_dir_all(pin_dir).map_err(|source| DataplaneError::Io {
        what: "create the pin directory",
        path: pin_dir.into(),
        source,
    })?;
    let mut bpf =
        EbpfLoader::new().map_pin_path(pin_dir).load(object).map_err(DataplaneError::Object)?;
    for &name in programs {
        let prog: &mut SchedClassifier = bpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { program: name, source })?;
        match prog.load() {
            Ok(()) => {}
            Err(ProgramError::LoadError { io_error, verifier_log }) => {
                let log = verifier_log.to_string();
                return Err(DataplaneError::ProgramLoad {
                    program: name,
                    reason: verifier_reason(&log),
                    log,
                    source: io_error,
                });
            }
            Err(source) => return Err(DataplaneError::Program { program: name, source }),
        }
    }
    Ok(bpf)
}

/// Attaches the loaded `program` to `iface`'s tc ingress (clsact qdisc, netlink
/// cls_bpf in direct-action mode) in the calling thread's namespace. The
/// attachment is left to the kernel: it lasts as long as the device, whatever
/// happens to this process.
pub fn attach_ingress(
    bpf: &mut Ebpf,
    program: &'static str,
    iface: &str,
) -> Result<(), DataplaneError> {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(source) => return Err(DataplaneError::Qdisc { iface: iface.to_string(), source }),
    }
    let prog: &mut SchedClassifier = bpf
        .program_mut(program)
        .ok_or(DataplaneError::MissingProgram(program))?
        .try_into()
        .map_err(|source| DataplaneError::Program { program, source })?;
    let attach_err = |source| DataplaneError::Attach { program, iface: iface.to_string(), source };
    let opts = TcAttachOptions::Netlink(NlOptions { priority: 1, handle: 1 });
    let id = prog.attach_with_options(iface, TcAttachType::Ingress, opts).map_err(attach_err)?;
    let link = prog.take_link(id).map_err(attach_err)?;
    // Dropping the link would detach the filter; the device owns it from now on.
    std::mem::forget(link);
    Ok(())
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Truncated or invalid IPv4/TCP/UDP header, bad IPv4 header checksum.
    Malformed,
    /// A source MAC or IPv4 address that is not the guest's.
    Spoof,
    /// IPv6 (the dataplane routes IPv4 only).
    Ipv6,
    /// Neither IPv4 nor ARP.
    NotIp,
    /// DNS to a server other than the slot's resolver.
    Dns,
    /// The policy (a rule or the default action).
    Policy,
    /// The rate limit.
    Rate,
    /// The slot is not configured (between release and take).
    Unconfigured,
}

impl DropReason {
    /// All reasons, in counter order.
    pub const ALL: [DropReason; maps::NUM_REASONS] = [
        Self::Malformed,
        Self::Spoof,
        Self::Ipv6,
        Self::NotIp,
        Self::Dns,
        Self::Policy,
        Self::Rate,
        Self::Unconfigured,
    ];

    fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v)).copied()
    }
}

/// Packets seen in one direction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DirCounters {
    /// Packets and bytes passed (after NAT, including the Ethernet header).
    pub packets: u64,
    pub bytes: u64,
    /// Drops by reason, in [`DropReason::ALL`] order.
    pub drops: [u64; maps::NUM_REASONS],
}

impl DirCounters {
    /// Drops for one reason.
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }
}

/// A slot's counters, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub egress: DirCounters,
    pub ingress: DirCounters,
    /// Denials the ring buffer had no room for.
    pub log_lost: u64,
}

/// Direction of a packet, from the guest's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Egress,
    Ingress,
}

/// One denied packet, as the program logged it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PacketDenial {
    /// CLOCK_MONOTONIC nanoseconds.
    pub time_ns: u64,
    pub direction: Direction,
    /// Destination (egress) or source (ingress).
    pub remote: Ipv4Addr,
    /// Remote port, 0 when there is none.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    pub reason: DropReason,
    /// Rule id as stored in the maps (see [`crate::policy::RuleRef`]).
    pub rule_id: u32,
}

/// Typed handles on a slot's pinned maps.
pub struct SlotMaps {
    dir: PathBuf,
    cfg: Array<MapData, SlotCfg>,
    cidr: LpmTrie<MapData, u32, CidrVal>,
    dyn_allow: HashMap<MapData, u32, DynVal>,
    expose: HashMap<MapData, PortKey, PortVal>,
    expose_rev: HashMap<MapData, PortKey, PortVal>,
    rate: Array<MapData, Bucket>,
    stats: PerCpuArray<MapData, u64>,
    denials: RingBuf<MapData>,
}

/// Every map the slot object pins, for clean-up checks.
pub const MAP_NAMES: [&str; 8] =
    ["cfg", "cidr", "dyn_allow", "expose", "expose_rev", "rate", "stats", "denials"];

impl std::fmt::Debug for SlotMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotMaps").field("dir", &self.dir).finish()
    }
}

fn open_pinned<T: TryFrom<Map, Error = aya::maps::MapError>>(
    dir: &Path,
    name: &'static str,
    wrap: fn(MapData) -> Map,
) -> Result<T, DataplaneError> {
    let err = |source| DataplaneError::Map { map: name, dir: dir.into(), source };
    let data = MapData::from_pin(dir.join(name)).map_err(err)?;
    T::try_from(wrap(data)).map_err(err)
}

/// An IPv4 address as the programs store it (network byte order in memory).
pub fn ip_key(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

fn ip_of_key(k: u32) -> Ipv4Addr {
    Ipv4Addr::from(k.to_ne_bytes())
}

impl SlotMaps {
    /// Opens the maps pinned under `dir`.
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Self {
            dir: dir.to_path_buf(),
            cfg: open_pinned(dir, "cfg", Map::Array)?,
            cidr: open_pinned(dir, "cidr", Map::LpmTrie)?,
            dyn_allow: open_pinned(dir, "dyn_allow", Map::HashMap)?,
            expose: open_pinned(dir, "expose", Map::HashMap)?,
            expose_rev: open_pinned(dir, "expose_rev", Map::HashMap)?,
            rate: open_pinned(dir, "rate", Map::Array)?,
            stats: open_pinned(dir, "stats", Map::PerCpuArray)?,
            denials: open_pinned(dir, "denials", Map::RingBuf)?,
        })
    }

    fn err(&self, map: &'static str) -> impl FnOnce(aya::maps::MapError) -> DataplaneError + '_ {
        move |source| DataplaneError::Map { map, dir: self.dir.clone(), source }
    }

    /// The slot configuration.
    pub fn config(&self) -> Result<SlotCfg, DataplaneError> {
        self.cfg.get(&0, 0).map_err(self.err("cfg"))
    }

    /// Writes the slot configuration (takes effect on the next packet).
    pub fn set_config(&mut self, c: &SlotCfg) -> Result<(), DataplaneError> {
        let dir = self.dir.clone();
        self.cfg.set(0, c, 0).map_err(|source| DataplaneError::Map { map: "cfg", dir, source })
    }

    /// The CIDR entries: (address, prefix length) -> value.
    pub fn cidr_entries(&self) -> Result<Vec<(Ipv4Addr, u8, CidrVal)>, DataplaneError> {
        let mut out = Vec::new();
        for kv in self.cidr.iter() {
            let (k, v) = kv.map_err(self.err("cidr"))?;
            let len = u8::try_from(k.prefix_len()).unwrap_or(32);
            out.push((ip_of_key(k.data()), len, v));
        }
        Ok(out)
    }

    /// Inserts or replaces a CIDR entry.
    pub fn cidr_insert(
        &mut self,
        net: Ipv4Addr,
        len: u8,
        v: CidrVal,
    ) -> Result<(), DataplaneError> {
        let dir = self.dir.clone();
        self.cidr
            .insert(&Key::new(u32::from(len), ip_key(net)), v, 0)
            .map_err(|source| DataplaneError::Map { map: "cidr", dir, source })
    }

    /// Removes a CIDR entry (absent is fine).
    pub fn cidr_remove(&mut self, net: Ipv4Addr, len: u8) -> Result<(), DataplaneError> {
        match self.cidr.remove(&Key::new(u32::from(len), ip_key(net))) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DataplaneError::Map { map: "cidr", dir: self.dir.clone(), source }),
        }
    }

    /// Resolver-learnt addresses.
    pub fn dyn_entries(&self) -> Result<Vec<(Ipv4Addr, DynVal)>, DataplaneError> {
        let mut out = Vec::new();
        for kv in self.dyn_allow.iter() {
            let (k, v) = kv.map_err(self.err("dyn_allow"))?;
            out.push((ip_of_key(k), v));
        }
        Ok(out)
    }

    /// Allows `addr` until `expires_ns` (CLOCK_MONOTONIC).
    pub fn dyn_insert(&mut self, addr: Ipv4Addr, v: DynVal) -> Result<(), DataplaneError> {
        let dir = self.dir.clone();
        self.dyn_allow.insert(ip_key(addr), v, 0).map_err(|source| DataplaneError::Map {
            map: "dyn_allow",
            dir,
            source,
        })
    }

    /// Forgets a learnt address (absent is fine).
    pub fn dyn_remove(&mut self, addr: Ipv4Addr) -> Result<(), DataplaneError> {
        match self.dyn_allow.remove(&ip_key(addr)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => {
                Err(DataplaneError::Map { map: "dyn_allow", dir: self.dir.clone(), source })
            }
        }
    }

    /// Exposures as (proto, slot port, guest port), host byte order.
    pub fn exposures(&self) -> Result<Vec<(u8, u16, u16)>, DataplaneError> {
        let mut out = Vec::new();
        for kv in self.expose.iter() {
            let (k, v) = kv.map_err(self.err("expose"))?;
            out.push((k.proto, u16::from_be(k.port), u16::from_be(v.port)));
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Replaces the exposures with `list` of (proto, slot port, guest port).
    pub fn set_exposures(&mut self, list: &[(u8, u16, u16)]) -> Result<(), DataplaneError> {
        let key = |proto, port: u16| PortKey { proto, pad: 0, port: port.to_be() };
        let val = |port: u16| PortVal { port: port.to_be(), pad: 0 };
        let dir = self.dir.clone();
        let e = |map| {
            let dir = dir.clone();
            move |source| DataplaneError::Map { map, dir, source }
        };
        for &(p, slot_port, guest_port) in list {
            self.expose.insert(key(p, slot_port), val(guest_port), 0).map_err(e("expose"))?;
            self.expose_rev
                .insert(key(p, guest_port), val(slot_port), 0)
                .map_err(e("expose_rev"))?;
        }
        let stale: Vec<PortKey> = self
            .expose
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !list.iter().any(|&(p, s, _)| key(p, s) == *k))
            .collect();
        for k in stale {
            let _ = self.expose.remove(&k);
        }
        let stale: Vec<PortKey> = self
            .expose_rev
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !list.iter().any(|&(p, _, g)| key(p, g) == *k))
            .collect();
        for k in stale {
            let _ = self.expose_rev.remove(&k);
        }
        Ok(())
    }

    /// Sets the token bucket of a direction (`rate_bps` 0 = unlimited); the
    /// bucket starts full.
    pub fn set_rate(&mut self, dir: u8, rate_bps: u64, burst: u64) -> Result<(), DataplaneError> {
        let b = Bucket {
            lock: 0,
            pad: 0,
            rate_bps,
            burst,
            tokens: burst * 1_000_000_000,
            last_ns: monotonic_ns(),
        };
        let d = self.dir.clone();
        // BPF_F_LOCK: the update takes the value's spin lock.
        self.rate.set(u32::from(dir), b, 4).map_err(|source| DataplaneError::Map {
            map: "rate",
            dir: d,
            source,
        })
    }

    /// Counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DataplaneError> {
        let mut v = [0u64; maps::NUM_COUNTERS];
        for (i, slot) in v.iter_mut().enumerate() {
            let idx = u32::try_from(i).unwrap_or(u32::MAX);
            let per_cpu = self.stats.get(&idx, 0).map_err(self.err("stats"))?;
            *slot = per_cpu.iter().copied().fold(0u64, u64::wrapping_add);
        }
        let dir = |base: usize| DirCounters {
            packets: v[base],
            bytes: v[base + 1],
            drops: std::array::from_fn(|r| v[base + 2 + r]),
        };
        Ok(Counters { egress: dir(0), ingress: dir(maps::STRIDE), log_lost: v[maps::C_LOG_LOST] })
    }

    /// Zeroes the counters.
    pub fn reset_counters(&mut self) -> Result<(), DataplaneError> {
        let ncpus = aya::util::nr_cpus().map_err(|(_, source)| DataplaneError::Io {
            what: "count possible CPUs",
            path: "/sys/devices/system/cpu/possible".into(),
            source,
        })?;
        let dir = self.dir.clone();
        for i in 0..maps::NUM_COUNTERS {
            let zeros = PerCpuValues::try_from(vec![0u64; ncpus]).map_err(|source| {
                DataplaneError::Io { what: "per-CPU values", path: dir.clone(), source }
            })?;
            let idx = u32::try_from(i).unwrap_or(u32::MAX);
            self.stats.set(idx, zeros, 0).map_err(|source| DataplaneError::Map {
                map: "stats",
                dir: dir.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Takes every denial logged since the last call.
    pub fn drain_denials(&mut self) -> Vec<PacketDenial> {
        let mut out = Vec::new();
        while let Some(item) = self.denials.next() {
            let Some(raw) = DenialRaw::from_bytes(&item) else { continue };
            let Some(reason) = DropReason::from_u8(raw.reason) else { continue };
            out.push(PacketDenial {
                time_ns: raw.ts_ns,
                direction: if raw.dir == maps::DIR_EGRESS {
                    Direction::Egress
                } else {
                    Direction::Ingress
                },
                remote: ip_of_key(raw.addr),
                port: u16::from_be(raw.port),
                proto: raw.proto,
                reason,
                rule_id: raw.rule_id,
            });
        }
        out
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}

/// Result of one `BPF_PROG_TEST_RUN`.
#[derive(Debug, Clone)]
pub struct TestRunResult {
    /// The program's return value (`TC_ACT_*`).
    pub retval: u32,
    /// The packet as the program left it.
    pub data: Vec<u8>,
    /// Average run time per repetition, as the kernel measured it (ns).
    pub duration_ns: u32,
}

/// `TC_ACT_OK`.
pub const TC_ACT_OK: u32 = 0;
/// `TC_ACT_SHOT`.
pub const TC_ACT_SHOT: u32 = 2;
/// `TC_ACT_REDIRECT` (what `bpf_redirect` returns).
pub const TC_ACT_REDIRECT: u32 = 7;

/// Runs the loaded program `prog` on `data` `repeat` times (`BPF_PROG_TEST_RUN`);
/// redirects are not performed, only reported in the return value.
pub fn test_run(
    prog: BorrowedFd<'_>,
    data: &[u8],
    repeat: u32,
) -> Result<TestRunResult, DataplaneError> {
    // The `test` member of `union bpf_attr`, padded with zeros.
    #[repr(C)]
    #[derive(Default)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        pad: [u32; 5],
    }
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    let mut out = vec![0u8; data.len() + 256];
    let too_big = |_| DataplaneError::TestRun(std::io::Error::from_raw_os_error(libc::E2BIG));
    let mut attr = TestAttr {
        prog_fd: u32::try_from(prog.as_raw_fd())
            .map_err(|_| DataplaneError::TestRun(std::io::Error::from_raw_os_error(libc::EBADF)))?,
        data_size_in: u32::try_from(data.len()).map_err(too_big)?,
        data_size_out: u32::try_from(out.len()).map_err(too_big)?,
        data_in: data.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..TestAttr::default()
    };
    // SAFETY: bpf(BPF_PROG_TEST_RUN) reads `attr` (size passed) and the
    // `data_size_in` bytes at `data_in`, and writes at most `data_size_out` bytes
    // at `data_out`; both buffers are alive and sized as stated for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<TestAttr>(),
        )
    };
    if rc < 0 {
        return Err(DataplaneError::TestRun(std::io::Error::last_os_error()));
    }
    let n = usize::try_from(attr.data_size_out).unwrap_or(0).min(out.len());
    out.truncate(n);
    Ok(TestRunResult { retval: attr.retval, data: out, duration_ns: attr.duration })
}

/// The fd of a loaded program of `bpf`.
pub fn program_fd<'a>(bpf: &'a Ebpf, name: &'static str) -> Result<BorrowedFd<'a>, DataplaneError> {
    let prog: &SchedClassifier = bpf
        .program(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program { program: name, source })?;
    let fd = prog.fd().map_err(|source| DataplaneError::Program { program: name, source })?;
    Ok(fd.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_reason_keeps_the_last_words() {
        let log =
            "0: R1=ctx() R10=fp0\n; return data[20]; @ bad.c:14\n1: (71) r1 = *(u8 *)(r2 +20)\n\
                   invalid access to packet, off=20 size=1, R2(id=0,off=20,r=0)\n\
                   R2 offset is outside of the packet\nprocessed 3 insns (limit 1000000)\n";
        let r = verifier_reason(log);
        assert!(r.contains("invalid access to packet"), "{r}");
        assert!(r.contains("outside of the packet"), "{r}");
        assert!(!r.contains("processed"), "{r}");
    }
}
