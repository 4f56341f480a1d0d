//! `grove-vmm check-host`: what this host offers Grove, and why each thing matters.
//!
//! Every check reads the host as it is (device nodes, `/sys`, `/proc`, the kernel
//! config, one KVM ioctl per capability) and never changes it. The decisions are
//! plain functions of what was read, so they are unit-tested with made-up inputs.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::Path;

use serde::Serialize;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Present and usable.
    Ok,
    /// Present, but with a limit worth knowing.
    Warn,
    /// Absent: the features that need it are off on this host.
    Missing,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Missing => "missing",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What it means for Grove.
    pub why: &'static str,
}

/// The kind of KVM behind `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvmKind {
    /// Intel VT-x on bare metal.
    HardwareVmx,
    /// AMD-V on bare metal.
    HardwareSvm,
    /// VT-x or AMD-V exposed to this host by an outer hypervisor (nested, still hardware-assisted).
    NestedHardware,
    /// No VMX/SVM: a paravirtual KVM such as `kvm_pvm`, itself inside another VM.
    NestedParavirtual,
    /// `/dev/kvm` is there but the module behind it is not recognised.
    Unknown,
    /// No usable `/dev/kvm`.
    Absent,
}

impl KvmKind {
    /// What the kind means for Grove, in one sentence.
    pub fn meaning(self) -> &'static str {
        match self {
            KvmKind::HardwareVmx | KvmKind::HardwareSvm => {
                "hardware virtualisation: Linux guests boot and run at native speed"
            }
            KvmKind::NestedHardware => {
                "nested hardware virtualisation: Linux guests run, exits cost more than on bare metal"
            }
            KvmKind::NestedParavirtual => {
                "paravirtual nested KVM (no VMX/SVM): guest CPL3 runs natively but CPL0 is emulated \
                 (~1000x slower), so a stock Linux kernel does not boot in useful time; use the test \
                 guest here and a hardware-KVM host for Linux guests"
            }
            KvmKind::Unknown => "KVM of an unrecognised kind: expect it to work, measure before trusting",
            KvmKind::Absent => "no KVM: grove-vmm cannot run guests on this host",
        }
    }
}

/// What the host offers for KVM.
#[derive(Debug, Clone, Serialize)]
pub struct KvmReport {
    pub kind: KvmKind,
    /// The kernel module behind `/dev/kvm` (`kvm_intel`, `kvm_amd`, `kvm_pvm`).
    pub module: Option<String>,
    pub api_version: Option<i32>,
    pub meaning: &'static str,
    /// Capability name -> supported; only the ones the VMM relies on.
    pub capabilities: BTreeMap<&'static str, bool>,
    pub detail: String,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub kernel: String,
    pub kvm: KvmReport,
    pub checks: Vec<Check>,
}

impl HostReport {
    /// Whether the host can run grove-vmm at all.
    pub fn can_run_vms(&self) -> bool {
        self.kvm.kind != KvmKind::Absent && self.kvm.capabilities.values().all(|&ok| ok)
    }

    /// The check with this name.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
}

impl fmt::Display for HostReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel      {}", self.kernel)?;
        let module = self.kvm.module.as_deref().unwrap_or("-");
        let kind = serde_json::to_value(self.kvm.kind).unwrap_or_default();
        writeln!(
            f,
            "kvm         {} (module {module}): {}",
            kind.as_str().unwrap_or("?"),
            self.kvm.detail
        )?;
        writeln!(f, "            {}", self.kvm.meaning)?;
        let missing: Vec<_> =
            self.kvm.capabilities.iter().filter(|(_, &ok)| !ok).map(|(n, _)| *n).collect();
        if missing.is_empty() {
            writeln!(
                f,
                "            all {} capabilities the VMM needs are there",
                self.kvm.capabilities.len()
            )?;
        } else {
            writeln!(f, "            MISSING capabilities: {}", missing.join(", "))?;
        }
        for c in &self.checks {
            writeln!(f, "{:<11} {:<7} {}", c.name, c.status, c.detail)?;
            writeln!(f, "{:<19} {}", "", c.why)?;
        }
        Ok(())
    }
}

