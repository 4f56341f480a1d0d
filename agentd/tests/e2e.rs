//! End-to-end tests of agentd with real VMMs: a real agentd in a temporary data directory,
//! the test guest as a template, through the gRPC client and through the `grove` CLI.
//! They print `skipped: ...` and return where /dev/kvm is missing. No timing assertions.

#![allow(clippy::tests_outside_test_module)]

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::*;
use grove_proto::v1 as pb;
use tonic::Code;

const READY_CMDLINE: &str = "tg.mode=ready tg.idle_us=1000";
const FORK_CMDLINE: &str = "tg.mode=fork tg.touch_mib=8 tg.idle_us=1000";

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn state(s: &pb::Sandbox) -> pb::SandboxState {
    s.state()
}

async fn get(
    c: &mut grove_agentd::client::Clients,
    id: &str,
) -> Result<pb::Sandbox, tonic::Status> {
    c.sandbox.get(pb::GetRequest { id: id.into() }).await.map(tonic::Response::into_inner)
}

fn ts(agent: &Agent, pid: u32) -> usize {
    serial_of(agent, pid).bytes().filter(|&b| b == b'T').count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_through_the_api() {
    if !kvm_available() {
        return;
    }
    let agent = Agent::start(2, &[]);
    let mut c = agent.clients().await;
    let t = warm_test_guest(&mut c, "tg", READY_CMDLINE, 128).await;
    assert_ne!(t.snapshot, 0, "warm template has a snapshot");

    // Create: a restore of the warm template; its guest runs (the T stream grows).
    let mut req = create_req("tg");
    req.labels = HashMap::from([("team".into(), "a".into())]);
    let s = c.sandbox.create(req).await.unwrap().into_inner();
    assert_eq!(state(&s), pb::SandboxState::Running);
    assert_eq!(s.from_snapshot, t.snapshot);
    assert!(alive(s.vmm_pid));
    let before = ts(&agent, s.vmm_pid);
    wait_until("the guest's T stream to grow", || ts(&agent, s.vmm_pid) > before + 10).await;

    // Pause: the stream stops; resume: it goes on.
    let p = c.sandbox.pause(pb::PauseRequest { id: s.id.clone() }).await.unwrap().into_inner();
    assert_eq!(state(&p), pb::SandboxState::Paused);
    let n1 = ts(&agent, s.vmm_pid);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ts(&agent, s.vmm_pid), n1, "a paused guest prints nothing");
    let r = c.sandbox.resume(pb::ResumeRequest { id: s.id.clone() }).await.unwrap().into_inner();
    assert_eq!(state(&r), pb::SandboxState::Running);
    wait_until("the stream to resume", || ts(&agent, s.vmm_pid) > n1 + 10).await;

    // Snapshot (durable) and a sandbox restored from it.
    let snap = c
        .sandbox
        .snapshot(pb::SnapshotRequest { id: s.id.clone(), labels: HashMap::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snap.sandbox, s.id);
    assert_eq!(snap.parent, t.snapshot);
    let from_snap = c
        .sandbox
        .create(pb::CreateRequest {
            source: Some(pb::create_request::Source::SnapshotId(snap.id)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(from_snap.from_snapshot, snap.id);
    wait_until("the restored snapshot to run", || ts(&agent, from_snap.vmm_pid) > 10).await;

    // Get and List with filters.
    let g = c.sandbox.get(pb::GetRequest { id: s.id.clone() }).await.unwrap().into_inner();
    assert_eq!(g.labels.get("team").map(String::as_str), Some("a"));
    let l = c
        .sandbox
        .list(pb::ListRequest {
            labels: HashMap::from([("team".into(), "a".into())]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.sandboxes.iter().map(|s| s.id.clone()).collect::<Vec<_>>(), vec![s.id.clone()]);
    let page = c
        .sandbox
        .list(pb::ListRequest { page_size: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.sandboxes.len(), 1);
    assert!(!page.next_page_token.is_empty());
    let rest = c
        .sandbox
        .list(pb::ListRequest {
            page_size: 1,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.sandboxes.len(), 1);
    assert_ne!(rest.sandboxes[0].id, page.sandboxes[0].id);

    // Delete removes processes, sockets and files.
    for id in [s.id.clone(), from_snap.id.clone()] {
        let rec = c.sandbox.get(pb::GetRequest { id: id.clone() }).await.unwrap().into_inner();
        c.sandbox.delete(pb::DeleteRequest { id: id.clone(), subtree: false }).await.unwrap();
        assert!(!alive(rec.vmm_pid), "VMM {} still runs", rec.vmm_pid);
        let e = c.sandbox.get(pb::GetRequest { id }).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
    // Only the standby pool's VMMs and directories are left.
    assert_no_strays(&agent, &mut c).await;
    let info = c.node.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.capacity.unwrap().sandboxes, 0);
    // The pinned snapshot stays until deleted; then the snapshot tree is the template's only.
    c.sandbox.delete_snapshot(pb::DeleteSnapshotRequest { id: snap.id }).await.unwrap();
    let snaps =
        c.sandbox.list_snapshots(pb::ListSnapshotsRequest {}).await.unwrap().into_inner().snapshots;
    assert_eq!(snaps.iter().map(|s| s.id).collect::<Vec<_>>(), vec![t.snapshot]);
    assert_eq!(list(&agent.data().join("snapshots")), vec![t.snapshot.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_into_eight_children_with_their_own_identity() {
    if !kvm_available() {
        return;
    }
    let agent = Agent::start(2, &[]);
    let mut c = agent.clients().await;
    warm_test_guest(&mut c, "tgf", FORK_CMDLINE, 128).await;
    let parent = c.sandbox.create(create_req("tgf")).await.unwrap().into_inner();
    let r = c
        .sandbox
        .fork(pb::ForkRequest {
            id: parent.id.clone(),
            count: 8,
            labels: HashMap::from([("job".into(), "f".into())]),
            child_labels: vec![pb::Labels { labels: HashMap::from([("n".into(), "0".into())]) }],
            ttl_seconds: 0,
            // Accepted for any template; the test guest's (no agent) restore as saved anyway,
            // and each child still gets its own identity.
            deterministic: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.children.len(), 8);
    let snap = r.snapshot.unwrap();
    let mut identities = std::collections::HashSet::new();
    for (i, ch) in r.children.iter().enumerate() {
        assert_eq!(state(ch), pb::SandboxState::Running);
        assert_eq!(ch.parent, parent.id);
        assert_eq!(ch.from_snapshot, snap.id);
        assert_eq!(ch.labels.get("job").map(String::as_str), Some("f"));
        assert_eq!(ch.labels.contains_key("n"), i == 0);
        assert!(identities.insert(ch.identity), "identities are distinct");
        // The test guest's fork mode prints its identity after a restore.
        let want = format!("ID={} ", ch.identity);
        wait_until("a child's ID line", || serial_of(&agent, ch.vmm_pid).contains(&want)).await;
    }
    // The parent keeps running and sees none of its children's identities (it prints
    // only its own, given when it was restored from the template).
    let p = c.sandbox.get(pb::GetRequest { id: parent.id.clone() }).await.unwrap().into_inner();
    assert_eq!(state(&p), pb::SandboxState::Running);
    let out = serial_of(&agent, parent.vmm_pid);
    assert!(out.contains(&format!("ID={} ", parent.identity)), "{out}");
    for ch in &r.children {
        assert!(!out.contains(&format!("ID={} ", ch.identity)), "a child's identity in the parent");
    }
    // The fork snapshot is referenced by the children; deleting them collects it.
    let snaps =
        c.sandbox.list_snapshots(pb::ListSnapshotsRequest {}).await.unwrap().into_inner().snapshots;
    assert_eq!(snaps.iter().find(|s| s.id == snap.id).unwrap().refs, 8);
    for ch in &r.children {
        c.sandbox.delete(pb::DeleteRequest { id: ch.id.clone(), subtree: false }).await.unwrap();
    }
    let snaps =
        c.sandbox.list_snapshots(pb::ListSnapshotsRequest {}).await.unwrap().into_inner().snapshots;
    assert!(snaps.iter().all(|s| s.id != snap.id), "the fork snapshot was collected: {snaps:?}");
    // Its layer files stay while the parent's VMM names them (a later fork diffs on top).
    c.sandbox
        .fork(pb::ForkRequest { id: parent.id.clone(), count: 1, ..Default::default() })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_codes_and_change_nothing() {
    if !kvm_available() {
        return;
    }
    // Room for two 128 MiB sandboxes.
    let agent = Agent::start(1, &["--max-memory-mib", "300"]);
    let mut c = agent.clients().await;
    warm_test_guest(&mut c, "tg", READY_CMDLINE, 128).await;
    let a = c.sandbox.create(create_req("tg")).await.unwrap().into_inner();
    let snapshot_state = |c: &mut grove_agentd::client::Clients| {
        let mut c = c.clone();
        async move {
            let l = c.sandbox.list(pb::ListRequest::default()).await.unwrap().into_inner();
            let s =
                c.sandbox.list_snapshots(pb::ListSnapshotsRequest {}).await.unwrap().into_inner();
            let t = c.template.list(pb::ListTemplatesRequest {}).await.unwrap().into_inner();
            let cap = c.node.info(pb::InfoRequest {}).await.unwrap().into_inner().capacity.unwrap();
            format!("{:?} {:?} {:?} {:?}", l.sandboxes, s.snapshots, t.templates, cap)
        }
    };
    let before = snapshot_state(&mut c).await;
    let unknown = "sb-0000000000000000".to_string();
    assert_eq!(code(c.sandbox.get(pb::GetRequest { id: unknown.clone() }).await), Code::NotFound);
    assert_eq!(
        code(c.sandbox.delete(pb::DeleteRequest { id: unknown.clone(), subtree: false }).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.sandbox.pause(pb::PauseRequest { id: unknown.clone() }).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.sandbox.get(pb::GetRequest { id: "../../etc".into() }).await),
        Code::InvalidArgument
    );
    let mut fork = pb::ForkRequest { id: a.id.clone(), count: 0, ..Default::default() };
    assert_eq!(code(c.sandbox.fork(fork.clone()).await), Code::InvalidArgument);
    fork.count = 10_000;
    assert_eq!(code(c.sandbox.fork(fork.clone()).await), Code::InvalidArgument);
    // Over capacity: one more fits, two do not; nothing is half-made.
    fork.count = 2;
    assert_eq!(code(c.sandbox.fork(fork.clone()).await), Code::ResourceExhausted);
    let mut big = create_req("tg");
    big.labels = HashMap::from([("k".into(), "v".repeat(256))]);
    assert_eq!(code(c.sandbox.create(big).await), Code::InvalidArgument);
    let mut many = create_req("tg");
    many.labels = (0..33).map(|i| (format!("k{i}"), String::new())).collect();
    assert_eq!(code(c.sandbox.create(many).await), Code::InvalidArgument);
    assert_eq!(code(c.sandbox.create(create_req("Bad Name")).await), Code::InvalidArgument);
    assert_eq!(code(c.sandbox.create(create_req("nope")).await), Code::NotFound);
    assert_eq!(code(c.sandbox.create(pb::CreateRequest::default()).await), Code::InvalidArgument);
    let mut net = create_req("tg");
    net.network = Some(pb::NetworkRequest { enabled: true, allow_cidrs: vec![] });
    assert_eq!(code(c.sandbox.create(net).await), Code::Unimplemented);
    let mut huge = create_req("tg");
    huge.memory_mib = 4096;
    assert_eq!(code(c.sandbox.create(huge).await), Code::ResourceExhausted);
    let mut snap_shape = pb::CreateRequest {
        source: Some(pb::create_request::Source::SnapshotId(12345)),
        ..Default::default()
    };
    assert_eq!(code(c.sandbox.create(snap_shape.clone()).await), Code::NotFound);
    let t = c.template.list(pb::ListTemplatesRequest {}).await.unwrap().into_inner().templates[0]
        .clone();
    snap_shape.source = Some(pb::create_request::Source::SnapshotId(t.snapshot));
    snap_shape.memory_mib = 256;
    assert_eq!(code(c.sandbox.create(snap_shape).await), Code::FailedPrecondition);
    assert_eq!(
        code(c.sandbox.resume(pb::ResumeRequest { id: a.id.clone() }).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(c.template.delete(pb::DeleteTemplateRequest { name: "tg".into() }).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(c.sandbox.delete_snapshot(pb::DeleteSnapshotRequest { id: t.snapshot }).await),
        Code::FailedPrecondition
    );
    let reg = |name: &str, kernel: &str| pb::RegisterTemplateRequest {
        name: name.into(),
        kernel: kernel.into(),
        ..Default::default()
    };
    assert_eq!(code(c.template.register(reg("tg", guest())).await), Code::AlreadyExists);
    assert_eq!(code(c.template.register(reg("x/y", guest())).await), Code::InvalidArgument);
    assert_eq!(code(c.template.register(reg("x", "relative/kernel")).await), Code::InvalidArgument);
    assert_eq!(
        code(c.template.register(reg("x", "/nonexistent/kernel")).await),
        Code::InvalidArgument
    );
    let mut bad_vcpus = reg("x", guest());
    bad_vcpus.vcpus = 33;
    assert_eq!(code(c.template.register(bad_vcpus).await), Code::InvalidArgument);
    assert_eq!(
        code(c.sandbox.list(pb::ListRequest { page_size: 5000, ..Default::default() }).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.sandbox
                .list(pb::ListRequest { page_token: "garbage".into(), ..Default::default() })
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(snapshot_state(&mut c).await, before, "refused requests changed nothing");
    // The capacity that is left still works, and then it is full.
    c.sandbox.create(create_req("tg")).await.unwrap();
    assert_eq!(code(c.sandbox.create(create_req("tg")).await), Code::ResourceExhausted);
    // Errors are counted by code.
    let m = c.node.metrics(pb::MetricsRequest {}).await.unwrap().into_inner().text;
    assert!(
        m.contains("grove_api_errors_total{method=\"Create\",code=\"ResourceExhausted\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_creates_leave_a_consistent_catalog() {
    if !kvm_available() {
        return;
    }
    let agent = Agent::start(4, &["--max-vcpus", "100"]);
    let mut c = agent.clients().await;
    warm_test_guest(&mut c, "tg", READY_CMDLINE, 64).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = create_req("tg");
            r.labels = HashMap::from([("i".into(), i.to_string())]);
            c.sandbox.create(r).await.map(tonic::Response::into_inner)
        }));
    }
    let mut made = Vec::new();
    for t in tasks {
        made.push(t.await.unwrap().expect("create"));
    }
    let l = c.sandbox.list(pb::ListRequest::default()).await.unwrap().into_inner().sandboxes;
    assert_eq!(l.len(), 50);
    let pids: std::collections::HashSet<u32> = l.iter().map(|s| s.vmm_pid).collect();
    assert_eq!(pids.len(), 50, "one VMM per sandbox");
    assert!(l.iter().all(|s| state(s) == pb::SandboxState::Running && alive(s.vmm_pid)));
    let idents: std::collections::HashSet<u32> = l.iter().map(|s| s.identity).collect();
    assert_eq!(idents.len(), 50);
    // Concurrent deletes: no stray processes or directories.
    let mut tasks = Vec::new();
    for s in made {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.sandbox.delete(pb::DeleteRequest { id: s.id, subtree: false }).await
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("delete");
    }
    assert!(c
        .sandbox
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes
        .is_empty());
    for p in pids {
        assert!(!alive(p), "VMM {p} survived its delete");
    }
    let info = c.node.info(pb::InfoRequest {}).await.unwrap().into_inner();
    let cap = info.capacity.unwrap();
    assert_eq!((cap.memory_used_mib, cap.vcpus_used, cap.sandboxes), (0, 0, 0));
    // What is left is the standby pool, whose directories match its processes.
    assert_no_strays(&agent, &mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_deletes_the_sandbox() {
    if !kvm_available() {
        return;
    }
    let agent = Agent::start(1, &[]);
    let mut c = agent.clients().await;
    warm_test_guest(&mut c, "tg", READY_CMDLINE, 64).await;
    let mut w = c
        .sandbox
        .watch(pb::WatchRequest { id: String::new(), include_current: false })
        .await
        .unwrap()
        .into_inner();
    let mut r = create_req("tg");
    r.ttl_seconds = 1;
    let s = c.sandbox.create(r).await.unwrap().into_inner();
    assert!(s.expires_unix_ms > s.created_unix_ms);
    // Watch sees it created, then deleted.
    let mut kinds = Vec::new();
    while let Some(ev) = tokio::time::timeout(DEADLINE, w.message()).await.unwrap().unwrap() {
        if ev.sandbox.as_ref().is_some_and(|x| x.id == s.id) {
            kinds.push(ev.kind());
            if ev.kind() == pb::EventKind::Deleted {
                break;
            }
        }
    }
    assert_eq!(kinds.first(), Some(&pb::EventKind::Created));
    assert_eq!(kinds.last(), Some(&pb::EventKind::Deleted));
    assert!(!alive(s.vmm_pid));
    assert_eq!(
        c.sandbox.get(pb::GetRequest { id: s.id }).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_vmm_fails_only_its_sandbox() {
    if !kvm_available() {
        return;
    }
    let agent = Agent::start(1, &[]);
    let mut c = agent.clients().await;
    warm_test_guest(&mut c, "tg", READY_CMDLINE, 64).await;
    let a = c.sandbox.create(create_req("tg")).await.unwrap().into_inner();
    let b = c.sandbox.create(create_req("tg")).await.unwrap().into_inner();
    Command::new("kill").args(["-9", &a.vmm_pid.to_string()]).status().unwrap();
    let t = std::time::Instant::now();
    let ga = loop {
        let s = c.sandbox.get(pb::GetRequest { id: a.id.clone() }).await.unwrap().into_inner();
        if state(&s) == pb::SandboxState::Failed {
            break s;
        }
        assert!(t.elapsed() < DEADLINE, "the sandbox never failed: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(ga.reason.contains("signal 9"), "{}", ga.reason);
    assert_eq!(ga.vmm_pid, 0);
    let gb = c.sandbox.get(pb::GetRequest { id: b.id.clone() }).await.unwrap().into_inner();
    assert_eq!(state(&gb), pb::SandboxState::Running);
    // A failed sandbox is deleted like any other.
    c.sandbox.delete(pb::DeleteRequest { id: a.id, subtree: false }).await.unwrap();
    let cap = c.node.info(pb::InfoRequest {}).await.unwrap().into_inner().capacity.unwrap();
    assert_eq!(cap.sandboxes, 1);
    assert_eq!(cap.memory_used_mib, 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_the_same_flow() {
    if !kvm_available() {
        return;
    }
    let agent = Agent::start(2, &[]);
    let ep = agent.endpoint();
    let grove = |args: &[&str]| -> (bool, String, String) {
        let o = Command::new(GROVE).arg("--endpoint").arg(&ep).args(args).output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let ok = |args: &[&str]| -> String {
        let (good, out, err) = grove(args);
        assert!(good, "grove {args:?} failed: {err}");
        out
    };
    ok(&[
        "template",
        "add",
        "tg",
        "--kernel",
        guest(),
        "--cmdline",
        FORK_CMDLINE,
        "--memory-mib",
        "128",
        "--ready",
        "serial:READY",
    ]);
    let warm = ok(&["template", "warm", "tg"]);
    assert!(warm.contains("tg: warm (snapshot"), "{warm}");
    let ls = ok(&["template", "ls"]);
    assert!(ls.lines().nth(1).is_some_and(|l| l.starts_with("tg ")), "{ls}");
    let id = ok(&["create", "--template", "tg", "--label", "who=cli"]).trim().to_string();
    assert!(id.starts_with("sb-"), "{id}");
    let got: serde_json::Value = serde_json::from_str(&ok(&["get", &id, "--json"])).unwrap();
    assert_eq!(got["state"], "running");
    assert_eq!(got["labels"]["who"], "cli");
    assert!(ok(&["pause", &id]).contains("paused"));
    assert!(ok(&["resume", &id]).contains("running"));
    let snap = ok(&["snapshot", &id]).trim().parse::<u64>().unwrap();
    assert!(ok(&["snapshots", "ls"]).lines().any(|l| l.starts_with(&format!("{snap} "))));
    let kids: Vec<String> =
        ok(&["fork", &id, "--count", "8"]).lines().map(str::to_string).collect();
    assert_eq!(kids.len(), 8);
    let all: serde_json::Value = serde_json::from_str(&ok(&["ls", "--json"])).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 9);
    for k in &kids {
        let s: serde_json::Value = serde_json::from_str(&ok(&["get", k, "--json"])).unwrap();
        let want = format!("ID={} ", s["identity"]);
        let pid = u32::try_from(s["vmm_pid"].as_u64().unwrap()).unwrap();
        wait_until("a child's ID line", || serial_of(&agent, pid).contains(&want)).await;
    }
    let only = ok(&["ls", "--label", "who=cli"]);
    assert_eq!(only.lines().count(), 2, "{only}");
    let info = ok(&["node", "info"]);
    assert!(info.contains("sandboxes  9"), "{info}");
    let (good, _, err) = grove(&["template", "rm", "tg"]);
    assert!(!good && err.contains("FailedPrecondition"), "{err}");
    let mut rm = vec!["rm", id.as_str()];
    rm.extend(kids.iter().map(String::as_str));
    ok(&rm);
    assert_eq!(ok(&["ls"]).lines().count(), 1, "only the header is left");
    ok(&["snapshots", "rm", &snap.to_string()]);
    ok(&["template", "rm", "tg"]);
    assert_eq!(ok(&["template", "ls"]).lines().count(), 1);
    // Not running: one clear line.
    let o = Command::new(GROVE)
        .args(["--endpoint", "unix:/nonexistent/agentd.sock", "ls"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("agentd is not running"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_and_health_serves() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    // No VM needed: the server alone (its grove-vmm is never started).
    let agent = Agent::start(0, &[]);
    let c = agent.clients().await;
    let mut r = ServerReflectionClient::new(c.channel.clone());
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let mut resp = r
        .server_reflection_info(tokio_stream::iter(vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol("grove.v1.SandboxService".into())),
        ]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(l)) =
        resp.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
    for want in [
        "grove.v1.SandboxService",
        "grove.v1.TemplateService",
        "grove.v1.NodeService",
        "grove.v1.ProcessService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    let Some(MessageResponse::FileDescriptorResponse(f)) =
        resp.message().await.unwrap().unwrap().message_response
    else {
        panic!("no file descriptor");
    };
    use prost::Message;
    let fd =
        prost_types::FileDescriptorProto::decode(f.file_descriptor_proto[0].as_slice()).unwrap();
    assert_eq!(fd.package(), "grove.v1");
    let svc = fd.service.iter().find(|s| s.name() == "SandboxService").unwrap();
    let methods: Vec<&str> =
        svc.method.iter().map(prost_types::MethodDescriptorProto::name).collect();
    for m in ["Create", "Get", "List", "Delete", "Pause", "Resume", "Snapshot", "Fork", "Watch"] {
        assert!(methods.contains(&m), "{m} missing from {methods:?}");
    }
    let mut h = tonic_health::pb::health_client::HealthClient::new(c.channel.clone());
    let st = h
        .check(tonic_health::pb::HealthCheckRequest { service: "grove.v1.SandboxService".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_needs_the_bearer_token_and_metrics_are_served_over_http() {
    let port =
        |_: ()| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (grpc, http) = (port(()), port(()));
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("token");
    std::fs::write(&tok, "0123456789abcdef-token\n").unwrap();
    let mut agent = Agent::start(0, &[]);
    agent.kill9();
    agent.extra = vec![
        "--pool-size".into(),
        "0".into(),
        "--token-file".into(),
        tok.display().to_string(),
        "--listen".into(),
        format!("tcp:127.0.0.1:{grpc}"),
        "--metrics-listen".into(),
        format!("127.0.0.1:{http}"),
    ];
    let log = std::fs::OpenOptions::new().create(true).append(true).open(agent.log()).unwrap();
    let mut child = Command::new(AGENTD)
        .arg("--data-dir")
        .arg(agent.data())
        .arg("--vmm")
        .arg(vmm())
        .args(&agent.extra)
        .stderr(log)
        .spawn()
        .unwrap();
    let ep = format!("http://127.0.0.1:{grpc}");
    let mut tries = 0;
    let mut without = loop {
        match grove_agentd::client::connect(&ep, None).await {
            Ok(c) => break c,
            Err(_) if tries < 500 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let e = without.node.info(pb::InfoRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut wrong =
        grove_agentd::client::connect(&ep, Some("0123456789abcdef-wrong")).await.unwrap();
    assert_eq!(
        wrong.node.info(pb::InfoRequest {}).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut with =
        grove_agentd::client::connect(&ep, Some("0123456789abcdef-token")).await.unwrap();
    let info = with.node.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.api, "grove.v1");
    // The Prometheus endpoint.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    for m in [
        "grove_sandboxes{state=\"running\"} 0",
        "grove_standby_pool_misses_total",
        "grove_api_requests_total{method=\"Info\"} 1",
    ] {
        assert!(body.contains(m), "{m} missing:\n{body}");
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The Linux-template flow (Debian's kernel, guest-init, ready through the boot-timer
/// port) through the Rust client. Linux guests boot only inside the test host (QEMU TCG
/// emulating AMD-V). The test host runs the same flow with a root disk on virtio-blk and
/// per-VM disk checks as the scenario `scripts/testhost.sh agentd` (through the CLI); this
/// test runs there by hand with GROVE_LINUX_KERNEL and GROVE_LINUX_INITRD set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Linux-capable KVM: run inside the test host with GROVE_LINUX_KERNEL/GROVE_LINUX_INITRD"]
async fn linux_template_boots_warms_and_forks() {
    let kernel = std::env::var("GROVE_LINUX_KERNEL").expect("GROVE_LINUX_KERNEL: a Debian vmlinux");
    let initrd = std::env::var("GROVE_LINUX_INITRD")
        .expect("GROVE_LINUX_INITRD: the project's initramfs with guest-init");
    let agent = Agent::start(1, &[]);
    let mut c = agent.clients().await;
    c.template
        .register(pb::RegisterTemplateRequest {
            name: "debian".into(),
            kernel,
            initrd,
            cmdline: "console=ttyS0 reboot=k panic=1 pci=off".into(),
            vcpus: 1,
            memory_mib: 512,
            ready_check: pb::ReadyCheck::BootTimer.into(),
            ready_timeout_seconds: 600,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut s =
        c.template.warm(pb::WarmRequest { name: "debian".into() }).await.unwrap().into_inner();
    while s.message().await.unwrap().is_some() {}
    let sb = c.sandbox.create(create_req("debian")).await.unwrap().into_inner();
    assert_eq!(sb.state(), pb::SandboxState::Running);
    let f = c
        .sandbox
        .fork(pb::ForkRequest { id: sb.id.clone(), count: 2, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.children.len(), 2);
    for ch in f.children {
        c.sandbox.delete(pb::DeleteRequest { id: ch.id, subtree: false }).await.unwrap();
    }
    c.sandbox.delete(pb::DeleteRequest { id: sb.id, subtree: false }).await.unwrap();
}

/// Issue 13's lineage logic with the test guest (no exec needed): a fork tree's children
/// and ancestors in Get and List, a TTL on a subtree, keep one child, delete a subtree,
/// and rewind in place to a checkpoint and to the creation point, seen in the guest's
/// memory; the same tree through `grove tree`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lineage_subtrees_and_rewind() {
    if !kvm_available() {
        return;
    }
    let agent = Agent::start(2, &[]);
    let mut c = agent.clients().await;
    let tmpl = warm_test_guest(&mut c, "tgl", FORK_CMDLINE, 128).await;
    let p = c.sandbox.create(create_req("tgl")).await.unwrap().into_inner();
    // The fork-mode guest prints its identity and a checksum of the memory it filled from
    // it once per new identity: a restore of memory that already saw the identity prints
    // nothing more.
    let id_line = format!("ID={} ", p.identity);
    // The first complete (newline-ended) line with the identity: the serial file may hold
    // a line being written.
    let first_line = |out: &str| {
        out.split_inclusive('\n')
            .find(|l| l.contains(&id_line) && l.ends_with('\n'))
            .map(|l| l.trim_end().to_string())
    };
    wait_until("P's ID line", || first_line(&serial_of(&agent, p.vmm_pid)).is_some()).await;
    let p_line = first_line(&serial_of(&agent, p.vmm_pid)).unwrap();
    let c1 = c
        .sandbox
        .snapshot(pb::SnapshotRequest { id: p.id.clone(), labels: HashMap::new() })
        .await
        .unwrap()
        .into_inner();
    let fork = |id: &str| pb::ForkRequest { id: id.into(), count: 2, ..Default::default() };
    let mut ab = c.sandbox.fork(fork(&p.id)).await.unwrap().into_inner().children;
    ab.sort_by(|x, y| x.id.cmp(&y.id));
    let (a, b) = (ab[0].id.clone(), ab[1].id.clone());
    let mut a12 = c.sandbox.fork(fork(&a)).await.unwrap().into_inner().children;
    a12.sort_by(|x, y| x.id.cmp(&y.id));
    let (a1, a2) = (a12[0].id.clone(), a12[1].id.clone());

    // Lineage in Get and List.
    assert_eq!(get(&mut c, &p.id).await.unwrap().children, vec![a.clone(), b.clone()]);
    assert_eq!(get(&mut c, &a).await.unwrap().children, vec![a1.clone(), a2.clone()]);
    assert_eq!(get(&mut c, &a1).await.unwrap().ancestors, vec![a.clone(), p.id.clone()]);
    assert!(get(&mut c, &p.id).await.unwrap().ancestors.is_empty());
    let all = c.sandbox.list(pb::ListRequest::default()).await.unwrap().into_inner().sandboxes;
    let in_list = all.iter().find(|s| s.id == a2).unwrap();
    assert_eq!(in_list.ancestors, vec![a.clone(), p.id.clone()]);
    assert!(in_list.children.is_empty());

    // A TTL on A's subtree reaches A, A1, A2 and nothing else.
    let set = c
        .sandbox
        .set_ttl(pb::SetTtlRequest { id: a.clone(), ttl_seconds: 3600, subtree: true })
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    let mut got: Vec<String> = set.iter().map(|s| s.id.clone()).collect();
    got.sort();
    let mut want = vec![a.clone(), a1.clone(), a2.clone()];
    want.sort();
    assert_eq!(got, want);
    assert!(set.iter().all(|s| s.expires_unix_ms > s.created_unix_ms));
    let a1_set = set.iter().find(|s| s.id == a1).unwrap().expires_unix_ms;
    assert_eq!(get(&mut c, &a1).await.unwrap().expires_unix_ms, a1_set);
    assert_eq!(get(&mut c, &b).await.unwrap().expires_unix_ms, 0);
    assert_eq!(get(&mut c, &p.id).await.unwrap().expires_unix_ms, 0);

    // Keep A1: its sibling A2 goes (and its VMM), A and A1 stay.
    let a2_pid = get(&mut c, &a2).await.unwrap().vmm_pid;
    let kept =
        c.sandbox.keep(pb::KeepRequest { id: a1.clone() }).await.unwrap().into_inner().deleted;
    assert_eq!(kept, vec![a2.clone()]);
    assert_eq!(code(c.sandbox.get(pb::GetRequest { id: a2.clone() }).await), Code::NotFound);
    wait_until("A2's VMM to exit", || !alive(a2_pid)).await;
    assert_eq!(get(&mut c, &a).await.unwrap().children, vec![a1.clone()]);
    // P has no parent: nothing to keep it from.
    assert_eq!(
        code(c.sandbox.keep(pb::KeepRequest { id: p.id.clone() }).await),
        Code::FailedPrecondition
    );

    // Delete A's subtree: A1 first, then A; P and B stay.
    let del = c
        .sandbox
        .delete(pb::DeleteRequest { id: a.clone(), subtree: true })
        .await
        .unwrap()
        .into_inner()
        .deleted;
    assert_eq!(del, vec![a1.clone(), a.clone()]);
    assert_eq!(get(&mut c, &p.id).await.unwrap().children, vec![b.clone()]);

    // Rewind P to its checkpoint C1: a new VMM, same id, identity, labels and children; the
    // guest's memory is C1's (it had printed its ID line already: no new one).
    let before = get(&mut c, &p.id).await.unwrap();
    let r = c
        .sandbox
        .rewind(pb::RewindRequest { id: p.id.clone(), snapshot_id: c1.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&r), pb::SandboxState::Running);
    assert_ne!(r.vmm_pid, before.vmm_pid);
    assert_eq!((r.identity, r.from_snapshot), (p.identity, c1.id));
    assert_eq!(r.children, vec![b.clone()]);
    wait_until("the old VMM to exit", || !alive(before.vmm_pid)).await;
    wait_until("Ts from the rewound guest", || ts(&agent, r.vmm_pid) >= 100).await;
    assert!(!serial_of(&agent, r.vmm_pid).contains("ID="), "C1's memory had seen its identity");
    // Still Running after the old VMM's exit (that exit is not the sandbox's).
    assert_eq!(state(&get(&mut c, &p.id).await.unwrap()), pb::SandboxState::Running);

    // Rewind P to where it was created (the template's snapshot, C1's parent): the guest
    // sees its identity as new again and fills the same memory: the same line.
    let t0 = tmpl.snapshot;
    let r2 = c
        .sandbox
        .rewind(pb::RewindRequest { id: p.id.clone(), snapshot_id: t0 })
        .await
        .unwrap()
        .into_inner();
    wait_until("the ID line after rewinding to creation", || {
        first_line(&serial_of(&agent, r2.vmm_pid)).is_some()
    })
    .await;
    assert_eq!(first_line(&serial_of(&agent, r2.vmm_pid)).unwrap(), p_line);

    // Not in P's history: a snapshot of B. Unknown ids: NOT_FOUND.
    let cb = c
        .sandbox
        .snapshot(pb::SnapshotRequest { id: b.clone(), labels: HashMap::new() })
        .await
        .unwrap()
        .into_inner();
    let rw = |id: &str, snapshot_id: u64| pb::RewindRequest { id: id.into(), snapshot_id };
    assert_eq!(code(c.sandbox.rewind(rw(&p.id, cb.id)).await), Code::FailedPrecondition);
    assert_eq!(code(c.sandbox.rewind(rw(&p.id, 999_999)).await), Code::NotFound);
    assert_eq!(code(c.sandbox.rewind(rw("sb-0000000000000000", c1.id)).await), Code::NotFound);
    let still = get(&mut c, &p.id).await.unwrap();
    assert_eq!((still.vmm_pid, state(&still)), (r2.vmm_pid, pb::SandboxState::Running));

    // The CLI's tree: P with B below it.
    let out = Command::new(GROVE)
        .args(["--endpoint", &agent.endpoint(), "tree", &p.id])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with(&p.id) && lines[1].contains(&b), "{text}");
    assert!(!text.contains(&a), "{text}");
    let out = Command::new(GROVE)
        .args(["--endpoint", &agent.endpoint(), "--json", "tree", &p.id])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["subtree"][0]["id"], serde_json::Value::String(b.clone()));

    // Everything goes with P's subtree; no VMM, directory or snapshot of theirs is left.
    let del = c
        .sandbox
        .delete(pb::DeleteRequest { id: p.id.clone(), subtree: true })
        .await
        .unwrap()
        .into_inner()
        .deleted;
    assert_eq!(del, vec![b.clone(), p.id.clone()]);
    // B's snapshot first: its chain runs through the fork's snapshot to C1.
    c.sandbox.delete_snapshot(pb::DeleteSnapshotRequest { id: cb.id }).await.unwrap();
    c.sandbox.delete_snapshot(pb::DeleteSnapshotRequest { id: c1.id }).await.unwrap();
    assert_no_strays(&agent, &mut c).await;
}

/// ProcessService on this host (the test guest has no agent: the exec itself is tested in
/// the test host's agentd scenario): what is refused and with which code; nothing starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_requests_are_refused_without_an_agent_or_with_bad_input() {
    if !kvm_available() {
        return;
    }
    let agent = Agent::start(1, &[]);
    let mut c = agent.clients().await;
    let t = warm_test_guest(&mut c, "tgp", READY_CMDLINE, 64).await;
    assert!(!t.guest_agent);
    let s = c.sandbox.create(create_req("tgp")).await.unwrap().into_inner();
    let start = |argv: &[&str]| pb::StartProcessRequest {
        sandbox_id: s.id.clone(),
        argv: argv.iter().map(|a| (*a).to_string()).collect(),
        ..Default::default()
    };
    let code_of =
        |r: Result<tonic::Response<tonic::Streaming<pb::ProcessEvent>>, tonic::Status>| code(r);
    // No agent in the test guest's template.
    assert_eq!(code_of(c.process.start(start(&["true"])).await), Code::FailedPrecondition);
    // Malformed: no argv, a relative cwd, half a PTY size, a NUL.
    assert_eq!(code_of(c.process.start(start(&[])).await), Code::InvalidArgument);
    let mut r = start(&["true"]);
    r.cwd = "tmp".into();
    assert_eq!(code_of(c.process.start(r).await), Code::InvalidArgument);
    let mut r = start(&["true"]);
    r.pty_rows = 24;
    assert_eq!(code_of(c.process.start(r).await), Code::InvalidArgument);
    assert_eq!(code_of(c.process.start(start(&["a\0b"])).await), Code::InvalidArgument);
    // Unknown sandbox and process ids; a bad signal.
    let mut r = start(&["true"]);
    r.sandbox_id = "sb-0000000000000000".into();
    assert_eq!(code_of(c.process.start(r).await), Code::NotFound);
    let stdin = pb::SendStdinRequest { process_id: "p-1".into(), data: b"x".to_vec(), eof: true };
    assert_eq!(code(c.process.send_stdin(stdin).await), Code::NotFound);
    let sig = |signal| pb::SignalProcessRequest { process_id: "p-1".into(), signal };
    assert_eq!(code(c.process.signal(sig(0)).await), Code::InvalidArgument);
    assert_eq!(code(c.process.signal(sig(9)).await), Code::NotFound);
    let conn = pb::ConnectProcessRequest { process_id: "p-1".into(), from_seq: 0 };
    assert_eq!(code(c.process.connect(conn).await), Code::NotFound);
    let wait = pb::WaitProcessRequest { process_id: "p-1".into() };
    assert_eq!(code(c.process.wait(wait).await), Code::NotFound);
    // ForkRun: refused before anything is forked.
    let fr = |count, children: Vec<pb::ChildRun>| pb::ForkRunRequest {
        id: s.id.clone(),
        count,
        argv: vec!["true".into()],
        children,
        ..Default::default()
    };
    let fr_code =
        |r: Result<tonic::Response<tonic::Streaming<pb::ForkRunEvent>>, tonic::Status>| code(r);
    assert_eq!(fr_code(c.sandbox.fork_run(fr(2, vec![])).await), Code::FailedPrecondition);
    assert_eq!(fr_code(c.sandbox.fork_run(fr(0, vec![])).await), Code::InvalidArgument);
    let three = vec![pb::ChildRun::default(); 3];
    assert_eq!(fr_code(c.sandbox.fork_run(fr(2, three)).await), Code::InvalidArgument);
    let mut rel = pb::ChildRun::default();
    rel.files.insert("etc/x".into(), b"x".to_vec());
    assert_eq!(fr_code(c.sandbox.fork_run(fr(1, vec![rel])).await), Code::InvalidArgument);
    let all = c.sandbox.list(pb::ListRequest::default()).await.unwrap().into_inner().sandboxes;
    assert_eq!(all.len(), 1, "nothing was forked: {all:?}");
    // Files: the same refusals.
    let stat = |path: &str| pb::StatFileRequest { sandbox_id: s.id.clone(), path: path.into() };
    assert_eq!(code(c.files.stat(stat("/etc")).await), Code::FailedPrecondition);
    assert_eq!(code(c.files.stat(stat("etc")).await), Code::InvalidArgument);
    let list = pb::ListFilesRequest { sandbox_id: s.id.clone(), path: "/".into(), depth: 33 };
    assert_eq!(code(c.files.list(list).await), Code::InvalidArgument);
    let mut unknown = stat("/etc");
    unknown.sandbox_id = "sb-0000000000000000".into();
    assert_eq!(code(c.files.stat(unknown).await), Code::NotFound);
    let first = pb::WriteFileRequest {
        sandbox_id: s.id.clone(),
        path: "/root/f".into(),
        data: b"x".to_vec(),
        ..Default::default()
    };
    let w = c.files.write(tokio_stream::iter(vec![first])).await;
    assert_eq!(code(w), Code::FailedPrecondition);
    let watch = |path: &str| pb::WatchDirRequest { sandbox_id: s.id.clone(), path: path.into() };
    assert_eq!(code(c.files.watch(watch("/root")).await), Code::FailedPrecondition);
    assert_eq!(code(c.files.watch(watch("root")).await), Code::InvalidArgument);
    let mut unknown = watch("/root");
    unknown.sandbox_id = "sb-0000000000000000".into();
    assert_eq!(code(c.files.watch(unknown).await), Code::NotFound);
    // Nothing was started; the sandbox runs on.
    let l = c.process.list(pb::ListProcessesRequest::default()).await.unwrap().into_inner();
    assert!(l.processes.is_empty());
    assert_eq!(state(&get(&mut c, &s.id).await.unwrap()), pb::SandboxState::Running);
    // The CLI says why, and fails.
    let out = Command::new(GROVE)
        .args(["--endpoint", &agent.endpoint(), "exec", &s.id, "--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no guest agent"), "{out:?}");
}

/// 1 000 concurrent streams (Watch, over 10 connections of 100 streams each, as 10
/// orchestrator processes would hold them): every one gets its sandbox's current state and
/// then the pause and the resume, while creates, gets and deletes are served beside them;
/// when they all go away, agentd serves on and has let go of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_and_agentd_serves_others() {
    if !kvm_available() {
        return;
    }
    const CONNS: usize = 10;
    const PER_CONN: usize = 100;
    let agent = Agent::start(1, &[]);
    let mut c = agent.clients().await;
    warm_test_guest(&mut c, "tgs", READY_CMDLINE, 64).await;
    let s = c.sandbox.create(create_req("tgs")).await.unwrap().into_inner();
    let pid = agent.child.as_ref().expect("agentd runs").id();
    let threads = || {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = st.lines().find(|l| l.starts_with("Threads:")).unwrap().to_string();
        line["Threads:".len()..].trim().parse::<usize>().unwrap()
    };
    let threads_before = threads();
    let mut streams = Vec::new();
    for _ in 0..CONNS {
        let conn = agent.clients().await;
        let opens: Vec<_> = (0..PER_CONN)
            .map(|_| {
                let mut sc = conn.sandbox.clone();
                let id = s.id.clone();
                tokio::spawn(async move {
                    sc.watch(pb::WatchRequest { id, include_current: true }).await
                })
            })
            .collect();
        for o in opens {
            streams.push(o.await.unwrap().expect("a watch stream opens").into_inner());
        }
    }
    assert_eq!(streams.len(), CONNS * PER_CONN);
    // Each stream: CURRENT (running), then the pause and the resume below.
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut w| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while seen.len() < 3 {
                    match tokio::time::timeout(DEADLINE, w.message()).await {
                        Ok(Ok(Some(ev))) => {
                            let kind = ev.kind();
                            seen.push((kind, state(&ev.sandbox.unwrap_or_default())));
                        }
                        other => return Err(format!("stream ended after {seen:?}: {other:?}")),
                    }
                }
                Ok((seen, w))
            })
        })
        .collect();
    // Served beside them: a create, a get, a pause and a resume, a delete.
    let other = c.sandbox.create(create_req("tgs")).await.unwrap().into_inner();
    assert_eq!(state(&get(&mut c, &other.id).await.unwrap()), pb::SandboxState::Running);
    c.sandbox.pause(pb::PauseRequest { id: s.id.clone() }).await.unwrap();
    c.sandbox.resume(pb::ResumeRequest { id: s.id.clone() }).await.unwrap();
    c.sandbox
        .delete(pb::DeleteRequest { id: other.id.clone(), ..Default::default() })
        .await
        .unwrap();
    let want = vec![
        (pb::EventKind::Current, pb::SandboxState::Running),
        (pb::EventKind::StateChanged, pb::SandboxState::Paused),
        (pb::EventKind::StateChanged, pb::SandboxState::Running),
    ];
    let mut held = Vec::new();
    for r in readers {
        let (seen, w) = r.await.unwrap().expect("every stream sees its events");
        assert_eq!(seen, want);
        held.push(w);
    }
    // All go away: agentd serves on, its thread count back near where it was (the streams
    // held no thread of their own).
    drop(held);
    let l = c.sandbox.list(pb::ListRequest::default()).await.unwrap().into_inner();
    assert_eq!(l.sandboxes.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(), vec![s.id.as_str()]);
    let threads_after = threads();
    assert!(
        threads_after <= threads_before + 8,
        "agentd's threads: {threads_before} before the streams, {threads_after} after"
    );
    c.sandbox.delete(pb::DeleteRequest { id: s.id.clone(), ..Default::default() }).await.unwrap();
}
