"""Sandboxes (SandboxService): create, fork, run commands, files, lineage, rewind."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import grpc

from .errors import GroveError, raise_from
from .files import Files
from .models import Child, Exit, Output, ProcessInfo, RunResult, Snapshot
from .process import Cmd, Process, ProcessStream, argv_of, timeout_seconds
from .v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from .client import Client

_STATES = {v: k[len("SANDBOX_STATE_") :].lower() for k, v in pb.SandboxState.items()}


def state_value(name: str) -> pb.SandboxState:
    """A state name (running, paused, ...) as the proto's enum value."""
    try:
        return pb.SandboxState.Value("SANDBOX_STATE_" + name.upper())  # type: ignore[return-value]
    except ValueError:
        raise ValueError(f"unknown sandbox state {name!r}: one of {sorted(_STATES.values())}")


@dataclass
class ChildResult:
    """One child of :meth:`Sandbox.fork_run`: its sandbox, its command's output and exit,
    or the ``error`` that kept its files or command from starting."""

    index: int
    sandbox: Sandbox
    process_id: str = ""
    exit: Optional[Exit] = None
    stdout: bytes = b""
    stderr: bytes = b""
    error: str = ""
    _out: Dict[str, List[bytes]] = field(
        default_factory=lambda: {"stdout": [], "stderr": []}, repr=False
    )

    @property
    def exit_code(self) -> Optional[int]:
        return self.exit.code if self.exit else None

    @property
    def ok(self) -> bool:
        """Its command exited 0."""
        return not self.error and self.exit_code == 0