/// KVM capabilities the VMM relies on, by name and `KVM_CAP_*` number.
pub const REQUIRED_CAPS: &[(&str, u32)] = &[
    ("user-memory", kvm_bindings::KVM_CAP_USER_MEMORY),
    ("irqchip", kvm_bindings::KVM_CAP_IRQCHIP),
    ("pit2", kvm_bindings::KVM_CAP_PIT2),
    ("ioeventfd", kvm_bindings::KVM_CAP_IOEVENTFD),
    ("irqfd", kvm_bindings::KVM_CAP_IRQFD),
    ("set-tss-addr", kvm_bindings::KVM_CAP_SET_TSS_ADDR),
    ("ext-cpuid", kvm_bindings::KVM_CAP_EXT_CPUID),
    ("mp-state", kvm_bindings::KVM_CAP_MP_STATE),
    ("vcpu-events", kvm_bindings::KVM_CAP_VCPU_EVENTS),
    ("debugregs", kvm_bindings::KVM_CAP_DEBUGREGS),
    ("xsave", kvm_bindings::KVM_CAP_XSAVE),
    ("xcrs", kvm_bindings::KVM_CAP_XCRS),
    ("adjust-clock", kvm_bindings::KVM_CAP_ADJUST_CLOCK),
    ("immediate-exit", kvm_bindings::KVM_CAP_IMMEDIATE_EXIT),
    ("dirty-log-ring", kvm_bindings::KVM_CAP_DIRTY_LOG_RING),
];

/// Classifies KVM from what the host shows: loaded modules and CPU flags.
pub fn classify_kvm(
    dev_kvm_opens: bool,
    modules: &[&str],
    cpu_flags: &[&str],
) -> (KvmKind, Option<String>) {
    if !dev_kvm_opens {
        return (KvmKind::Absent, None);
    }
    let has = |m: &str| modules.contains(&m);
    let flag = |f: &str| cpu_flags.contains(&f);
    let nested = flag("hypervisor");
    if has("kvm_pvm") {
        return (KvmKind::NestedParavirtual, Some("kvm_pvm".into()));
    }
    for (module, cpu) in [("kvm_intel", "vmx"), ("kvm_amd", "svm")] {
        if has(module) {
            let kind = match (nested, cpu) {
                (true, _) => KvmKind::NestedHardware,
                (false, "vmx") => KvmKind::HardwareVmx,
                (false, _) => KvmKind::HardwareSvm,
            };
            return (kind, Some(module.into()));
        }
    }
    // No vendor module visible (built in without parameters): go by the CPU flags.
    match (flag("vmx"), flag("svm"), nested) {
        (true, _, false) => (KvmKind::HardwareVmx, None),
        (_, true, false) => (KvmKind::HardwareSvm, None),
        (true, _, true) | (_, true, true) => (KvmKind::NestedHardware, None),
        _ => (KvmKind::Unknown, None),
    }
}

/// The state of one option in a kernel config (`CONFIG_X=y`, `=m`, or not set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigOpt {
    BuiltIn,
    Module,
    Off,
}

/// A parsed kernel config.
#[derive(Debug, Default, Clone)]
pub struct KernelConfig {
    opts: BTreeMap<String, String>,
    /// Whether any config was found at all.
    pub known: bool,
}

impl KernelConfig {
    /// Parses the text of a kernel `.config`.
    pub fn parse(text: &str) -> Self {
        let opts = text
            .lines()
            .filter_map(|l| l.strip_prefix("CONFIG_"))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self { opts, known: true }
    }

    /// The state of `CONFIG_<name>`.
    pub fn get(&self, name: &str) -> ConfigOpt {
        match self.opts.get(name).map(String::as_str) {
            Some("y") => ConfigOpt::BuiltIn,
            Some("m") => ConfigOpt::Module,
            _ => ConfigOpt::Off,
        }
    }

    fn describe(&self, name: &str) -> String {
        if !self.known {
            return format!("CONFIG_{name} unknown (no kernel config found)");
        }
        match self.get(name) {
            ConfigOpt::BuiltIn => format!("CONFIG_{name}=y"),
            ConfigOpt::Module => format!("CONFIG_{name}=m"),
            ConfigOpt::Off => format!("CONFIG_{name} not set"),
        }
    }

    /// Reads `/proc/config.gz`, else `/boot/config-<release>`; empty if neither exists.
    pub fn from_host(release: &str) -> Self {
        if let Ok(f) = fs::File::open("/proc/config.gz") {
            let mut text = String::new();
            if flate2::read::GzDecoder::new(f).read_to_string(&mut text).is_ok() {
                return Self::parse(&text);
            }
        }
        match fs::read_to_string(format!("/boot/config-{release}")) {
            Ok(text) => Self::parse(&text),
            Err(_) => Self::default(),
        }
    }
}

