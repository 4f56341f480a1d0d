//! Restart without loss: `kill -9` of agentd leaves its VMMs running; a restart adopts
//! them through their control sockets, marks dead ones Failed, and the recovery pass
//! finishes or rolls back what a kill interrupted (a fork, a create, a delete: failpoints
//! that hold agentd still at a step while the test kills it).
//!
//! The failpoint tests need `--features failpoints` (scripts/test.sh builds them so); they
//! are ignored with that reason otherwise.

#![allow(clippy::tests_outside_test_module)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use grove_proto::v1 as pb;

const FORK_CMDLINE: &str = "tg.mode=fork tg.touch_mib=8 tg.idle_us=1000";

async fn get(c: &mut grove_agentd::client::Clients, id: &str) -> pb::Sandbox {
    c.sandbox.get(pb::GetRequest { id: id.into() }).await.unwrap().into_inner()
}

async fn ids(c: &mut grove_agentd::client::Clients) -> Vec<String> {
    let mut v: Vec<String> = c
        .sandbox
        .list(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes
        .into_iter()
        .map(|s| s.id)
        .collect();
    v.sort();
    v
}

/// The process group of `pid` (field 5 of /proc/PID/stat).
fn pgrp(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(") ").unwrap().1;
    rest.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// Waits until agentd's log (kept across restarts) shows `line` more than `before` times.
async fn wait_log(agent: &Agent, line: &str, before: usize) {
    let t = Instant::now();
    while agent.log_text().matches(line).count() <= before {
        assert!(t.elapsed() < DEADLINE, "agentd never logged {line:?}:\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many times agentd's log shows `line` so far.
fn logged(agent: &Agent, line: &str) -> usize {
    agent.log_text().matches(line).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_restart_adopts_running_vmms_and_fails_dead_ones() {
    if !kvm_available() {
        return;
    }
    let mut agent = Agent::start(2, &[]);
    let mut c = agent.clients().await;
    warm_test_guest(&mut c, "tg", FORK_CMDLINE, 64).await;
    let a = c.sandbox.create(create_req("tg")).await.unwrap().into_inner();
    let b = c.sandbox.create(create_req("tg")).await.unwrap().into_inner();
    let d = c.sandbox.create(create_req("tg")).await.unwrap().into_inner();
    c.sandbox.pause(pb::PauseRequest { id: b.id.clone() }).await.unwrap();
    let agentd_pid = agent.child.as_ref().unwrap().id();
    assert_ne!(pgrp(a.vmm_pid), pgrp(agentd_pid), "VMMs have a process group of their own");
    assert_eq!(pgrp(a.vmm_pid), a.vmm_pid);

    agent.kill9();
    assert!(alive(a.vmm_pid) && alive(b.vmm_pid) && alive(d.vmm_pid), "VMMs outlive agentd");
    std::process::Command::new("kill").args(["-9", &d.vmm_pid.to_string()]).status().unwrap();
    agent.spawn();
    let mut c = agent.clients().await;

    let ga = get(&mut c, &a.id).await;
    assert_eq!((ga.state(), ga.vmm_pid), (pb::SandboxState::Running, a.vmm_pid));
    let gb = get(&mut c, &b.id).await;
    assert_eq!((gb.state(), gb.vmm_pid), (pb::SandboxState::Paused, b.vmm_pid));
    let gd = get(&mut c, &d.id).await;
    assert_eq!(gd.state(), pb::SandboxState::Failed);
    assert!(gd.reason.contains("VMM gone"), "{}", gd.reason);
    // Adopted VMMs are driven as before.
    let n = serial_of(&agent, a.vmm_pid).len();
    wait_until("the adopted guest to keep running", || serial_of(&agent, a.vmm_pid).len() > n + 10)
        .await;
    c.sandbox.resume(pb::ResumeRequest { id: b.id.clone() }).await.unwrap();
    let f = c
        .sandbox
        .fork(pb::ForkRequest { id: a.id.clone(), count: 2, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.children.len(), 2);
    // An adopted VMM that dies is noticed (pidfd, not a child of this agentd).
    std::process::Command::new("kill").args(["-9", &b.vmm_pid.to_string()]).status().unwrap();
    let t = Instant::now();
    while get(&mut c, &b.id).await.state() != pb::SandboxState::Failed {
        assert!(t.elapsed() < DEADLINE, "the adopted VMM's death was not noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The standby pool was adopted, not leaked.
    assert!(agent.log_text().contains("recovery: standby VMM adopted"), "{}", agent.log_text());
    assert_no_strays(&agent, &mut c).await;
    for id in ids(&mut c).await {
        c.sandbox.delete(pb::DeleteRequest { id, subtree: false }).await.unwrap();
    }
    assert!(ids(&mut c).await.is_empty());
    assert!(!alive(a.vmm_pid));
    assert_no_strays(&agent, &mut c).await;
}

/// Runs the kill at failpoint `fp` (held with a long sleep): `start` gets agentd to it,
/// then agentd is killed and restarted without failpoints.
async fn kill_at<F, Fut>(agent: &mut Agent, fp: &str, log_line: &str, start: F)
where
    F: FnOnce(grove_agentd::client::Clients) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    agent.kill9();
    agent.env = vec![("FAILPOINTS".into(), format!("{fp}=sleep(600000)"))];
    let before = logged(agent, log_line);
    agent.spawn();
    let c = agent.clients().await;
    let task = tokio::spawn(start(c));
    wait_log(agent, log_line, before).await;
    // Let the request reach the failpoint after its log line.
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.kill9();
    task.abort();
    agent.env.clear();
    agent.spawn();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn kill_in_the_middle_of_a_fork_rolls_the_children_back() {
    if !kvm_available() {
        return;
    }
    let mut agent = Agent::start(2, &[]);
    let mut c = agent.clients().await;
    warm_test_guest(&mut c, "tg", FORK_CMDLINE, 64).await;
    let p = c.sandbox.create(create_req("tg")).await.unwrap().into_inner();

    // Killed once the children run, before the fork is reported.
    let id = p.id.clone();
    kill_at(
        &mut agent,
        "agentd::fork::after_children",
        "fork: children running",
        move |mut c| async move {
            let _ = c.sandbox.fork(pb::ForkRequest { id, count: 3, ..Default::default() }).await;
        },
    )
    .await;
    let mut c = agent.clients().await;
    assert_eq!(ids(&mut c).await, vec![p.id.clone()], "the unreported children are gone");
    let gp = get(&mut c, &p.id).await;
    assert_eq!((gp.state(), gp.vmm_pid), (pb::SandboxState::Running, p.vmm_pid));
    assert_no_strays(&agent, &mut c).await;
    assert!(agent.log_text().contains("recovery: unfinished operation"));

    // Killed between the fork's snapshot and its children.
    let id = p.id.clone();
    kill_at(
        &mut agent,
        "agentd::fork::after_snapshot",
        "fork: snapshot taken",
        move |mut c| async move {
            let _ = c.sandbox.fork(pb::ForkRequest { id, count: 2, ..Default::default() }).await;
        },
    )
    .await;
    let mut c = agent.clients().await;
    assert_eq!(ids(&mut c).await, vec![p.id.clone()]);
    assert_eq!(get(&mut c, &p.id).await.state(), pb::SandboxState::Running);
    assert_no_strays(&agent, &mut c).await;

    // The parent forks again, and its children run with their own identities.
    let f = c
        .sandbox
        .fork(pb::ForkRequest { id: p.id.clone(), count: 2, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    for ch in &f.children {
        let want = format!("ID={} ", ch.identity);
        wait_until("a child's ID line", || serial_of(&agent, ch.vmm_pid).contains(&want)).await;
    }
    // Snapshot records and files agree: every snapshot directory belongs to a snapshot or
    // to a memory layer of the parent's chain.
    let snaps =
        c.sandbox.list_snapshots(pb::ListSnapshotsRequest {}).await.unwrap().into_inner().snapshots;
    assert!(snaps.iter().all(|s| agent
        .data()
        .join("snapshots")
        .join(s.id.to_string())
        .join("vmstate")
        .is_file()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn kill_in_the_middle_of_a_create_or_a_delete() {
    if !kvm_available() {
        return;
    }
    let mut agent = Agent::start(2, &[]);
    let mut c = agent.clients().await;
    warm_test_guest(&mut c, "tg", FORK_CMDLINE, 64).await;
    let keep = c.sandbox.create(create_req("tg")).await.unwrap().into_inner();

    // A create killed once its restore request was sent to a standby VMM, before the
    // record (committed beside the restore): rolled back, its VMM killed.
    kill_at(&mut agent, "agentd::create::restore_sent", "recovery done", |mut c| async move {
        let _ = c.sandbox.create(create_req("tg")).await;
    })
    .await;
    let mut c = agent.clients().await;
    assert_eq!(ids(&mut c).await, vec![keep.id.clone()]);
    assert_no_strays(&agent, &mut c).await;

    // A create killed after its VMM restored and its record was committed, before the
    // reply: the sandbox exists (committed before it could be reported) and is adopted.
    kill_at(&mut agent, "agentd::create::after_restore", "recovery done", |mut c| async move {
        let _ = c.sandbox.create(create_req("tg")).await;
    })
    .await;
    let mut c = agent.clients().await;
    let now = ids(&mut c).await;
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(now.contains(&keep.id), "{now:?}");
    let other = now.iter().find(|i| **i != keep.id).unwrap().clone();
    let o = get(&mut c, &other).await;
    assert_eq!(o.state(), pb::SandboxState::Running);
    assert!(alive(o.vmm_pid), "the adopted sandbox's VMM runs");
    c.sandbox.delete(pb::DeleteRequest { id: other, subtree: false }).await.unwrap();
    assert_eq!(ids(&mut c).await, vec![keep.id.clone()]);
    assert_no_strays(&agent, &mut c).await;

    // A delete killed after it was recorded: finished at restart.
    let gone = c.sandbox.create(create_req("tg")).await.unwrap().into_inner();
    let id = gone.id.clone();
    kill_at(&mut agent, "agentd::delete::after_mark", "recovery done", move |mut c| async move {
        let _ = c.sandbox.delete(pb::DeleteRequest { id, subtree: false }).await;
    })
    .await;
    let mut c = agent.clients().await;
    assert_eq!(ids(&mut c).await, vec![keep.id.clone()]);
    assert!(!alive(gone.vmm_pid), "the deleted sandbox's VMM is gone");
    assert_eq!(get(&mut c, &keep.id).await.state(), pb::SandboxState::Running);
    assert_no_strays(&agent, &mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn kill_in_the_middle_of_a_rewind_keeps_one_vmm() {
    if !kvm_available() {
        return;
    }
    let mut agent = Agent::start(2, &[]);
    let mut c = agent.clients().await;
    warm_test_guest(&mut c, "tg", FORK_CMDLINE, 64).await;
    let s = c.sandbox.create(create_req("tg")).await.unwrap().into_inner();
    let cp = c
        .sandbox
        .snapshot(pb::SnapshotRequest { id: s.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let rewind = |id: String| {
        move |mut c: grove_agentd::client::Clients| async move {
            let _ = c.sandbox.rewind(pb::RewindRequest { id, snapshot_id: cp.id }).await;
        }
    };

    // Killed once the new VMM restored, before the record names it: the sandbox keeps its
    // old VMM; the new one is killed.
    kill_at(&mut agent, "agentd::rewind::restored", "recovery done", rewind(s.id.clone())).await;
    let mut c = agent.clients().await;
    let g = get(&mut c, &s.id).await;
    assert_eq!((g.state(), g.vmm_pid), (pb::SandboxState::Running, s.vmm_pid));
    assert_no_strays(&agent, &mut c).await;

    // Killed after the record names the new VMM, before the old one is stopped: the
    // sandbox runs on the new VMM; the old one is killed.
    kill_at(&mut agent, "agentd::rewind::committed", "recovery done", rewind(s.id.clone())).await;
    let mut c = agent.clients().await;
    let g = get(&mut c, &s.id).await;
    assert_eq!(g.state(), pb::SandboxState::Running);
    assert_ne!(g.vmm_pid, s.vmm_pid);
    assert_eq!(g.from_snapshot, cp.id);
    assert!(alive(g.vmm_pid));
    wait_until("the old VMM to be killed", || !alive(s.vmm_pid)).await;
    assert_no_strays(&agent, &mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn kill_between_a_vmm_spawn_and_its_pid_file_leaves_no_stray() {
    if !kvm_available() {
        return;
    }
    let mut agent = Agent::start(2, &[]);
    let mut c = agent.clients().await;
    warm_test_guest(&mut c, "tg", FORK_CMDLINE, 64).await;
    let keep = c.sandbox.create(create_req("tg")).await.unwrap().into_inner();
    assert_no_strays(&agent, &mut c).await;
    // Restarted with a larger pool: its refill spawns a VMM, and the first spawn (only the
    // first: `1*`, so nothing else in agentd waits behind it) holds still before its pid
    // file is written.
    agent.kill9();
    agent.extra = vec!["--pool-size".into(), "3".into()];
    agent.env = vec![("FAILPOINTS".into(), "agentd::vmm::after_spawn=1*sleep(600000)".into())];
    let before = logged(&agent, "recovery done");
    agent.spawn();
    wait_log(&agent, "recovery done", before).await;
    let data = agent.data();
    let unrecorded = || {
        agent
            .vmm_pids()
            .into_iter()
            .filter(|p| {
                !agent.vmm_dirs().iter().any(|d| {
                    std::fs::read_to_string(data.join("vmm").join(d).join("pid"))
                        .is_ok_and(|s| s.trim() == p.to_string())
                })
            })
            .collect::<Vec<u32>>()
    };
    wait_until("a VMM spawned without its pid file", || !unrecorded().is_empty()).await;
    let stray = unrecorded();
    agent.kill9();
    agent.extra = vec!["--pool-size".into(), "2".into()];
    agent.env.clear();
    let before = logged(&agent, "recovery done");
    agent.spawn();
    wait_log(&agent, "recovery done", before).await;
    let mut c = agent.clients().await;
    for p in &stray {
        wait_until("the VMM without a pid file killed", || !alive(*p)).await;
    }
    assert_eq!(ids(&mut c).await, vec![keep.id.clone()]);
    assert_eq!(get(&mut c, &keep.id).await.state(), pb::SandboxState::Running);
    assert_no_strays(&agent, &mut c).await;
}
