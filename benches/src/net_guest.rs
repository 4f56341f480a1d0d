//! `grove-bench net-guest`: guest-to-host TCP throughput of a Linux guest on virtio-net in a
//! netd slot (tap, the slot's programs, NAT) under grove-vmm, beside the same guest under
//! QEMU's own virtio-net (virtio-mmio on a `microvm` machine, tap backend, no vhost) in another
//! slot of the same pool, in the same run. Needs a hardware-style KVM for Linux guests: run it
//! in the test host (`scripts/testhost.sh netbench`).
//!
//! Both guests run `scripts/testhost/guest/netbench.sh`, which asks a control port what to do
//! and uploads zeros (`dd | nc`) to a TCP sink in the test bed's server namespace; the sink
//! times each upload from its first byte to EOF. Uploads alternate between the two VMMs (one
//! at a time, the order swapped every round), after one warm-up each.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grove_netd::testbed::{Servers, TestNet, SERVER, SINK_PORT};
use grove_netd::{Policy, Slot, SlotRequest};
use serde::Serialize;

use crate::stats::{flag, wants_json, Summary};

/// Control port: a guest asks what to do next ("upload N" 64 KiB blocks, "wait", "done").
const CTRL_PORT: u16 = 7005;

#[derive(Serialize)]
struct Side {
    vmm: String,
    slot_ip: Ipv4Addr,
    mbytes_per_s: Summary,
}

#[derive(Serialize)]
struct Report {
    conditions: serde_json::Value,
    grove: Side,
    qemu: Side,
    /// Median grove-vmm throughput over median QEMU throughput.
    ratio: f64,
}

/// What the control server tells each guest.
#[derive(Default)]
struct Control {
    /// The guest whose turn it is, and how many 64 KiB blocks it sends.
    turn: Option<(IpAddr, u32)>,
    done: bool,
    seen: Vec<IpAddr>,
}

fn start_control(net: &TestNet, stop: Arc<AtomicBool>) -> Arc<Mutex<Control>> {
    let ctl = Arc::new(Mutex::new(Control::default()));
    let l = net.in_server(|| {
        let l = std::net::TcpListener::bind((SERVER, CTRL_PORT)).expect("control port");
        l.set_nonblocking(true).expect("non-blocking");
        l
    });
    let c = ctl.clone();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut s, peer)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let msg = {
                let mut c = c.lock().unwrap();
                if !c.seen.contains(&peer.ip()) {
                    c.seen.push(peer.ip());
                }
                if c.done {
                    "done\n".to_string()
                } else {
                    match c.turn {
                        Some((ip, n)) if ip == peer.ip() => {
                            c.turn = None;
                            format!("upload {n}\n")
                        }
                        _ => "wait\n".to_string(),
                    }
                }
            };
            let _ = s.set_nonblocking(false);
            let _ = s.write_all(msg.as_bytes());
        }
    });
    ctl
}

/// A guest VMM process, killed when dropped.
struct Guest {
    name: &'static str,
    child: Child,
    serial: PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guest {
    fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name)
        .map_err(|_| format!("{name} is not set (run through scripts/testhost.sh netbench)"))
}

fn cmdline(slot: &Slot) -> String {
    let g = slot.guest();
    let mask = u32::MAX.checked_shl(32 - u32::from(g.prefix_len)).unwrap_or(0);
    format!(
        "console=ttyS0 reboot=k panic=-1 grove.vsock=off grove.run=/probe/netbench.sh \
         grove.modules=virtio_mmio,virtio_net ip={}::{}:{}:grove:eth0:off probe.server={SERVER} \
         probe.ctrl={CTRL_PORT} probe.sink={SINK_PORT}",
        g.guest_ip,
        g.gateway_ip,
        Ipv4Addr::from(mask)
    )
}

fn mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn start_grove(slot: &Slot, out: &std::path::Path) -> Result<Guest, String> {
    let serial = out.join("netbench-grove.serial");
    let child = Command::new(env("GROVE_VMM")?)
        .args(["run", "--kernel", &env("GUEST_KERNEL")?, "--initrd", &env("GUEST_INITRD")?])
        .args(["--cmdline", &cmdline(slot), "--vcpus", "1", "--mem-mib", "512"])
        .arg("--net")
        .arg(format!("tap={},netns={}", slot.tap_name(), slot.netns_path().display()))
        .arg("--serial")
        .arg(&serial)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(out.join("netbench-grove.err")).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("grove-vmm: {e}"))?;
    Ok(Guest { name: "grove-vmm", child, serial })
}