class Sandbox:
    """A sandbox on agentd. Made by :meth:`create`, :meth:`get`, :meth:`list` and forks;
    its attributes are as of the last answer about it (:meth:`refresh` asks again)."""

    def __init__(self, client: Client, info: pb.Sandbox) -> None:
        self.client = client
        self.info = info
        #: Its guest's files (FilesystemService; templates with the guest agent).
        self.files = Files(client, info.id)

    # ------------------------------------------------------------------ lookup, create

    @classmethod
    def create(
        cls,
        client: Client,
        template: Optional[str] = None,
        *,
        snapshot: Union[Snapshot, int, None] = None,
        labels: Optional[Mapping[str, str]] = None,
        ttl: Optional[int] = None,
        vcpus: int = 0,
        memory_mib: int = 0,
    ) -> Sandbox:
        """A new sandbox from a template (a restore when it is warm) or a snapshot; returns
        once it runs. ``ttl``: deleted that many seconds after creation."""
        if (template is None) == (snapshot is None):
            raise ValueError("give a template or a snapshot (one of them)")
        req = pb.CreateRequest(
            labels=dict(labels or {}),
            ttl_seconds=ttl or 0,
            vcpus=vcpus,
            memory_mib=memory_mib,
        )
        if template is not None:
            req.template = template
        else:
            req.snapshot_id = _snapshot_id(snapshot)
        return cls(client, client._unary(client.sandbox.Create, req))

    @classmethod
    def get(cls, client: Client, sandbox_id: str) -> Sandbox:
        return cls(client, client._unary(client.sandbox.Get, pb.GetRequest(id=sandbox_id)))

    @classmethod
    def list(
        cls,
        client: Client,
        labels: Optional[Mapping[str, str]] = None,
        states: Iterable[str] = (),
    ) -> List[Sandbox]:
        """Every sandbox whose labels include ``labels`` and whose state is one of
        ``states`` (any when empty), by id; all pages."""
        out: List[Sandbox] = []
        token = ""
        while True:
            req = pb.ListRequest(
                labels=dict(labels or {}),
                states=[state_value(s) for s in states],
                page_size=1000,
                page_token=token,
            )
            page = client._unary(client.sandbox.List, req)
            out.extend(cls(client, s) for s in page.sandboxes)
            token = page.next_page_token
            if not token:
                return out

    def refresh(self) -> Sandbox:
        """Reads its record again (Get); returns self."""
        self.info = self.client._unary(self.client.sandbox.Get, pb.GetRequest(id=self.id))
        return self

    # ------------------------------------------------------------------ attributes

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def state(self) -> str:
        """creating, running, paused, snapshotting, stopped or failed."""
        return _STATES.get(self.info.state, "unspecified")

    @property
    def reason(self) -> str:
        return self.info.reason

    @property
    def template(self) -> str:
        return self.info.template

    @property
    def labels(self) -> Dict[str, str]:
        return dict(self.info.labels)

    @property
    def parent(self) -> str:
        """The sandbox it was forked from ("" if none)."""
        return self.info.parent

    @property
    def children(self) -> List[str]:
        """Ids of the sandboxes forked from it that exist."""
        return list(self.info.children)

    @property
    def ancestors(self) -> List[str]:
        """Its parent first, up to the first one deleted."""
        return list(self.info.ancestors)

    @property
    def identity(self) -> int:
        return self.info.identity

    @property
    def vmm_pid(self) -> int:
        return self.info.vmm_pid

    @property
    def expires_unix_ms(self) -> int:
        """When the TTL deletes it (0: no TTL)."""
        return self.info.expires_unix_ms

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r}, {self.state})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sandbox) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    # ------------------------------------------------------------------ lifecycle

    def delete(self, subtree: bool = False) -> List[str]:
        """Deletes it (with ``subtree``: every descendant first); the ids deleted."""
        m = self.client._unary(
            self.client.sandbox.Delete, pb.DeleteRequest(id=self.id, subtree=subtree)
        )
        return list(m.deleted)

    def pause(self) -> Sandbox:
        self.info = self.client._unary(self.client.sandbox.Pause, pb.PauseRequest(id=self.id))
        return self

    def resume(self) -> Sandbox:
        self.info = self.client._unary(self.client.sandbox.Resume, pb.ResumeRequest(id=self.id))
        return self

    def snapshot(self, labels: Optional[Mapping[str, str]] = None) -> Snapshot:
        """A durable snapshot (kept until :meth:`Client.delete_snapshot`); it runs on."""
        m = self.client._unary(
            self.client.sandbox.Snapshot,
            pb.SnapshotRequest(id=self.id, labels=dict(labels or {})),
        )
        return Snapshot.from_pb(m)

    def rewind(self, snapshot: Union[Snapshot, int]) -> Sandbox:
        """Restores it in place to a snapshot of its own history (what ran since is lost
        unless snapshotted); returns self, refreshed."""
        self.info = self.client._unary(
            self.client.sandbox.Rewind,
            pb.RewindRequest(id=self.id, snapshot_id=_snapshot_id(snapshot)),
        )
        return self

    def set_ttl(self, seconds: int, subtree: bool = False) -> List[Sandbox]:
        """A TTL from now (0 clears it) on it, or on its whole subtree; the sandboxes set."""
        m = self.client._unary(
            self.client.sandbox.SetTtl,
            pb.SetTtlRequest(id=self.id, ttl_seconds=seconds, subtree=subtree),
        )
        for s in m.sandboxes:
            if s.id == self.id:
                self.info = s
        return [Sandbox(self.client, s) for s in m.sandboxes]

    # ------------------------------------------------------------------ forks

    def fork(
        self,
        n: int,
        *,
        labels: Optional[Mapping[str, str]] = None,
        child_labels: Sequence[Mapping[str, str]] = (),
        ttl: Optional[int] = None,
        deterministic: bool = False,
    ) -> List[Sandbox]:
        """``n`` children of this running sandbox (it pauses only while its dirty pages
        are written); ``child_labels[i]`` adds to child i's labels. ``deterministic``:
        the children keep the snapshot's clock and RNG state (default: each gets the
        host's clock and fresh entropy)."""
        req = pb.ForkRequest(
            id=self.id,
            count=n,
            labels=dict(labels or {}),
            child_labels=[pb.Labels(labels=dict(c)) for c in child_labels],
            ttl_seconds=ttl or 0,
            deterministic=deterministic,
        )
        m = self.client._unary(self.client.sandbox.Fork, req)
        return [Sandbox(self.client, c) for c in m.children]

    def fork_run(
        self,
        children: Union[int, Sequence[Child]],
        cmd: Optional[Cmd] = None,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: str = "",
        timeout: Optional[float] = None,
        labels: Optional[Mapping[str, str]] = None,
        ttl: Optional[int] = None,
        deterministic: bool = False,
        on_output: Optional[Callable[[int, Output], None]] = None,
    ) -> List[ChildResult]:
        """Fork exploration (ForkRun): forks into ``children`` (a count, or one
        :class:`Child` each) and, as each child starts, writes its files and runs its
        command (the child's, else ``cmd``) with ``env`` and the child's own environment
        on top (plus GROVE_CHILD_INDEX and GROVE_SANDBOX_ID). Returns once every command
        ended, one result per child in index order; ``on_output(index, chunk)`` sees the
        output as it comes; ``deterministic`` as in :meth:`fork`. Keep the winner with
        :meth:`keep`."""
        specs = [Child() for _ in range(children)] if isinstance(children, int) else list(children)
        req = pb.ForkRunRequest(
            id=self.id,
            count=len(specs),
            labels=dict(labels or {}),
            ttl_seconds=ttl or 0,
            argv=argv_of(cmd) if cmd is not None else [],
            env=dict(env or {}),
            cwd=cwd,
            timeout_seconds=timeout_seconds(timeout),
            deterministic=deterministic,
            children=[
                pb.ChildRun(
                    labels=dict(c.labels),
                    env=dict(c.env),
                    files=dict(c.files),
                    argv=argv_of(c.cmd) if c.cmd is not None else [],  # type: ignore[arg-type]
                )
                for c in specs
            ],
        )
        results: List[ChildResult] = []
        try:
            for ev in self.client.sandbox.ForkRun(req):
                kind = ev.WhichOneof("event")
                if kind == "forked":
                    results = [
                        ChildResult(i, Sandbox(self.client, s))
                        for i, s in enumerate(ev.forked.children)
                    ]
                    continue
                r = results[ev.child]
                if kind == "error":
                    r.error = ev.error
                elif kind == "process":
                    pe = ev.process
                    which = pe.WhichOneof("event")
                    if which == "started":
                        r.process_id = pe.started.process_id
                    elif which == "output":
                        o = Output.from_pb(pe.output)
                        r._out[o.stream].append(o.data)
                        if on_output is not None:
                            on_output(ev.child, o)
                    elif which == "exit":
                        r.exit = Exit.from_pb(pe.exit)
                        r.error = r.error or r.exit.error
        except grpc.RpcError as e:
            raise_from(e)
        for r in results:
            r.stdout, r.stderr = b"".join(r._out["stdout"]), b"".join(r._out["stderr"])
        if len(results) != len(specs):
            raise GroveError(f"ForkRun ended before it reported its {len(specs)} children")
        return results

    def keep(self, child: Union[Sandbox, str]) -> List[str]:
        """Keeps ``child`` (one of this sandbox's children) and deletes its siblings with
        their subtrees, in one call; the ids deleted."""
        cid = child.id if isinstance(child, Sandbox) else child
        if isinstance(child, Sandbox) and child.parent and child.parent != self.id:
            raise ValueError(f"{cid} is a child of {child.parent}, not of {self.id}")
        m = self.client._unary(self.client.sandbox.Keep, pb.KeepRequest(id=cid))
        return list(m.deleted)

    # ------------------------------------------------------------------ processes

    def start(
        self,
        cmd: Cmd,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: str = "",
        user: str = "",
        timeout: Optional[float] = None,
        stdin: bool = False,
        pty: Optional[Tuple[int, int]] = None,
        checkpoint: bool = False,
    ) -> ProcessStream:
        """Starts ``cmd`` (a string runs through ``sh -c``) and returns its stream: iterate
        for output chunks as they come; ``stream.process`` is the process (send_stdin when
        ``stdin``, signal, ...); ``stream.exit`` once it ended. ``pty=(rows, cols)`` runs
        it on a terminal; ``checkpoint`` snapshots the sandbox when it exits."""
        rows, cols = pty if pty else (0, 0)
        req = pb.StartProcessRequest(
            sandbox_id=self.id,
            argv=argv_of(cmd),
            env=dict(env or {}),
            cwd=cwd,
            user=user,
            timeout_seconds=timeout_seconds(timeout),
            stdin=stdin,
            pty_rows=rows,
            pty_cols=cols,
            checkpoint=checkpoint,
        )
        return ProcessStream(self.client, start=req)

    def run(
        self,
        cmd: Cmd,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: str = "",
        user: str = "",
        timeout: Optional[float] = None,
        stdin: Union[bytes, str, None] = None,
        checkpoint: bool = False,
    ) -> RunResult:
        """Runs ``cmd`` to its end: exit code or signal, stdout, stderr. ``stdin`` (bytes
        or str) is fed to it, then closed; without it stdin is /dev/null. ``timeout``
        (seconds) kills it (``timed_out`` is then set)."""
        stream = self.start(
            cmd,
            env=env,
            cwd=cwd,
            user=user,
            timeout=timeout,
            stdin=stdin is not None,
            checkpoint=checkpoint,
        )
        feeder = None
        errors: List[BaseException] = []
        if stdin is not None:
            data = stdin.encode() if isinstance(stdin, str) else bytes(stdin)

            def feed() -> None:
                try:
                    stream.process.send_stdin(data, eof=True)
                except BaseException as e:  # reported after the output is read
                    errors.append(e)

            # Fed beside the reading: a process that writes while it reads would otherwise
            # fill its output pipe and stop reading its stdin.
            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
        result = stream.collect()
        if feeder is not None:
            feeder.join()
        # A process that ended (exit or signal) may have closed its stdin early: its
        # result is the answer. Otherwise the failed feed is.
        if errors and result.exit_code is None and result.signal is None:
            raise errors[0]
        return result

    def processes(self) -> List[ProcessInfo]:
        """Its running processes and the last ended ones."""
        m = self.client._unary(
            self.client.process.List, pb.ListProcessesRequest(sandbox_id=self.id)
        )
        return [ProcessInfo.from_pb(p) for p in m.processes]

    def process(self, process_id: str) -> Process:
        """A handle to one of its processes by id."""
        return Process(self.client, process_id)


def _snapshot_id(s: Union[Snapshot, int, None]) -> int:
    if isinstance(s, Snapshot):
        return s.id
    if isinstance(s, int) and s > 0:
        return s
    raise ValueError(f"a snapshot is a Snapshot or a positive id, not {s!r}")
