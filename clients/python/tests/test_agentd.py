"""The client against a real agentd with the test guest (KVM on this host).

The test guest has no guest agent, so what is tested here is everything that needs no
command in the guest: create/get/list, fork and lineage, keep, subtree delete, snapshot,
rewind, TTL, and the error mapping (process and file calls are FAILED_PRECONDITION). The
rest (run, files, watch, fork_run, 1000 streams, the example) runs in the test host:
scripts/testhost/scenarios/agentd-python.sh.
"""

from __future__ import annotations

import grpc
import pytest

from conftest import DEADLINE, Agentd, Made, alive, wait_until
from grove_client import (
    Child,
    Client,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Sandbox,
)


def gone(client: Client, sandbox_id: str) -> bool:
    try:
        Sandbox.get(client, sandbox_id)
        return False
    except NotFound:
        return True


def test_create_get_list_delete(client: Client, template: str, made: Made) -> None:
    sb = made.sandbox(Sandbox.create(client, template=template, labels={"job": "pytest-a"}))
    assert sb.id.startswith("sb-") and sb.state == "running"
    assert (sb.template, sb.labels, sb.parent) == (template, {"job": "pytest-a"}, "")
    assert sb.vmm_pid > 0 and alive(sb.vmm_pid)
    again = Sandbox.get(client, sb.id)
    assert again == sb and again.vmm_pid == sb.vmm_pid and again.expires_unix_ms == 0
    other = made.sandbox(Sandbox.create(client, template=template, labels={"job": "pytest-b"}))
    assert [s.id for s in Sandbox.list(client, labels={"job": "pytest-a"})] == [sb.id]
    running = {s.id for s in Sandbox.list(client, states=["running"])}
    assert {sb.id, other.id} <= running
    assert not Sandbox.list(client, labels={"job": "pytest-a"}, states=["paused"])
    assert sb.pause().state == "paused"
    assert [s.id for s in Sandbox.list(client, states=["paused"])] == [sb.id]
    assert sb.resume().state == "running"
    pid = sb.vmm_pid
    assert sb.delete() == [sb.id]
    assert gone(client, sb.id)
    wait_until(f"the deleted sandbox's VMM {pid} to exit", lambda: not alive(pid))
    assert gone(client, sb.id) and not gone(client, other.id)


def test_fork_lineage_keep_and_subtree_delete(
    client: Client, agentd: Agentd, template: str, made: Made
) -> None:
    p = made.sandbox(Sandbox.create(client, template=template))
    a, b = p.fork(2, labels={"gen": "1"}, child_labels=[{"name": "a"}, {"name": "b"}])
    assert (a.labels, b.labels) == ({"gen": "1", "name": "a"}, {"gen": "1", "name": "b"})
    assert a.parent == b.parent == p.id and a.state == b.state == "running"
    assert len({p.identity, a.identity, b.identity}) == 3
    a1, a2 = a.fork(2, deterministic=True)
    assert a1.state == a2.state == "running" and a1.identity != a2.identity
    # Lineage in Get and List.
    assert sorted(p.refresh().children) == sorted([a.id, b.id])
    assert sorted(a.refresh().children) == sorted([a1.id, a2.id])
    assert a1.refresh().ancestors == [a.id, p.id]
    assert p.ancestors == []
    listed = {s.id: s for s in Sandbox.list(client)}
    assert listed[a2.id].ancestors == [a.id, p.id] and listed[a2.id].children == []
    # A TTL on A's subtree reaches A, A1 and A2 only.
    set_ = a.set_ttl(3600, subtree=True)
    assert sorted(s.id for s in set_) == sorted([a.id, a1.id, a2.id])
    assert all(s.expires_unix_ms > 0 for s in set_)
    assert a2.refresh().expires_unix_ms > 0
    assert p.refresh().expires_unix_ms == 0 and b.refresh().expires_unix_ms == 0
    assert a.set_ttl(0)[0].expires_unix_ms == 0
    # Keep A1: its sibling A2 goes (with its VMM), nothing else.
    with pytest.raises(ValueError):
        p.keep(a1)  # a grandchild: refused by the client before any call
    a2_pid = a2.vmm_pid
    assert a.keep(a1) == [a2.id]
    assert gone(client, a2.id) and not gone(client, a1.id) and not gone(client, b.id)
    wait_until("A2's VMM to exit", lambda: not alive(a2_pid))
    assert a2_pid not in agentd.vmm_pids()
    with pytest.raises(FailedPrecondition):
        p.keep(p.id)  # p has no parent
    # Delete A's subtree: A1 first, then A; P and B stay.
    assert a.delete(subtree=True) == [a1.id, a.id]
    assert p.refresh().children == [b.id]
    # Keep on the last child deletes no sibling.
    assert p.keep(b) == []
    assert p.delete(subtree=True) == [b.id, p.id]
    assert gone(client, b.id) and gone(client, p.id)


