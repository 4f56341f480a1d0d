//! Prometheus metrics (prometheus-client), served on an HTTP endpoint (`/metrics`) and by
//! `NodeService.Metrics`. Gauges that describe the node now (sandboxes by state, pool
//! sizes, VMM RSS) are refreshed just before each scrape.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// Sandbox state.
    pub state: String,
}

/// `method`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    /// gRPC method.
    pub method: String,
}

/// `method`, `code`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// gRPC method.
    pub method: String,
    /// gRPC code.
    pub code: String,
}

/// `source` (template|snapshot|fork), `path` (standby|cold|boot).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CreateLabel {
    /// What the sandbox was made from.
    pub source: String,
    /// How its VMM was started.
    pub path: String,
}

/// A pool shape.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShapeLabel {
    /// vCPUs.
    pub vcpus: String,
    /// Guest memory.
    pub memory_mib: String,
}

/// A sandbox.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SandboxLabel {
    /// Its id.
    pub sandbox: String,
}

fn latency() -> Histogram {
    // 0.25 ms .. ~8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// Every metric agentd exports.
pub struct Metrics {
    registry: Registry,
    /// Sandboxes by state.
    pub sandboxes: Family<StateLabel, Gauge>,
    /// Create latency (request to Running, seconds).
    pub create_seconds: Family<CreateLabel, Histogram, fn() -> Histogram>,
    /// A VMM's restore call (standby) or start to serving (cold), seconds.
    pub restore_seconds: Family<CreateLabel, Histogram, fn() -> Histogram>,
    /// Fork latency (request to every child Running, seconds).
    pub fork_seconds: Histogram,
    /// The parent's pause during a fork, seconds.
    pub fork_pause_seconds: Histogram,
    /// Standby VMMs ready, per shape.
    pub pool_ready: Family<ShapeLabel, Gauge>,
    /// Standby VMMs wanted, per shape.
    pub pool_target: Family<ShapeLabel, Gauge>,
    /// Creates that found no standby VMM of their shape (paid a cold restore).
    pub pool_misses: Counter,
    /// Standby VMMs started, and those that failed to start.
    pub pool_started: Counter,
    /// Standby VMMs that failed to start.
    pub pool_failures: Counter,
    /// Resident memory of each sandbox's VMM process (guest memory it touched included).
    pub vmm_rss: Family<SandboxLabel, Gauge>,
    /// Resident memory of every VMM (standby ones included).
    pub vmm_rss_total: Gauge,
    /// Requests by method.
    pub requests: Family<MethodLabel, Counter>,
    /// Errors by method and gRPC code.
    pub errors: Family<ErrorLabel, Counter>,
    /// VMMs that exited while their sandbox lived (clean: the guest shut down).
    pub vmm_exits: Family<StateLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("grove");
        let m = Self {
            sandboxes: Family::default(),
            create_seconds: Family::new_with_constructor(latency),
            restore_seconds: Family::new_with_constructor(latency),
            fork_seconds: latency(),
            fork_pause_seconds: latency(),
            pool_ready: Family::default(),
            pool_target: Family::default(),
            pool_misses: Counter::default(),
            pool_started: Counter::default(),
            pool_failures: Counter::default(),
            vmm_rss: Family::default(),
            vmm_rss_total: Gauge::default(),
            requests: Family::default(),
            errors: Family::default(),
            vmm_exits: Family::default(),
            registry: Registry::default(),
        };
        registry.register("sandboxes", "Sandboxes by state", m.sandboxes.clone());
        registry.register(
            "create_seconds",
            "Create latency, request to Running",
            m.create_seconds.clone(),
        );
        registry.register(
            "restore_seconds",
            "VMM restore (standby) or start (cold) latency",
            m.restore_seconds.clone(),
        );
        registry.register(
            "fork_seconds",
            "Fork latency, request to every child Running",
            m.fork_seconds.clone(),
        );
        registry.register(
            "fork_pause_seconds",
            "Parent pause during a fork",
            m.fork_pause_seconds.clone(),
        );
        registry.register(
            "standby_pool_ready",
            "Standby VMMs ready per shape",
            m.pool_ready.clone(),
        );
        registry.register(
            "standby_pool_target",
            "Standby VMMs wanted per shape",
            m.pool_target.clone(),
        );
        registry.register(
            "standby_pool_misses",
            "Creates that found no standby VMM",
            m.pool_misses.clone(),
        );
        registry.register("standby_started", "Standby VMMs started", m.pool_started.clone());
        registry.register(
            "standby_failures",
            "Standby VMMs that failed to start",
            m.pool_failures.clone(),
        );
        registry.register("vmm_rss_bytes", "Resident memory of a sandbox's VMM", m.vmm_rss.clone());
        registry.register(
            "vmm_rss_bytes_all",
            "Resident memory of every VMM",
            m.vmm_rss_total.clone(),
        );
        registry.register("api_requests", "API requests by method", m.requests.clone());
        registry.register("api_errors", "API errors by method and gRPC code", m.errors.clone());
        registry.register(
            "vmm_exits",
            "VMMs that exited under a live sandbox",
            m.vmm_exits.clone(),
        );
        Self { registry, ..m }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a request and, if it failed, its code.
    pub fn request(&self, method: &str, code: Option<tonic::Code>) {
        self.requests.get_or_create(&MethodLabel { method: method.into() }).inc();
        if let Some(c) = code {
            self.errors
                .get_or_create(&ErrorLabel { method: method.into(), code: format!("{c:?}") })
                .inc();
        }
    }
}

/// Resident set size of a process, bytes (0 if gone).
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        })
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_family() {
        let m = Metrics::new();
        m.sandboxes.get_or_create(&StateLabel { state: "running".into() }).set(3);
        m.request("Create", Some(tonic::Code::ResourceExhausted));
        m.create_seconds
            .get_or_create(&CreateLabel { source: "template".into(), path: "standby".into() })
            .observe(0.002);
        let t = m.encode();
        assert!(t.contains("grove_sandboxes{state=\"running\"} 3"), "{t}");
        assert!(
            t.contains("grove_api_errors_total{method=\"Create\",code=\"ResourceExhausted\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("grove_create_seconds_count{source=\"template\",path=\"standby\"} 1"),
            "{t}"
        );
        assert!(rss_bytes(std::process::id()) > 0);
    }
}
