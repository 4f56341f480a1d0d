//! Command-line parsing for `grove-vmm` (hand-written: a few flags, exact errors).

use std::time::Duration;

use grove_vmm_api::{GuestNet, GuestRefresh};

use crate::api_server::ApiConfig;
use crate::builder::{MemMode, VmConfig};
use crate::devices::manager::RestoreOverrides;
use crate::devices::virtio::block::disk::DiskSpec;
use crate::devices::virtio::net::NetConfig;
use crate::devices::virtio::vsock::device::VsockConfig;
use crate::seccomp::Mode;

/// Usage text.
pub const USAGE: &str = "usage:
  grove-vmm run --kernel PATH [--initrd PATH] [--cmdline STR] [--vcpus N] [--mem-mib N]
                [--serial stdout|PATH] [--rng] [--disk DISK]... [--net NET]
                [--vsock-uds PATH [--vsock-cid N]] [--api-sock PATH] [API LIMITS]
  grove-vmm restore --snapshot DIR [--mem-mode mmap|uffd] [--api-sock PATH] [--identity N]
                [--serial stdout|PATH] [--disk-dir DIR] [--net NET] [--vsock-uds PATH]
                [--vsock-cid N] [GUEST] [API LIMITS]
  grove-vmm standby --api-sock PATH [--vcpus N] [--mem-mib N] [--serial stdout|PATH]
                [--disk-dir DIR] [--net NET] [API LIMITS]
  grove-vmm api --api-sock PATH JSON     (one control request; the reply on stdout)
  grove-vmm check-host [--json]
run, restore and standby also take --seccomp off|log|kill (default: $GROVE_SECCOMP, else
  kill): each thread kind's seccomp filter; a forbidden syscall ends the process with one
  line and status 159 (kill), is only logged by the kernel (log), or nothing is filtered (off).
API LIMITS: [--api-max-conns N] (default 16) [--api-idle-ms N] (default 600000): control
  connections open at once, and how long one may stay idle before it is closed.
--rng: a virtio-rng device (virtio-mmio, described in ACPI and on the command line).
--disk IMAGE,layer=STEM[,id=NAME] | IMAGE,ro[,id=NAME]: a virtio-blk disk (repeat for more,
  at most 8; the first is /dev/vda). IMAGE is a raw image, never written; a writable disk
  writes into the layer STEM.data + STEM.idx (created empty, or reused if empty). NAME
  (default disk<N>) is the serial the guest reads and names the disk's frozen layers in
  snapshot directories (disk-NAME.data, .idx: a snapshot moves the layer there and the VM
  continues on a new one at STEM).
--disk-dir DIR: where a restored VM's writable disks get their own new layers (DIR/NAME.*).
--vsock-uds PATH: a virtio-vsock device; host programs connect to PATH and send
  \"CONNECT <port>\\n\" (answer \"OK <n>\\n\"); guest connections to host port P reach PATH_P.
  --vsock-cid: the guest's context id (default 3). A restored VM needs its own --vsock-uds.
GUEST (restore): before the restore is reported done (the control socket then appears), the
  guest gets the host's wall clock and fresh entropy (RNG reseeded), unless --deterministic
  (same clock base, no reseed); --hostname NAME; --guest-net IFACE,ADDR/PREFIX[,GATEWAY];
  --guest-timeout-ms N (default 10000): how long to wait for its answer.
--net NET: a virtio-net device on a tap, NET = tap=NAME[,netns=PATH|NAME][,mac=XX:..:XX]
  [,queue-size=N][,offload=on|off][,mtu=N][,rx-rate=B][,rx-burst=B][,rx-pps=N][,tx-rate=B]
  [,tx-burst=B][,tx-pps=N]: the tap (in the network namespace at PATH, or /run/netns/NAME),
  the guest's MAC (default 02:67:72:00:00:02), queue size (default 256), checksum/TSO offloads
  (default on), the MTU told to the guest; rates in bytes (frames) per second per direction
  (rx: to the guest), k/M/G = 10^3/10^6/10^9. On restore and standby, mac/queue-size/offload/
  mtu come from the snapshot (a value given must match it).";

