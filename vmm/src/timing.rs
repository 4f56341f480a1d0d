//! Start-up timing: `GROVE_VMM_TIMING=1` prints each setup step's time since VMM start on stderr.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Records the VMM start time (call first thing in main) and reads `GROVE_VMM_TIMING`.
pub fn init() -> Instant {
    let t = *START.get_or_init(Instant::now);
    ENABLED
        .store(std::env::var_os("GROVE_VMM_TIMING").is_some_and(|v| v != "0"), Ordering::Relaxed);
    t
}

/// The VMM start time.
pub fn start() -> Instant {
    *START.get_or_init(Instant::now)
}

/// Milliseconds since VMM start.
pub fn since_start_ms() -> f64 {
    start().elapsed().as_secs_f64() * 1000.0
}

/// Prints `timing: <what> <ms>` when enabled.
pub fn mark(what: &str) {
    if ENABLED.load(Ordering::Relaxed) {
        crate::errln!("timing: {what} {:.3} ms", since_start_ms());
    }
}
