//! The VMM thread's loop and control requests: turns the event loop, ends when a vCPU or a
//! device records an exit, executes the control socket's requests between turns, saves a
//! first uffd restore's working set when it is due. The one place where VMM errors become
//! protocol error codes ([`snapshot_code`], [`build_code`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{SubscriberId, SubscriberOps};
use grove_memory::LayerError;
use grove_vmm_api::{RestoreReport, RunState, SnapshotKind as Kind, VmStatus, API_VERSION};

use crate::api_server::{
    Answer, ApiConfig, ApiServer, ApiServerError, ErrorCode, Pending, Refusal, Reply, Request,
};
use crate::builder::{BuildError, MemMode, RestoreConfig, Standby};
use crate::devices::lock;
use crate::devices::manager::{DeviceManagerError, EventLoop, RestoreOverrides};
use crate::devices::virtio::vsock::backend::BackendError;
use crate::devices::virtio::vsock::device::VsockError;
use crate::exit::VmExit;
use crate::guest_refresh;
use crate::input::InputError;
use crate::snapshot::{SnapshotError, SnapshotKind};
use crate::state::StateError;
use crate::vmm::Vmm;

/// The control socket registered in an event loop.
#[derive(Clone)]
pub struct ApiHandle {
    server: Arc<Mutex<ApiServer>>,
    id: SubscriberId,
}

/// Binds the control socket at `path` and adds it to `events`.
pub fn attach_api(
    events: &mut EventLoop,
    path: &str,
    cfg: ApiConfig,
) -> Result<ApiHandle, ApiServerError> {
    let server = Arc::new(Mutex::new(ApiServer::bind(path, cfg)?));
    let id = events.add_subscriber(server.clone());
    Ok(ApiHandle { server, id })
}

impl ApiHandle {
    /// Expires idle connections; returns when the next may expire.
    fn expire(&self, events: &mut EventLoop) -> Option<Duration> {
        let mut ops = events.event_ops(self.id).ok()?;
        lock(&self.server).expire(Instant::now(), &mut ops)
    }

    fn take(&self) -> Vec<(u64, Pending)> {
        lock(&self.server).take_requests()
    }

    fn reply(&self, events: &mut EventLoop, conn: u64, answer: &Answer) {
        if let Ok(mut ops) = events.event_ops(self.id) {
            lock(&self.server).reply(conn, answer, &mut ops);
        }
    }
}

fn min_timeout(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Serves the VM until it ends; returns how it ended. Installs the VMM thread's seccomp
/// filter first (if [`guest_refresh::run`] did not already): every thread is started by now.
pub fn serve(vmm: &mut Vmm, api: Option<&ApiHandle>) -> VmExit {
    crate::seccomp::install_or_exit(crate::seccomp::Kind::Vmm);
    loop {
        let mut timeout = api.and_then(|a| a.expire(vmm.events()));
        if let Some(at) = vmm.working_set_due() {
            let left = at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Best effort: a read-only snapshot directory just means no prefetch next time.
                let _ = vmm.save_working_set();
                continue;
            }
            timeout = min_timeout(timeout, Some(left));
        }
        if let Err(e) = vmm.run_events(timeout) {
            return VmExit::EventLoop(e);
        }
        if let Some(exit) = vmm.take_exit() {
            return exit;
        }
        if let Some(a) = api {
            for (conn, p) in a.take() {
                let answer = p.and_then(|req| handle(vmm, req));
                a.reply(vmm.events(), conn, &answer);
            }
        }
    }
}

/// Executes one request on a running VM.
pub fn handle(vmm: &mut Vmm, req: Request) -> Answer {
    let internal =
        |e: &dyn std::error::Error| Refusal::new(ErrorCode::Internal, crate::one_line(e));
    match req {
        Request::Status {} => Ok(Reply::Status(vmm.status())),
        Request::Pause {} => match vmm.pause() {
            Ok(()) => Ok(Reply::State(RunState::Paused)),
            Err(e) => Err(internal(&e)),
        },
        Request::Resume {} => match vmm.resume() {
            Ok(()) => Ok(Reply::State(RunState::Running)),
            Err(e) => Err(internal(&e)),
        },
        Request::Snapshot { kind, dir, fsync } => {
            let kind = match kind {
                Kind::Full => SnapshotKind::Full,
                Kind::Diff => SnapshotKind::Diff,
            };
            vmm.snapshot(kind, &dir, fsync).map(Reply::Snapshot).map_err(|e| snapshot_refusal(&e))
        }
        Request::Fork { dir } => {
            vmm.fork(&dir).map(Reply::Snapshot).map_err(|e| snapshot_refusal(&e))
        }
        Request::Restore { .. } => Err(Refusal::new(
            ErrorCode::FailedPrecondition,
            "a VM is already running in this grove-vmm",
        )),
        Request::SaveWorkingSet {} => {
            vmm.save_working_set().map(Reply::WorkingSet).map_err(|e| snapshot_refusal(&e))
        }
    }
}