/// Errors in the arguments.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// Unknown flag.
    #[error("unknown flag {0} (see grove-vmm --help)")]
    UnknownFlag(String),
    /// Flag without a value.
    #[error("{0} needs a value")]
    MissingValue(String),
    /// Required flag absent.
    #[error("{0} is required")]
    Required(&'static str),
    /// A value that does not parse.
    #[error("bad value for {flag}: {value:?} ({why})")]
    BadValue {
        /// Flag.
        flag: String,
        /// Value given.
        value: String,
        /// Why.
        why: String,
    },
    /// Flag given twice.
    #[error("{0} given twice")]
    Twice(String),
}

/// Flags that take no value.
const SWITCHES: &[&str] = &["--rng", "--deterministic"];

/// Flags that may be given more than once.
const REPEATABLE: &[&str] = &["--disk"];

/// The control-socket limit flags every command with a socket takes.
const API_FLAGS: [&str; 2] = ["--api-max-conns", "--api-idle-ms"];

/// Applies an API limit flag; false if `f` is not one.
fn api_flag(cfg: &mut ApiConfig, f: &str, v: &str) -> Result<bool, CliError> {
    match f {
        "--api-max-conns" => {
            cfg.max_connections = number(f, v)?;
            if cfg.max_connections == 0 {
                return Err(CliError::BadValue {
                    flag: f.into(),
                    value: v.into(),
                    why: "at least 1".into(),
                });
            }
        }
        "--api-idle-ms" => cfg.idle_timeout = Duration::from_millis(number(f, v)?),
        _ => return Ok(false),
    }
    Ok(true)
}

/// `run` arguments.
#[derive(Debug, Clone)]
pub struct RunArgs {
    /// The VM.
    pub vm: VmConfig,
    /// Control socket.
    pub api_sock: Option<String>,
    /// Control socket limits.
    pub api: ApiConfig,
}

/// `restore` arguments.
#[derive(Debug, Clone)]
pub struct RestoreArgs {
    /// Snapshot directory.
    pub snapshot: String,
    /// Memory mode.
    pub mem_mode: MemMode,
    /// Control socket.
    pub api_sock: Option<String>,
    /// Identity value for port 0x444.
    pub identity: u32,
    /// Serial sink.
    pub serial: String,
    /// Where writable disks get their new layers.
    pub disk_dir: Option<String>,
    /// Control socket limits.
    pub api: ApiConfig,
    /// Host-side resources of the restored VM (its vsock socket and cid).
    pub overrides: RestoreOverrides,
    /// What the guest is told after the restore.
    pub guest: GuestRefresh,
    /// The snapshot's virtio-net tap.
    pub net: Option<NetConfig>,
}

/// `standby` arguments.
#[derive(Debug, Clone)]
pub struct StandbyArgs {
    /// Control socket (required: the restore request comes through it).
    pub api_sock: String,
    /// vCPU count of the snapshots it will take.
    pub vcpus: u8,
    /// Memory size (MiB) of the snapshots it will take.
    pub mem_mib: u64,
    /// Serial sink.
    pub serial: String,
    /// Where writable disks of the restored VM get their new layers.
    pub disk_dir: Option<String>,
    /// Control socket limits.
    pub api: ApiConfig,
    /// The tap for the snapshots' virtio-net device (opened at once).
    pub net: Option<NetConfig>,
}

/// Parses a `--net` value.
fn net(flag: &str, v: &str) -> Result<NetConfig, CliError> {
    NetConfig::parse(v).map_err(|e| CliError::BadValue {
        flag: flag.into(),
        value: v.into(),
        why: e.to_string(),
    })
}