/// Decides the device-mapper and dm-thin lines from the kernel config and `/proc/misc`.
pub fn dm_checks(cfg: &KernelConfig, proc_misc: &str) -> (Check, Check) {
    let dm_live = proc_misc.lines().any(|l| l.split_whitespace().nth(1) == Some("device-mapper"));
    let dm_cfg = cfg.get("BLK_DEV_DM");
    let dm = if dm_live {
        Check {
            name: "dm",
            status: Status::Ok,
            detail: "device-mapper is registered (/proc/misc)".into(),
            why: "needed by the dm-thin disk backend",
        }
    } else if dm_cfg == ConfigOpt::Module {
        Check {
            name: "dm",
            status: Status::Warn,
            detail: format!("{}, module not loaded (modprobe dm_mod)", cfg.describe("BLK_DEV_DM")),
            why: "needed by the dm-thin disk backend",
        }
    } else {
        Check {
            name: "dm",
            status: Status::Missing,
            detail: format!("no device-mapper in this kernel ({})", cfg.describe("BLK_DEV_DM")),
            why: "needed by the dm-thin disk backend; Grove uses the layered file store instead",
        }
    };
    let thin_cfg = cfg.get("DM_THIN_PROVISIONING");
    let thin = match (dm.status, thin_cfg) {
        (Status::Missing, _) => Check {
            name: "dm-thin",
            status: Status::Missing,
            detail: "no device-mapper in this kernel, so no dm-thin".into(),
            why: "thin snapshots of disks; the layered copy-on-write file store is used instead",
        },
        (_, ConfigOpt::Off) if cfg.known => Check {
            name: "dm-thin",
            status: Status::Missing,
            detail: cfg.describe("DM_THIN_PROVISIONING"),
            why: "thin snapshots of disks; the layered copy-on-write file store is used instead",
        },
        _ => Check {
            name: "dm-thin",
            status: Status::Ok,
            detail: cfg.describe("DM_THIN_PROVISIONING"),
            why: "thin snapshots of disks (the dm-thin backend) can be used",
        },
    };
    (dm, thin)
}