/// Serves a standby VMM's socket until a `restore` succeeds; returns the running VMM. A
/// refused restore leaves the standby VMM usable; a failure while loading is final.
pub fn serve_standby(
    standby: Standby,
    serial: &str,
    mut events: EventLoop,
    api: &ApiHandle,
) -> Result<Vmm, String> {
    let mut sb = Some(standby);
    loop {
        let timeout = api.expire(&mut events);
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis().max(1)).unwrap_or(i32::MAX));
        if let Err(e) = events.run_with_timeout(ms) {
            return Err(crate::one_line(&e));
        }
        let mut reqs = api.take().into_iter();
        while let Some((conn, p)) = reqs.next() {
            let Some(standby) = sb.as_ref() else { break };
            let req = match p {
                Ok(req) => req,
                Err(r) => {
                    api.reply(&mut events, conn, &Err(r));
                    continue;
                }
            };
            let (snapshot, identity, overrides, guest) = match req {
                Request::Restore { snapshot, identity, vsock_uds, vsock_cid, guest } => {
                    let o = RestoreOverrides { vsock_uds, vsock_cid };
                    (snapshot, identity, o, guest)
                }
                Request::Status {} => {
                    let st = VmStatus {
                        api_version: API_VERSION,
                        pid: std::process::id(),
                        state: RunState::Standby,
                        vcpus: u32::try_from(standby.vcpus()).unwrap_or(u32::MAX),
                        mem_bytes: standby.mem_bytes(),
                        identity: 0,
                        generation: 0,
                        dirty_logging: true,
                        layers: Vec::new(),
                        post_restore: None,
                        vsock: None,
                        virtio: Vec::new(),
                    };
                    api.reply(&mut events, conn, &Ok(Reply::Status(st)));
                    continue;
                }
                _ => {
                    let r = Refusal::new(
                        ErrorCode::FailedPrecondition,
                        "no VM yet: send restore first",
                    );
                    api.reply(&mut events, conn, &Err(r));
                    continue;
                }
            };
            if let Err(why) = guest.validate() {
                api.reply(&mut events, conn, &Err(Refusal::new(ErrorCode::InvalidArgument, why)));
                continue;
            }
            let t = Instant::now();
            crate::timing::mark("restore request");
            let cfg = restore_config(snapshot, identity, serial, overrides);
            let prepared = match standby.check(&cfg) {
                Ok(p) => p,
                Err(e) => {
                    api.reply(&mut events, conn, &Err(build_refusal(&e)));
                    continue;
                }
            };
            let Some(standby) = sb.take() else { break };
            return match standby.finish(&cfg, prepared, events) {
                Ok(mut vmm) => {
                    let ms = t.elapsed().as_secs_f64() * 1000.0;
                    // Reported done once the guest has its clock, entropy and identity.
                    let ack = guest_refresh::run(&mut vmm, &guest);
                    vmm.set_post_restore(ack.clone());
                    let answer = Ok(Reply::Restored(RestoreReport { restore_ms: ms, guest: ack }));
                    api.reply(vmm.events(), conn, &answer);
                    // The rest of this batch goes to the VM now running.
                    for (conn, p) in reqs {
                        let answer = p.and_then(|req| handle(&mut vmm, req));
                        api.reply(vmm.events(), conn, &answer);
                    }
                    // A snapshot whose writer was killed may have left temporary files
                    // beside it: swept now, after the answer (a cold restore sweeps first).
                    crate::snapshot::sweep(&cfg.dir, false);
                    Ok(vmm)
                }
                // The event loop went with the failed build: the process ends with this error.
                Err(e) => Err(build_refusal(&e).message),
            };
        }
    }
}

fn restore_config(
    snapshot: PathBuf,
    identity: u32,
    serial: &str,
    overrides: RestoreOverrides,
) -> RestoreConfig {
    RestoreConfig {
        dir: snapshot,
        mem_mode: MemMode::Mmap,
        identity,
        serial: serial.to_string(),
        dirty_logging: true,
        // The standby VMM's own --disk-dir.
        disk_dir: None,
        overrides,
        // A standby VMM restores onto the tap it opened when it started.
        net: None,
    }
}

fn io_code(k: std::io::ErrorKind) -> ErrorCode {
    use std::io::ErrorKind;
    match k {
        ErrorKind::NotFound => ErrorCode::NotFound,
        ErrorKind::AlreadyExists => ErrorCode::AlreadyExists,
        ErrorKind::PermissionDenied | ErrorKind::InvalidInput => ErrorCode::InvalidArgument,
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::OutOfMemory => {
            ErrorCode::ResourceExhausted
        }
        _ => ErrorCode::Internal,
    }
}

fn input_code(e: &InputError) -> ErrorCode {
    match e {
        InputError::Open(source) | InputError::Stat(source) | InputError::Read(source) => {
            io_code(source.kind())
        }
        InputError::NotRegular { .. } => ErrorCode::InvalidArgument,
        InputError::TooBig { .. } => ErrorCode::Corrupt,
    }
}