/// Parses the arguments after `standby`.
pub fn parse_standby(args: &[String]) -> Result<StandbyArgs, CliError> {
    let known = [
        "--api-sock",
        "--vcpus",
        "--mem-mib",
        "--serial",
        "--disk-dir",
        "--net",
        API_FLAGS[0],
        API_FLAGS[1],
    ];
    let d = VmConfig::default();
    let mut a = StandbyArgs {
        api_sock: String::new(),
        vcpus: d.vcpus,
        mem_mib: d.mem_mib,
        serial: d.serial,
        disk_dir: None,
        api: ApiConfig::default(),
        net: None,
    };
    let mut sock = None;
    for (f, v) in pairs(args, &known)? {
        if api_flag(&mut a.api, &f, &v)? {
            continue;
        }
        match f.as_str() {
            "--api-sock" => sock = Some(non_empty(&f, v)?),
            "--vcpus" => a.vcpus = number(&f, &v)?,
            "--mem-mib" => a.mem_mib = number(&f, &v)?,
            "--serial" => a.serial = non_empty(&f, v)?,
            "--disk-dir" => a.disk_dir = Some(non_empty(&f, v)?),
            "--net" => a.net = Some(net(&f, &v)?),
            _ => return Err(CliError::UnknownFlag(f)),
        }
    }
    a.api_sock = sock.ok_or(CliError::Required("--api-sock"))?;
    Ok(a)
}

/// Takes `--seccomp MODE` (or `--seccomp=MODE`) out of a command's arguments: the mode
/// (else `$GROVE_SECCOMP`, else `kill`) and the other arguments, in order.
pub fn take_seccomp(args: &[String]) -> Result<(Mode, Vec<String>), CliError> {
    let bad = |v: &str, e: crate::seccomp::SeccompError| CliError::BadValue {
        flag: "--seccomp".into(),
        value: v.into(),
        why: e.to_string(),
    };
    let mut given: Option<String> = None;
    let mut rest = Vec::with_capacity(args.len());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = if a == "--seccomp" {
            it.next().cloned().ok_or_else(|| CliError::MissingValue(a.clone()))?
        } else if let Some(v) = a.strip_prefix("--seccomp=") {
            v.to_string()
        } else {
            rest.push(a.clone());
            // A flag's separate value is never taken for a flag.
            if a.starts_with("--") && !a.contains('=') && !SWITCHES.contains(&a.as_str()) {
                rest.extend(it.next().cloned());
            }
            continue;
        };
        if given.replace(value).is_some() {
            return Err(CliError::Twice("--seccomp".into()));
        }
    }
    let mode = match given {
        Some(v) => Mode::parse(&v).map_err(|e| bad(&v, e))?,
        None => match std::env::var(crate::seccomp::MODE_ENV) {
            Ok(v) if !v.is_empty() => Mode::parse(&v).map_err(|e| bad(&v, e))?,
            // On by default (docs/security.md §4).
            _ => Mode::Kill,
        },
    };
    Ok((mode, rest))
}

/// Splits `--flag value` / `--flag=value` pairs, rejecting unknown or repeated flags.
fn pairs(args: &[String], known: &[&str]) -> Result<Vec<(String, String)>, CliError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        if !known.contains(&flag.as_str()) {
            return Err(CliError::UnknownFlag(flag));
        }
        let value = match inline {
            Some(v) => v,
            None if SWITCHES.contains(&flag.as_str()) => String::new(),
            None => it.next().cloned().ok_or_else(|| CliError::MissingValue(flag.clone()))?,
        };
        if !REPEATABLE.contains(&flag.as_str()) && out.iter().any(|(f, _)| *f == flag) {
            return Err(CliError::Twice(flag));
        }
        out.push((flag, value));
    }
    Ok(out)
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, CliError>
where
    T::Err: std::fmt::Display,
{
    v.parse::<T>().map_err(|e| CliError::BadValue {
        flag: flag.to_string(),
        value: v.to_string(),
        why: e.to_string(),
    })
}

fn non_empty(flag: &str, v: String) -> Result<String, CliError> {
    if v.is_empty() {
        return Err(CliError::BadValue { flag: flag.to_string(), value: v, why: "empty".into() });
    }
    Ok(v)
}