def test_snapshot_rewind_and_create_from_snapshot(
    client: Client, template: str, made: Made
) -> None:
    p = made.sandbox(Sandbox.create(client, template=template))
    s = made.snapshot(p.snapshot(labels={"step": "1"}))
    assert s.id > 0 and s.sandbox == p.id and s.labels == {"step": "1"}
    assert s.id in {x.id for x in client.snapshots()}
    old = p.vmm_pid
    identity = p.identity
    p.rewind(s)
    # Rewound in place: same sandbox and identity on a new VMM; the old one is gone.
    assert p.state == "running" and p.identity == identity
    assert p.vmm_pid not in (0, old)
    wait_until("the pre-rewind VMM to exit", lambda: not alive(old))
    assert Sandbox.get(client, p.id).vmm_pid == p.vmm_pid
    # A sandbox made from the snapshot.
    q = made.sandbox(Sandbox.create(client, snapshot=s, labels={"from": "snapshot"}))
    assert q.state == "running" and q.info.from_snapshot == s.id and q.identity != identity
    # Another sandbox's snapshot is not in P's history; an unknown one does not exist.
    other = made.snapshot(q.snapshot())
    with pytest.raises(FailedPrecondition):
        p.rewind(other)
    with pytest.raises(NotFound):
        p.rewind(987654321)
    assert p.refresh().state == "running"
    # A snapshot in use is kept.
    with pytest.raises(FailedPrecondition):
        client.delete_snapshot(s)


def test_ttl_deletes_the_sandbox_and_watch_sees_it(
    client: Client, template: str, made: Made
) -> None:
    sb = made.sandbox(Sandbox.create(client, template=template, ttl=2))
    assert sb.expires_unix_ms > sb.info.created_unix_ms
    events = client.watch(sb.id, include_current=True, timeout=DEADLINE)
    kind, first = next(events)
    assert (kind, first.id, first.state) == ("current", sb.id, "running")
    # The TTL reaper deletes it: the stream says so (its deadline is the hang guard).
    kinds = []
    for kind, s in events:
        assert s.id == sb.id
        kinds.append(kind)
        if kind == "deleted":
            break
    assert kinds[-1:] == ["deleted"], kinds
    assert gone(client, sb.id)


def test_errors_map_to_exceptions(client: Client, template: str, made: Made) -> None:
    with pytest.raises(NotFound) as e:
        Sandbox.get(client, "sb-0123456789abcdef")
    assert isinstance(e.value.__cause__, grpc.RpcError)
    assert e.value.__cause__.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "sb-0123456789abcdef" in str(e.value)
    with pytest.raises(InvalidArgument):
        Sandbox.get(client, "not-an-id")
    with pytest.raises(NotFound):
        Sandbox.create(client, template="no-such-template")
    with pytest.raises(InvalidArgument):
        Sandbox.create(client, template=template, labels={"bad key!": "v"})
    with pytest.raises(InvalidArgument):
        Sandbox.create(client, template=template, ttl=31 * 24 * 3600)
    with pytest.raises(NotFound):
        client.get_process("p-999999").wait()
    with pytest.raises(NotFound):
        list(client.get_process("p-999999").connect())
    before = sorted(s.id for s in Sandbox.list(client))

    sb = made.sandbox(Sandbox.create(client, template=template))
    with pytest.raises(InvalidArgument):
        sb.fork(0)
    with pytest.raises(FailedPrecondition):
        sb.resume()  # it runs
    # No guest agent in the test guest: process and file calls are refused.
    with pytest.raises(FailedPrecondition):
        sb.run("echo hello")
    with pytest.raises(FailedPrecondition):
        sb.start(["true"])
    with pytest.raises(FailedPrecondition):
        sb.files.stat("/etc")
    with pytest.raises(FailedPrecondition):
        sb.files.read_bytes("/etc/hostname")
    with pytest.raises(FailedPrecondition):
        sb.files.write("/run/x", b"data")
    with pytest.raises(FailedPrecondition):
        sb.files.list("/")
    with pytest.raises(InvalidArgument):
        sb.files.stat("relative/path")
    with pytest.raises(FailedPrecondition):
        sb.files.watch("/root")
    with pytest.raises(InvalidArgument):
        sb.files.watch("root")
    with pytest.raises(FailedPrecondition):
        sb.fork_run([Child(env={"TRY": "a"}), Child(env={"TRY": "b"})], "echo $TRY")
    with pytest.raises(InvalidArgument):
        sb.fork_run([Child(files={"relative": b"x"})], "true")
    # The refusals changed nothing: no child was forked, agentd serves on.
    assert sb.refresh().children == [] and sb.state == "running"
    assert sorted(s.id for s in Sandbox.list(client)) == sorted(before + [sb.id])
    assert sb.delete() == [sb.id] and gone(client, sb.id)
