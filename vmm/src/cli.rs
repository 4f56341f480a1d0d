//! Command-line parsing for `grove-vmm` (hand-written: a few flags, exact errors).

use crate::vm::VmConfig;

/// Usage text.
pub const USAGE: &str = "usage:
  grove-vmm run --kernel PATH [--initrd PATH] [--cmdline STR] [--vcpus N] [--mem-mib N]
                [--serial stdout|PATH] [--api-sock PATH]
  grove-vmm restore --snapshot DIR [--mem-mode mmap|uffd] [--api-sock PATH] [--identity N]
                [--serial stdout|PATH]
  grove-vmm standby --api-sock PATH [--vcpus N] [--mem-mib N] [--serial stdout|PATH]
  grove-vmm api --api-sock PATH JSON     (one control request; the reply on stdout)
  grove-vmm check-host [--json]";

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

/// `run` arguments.
#[derive(Debug, Clone)]
pub struct RunArgs {
    /// The VM.
    pub vm: VmConfig,
    /// Control socket.
    pub api_sock: Option<String>,
}

/// Memory modes for restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemMode {
    /// MAP_PRIVATE layer files.
    Mmap,
    /// userfaultfd page server.
    Uffd,
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
}

/// Parses the arguments after `standby`.
pub fn parse_standby(args: &[String]) -> Result<StandbyArgs, CliError> {
    let known = ["--api-sock", "--vcpus", "--mem-mib", "--serial"];
    let d = VmConfig::default();
    let mut a = StandbyArgs {
        api_sock: String::new(),
        vcpus: d.vcpus,
        mem_mib: d.mem_mib,
        serial: d.serial,
    };
    let mut sock = None;
    for (f, v) in pairs(args, &known)? {
        match f.as_str() {
            "--api-sock" => sock = Some(non_empty(&f, v)?),
            "--vcpus" => a.vcpus = number(&f, &v)?,
            "--mem-mib" => a.mem_mib = number(&f, &v)?,
            "--serial" => a.serial = non_empty(&f, v)?,
            _ => return Err(CliError::UnknownFlag(f)),
        }
    }
    a.api_sock = sock.ok_or(CliError::Required("--api-sock"))?;
    Ok(a)
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
            None => it.next().cloned().ok_or_else(|| CliError::MissingValue(flag.clone()))?,
        };
        if out.iter().any(|(f, _)| *f == flag) {
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

/// Parses the arguments after `run`.
pub fn parse_run(args: &[String]) -> Result<RunArgs, CliError> {
    let known =
        ["--kernel", "--initrd", "--cmdline", "--vcpus", "--mem-mib", "--serial", "--api-sock"];
    let mut vm = VmConfig::default();
    let mut api_sock = None;
    let mut kernel = None;
    for (f, v) in pairs(args, &known)? {
        match f.as_str() {
            "--kernel" => kernel = Some(non_empty(&f, v)?),
            "--initrd" => vm.initrd = Some(non_empty(&f, v)?),
            "--cmdline" => vm.cmdline = Some(v),
            "--vcpus" => vm.vcpus = number(&f, &v)?,
            "--mem-mib" => vm.mem_mib = number(&f, &v)?,
            "--serial" => vm.serial = non_empty(&f, v)?,
            "--api-sock" => api_sock = Some(non_empty(&f, v)?),
            _ => return Err(CliError::UnknownFlag(f)),
        }
    }
    vm.kernel = kernel.ok_or(CliError::Required("--kernel"))?;
    Ok(RunArgs { vm, api_sock })
}

/// Parses the arguments after `restore`.
pub fn parse_restore(args: &[String]) -> Result<RestoreArgs, CliError> {
    let known = ["--snapshot", "--mem-mode", "--api-sock", "--identity", "--serial"];
    let mut snapshot = None;
    let mut r = RestoreArgs {
        snapshot: String::new(),
        mem_mode: MemMode::Mmap,
        api_sock: None,
        identity: 0,
        serial: "stdout".into(),
    };
    for (f, v) in pairs(args, &known)? {
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
            _ => return Err(CliError::UnknownFlag(f)),
        }
    }
    r.snapshot = snapshot.ok_or(CliError::Required("--snapshot"))?;
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
}
