//! `grove-vmm`: run a guest, restore a snapshot, wait as a standby VMM, send one control
//! request, or check the host.

use std::path::PathBuf;
use std::process::ExitCode;

use grove_vmm::api_server::ApiConfig;
use grove_vmm::builder::{self, RestoreConfig, Standby};
use grove_vmm::controller::{self, ApiHandle};
use grove_vmm::vmm::Vmm;
use grove_vmm::{api_server, cli, guest_refresh, one_line, seccomp};

fn fail(msg: &str) -> ExitCode {
    grove_vmm::errln!("grove-vmm: error: {msg}");
    ExitCode::from(1)
}

/// Serves the VM until it ends; status 0 for a guest reset or power-off.
fn serve(mut vmm: Vmm, api: Option<&ApiHandle>) -> ExitCode {
    let exit = controller::serve(&mut vmm, api);
    let dropped = grove_vmm::devices::legacy::serial::dropped_bytes();
    if dropped > 0 {
        grove_vmm::errln!("grove-vmm: {dropped} bytes of guest serial output were dropped");
    }
    let code = if exit.is_clean() {
        ExitCode::SUCCESS
    } else {
        match vmm.page_server_failure() {
            Some(pf) => fail(&format!("{}; page server failed: {pf}", one_line(&exit))),
            None => fail(&one_line(&exit)),
        }
    };
    // The VM's vsock socket goes with it (the path may be given to another VM).
    if let Some(p) = vmm.devices().vsock_uds() {
        let _ = std::fs::remove_file(p);
    }
    // The vCPU threads may still be inside KVM_RUN: end the process without tearing guest
    // memory down under them.
    std::mem::forget(vmm);
    code
}

/// Attaches the control socket (if asked for) to a built VMM and serves it.
fn serve_with_api(mut vmm: Vmm, sock: Option<&str>, cfg: ApiConfig) -> ExitCode {
    let api = match sock.map(|p| controller::attach_api(vmm.events(), p, cfg)) {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(e)) => return fail(&one_line(&e)),
    };
    serve(vmm, api.as_ref())
}

/// Takes `--seccomp` out of `args` and sets the process's seccomp mode (before any thread
/// starts); the other arguments.
fn seccomp_mode(args: &[String]) -> Result<Vec<String>, ExitCode> {
    let (mode, rest) = cli::take_seccomp(args).map_err(|e| fail(&one_line(&e)))?;
    seccomp::init(mode).map_err(|e| fail(&one_line(&e)))?;
    Ok(rest)
}

fn run(args: &[String]) -> ExitCode {
    let args = match seccomp_mode(args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let a = match cli::parse_run(&args) {
        Ok(a) => a,
        Err(e) => return fail(&one_line(&e)),
    };
    let built = builder::event_loop().and_then(|events| builder::boot(&a.vm, events));
    match built {
        Ok(vmm) => serve_with_api(vmm, a.api_sock.as_deref(), a.api),
        Err(e) => fail(&one_line(&e)),
    }
}

fn restore(args: &[String]) -> ExitCode {
    let args = match seccomp_mode(args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let a = match cli::parse_restore(&args) {
        Ok(a) => a,
        Err(e) => return fail(&one_line(&e)),
    };
    let cfg = RestoreConfig {
        dir: PathBuf::from(&a.snapshot),
        mem_mode: a.mem_mode,
        identity: a.identity,
        serial: a.serial.clone(),
        dirty_logging: a.api_sock.is_some(),
        disk_dir: a.disk_dir.as_ref().map(PathBuf::from),
        overrides: a.overrides.clone(),
        net: a.net.clone(),
    };
    match builder::event_loop().and_then(|events| builder::restore(&cfg, events)) {
        Ok(mut vmm) => {
            // Done (and the control socket bound) once the guest has its clock, entropy and
            // identity.
            let ack = guest_refresh::run(&mut vmm, &a.guest);
            // Said when the VM has a vsock device to reach the guest through (the status
            // request reports it in every case).
            if vmm.devices().vsock_uds().is_some() {
                grove_vmm::errln!(
                    "grove-vmm: post-restore: {}",
                    serde_json::to_string(&ack).unwrap_or_default()
                );
            }
            vmm.set_post_restore(ack);
            serve_with_api(vmm, a.api_sock.as_deref(), a.api)
        }
        Err(e) => fail(&one_line(&e)),
    }
}

fn standby(args: &[String]) -> ExitCode {
    let args = match seccomp_mode(args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let a = match cli::parse_standby(&args) {
        Ok(a) => a,
        Err(e) => return fail(&one_line(&e)),
    };
    let sb = match Standby::new(a.vcpus, a.mem_mib, a.net.as_ref()) {
        Ok(s) => s.with_disk_dir(a.disk_dir.as_ref().map(PathBuf::from)),
        Err(e) => return fail(&one_line(&e)),
    };
    let mut events = match builder::event_loop() {
        Ok(e) => e,
        Err(e) => return fail(&one_line(&e)),
    };
    let api = match controller::attach_api(&mut events, &a.api_sock, a.api) {
        Ok(api) => api,
        Err(e) => return fail(&one_line(&e)),
    };
    match controller::serve_standby(sb, &a.serial, events, &api) {
        Ok(vmm) => serve(vmm, Some(&api)),
        Err(msg) => fail(&msg),
    }
}

/// `grove-vmm api --api-sock PATH JSON`: one control request, its reply line on stdout;
/// status 0 when the VMM answered with a reply, 1 when it answered with an error.
fn api_client(args: &[String]) -> ExitCode {
    let (sock, req) = match args {
        [flag, sock, req] if flag == "--api-sock" => (sock, req),
        _ => return fail("usage: grove-vmm api --api-sock PATH '{\"cmd\":\"status\"}'"),
    };
    let req = match api_server::parse(req) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let answer = match grove_vmm_api::Client::connect(sock).and_then(|mut c| c.call(&req)) {
        Ok(r) => Ok(r),
        Err(grove_vmm_api::ClientError::Vmm { source, .. }) => Err(source),
        Err(e) => return fail(&one_line(&e)),
    };
    grove_vmm::out!("{}", grove_vmm_api::encode_reply(&answer));
    if answer.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn main() -> ExitCode {
    grove_vmm::timing::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("restore") => restore(&args[1..]),
        Some("standby") => standby(&args[1..]),
        Some("api") => api_client(&args[1..]),
        Some("check-host") => {
            let code = grove_vmm::hostcheck::main(&args[1..]);
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Some("-h" | "--help" | "help") => {
            grove_vmm::outln!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Some(other) => fail(&format!(
            "unknown command {other:?} (commands: run, restore, standby, api, check-host)"
        )),
        None => {
            grove_vmm::errln!("{}", cli::USAGE);
            ExitCode::from(2)
        }
    }
}
