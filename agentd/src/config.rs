//! agentd's configuration: a TOML file (`--config`) and flags; a flag wins over the file,
//! the file over the defaults.
//!
//! ```toml
//! listen = "unix:/run/grove/agentd.sock"   # or "tcp:0.0.0.0:7070" (needs token_file)
//! token_file = "/etc/grove/token"
//! data_dir = "/var/lib/grove"
//! metrics_listen = "127.0.0.1:9464"        # "" turns the HTTP endpoint off
//! vmm = "/usr/local/bin/grove-vmm"
//! pool_size = 2                            # standby VMMs per template shape
//! max_memory_mib = 16384                   # admission control (default: 90% of MemTotal)
//! max_vcpus = 64                           # default: 16 per host CPU
//! max_sandboxes = 1000
//! log_format = "text"                      # or "json"
//! ```

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

/// Where the gRPC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address (requires a bearer token).
    Tcp(String),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a path".into());
            }
            Ok(Listen::Unix(PathBuf::from(p)))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            a.parse::<std::net::SocketAddr>()
                .map_err(|e| format!("tcp:{a}: {e}"))
                .map(|_| Listen::Tcp(a.to_string()))
        } else {
            Err(format!("listen address {s:?}: expected unix:PATH or tcp:ADDR"))
        }
    }
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Command-line flags of `agentd`.
#[derive(Debug, Parser, Default)]
#[command(name = "agentd", version, about = "Grove's node agent: sandboxes over gRPC")]
pub struct Flags {
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// unix:PATH (default unix:/run/grove/agentd.sock) or tcp:ADDR.
    #[arg(long)]
    pub listen: Option<String>,
    /// File holding the bearer token TCP clients must send (required with tcp:).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// TLS certificate (PEM) for tcp: (built with the `tls` feature).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Data directory: catalog, layers, snapshots, VMM directories (default /var/lib/grove).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// HTTP address of the Prometheus endpoint (/metrics); "" turns it off.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// The grove-vmm binary (default: beside agentd, else on PATH).
    #[arg(long)]
    pub vmm: Option<PathBuf>,
    /// Standby VMMs kept ready per template shape.
    #[arg(long)]
    pub pool_size: Option<u32>,
    /// Guest memory agentd may hand out, MiB.
    #[arg(long)]
    pub max_memory_mib: Option<u64>,
    /// vCPUs agentd may hand out.
    #[arg(long)]
    pub max_vcpus: Option<u32>,
    /// Sandboxes at most.
    #[arg(long)]
    pub max_sandboxes: Option<u32>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    listen: Option<String>,
    token_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    metrics_listen: Option<String>,
    vmm: Option<PathBuf>,
    pool_size: Option<u32>,
    max_memory_mib: Option<u64>,
    max_vcpus: Option<u32>,
    max_sandboxes: Option<u32>,
    log_format: Option<LogFormat>,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC listen address.
    pub listen: Listen,
    /// Bearer token for TCP.
    pub token: Option<String>,
    /// TLS certificate and key paths.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Data directory (absolute).
    pub data_dir: PathBuf,
    /// Prometheus HTTP address.
    pub metrics_listen: Option<String>,
    /// grove-vmm binary.
    pub vmm: PathBuf,
    /// Standby VMMs per shape.
    pub pool_size: u32,
    /// Admission limits.
    pub max_memory_mib: u64,
    /// vCPU limit.
    pub max_vcpus: u32,
    /// Sandbox count limit.
    pub max_sandboxes: u32,
    /// Log format.
    pub log_format: LogFormat,
}

/// Largest standby pool per shape.
pub const MAX_POOL: u32 = 64;

fn mem_total_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        })
        .map_or(1024, |kib| kib / 1024)
}

fn default_vmm() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        let beside = exe.with_file_name("grove-vmm");
        if beside.is_file() {
            return beside;
        }
    }
    PathBuf::from("grove-vmm")
}