fn read_trim(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn exists(path: &str) -> bool {
    Path::new(path).exists()
}

fn config_check(
    cfg: &KernelConfig,
    name: &'static str,
    opts: &[&str],
    extra_ok: bool,
    why: &'static str,
) -> Check {
    let all_on = cfg.known && opts.iter().all(|o| cfg.get(o) != ConfigOpt::Off);
    let detail = opts.iter().map(|o| cfg.describe(o)).collect::<Vec<_>>().join(", ");
    let status = if all_on && extra_ok {
        Status::Ok
    } else if !cfg.known && extra_ok {
        Status::Warn
    } else {
        Status::Missing
    };
    Check { name, status, detail, why }
}

fn userfaultfd_check() -> Check {
    // SAFETY: userfaultfd(2) takes flags only and returns a new fd or -1; we close the fd at once.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    let dev = exists("/dev/userfaultfd");
    let (status, detail) = if fd >= 0 {
        #[allow(clippy::cast_possible_truncation)] // an fd fits in i32 by definition
        // SAFETY: `fd` is a descriptor this function just opened and nothing else uses.
        unsafe {
            libc::close(fd as i32);
        }
        (
            Status::Ok,
            format!(
                "userfaultfd(2) works; /dev/userfaultfd {}",
                if dev { "present" } else { "absent" }
            ),
        )
    } else {
        let err = std::io::Error::last_os_error();
        (Status::Missing, format!("userfaultfd(2) failed: {err}"))
    };
    Check {
        name: "userfaultfd",
        status,
        detail,
        why: "lazy restore: guest memory served page by page from snapshot layers (uffd mode)",
    }
}

fn kvm_report() -> KvmReport {
    let modules: Vec<String> = fs::read_dir("/sys/module")
        .map(|d| {
            d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
        })
        .unwrap_or_default();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    let kvm = kvm_ioctls::Kvm::new();
    let module_refs: Vec<&str> = modules.iter().map(String::as_str).collect();
    let (kind, module) = classify_kvm(kvm.is_ok(), &module_refs, &flags);
    let mut capabilities = BTreeMap::new();
    let (api_version, detail) = match &kvm {
        Ok(k) => {
            for (name, cap) in REQUIRED_CAPS {
                capabilities.insert(*name, k.check_extension_raw(libc::c_ulong::from(*cap)) > 0);
            }
            let v = k.get_api_version();
            (Some(v), format!("/dev/kvm opens, API version {v}"))
        }
        Err(e) => (None, format!("/dev/kvm does not open: {e}")),
    };
    KvmReport { kind, module, api_version, meaning: kind.meaning(), capabilities, detail }
}

/// Reads the host and builds the report.
pub fn report() -> HostReport {
    let kernel = read_trim("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into());
    let cfg = KernelConfig::from_host(&kernel);
    let kvm = kvm_report();
    let mut checks = vec![userfaultfd_check()];
    let (dm, thin) = dm_checks(&cfg, &fs::read_to_string("/proc/misc").unwrap_or_default());
    checks.push(dm);
    checks.push(thin);
    checks.push(config_check(
        &cfg,
        "bpf",
        &["BPF_SYSCALL", "DEBUG_INFO_BTF"],
        exists("/sys/kernel/btf/vmlinux"),
        "eBPF network dataplane (netd): programs need the bpf syscall and BTF",
    ));
    checks.push(config_check(
        &cfg,
        "tc",
        &["NET_SCH_INGRESS", "NET_CLS_BPF", "NET_CLS_ACT"],
        true,
        "netd attaches its eBPF programs with tc (clsact qdisc, cls_bpf direct-action)",
    ));
    checks.push(config_check(
        &cfg,
        "tun",
        &["TUN"],
        exists("/dev/net/tun"),
        "virtio-net devices are backed by tap devices",
    ));
    checks.push(config_check(
        &cfg,
        "netns",
        &["NET_NS", "VETH"],
        true,
        "each sandbox gets its own network namespace and veth pair",
    ));
    let vhost = exists("/dev/vhost-net") || exists("/dev/vhost-vsock");
    checks.push(Check {
        name: "vhost",
        status: if vhost { Status::Ok } else { Status::Warn },
        detail: format!(
            "/dev/vhost-net {}, /dev/vhost-vsock {}",
            if exists("/dev/vhost-net") { "present" } else { "absent" },
            if exists("/dev/vhost-vsock") { "present" } else { "absent" }
        ),
        why: "without vhost, virtio-net and vsock are served in userspace by grove-vmm",
    });
    let v2_controllers = read_trim("/sys/fs/cgroup/cgroup.controllers");
    let hybrid = exists("/sys/fs/cgroup/unified/cgroup.procs");
    checks.push(Check {
        name: "cgroup2",
        status: match (&v2_controllers, hybrid) {
            (Some(_), _) => Status::Ok,
            (None, true) => Status::Warn,
            (None, false) => Status::Missing,
        },
        detail: match (&v2_controllers, hybrid) {
            (Some(c), _) => format!("unified hierarchy at /sys/fs/cgroup, controllers: {c}"),
            (None, true) => {
                "hybrid: cgroup v1 controllers, cgroup2 only at /sys/fs/cgroup/unified".into()
            }
            (None, false) => "no cgroup2 mount found".into(),
        },
        why: "per-sandbox CPU, memory and pids limits use cgroup v2 controllers",
    });
    let thp = read_trim("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let huge2m = read_trim("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages");
    checks.push(Check {
        name: "hugepages",
        status: if thp.is_empty() && huge2m.is_none() { Status::Missing } else { Status::Ok },
        detail: format!(
            "transparent hugepages: {}; 2 MiB hugetlb pages reserved: {}",
            if thp.is_empty() { "unavailable" } else { &thp },
            huge2m.as_deref().unwrap_or("unavailable")
        ),
        why: "huge pages cut TLB misses for big guests; snapshot sharing (MAP_PRIVATE layers) uses 4 KiB pages",
    });
    let max_map = read_trim("/proc/sys/vm/max_map_count").and_then(|s| s.parse::<u64>().ok());
    checks.push(Check {
        name: "map-count",
        status: match max_map {
            Some(n) if n >= 65530 => Status::Ok,
            Some(_) => Status::Warn,
            None => Status::Missing,
        },
        detail: format!("vm.max_map_count = {}", max_map.map_or("unknown".into(), |n| n.to_string())),
        why: "mmap-mode restore maps runs of diff pages over the base: long chains need many mappings",
    });
    HostReport { kernel, kvm, checks }
}

/// Entry point of `grove-vmm check-host [--json]`; returns the exit status
/// (0 when the host can run VMs, 1 when it cannot, 2 on bad flags).
pub fn main(args: &[String]) -> i32 {
    let mut json = false;
    for a in args {
        match a.as_str() {
            "--json" => json = true,
            other => {
                crate::errln!(
                    "grove-vmm check-host: unknown flag '{other}' (usage: check-host [--json])"
                );
                return 2;
            }
        }
    }
    let r = report();
    if json {
        match serde_json::to_string_pretty(&r) {
            Ok(s) => crate::outln!("{s}"),
            Err(e) => {
                crate::errln!("grove-vmm check-host: {e}");
                return 1;
            }
        }
    } else {
        crate::out!("{r}");
    }
    i32::from(!r.can_run_vms())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_is_nested_paravirtual_whatever_the_flags() {
        let (k, m) = classify_kvm(true, &["kvm", "kvm_pvm"], &["fpu", "hypervisor"]);
        assert_eq!(k, KvmKind::NestedParavirtual);
        assert_eq!(m.as_deref(), Some("kvm_pvm"));
        assert!(k.meaning().contains("CPL0 is emulated"));
    }

    #[test]
    fn vendor_modules_and_flags() {
        assert_eq!(classify_kvm(true, &["kvm", "kvm_intel"], &["vmx"]).0, KvmKind::HardwareVmx);
        assert_eq!(classify_kvm(true, &["kvm", "kvm_amd"], &["svm"]).0, KvmKind::HardwareSvm);
        assert_eq!(
            classify_kvm(true, &["kvm", "kvm_intel"], &["vmx", "hypervisor"]).0,
            KvmKind::NestedHardware
        );
        assert_eq!(classify_kvm(true, &["kvm"], &["svm"]).0, KvmKind::HardwareSvm);
        assert_eq!(classify_kvm(true, &["kvm"], &["fpu"]).0, KvmKind::Unknown);
        assert_eq!(classify_kvm(false, &["kvm", "kvm_intel"], &["vmx"]).0, KvmKind::Absent);
    }

    #[test]
    fn kernel_config_parsing() {
        let cfg = KernelConfig::parse(
            "# comment\nCONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D=\"x\"\n",
        );
        assert_eq!(cfg.get("A"), ConfigOpt::BuiltIn);
        assert_eq!(cfg.get("B"), ConfigOpt::Module);
        assert_eq!(cfg.get("C"), ConfigOpt::Off);
        assert_eq!(cfg.get("D"), ConfigOpt::Off);
        assert_eq!(cfg.get("MISSING"), ConfigOpt::Off);
    }

    #[test]
    fn no_device_mapper_means_no_dm_thin_with_reason() {
        let cfg = KernelConfig::parse("CONFIG_KVM=y\n");
        let (dm, thin) = dm_checks(&cfg, "232 kvm\n237 loop-control\n");
        assert_eq!(dm.status, Status::Missing);
        assert!(dm.detail.contains("no device-mapper"), "{}", dm.detail);
        assert_eq!(thin.status, Status::Missing);
        assert!(thin.detail.contains("no device-mapper"), "{}", thin.detail);
    }

    #[test]
    fn device_mapper_present_with_and_without_thin() {
        let misc = "236 device-mapper\n232 kvm\n";
        let with = KernelConfig::parse("CONFIG_BLK_DEV_DM=y\nCONFIG_DM_THIN_PROVISIONING=m\n");
        let (dm, thin) = dm_checks(&with, misc);
        assert_eq!((dm.status, thin.status), (Status::Ok, Status::Ok));
        let without = KernelConfig::parse("CONFIG_BLK_DEV_DM=y\n");
        let (_, thin) = dm_checks(&without, misc);
        assert_eq!(thin.status, Status::Missing);
        assert!(thin.detail.contains("DM_THIN_PROVISIONING not set"));
        let modular = KernelConfig::parse("CONFIG_BLK_DEV_DM=m\n");
        assert_eq!(dm_checks(&modular, "").0.status, Status::Warn);
    }

    #[test]
    fn report_on_this_host_is_consistent() {
        let r = report();
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert!(v["kvm"]["kind"].is_string());
        assert_eq!(v["checks"].as_array().unwrap().len(), r.checks.len());
        for name in ["userfaultfd", "dm", "dm-thin", "bpf", "tc", "tun", "cgroup2", "hugepages"] {
            assert!(r.check(name).is_some(), "missing check {name}");
        }
        // The classification must agree with what /sys/module shows.
        if Path::new("/sys/module/kvm_pvm").exists() && Path::new("/dev/kvm").exists() {
            assert_eq!(r.kvm.kind, KvmKind::NestedParavirtual);
        }
        if Path::new("/dev/kvm").exists() {
            assert_eq!(r.kvm.capabilities.len(), REQUIRED_CAPS.len());
        } else {
            assert_eq!(r.kvm.kind, KvmKind::Absent);
        }
        // dm-thin can never be reported usable when device-mapper itself is missing.
        if r.check("dm").unwrap().status == Status::Missing {
            assert_eq!(r.check("dm-thin").unwrap().status, Status::Missing);
        }
        let text = r.to_string();
        assert!(text.contains("dm-thin"));
    }

    #[test]
    fn bad_flag_is_refused() {
        assert_eq!(main(&["--bogus".to_string()]), 2);
    }
}
