//! info / health and the post-restore steps.

use grove_proto::guest::{InfoReply, PostRestore};

use super::{AgentError, Ctx};
use crate::sys;

/// Most entropy bytes one PostRestore may carry.
const MAX_ENTROPY: usize = 4096;

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// System uptime from /proc/uptime, in ms.
pub fn uptime_ms() -> u64 {
    let s = read("/proc/uptime");
    let secs: f64 = s.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    // non-negative, far below 2^53 ms
    let ms = (secs * 1000.0) as u64;
    ms
}

fn meminfo_bytes(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

pub fn info(ctx: &Ctx) -> InfoReply {
    let load = read("/proc/loadavg");
    let l: Vec<f64> = load.split_whitespace().take(3).filter_map(|v| v.parse().ok()).collect();
    let mem = read("/proc/meminfo");
    let (disk_total, disk_free) = sys::statvfs(&ctx.root).unwrap_or((0, 0));
    let processes = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
                .count()
        })
        .unwrap_or(0);
    InfoReply {
        uptime_ms: uptime_ms(),
        load1: l.first().copied().unwrap_or(0.0),
        load5: l.get(1).copied().unwrap_or(0.0),
        load15: l.get(2).copied().unwrap_or(0.0),
        mem_total: meminfo_bytes(&mem, "MemTotal"),
        mem_available: meminfo_bytes(&mem, "MemAvailable"),
        disk_total,
        disk_free,
        hostname: read("/proc/sys/kernel/hostname").trim().to_string(),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        processes: u32::try_from(processes).unwrap_or(u32::MAX),
    }
}

/// Steps after a restore or fork: entropy first (so anything that runs next sees a reseeded
/// CRNG), then the clock, hostname and network. Clock, hostname and network change the
/// whole machine, so an agent that is not PID 1 (tests on a host) refuses them.
pub fn post_restore(ctx: &Ctx, req: &PostRestore) -> Result<(), AgentError> {
    if req.entropy.len() > MAX_ENTROPY {
        return Err(AgentError::BadRequest(format!("more than {MAX_ENTROPY} entropy bytes")));
    }
    let machine_wide = req.wall_clock_ns.is_some() || !req.hostname.is_empty() || req.net.is_some();
    if machine_wide && !ctx.pid1 {
        return Err(AgentError::Unsupported(
            "clock, hostname and network are only changed by guest-init running as PID 1".into(),
        ));
    }
    if !req.hostname.is_empty() {
        crate::net::validate_hostname(&req.hostname).map_err(AgentError::BadRequest)?;
    }
    if !req.entropy.is_empty() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")
            .map_err(|e| AgentError::os("open /dev/urandom", e))?;
        sys::add_entropy_and_reseed(&f, &req.entropy)
            .map_err(|e| AgentError::os("RNDADDENTROPY/RNDRESEEDCRNG", e))?;
    }
    if let Some(ns) = req.wall_clock_ns {
        sys::set_realtime_ns(ns).map_err(|e| AgentError::os("clock_settime", e))?;
    }
    if !req.hostname.is_empty() {
        sys::sethostname(&req.hostname).map_err(|e| AgentError::os("sethostname", e))?;
    }
    if let Some(net) = &req.net {
        let cfg = crate::net::IfConfig::from_proto(net).map_err(AgentError::BadRequest)?;
        cfg.apply().map_err(|e| AgentError::os("network configuration", e))?;
    }
    Ok(())
}