impl Config {
    /// Merges flags, the file they name and the defaults.
    pub fn load(flags: &Flags) -> Result<Self, String> {
        let file: File = match &flags.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("config {}: {e}", p.display()))?;
                toml::from_str(&text).map_err(|e| format!("config {}: {e}", p.display()))?
            }
            None => File::default(),
        };
        let listen: Listen = flags
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| "unix:/run/grove/agentd.sock".into())
            .parse()?;
        let token_file = flags.token_file.clone().or(file.token_file);
        let token = match &token_file {
            Some(p) => Some(read_token(p)?),
            None => None,
        };
        if matches!(listen, Listen::Tcp(_)) && token.is_none() {
            return Err(
                "listening on tcp: needs --token-file (clients send it as a bearer token)".into()
            );
        }
        let tls = match (
            flags.tls_cert.clone().or(file.tls_cert),
            flags.tls_key.clone().or(file.tls_key),
        ) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err("TLS needs both --tls-cert and --tls-key".into()),
        };
        if tls.is_some() && !cfg!(feature = "tls") {
            return Err("this agentd was built without TLS (cargo feature `tls`)".into());
        }
        if tls.is_some() && matches!(listen, Listen::Unix(_)) {
            return Err("TLS applies to tcp: listeners only".into());
        }
        let data_dir = flags
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/grove"));
        let data_dir = absolute(&data_dir)?;
        let metrics_listen = flags
            .metrics_listen
            .clone()
            .or(file.metrics_listen)
            .unwrap_or_else(|| "127.0.0.1:9464".into());
        let metrics_listen = if metrics_listen.is_empty() {
            None
        } else {
            metrics_listen
                .parse::<std::net::SocketAddr>()
                .map_err(|e| format!("metrics address {metrics_listen}: {e}"))?;
            Some(metrics_listen)
        };
        let pool_size = flags.pool_size.or(file.pool_size).unwrap_or(2);
        if pool_size > MAX_POOL {
            return Err(format!("pool size {pool_size} is over {MAX_POOL}"));
        }
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        Ok(Self {
            listen,
            token,
            tls,
            data_dir,
            metrics_listen,
            vmm: flags.vmm.clone().or(file.vmm).unwrap_or_else(default_vmm),
            pool_size,
            max_memory_mib: flags
                .max_memory_mib
                .or(file.max_memory_mib)
                .unwrap_or_else(|| mem_total_mib() * 9 / 10),
            max_vcpus: flags
                .max_vcpus
                .or(file.max_vcpus)
                .unwrap_or_else(|| u32::try_from(cpus * 16).unwrap_or(u32::MAX)),
            max_sandboxes: flags.max_sandboxes.or(file.max_sandboxes).unwrap_or(1000),
            log_format: flags.log_format.or(file.log_format).unwrap_or(LogFormat::Text),
        })
    }
}

fn absolute(p: &Path) -> Result<PathBuf, String> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    std::env::current_dir().map(|d| d.join(p)).map_err(|e| format!("current directory: {e}"))
}

/// Reads a token file: one line, at least 16 characters.
pub fn read_token(p: &Path) -> Result<String, String> {
    let t = std::fs::read_to_string(p).map_err(|e| format!("token file {}: {e}", p.display()))?;
    let t = t.trim().to_string();
    if t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "token file {}: the token must be one word of at least 16 characters",
            p.display()
        ));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!("unix:/a/b".parse::<Listen>().unwrap(), Listen::Unix("/a/b".into()));
        assert_eq!(
            "tcp:127.0.0.1:70".parse::<Listen>().unwrap(),
            Listen::Tcp("127.0.0.1:70".into())
        );
        for bad in ["unix:", "tcp:nohost", "http://x", ""] {
            assert!(bad.parse::<Listen>().is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_win_over_the_file_and_tcp_needs_a_token() {
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("agentd.toml");
        std::fs::write(
            &cfg,
            "pool_size = 5\nmax_vcpus = 7\ndata_dir = \"/x\"\nlog_format = \"json\"\n",
        )
        .unwrap();
        let flags = Flags { config: Some(cfg.clone()), pool_size: Some(3), ..Default::default() };
        let c = Config::load(&flags).unwrap();
        assert_eq!((c.pool_size, c.max_vcpus, c.log_format), (3, 7, LogFormat::Json));
        assert_eq!(c.data_dir, PathBuf::from("/x"));
        std::fs::write(&cfg, "pool_sise = 5\n").unwrap();
        assert!(Config::load(&flags).unwrap_err().contains("pool_sise"));
        let tcp = Flags { listen: Some("tcp:127.0.0.1:0".into()), ..Default::default() };
        assert!(Config::load(&tcp).unwrap_err().contains("token"));
        let tok = d.path().join("token");
        std::fs::write(&tok, "short\n").unwrap();
        let tcp = Flags { token_file: Some(tok.clone()), ..tcp };
        assert!(Config::load(&tcp).is_err());
        std::fs::write(&tok, "0123456789abcdef0123\n").unwrap();
        assert_eq!(Config::load(&tcp).unwrap().token.as_deref(), Some("0123456789abcdef0123"));
    }
}