fn state_code(e: &StateError) -> ErrorCode {
    match e {
        StateError::Io { source, .. } => io_code(source.kind()),
        StateError::Input { source, .. } => input_code(source),
        StateError::BadMagic(_)
        | StateError::FieldNotBytes { .. }
        | StateError::FieldLength { .. }
        | StateError::FieldRange { .. }
        | StateError::Version { .. }
        | StateError::Truncated { .. }
        | StateError::TrailingData { .. }
        | StateError::Checksum { .. }
        | StateError::Payload { .. } => ErrorCode::Corrupt,
        StateError::VcpuCount(_)
        | StateError::VcpuStates { .. }
        | StateError::Regions
        | StateError::NoLayers => ErrorCode::Incompatible,
    }
}

fn layer_code(e: &LayerError) -> ErrorCode {
    match e {
        LayerError::Io { source, .. } => io_code(source.kind()),
        LayerError::NotRegular { .. } => ErrorCode::InvalidArgument,
        _ => ErrorCode::Corrupt,
    }
}

/// The protocol's code for a snapshot error.
pub fn snapshot_code(e: &SnapshotError) -> ErrorCode {
    match e {
        SnapshotError::Exists(_) => ErrorCode::AlreadyExists,
        SnapshotError::RelativeDir(_) => ErrorCode::InvalidArgument,
        SnapshotError::NoBase | SnapshotError::NotUffd => ErrorCode::FailedPrecondition,
        SnapshotError::Dir { source, .. } => match io_code(source.kind()) {
            ErrorCode::Internal => ErrorCode::InvalidArgument,
            c => c,
        },
        SnapshotError::MemoryUnavailable(_) => ErrorCode::Unavailable,
        SnapshotError::Layer(l) => layer_code(l),
        SnapshotError::State(s) => state_code(s),
        SnapshotError::Vcpu(_)
        | SnapshotError::Vmm(_)
        | SnapshotError::Vm(_)
        | SnapshotError::Devices(_) => ErrorCode::Internal,
    }
}

/// The protocol's code for a (standby) restore error.
pub fn build_code(e: &BuildError) -> ErrorCode {
    match e {
        BuildError::State(s) => state_code(s),
        BuildError::Layer(l) => layer_code(l),
        BuildError::CpuidMismatch { .. }
        | BuildError::LayoutMismatch
        | BuildError::StandbyMismatch { .. } => ErrorCode::Incompatible,
        BuildError::StandbyMode | BuildError::Config(_) | BuildError::NetPresence(_) => {
            ErrorCode::InvalidArgument
        }
        BuildError::Devices(DeviceManagerError::VsockUdsRequired) => ErrorCode::InvalidArgument,
        BuildError::Devices(DeviceManagerError::VsockNew(VsockError::Backend(
            BackendError::Exists(_),
        ))) => ErrorCode::AlreadyExists,
        BuildError::Serial(crate::devices::legacy::serial::SerialError::File {
            source, ..
        }) => io_code(source.kind()),
        _ => ErrorCode::Internal,
    }
}

fn snapshot_refusal(e: &SnapshotError) -> Refusal {
    Refusal::new(snapshot_code(e), crate::one_line(e))
}

fn build_refusal(e: &BuildError) -> Refusal {
    Refusal::new(build_code(e), crate::one_line(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_codes() {
        assert_eq!(snapshot_code(&SnapshotError::Exists("/s".into())), ErrorCode::AlreadyExists);
        assert_eq!(snapshot_code(&SnapshotError::NoBase), ErrorCode::FailedPrecondition);
        assert_eq!(snapshot_code(&SnapshotError::NotUffd), ErrorCode::FailedPrecondition);
        let corrupt = SnapshotError::State(StateError::BadMagic("/s/vmstate".into()));
        assert_eq!(snapshot_code(&corrupt), ErrorCode::Corrupt);
        let missing = StateError::Input {
            path: "/s/vmstate".into(),
            source: InputError::Open(std::io::Error::from(std::io::ErrorKind::NotFound)),
        };
        assert_eq!(build_code(&BuildError::State(missing)), ErrorCode::NotFound);
        let cpuid = BuildError::CpuidMismatch { saved: 1, host: 2 };
        assert_eq!(build_code(&cpuid), ErrorCode::Incompatible);
        assert!(build_refusal(&cpuid).message.contains("another CPU"));
        let size = BuildError::StandbyMismatch { snap_vcpus: 1, snap_bytes: 1, vcpus: 1, bytes: 2 };
        assert_eq!(build_code(&size), ErrorCode::Incompatible);
        assert_eq!(build_code(&BuildError::StandbyMode), ErrorCode::InvalidArgument);
        let full = SnapshotError::Dir {
            path: "/s".into(),
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        };
        assert_eq!(snapshot_code(&full), ErrorCode::ResourceExhausted);
    }
}