/// A vsock context id flag.
fn cid(flag: &str, v: &str) -> Result<u64, CliError> {
    let c: u64 = number(flag, v)?;
    crate::devices::virtio::vsock::device::check_cid(c).map_err(|e| CliError::BadValue {
        flag: flag.into(),
        value: v.into(),
        why: e.to_string(),
    })
}

/// `--net IFACE,ADDR/PREFIX[,GATEWAY]`.
fn guest_net(flag: &str, v: &str) -> Result<GuestNet, CliError> {
    let parts: Vec<&str> = v.split(',').collect();
    match parts.as_slice() {
        [iface, address] | [iface, address, _] => Ok(GuestNet {
            iface: (*iface).into(),
            address: (*address).into(),
            gateway: parts.get(2).map(|g| (*g).to_string()).unwrap_or_default(),
        }),
        _ => Err(CliError::BadValue {
            flag: flag.into(),
            value: v.into(),
            why: "IFACE,ADDR/PREFIX[,GATEWAY]".into(),
        }),
    }
}

/// Parses the arguments after `run`.
pub fn parse_run(args: &[String]) -> Result<RunArgs, CliError> {
    let known = [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--vcpus",
        "--mem-mib",
        "--serial",
        "--api-sock",
        "--rng",
        "--disk",
        "--vsock-uds",
        "--vsock-cid",
        "--net",
        API_FLAGS[0],
        API_FLAGS[1],
    ];
    let mut vm = VmConfig::default();
    let mut vsock_uds = None;
    let mut vsock_cid = None;
    let mut api_sock = None;
    let mut api = ApiConfig::default();
    let mut kernel = None;
    for (f, v) in pairs(args, &known)? {
        if api_flag(&mut api, &f, &v)? {
            continue;
        }
        match f.as_str() {
            "--kernel" => kernel = Some(non_empty(&f, v)?),
            "--initrd" => vm.initrd = Some(non_empty(&f, v)?),
            "--cmdline" => vm.cmdline = Some(v),
            "--vcpus" => vm.vcpus = number(&f, &v)?,
            "--mem-mib" => vm.mem_mib = number(&f, &v)?,
            "--serial" => vm.serial = non_empty(&f, v)?,
            "--api-sock" => api_sock = Some(non_empty(&f, v)?),
            "--rng" if v.is_empty() => vm.rng = true,
            "--rng" => {
                return Err(CliError::BadValue { flag: f, value: v, why: "takes no value".into() })
            }
            "--disk" => {
                let d = DiskSpec::parse(&v, vm.disks.len()).map_err(|e| CliError::BadValue {
                    flag: f.clone(),
                    value: v.clone(),
                    why: crate::one_line(&e),
                })?;
                vm.disks.push(d);
            }
            "--vsock-uds" => vsock_uds = Some(non_empty(&f, v)?),
            "--vsock-cid" => vsock_cid = Some(cid(&f, &v)?),
            "--net" => vm.net = Some(net(&f, &v)?),
            _ => return Err(CliError::UnknownFlag(f)),
        }
    }
    vm.kernel = kernel.ok_or(CliError::Required("--kernel"))?;
    vm.vsock = match (vsock_uds, vsock_cid) {
        (Some(uds), c) => Some(VsockConfig {
            cid: c.unwrap_or(crate::devices::virtio::vsock::MIN_GUEST_CID),
            uds: uds.into(),
        }),
        (None, Some(_)) => return Err(CliError::Required("--vsock-uds (with --vsock-cid)")),
        (None, None) => None,
    };
    Ok(RunArgs { vm, api_sock, api })
}

