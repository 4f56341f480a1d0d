//! One thread reaps every child (and, as PID 1, every orphan) and hands the exit status of
//! processes the agent started to whoever waits for them.
//!
//! std's `Child::wait` is never used: a reaper calling waitpid(-1) would steal its status.
//! The reaper first peeks at an exited child (waitid WNOWAIT), then takes the registry lock
//! before reaping. `spawn` holds the same lock across fork+exec+registration, so a child that
//! exits at once is still found in the registry, and std's own wait on a failed exec (inside
//! spawn) happens before the reaper can touch that pid.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use crate::sys;

#[derive(Default)]
struct State {
    waiting: HashMap<i32, Sender<i32>>,
    /// Incremented by every spawn: tells the reaper a child appeared while it looked.
    spawned: u64,
}

struct Registry {
    waiting: Mutex<State>,
    children: Condvar,
}

static REGISTRY: OnceLock<Arc<Registry>> = OnceLock::new();

fn registry() -> &'static Arc<Registry> {
    REGISTRY.get_or_init(|| {
        let r =
            Arc::new(Registry { waiting: Mutex::new(State::default()), children: Condvar::new() });
        let rr = Arc::clone(&r);
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reaper_loop(&rr))
            .expect("spawn reaper thread");
        r
    })
}

/// Starts the reaper thread (idempotent). PID 1 calls this early so orphans get reaped
/// even before the first exec.
pub fn start() {
    let _ = registry();
}

fn reaper_loop(r: &Registry) {
    loop {
        let seen = r.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner).spawned;
        match sys::peek_exited_child() {
            Ok(Some(pid)) => {
                let mut w = r.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(status) = sys::reap(pid) {
                    if let Some(tx) = w.waiting.remove(&pid) {
                        let _ = tx.send(status);
                    }
                }
            }
            Ok(None) => {
                // No children: sleep until a spawn (or at most 1 s, for orphans adopted by
                // PID 1 from processes it did not start itself).
                let w = r.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if w.spawned == seen {
                    let _ = r.children.wait_timeout(w, Duration::from_secs(1));
                }
            }
            Err(e) => {
                eprintln!("guest-init: reaper: waitid: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Spawns `cmd` and returns the child plus a receiver for its raw wait status.
/// The caller must not call `wait` on the child.
pub fn spawn(cmd: &mut Command) -> io::Result<(Child, Receiver<i32>)> {
    let r = registry();
    let mut w = r.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let child = cmd.spawn()?;
    let (tx, rx) = channel();
    let pid =
        i32::try_from(child.id()).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    w.waiting.insert(pid, tx);
    w.spawned += 1;
    drop(w);
    r.children.notify_all();
    Ok((child, rx))
}