fn start_qemu(slot: &Slot, out: &std::path::Path) -> Result<Guest, String> {
    let serial = out.join("netbench-qemu.serial");
    let qemu = std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let child = Command::new("ip")
        .args(["netns", "exec", slot.name(), &qemu])
        .args(["-accel", "kvm", "-cpu", "host", "-M", "microvm,acpi=on", "-m", "512", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args(["-kernel", &env("GUEST_KERNEL")?, "-initrd", &env("GUEST_INITRD")?])
        .args(["-append", &cmdline(slot)])
        .arg("-netdev")
        .arg(format!("tap,id=n0,ifname={},script=no,downscript=no,vhost=off", slot.tap_name()))
        .arg("-device")
        .arg(format!("virtio-net-device,netdev=n0,mac={}", mac(slot.guest().guest_mac)))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(out.join("netbench-qemu.err")).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("{qemu}: {e}"))?;
    Ok(Guest { name: "qemu", child, serial })
}

/// Runs the benchmark.
pub fn run(args: &[String]) -> Result<(), String> {
    let runs: usize = flag(args, "--runs")?.unwrap_or(5);
    let mib: u32 = flag(args, "--mib")?.unwrap_or(64);
    let out = PathBuf::from(std::env::var("GROVE_OUT").unwrap_or_else(|_| "/tmp".into()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let report = rt.block_on(bench(runs, mib, &out))?;
    if wants_json(args) {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    } else {
        println!("conditions: {}", report.conditions);
        for s in [&report.grove, &report.qemu] {
            println!("guest -> server through {:<9} {}", s.vmm, s.mbytes_per_s);
        }
        println!("ratio grove-vmm / qemu (medians): {:.2}", report.ratio);
    }
    Ok(())
}

fn wait_until(
    what: &str,
    secs: u64,
    guests: &mut [&mut Guest],
    mut ok: impl FnMut() -> bool,
) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        for g in guests.iter_mut() {
            if let Ok(Some(st)) = g.child.try_wait() {
                let tail: String = g.serial().lines().rev().take(30).collect::<Vec<_>>().join("\n");
                return Err(format!(
                    "{} exited ({st}) before {what}; serial (last lines, newest first):\n{tail}",
                    g.name
                ));
            }
        }
        if Instant::now() > end {
            return Err(format!("no {what} within {secs} s"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn uploads_from(s: &Servers, ip: IpAddr) -> Vec<f64> {
    s.uploads
        .lock()
        .unwrap()
        .iter()
        .filter(|u| u.peer.ip() == ip && u.secs > 0.0)
        .map(|u| u.bytes as f64 / u.secs / 1e6)
        .collect()
}

async fn bench(runs: usize, mib: u32, out: &std::path::Path) -> Result<Report, String> {
    let net = TestNet::new().await;
    let servers = net.start_tcp_servers(2);
    let ctl = start_control(&net, net.stop.clone());
    let (pool, _) =
        grove_netd::SlotPool::open(net.pool_config()).await.map_err(|e| format!("pool: {e}"))?;
    let mut slots = Vec::new();
    for owner in ["grove", "qemu"] {
        let req = SlotRequest { owner: owner.into(), policy: Policy::default() };
        slots.push(pool.take(req).await.map_err(|e| format!("take: {e}"))?);
    }
    let ips: Vec<IpAddr> = slots.iter().map(|s| IpAddr::V4(s.slot_ip())).collect();
    let mut grove = start_grove(&slots[0], out)?;
    let mut qemu = start_qemu(&slots[1], out)?;
    let t0 = Instant::now();
    wait_until("both guests at the control port", 600, &mut [&mut grove, &mut qemu], || {
        let c = ctl.lock().unwrap();
        ips.iter().all(|ip| c.seen.contains(ip))
    })?;
    let boot_s = t0.elapsed().as_secs_f64();
    let blocks = mib * 16;
    // One warm-up each, then `runs` rounds, alternating who goes first.
    let mut order: Vec<usize> = vec![0, 1];
    for r in 0..=runs {
        for &i in &order {
            let before = uploads_from(&servers, ips[i]).len();
            ctl.lock().unwrap().turn = Some((ips[i], blocks));
            wait_until("an upload", 300, &mut [&mut grove, &mut qemu], || {
                uploads_from(&servers, ips[i]).len() > before
            })
            .map_err(|e| format!("round {r}, {}: {e}", ["grove-vmm", "qemu"][i]))?;
        }
        order.reverse();
    }
    ctl.lock().unwrap().done = true;
    let side = |i: usize, vmm: &str| -> Result<Side, String> {
        let v = uploads_from(&servers, ips[i]);
        let v = &v[1..]; // without the warm-up
        Ok(Side {
            vmm: vmm.into(),
            slot_ip: slots[i].slot_ip(),
            mbytes_per_s: Summary::of("MB/s", v).ok_or("no uploads")?,
        })
    };
    let g = side(0, "grove-vmm")?;
    let q = side(1, "qemu")?;
    let ratio = g.mbytes_per_s.median / q.mbytes_per_s.median;
    let qemu_version =
        Command::new(std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()))
            .arg("--version")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().to_string()
            })
            .unwrap_or_default();
    let uname = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let conditions = serde_json::json!({
        "host_kernel": uname,
        "kvm": if std::path::Path::new("/sys/module/kvm_amd").exists() { "kvm_amd" } else if std::path::Path::new("/sys/module/kvm_intel").exists() { "kvm_intel" } else { "other" },
        "guest_kernel": env("GUEST_KERNEL")?,
        "guest": "1 vCPU, 512 MiB, virtio-mmio virtio-net on a netd slot tap (programs attached)",
        "qemu": format!("{qemu_version}, -M microvm,acpi=on, virtio-net-device, tap vhost=off"),
        "upload_mib": mib,
        "runs": runs,
        "boot_both_s": boot_s,
        "sink": "TCP in the test bed's server namespace, first byte to EOF",
    });
    drop(grove);
    drop(qemu);
    for s in slots {
        let _ = pool.destroy(s).await;
    }
    let _ = pool.destroy_all().await;
    Ok(Report { conditions, grove: g, qemu: q, ratio })
}