/// Parses the arguments after `restore`.
pub fn parse_restore(args: &[String]) -> Result<RestoreArgs, CliError> {
    let known = [
        "--snapshot",
        "--mem-mode",
        "--api-sock",
        "--identity",
        "--serial",
        "--disk-dir",
        "--vsock-uds",
        "--vsock-cid",
        "--deterministic",
        "--hostname",
        "--guest-net",
        "--guest-timeout-ms",
        "--net",
        API_FLAGS[0],
        API_FLAGS[1],
    ];
    let mut snapshot = None;
    let mut r = RestoreArgs {
        snapshot: String::new(),
        mem_mode: MemMode::Mmap,
        api_sock: None,
        identity: 0,
        serial: "stdout".into(),
        disk_dir: None,
        api: ApiConfig::default(),
        overrides: RestoreOverrides::default(),
        guest: GuestRefresh::default(),
        net: None,
    };
    for (f, v) in pairs(args, &known)? {
        if api_flag(&mut r.api, &f, &v)? {
            continue;
        }
        match f.as_str() {
            "--snapshot" => snapshot = Some(non_empty(&f, v)?),
            "--mem-mode" => {
                r.mem_mode = match v.as_str() {
                    "mmap" => MemMode::Mmap,
                    "uffd" => MemMode::Uffd,
                    _ => {
                        return Err(CliError::BadValue {
                            flag: f,
                            value: v,
                            why: "mmap or uffd".into(),
                        })
                    }
                }
            }
            "--api-sock" => r.api_sock = Some(non_empty(&f, v)?),
            "--identity" => r.identity = number(&f, &v)?,
            "--serial" => r.serial = non_empty(&f, v)?,
            "--disk-dir" => r.disk_dir = Some(non_empty(&f, v)?),
            "--vsock-uds" => r.overrides.vsock_uds = Some(non_empty(&f, v)?.into()),
            "--vsock-cid" => r.overrides.vsock_cid = Some(cid(&f, &v)?),
            "--deterministic" if v.is_empty() => r.guest.deterministic = true,
            "--hostname" => r.guest.hostname = Some(v),
            "--guest-net" => r.guest.net = Some(guest_net(&f, &v)?),
            "--net" => r.net = Some(net(&f, &v)?),
            "--guest-timeout-ms" => r.guest.timeout_ms = Some(number(&f, &v)?),
            _ => return Err(CliError::BadValue { flag: f, value: v, why: "unexpected".into() }),
        }
    }
    r.snapshot = snapshot.ok_or(CliError::Required("--snapshot"))?;
    r.guest.validate().map_err(|why| CliError::BadValue {
        flag: "guest refresh".into(),
        value: String::new(),
        why,
    })?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_string()).collect()
    }

    #[test]
    fn run_flags_parse() {
        let a = parse_run(&s(&[
            "--kernel",
            "k",
            "--cmdline",
            "a b=c",
            "--vcpus=2",
            "--mem-mib",
            "4096",
            "--serial",
            "/tmp/x",
        ]))
        .unwrap();
        assert_eq!(a.vm.kernel, "k");
        assert_eq!(a.vm.cmdline.as_deref(), Some("a b=c"));
        assert_eq!((a.vm.vcpus, a.vm.mem_mib), (2, 4096));
        assert_eq!(a.vm.serial, "/tmp/x");
        assert!(a.api_sock.is_none());
    }

    #[test]
    fn seccomp_flag_is_taken_out() {
        let (m, rest) =
            take_seccomp(&s(&["--kernel", "k", "--seccomp", "log", "--rng", "--vcpus=2"])).unwrap();
        assert_eq!(m, Mode::Log);
        assert_eq!(rest, s(&["--kernel", "k", "--rng", "--vcpus=2"]));
        let (m, rest) = take_seccomp(&s(&["--seccomp=off", "--cmdline", "--seccomp"])).unwrap();
        assert_eq!(m, Mode::Off);
        // The value of --cmdline stays a value.
        assert_eq!(rest, s(&["--cmdline", "--seccomp"]));
        assert!(matches!(
            take_seccomp(&s(&["--seccomp", "on"])).unwrap_err(),
            CliError::BadValue { .. }
        ));
        assert!(matches!(take_seccomp(&s(&["--seccomp"])).unwrap_err(), CliError::MissingValue(_)));
        assert!(matches!(
            take_seccomp(&s(&["--seccomp", "log", "--seccomp=kill"])).unwrap_err(),
            CliError::Twice(_)
        ));
    }

    #[test]
    fn run_errors() {
        assert_eq!(parse_run(&s(&[])).unwrap_err(), CliError::Required("--kernel"));
        assert!(matches!(
            parse_run(&s(&["--kernel", "k", "--bogus", "1"])).unwrap_err(),
            CliError::UnknownFlag(_)
        ));
        assert!(matches!(parse_run(&s(&["--kernel"])).unwrap_err(), CliError::MissingValue(_)));
        assert!(matches!(
            parse_run(&s(&["--kernel", "k", "--vcpus", "-1"])).unwrap_err(),
            CliError::BadValue { .. }
        ));
        assert!(matches!(
            parse_run(&s(&["--kernel", "k", "--mem-mib", "lots"])).unwrap_err(),
            CliError::BadValue { .. }
        ));
        assert!(matches!(
            parse_run(&s(&["--kernel", "k", "--kernel", "j"])).unwrap_err(),
            CliError::Twice(_)
        ));
        // Sizes are checked by VmConfig::validate.
        let a = parse_run(&s(&["--kernel", "k", "--vcpus", "0"])).unwrap();
        assert!(a.vm.validate().is_err());
        let a = parse_run(&s(&["--kernel", "k", "--mem-mib", "1"])).unwrap();
        assert!(a.vm.validate().is_err());
    }

    #[test]
    fn restore_flags_parse() {
        let r = parse_restore(&s(&["--snapshot", "d", "--mem-mode", "uffd", "--identity", "5"]))
            .unwrap();
        assert_eq!((r.snapshot.as_str(), r.mem_mode, r.identity), ("d", MemMode::Uffd, 5));
        assert!(parse_restore(&s(&["--snapshot", "d", "--mem-mode", "x"])).is_err());
        assert!(parse_restore(&s(&[])).is_err());
    }

    #[test]
    fn vsock_and_guest_refresh_flags() {
        let a = parse_run(&s(&["--kernel", "k", "--vsock-uds", "/v.sock"])).unwrap();
        assert_eq!(a.vm.vsock, Some(VsockConfig { cid: 3, uds: "/v.sock".into() }));
        let a =
            parse_run(&s(&["--kernel", "k", "--vsock-uds", "/v", "--vsock-cid", "42"])).unwrap();
        assert_eq!(a.vm.vsock.unwrap().cid, 42);
        assert!(parse_run(&s(&["--kernel", "k", "--vsock-cid", "42"])).is_err(), "no socket");
        for bad in ["0", "2", "4294967295", "x"] {
            assert!(
                parse_run(&s(&["--kernel", "k", "--vsock-uds", "/v", "--vsock-cid", bad])).is_err()
            );
        }
        let r = parse_restore(&s(&[
            "--snapshot",
            "d",
            "--vsock-uds",
            "/c.sock",
            "--hostname",
            "child-1",
            "--guest-net",
            "eth0,10.0.0.2/24,10.0.0.1",
            "--guest-timeout-ms",
            "5000",
        ]))
        .unwrap();
        assert_eq!(r.overrides.vsock_uds.as_deref(), Some(std::path::Path::new("/c.sock")));
        assert!(!r.guest.deterministic);
        assert_eq!(r.guest.hostname.as_deref(), Some("child-1"));
        assert_eq!(r.guest.net.as_ref().unwrap().gateway, "10.0.0.1");
        assert_eq!(r.guest.timeout_ms, Some(5000));
        let d = parse_restore(&s(&["--snapshot", "d", "--deterministic"])).unwrap();
        assert!(d.guest.deterministic && !d.guest.has_work());
        assert!(parse_restore(&s(&["--snapshot", "d", "--deterministic=1"])).is_err());
        assert!(parse_restore(&s(&["--snapshot", "d", "--hostname", "a b"])).is_err());
        assert!(parse_restore(&s(&["--snapshot", "d", "--guest-net", "eth0"])).is_err());
        assert!(parse_restore(&s(&["--snapshot", "d", "--guest-net", "eth0,10.0.0.2"])).is_err());
        assert!(parse_restore(&s(&["--snapshot", "d", "--guest-timeout-ms", "0"])).is_err());
    }

    #[test]
    fn rng_switch_and_api_limits() {
        let a = parse_run(&s(&["--kernel", "k", "--rng", "--api-max-conns", "3"])).unwrap();
        assert!(a.vm.rng);
        assert_eq!(a.api.max_connections, 3);
        assert_eq!(a.api.idle_timeout, ApiConfig::default().idle_timeout);
        assert!(!parse_run(&s(&["--kernel", "k"])).unwrap().vm.rng);
        assert!(parse_run(&s(&["--kernel", "k", "--rng=yes"])).is_err());
        assert!(parse_run(&s(&["--kernel", "k", "--api-max-conns", "0"])).is_err());
        let r = parse_restore(&s(&["--snapshot", "d", "--api-idle-ms", "250"])).unwrap();
        assert_eq!(r.api.idle_timeout, Duration::from_millis(250));
        let sb = parse_standby(&s(&["--api-sock", "p", "--api-idle-ms=1000"])).unwrap();
        assert_eq!(sb.api.idle_timeout, Duration::from_secs(1));
        assert!(parse_standby(&s(&["--api-sock", "p", "--rng"])).is_err());
    }

    #[test]
    fn disks_repeat_and_are_checked() {
        let a = parse_run(&s(&[
            "--kernel",
            "k",
            "--disk",
            "/r.img,layer=/v/root,id=root",
            "--disk=/m.img,ro",
        ]))
        .unwrap();
        assert_eq!(a.vm.disks.len(), 2);
        assert_eq!((a.vm.disks[0].id.as_str(), a.vm.disks[0].read_only), ("root", false));
        assert_eq!((a.vm.disks[1].id.as_str(), a.vm.disks[1].read_only), ("disk1", true));
        let e = parse_run(&s(&["--kernel", "k", "--disk", "/r.img"])).unwrap_err();
        assert!(e.to_string().contains("layer=STEM"), "{e}");
        assert!(parse_run(&s(&["--kernel", "k", "--disk", "/r.img,ro,id=a b"])).is_err());
        assert!(parse_run(&s(&["--kernel", "k", "--disk-dir", "/d"])).is_err(), "restore only");
        let r = parse_restore(&s(&["--snapshot", "d", "--disk-dir", "/v/c1"])).unwrap();
        assert_eq!(r.disk_dir.as_deref(), Some("/v/c1"));
        assert!(
            parse_restore(&s(&["--snapshot", "d", "--disk-dir", "a", "--disk-dir", "b"])).is_err()
        );
        let sb = parse_standby(&s(&["--api-sock", "p", "--disk-dir", "/v/s"])).unwrap();
        assert_eq!(sb.disk_dir.as_deref(), Some("/v/s"));
    }

    #[test]
    fn net_option_on_every_command() {
        let a =
            parse_run(&s(&["--kernel", "k", "--net", "tap=tap0,netns=gs1,mac=02:00:00:00:00:07"]))
                .unwrap();
        let n = a.vm.net.unwrap();
        assert_eq!((n.tap.as_str(), n.mac), ("tap0", Some([2, 0, 0, 0, 0, 7])));
        let r = parse_restore(&s(&["--snapshot", "d", "--net=tap=t1,tx-rate=10M"])).unwrap();
        assert_eq!(r.net.unwrap().tx.bytes.unwrap().rate, 10_000_000);
        let sb = parse_standby(&s(&["--api-sock", "p", "--net", "tap=t2"])).unwrap();
        assert_eq!(sb.net.unwrap().tap, "t2");
        assert!(parse_run(&s(&["--kernel", "k"])).unwrap().vm.net.is_none());
        let e = parse_run(&s(&["--kernel", "k", "--net", "tap=a,mtu=1"])).unwrap_err();
        assert!(matches!(e, CliError::BadValue { .. }));
        assert!(e.to_string().contains("mtu=1"), "{e}");
        assert!(matches!(
            parse_run(&s(&["--kernel", "k", "--net", "tap=a", "--net", "tap=b"])).unwrap_err(),
            CliError::Twice(_)
        ));
    }
}
