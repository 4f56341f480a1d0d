"""Plain data returned by the client (built from the generated messages)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .v1 import sandbox_pb2 as pb


@dataclass(frozen=True)
class Snapshot:
    """A snapshot (SnapshotInfo): ``id`` is what :meth:`Sandbox.rewind` and creates take."""

    id: int
    parent: int
    sandbox: str
    labels: Dict[str, str]
    depth: int
    pages: int
    pause_ms: float
    created_unix_ms: int
    refs: int

    @classmethod
    def from_pb(cls, m: pb.SnapshotInfo) -> Snapshot:
        return cls(
            id=m.id,
            parent=m.parent,
            sandbox=m.sandbox,
            labels=dict(m.labels),
            depth=m.depth,
            pages=m.pages,
            pause_ms=m.pause_ms,
            created_unix_ms=m.created_unix_ms,
            refs=m.refs,
        )


@dataclass(frozen=True)
class Output:
    """One chunk of a process's output; ``seq`` counts chunks of both streams from 0."""

    stream: str  # "stdout" or "stderr"
    seq: int
    data: bytes

    @classmethod
    def from_pb(cls, m: pb.ProcessOutput) -> Output:
        stream = "stderr" if m.stream == pb.OUTPUT_STREAM_STDERR else "stdout"
        return cls(stream=stream, seq=m.seq, data=m.data)


@dataclass(frozen=True)
class Exit:
    """How a process ended: ``code`` or ``signal`` (one is None); ``error`` when agentd
    lost the guest's answer (the status is then unknown); the checkpoint taken at the exit
    when the process was started with ``checkpoint=True``."""

    code: Optional[int]
    signal: Optional[int]
    timed_out: bool = False
    error: str = ""
    checkpoint: Optional[int] = None
    checkpoint_error: str = ""

    @classmethod
    def from_pb(cls, m: pb.ProcessExit) -> Exit:
        which = m.WhichOneof("status")
        return cls(
            code=m.code if which == "code" else None,
            signal=m.signal if which == "signal" else None,
            timed_out=m.timed_out,
            error=m.error,
            checkpoint=m.checkpoint_snapshot_id or None,
            checkpoint_error=m.checkpoint_error,
        )


@dataclass(frozen=True)
class RunResult:
    """A finished command: its exit and its whole output."""

    process_id: str
    exit_code: Optional[int]
    signal: Optional[int]
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    error: str = ""
    checkpoint: Optional[int] = None

    @property
    def ok(self) -> bool:
        """Exited with status 0."""
        return self.exit_code == 0


@dataclass(frozen=True)
class ProcessInfo:
    """A process agentd started (ProcessService.List)."""

    process_id: str
    sandbox_id: str
    argv: List[str]
    pid: int
    running: bool
    exit: Optional[Exit]
    started_unix_ms: int

    @classmethod
    def from_pb(cls, m: pb.ProcessInfo) -> ProcessInfo:
        return cls(
            process_id=m.process_id,
            sandbox_id=m.sandbox_id,
            argv=list(m.argv),
            pid=m.pid,
            running=m.running,
            exit=Exit.from_pb(m.exit) if m.HasField("exit") else None,
            started_unix_ms=m.started_unix_ms,
        )


_FILE_TYPES = {
    pb.FILE_TYPE_REGULAR: "regular",
    pb.FILE_TYPE_DIRECTORY: "directory",
    pb.FILE_TYPE_SYMLINK: "symlink",
}


@dataclass(frozen=True)
class FileInfo:
    """A file in the guest: ``type`` is regular, directory, symlink or other."""

    path: str
    type: str
    size: int
    mode: int
    uid: int
    gid: int
    mtime_unix_ns: int
    symlink_target: str = ""

    @property
    def is_dir(self) -> bool:
        return self.type == "directory"

    @classmethod
    def from_pb(cls, m: pb.FileInfo) -> FileInfo:
        return cls(
            path=m.path,
            type=_FILE_TYPES.get(m.type, "other"),
            size=m.size,
            mode=m.mode,
            uid=m.uid,
            gid=m.gid,
            mtime_unix_ns=m.mtime_unix_ns,
            symlink_target=m.symlink_target,
        )


_FILE_EVENTS = {v: k[len("FILE_EVENT_KIND_") :].lower() for k, v in pb.FileEventKind.items()}


@dataclass(frozen=True)
class FileEvent:
    """A change in a watched directory: ``kind`` is created, modified, removed,
    renamed_from or renamed_to; ``path`` the entry's full path."""

    path: str
    kind: str
    is_dir: bool

    @classmethod
    def from_pb(cls, m: pb.FileEvent) -> FileEvent:
        return cls(path=m.path, kind=_FILE_EVENTS.get(m.kind, "unspecified"), is_dir=m.is_dir)


@dataclass
class Child:
    """What one child of :meth:`Sandbox.fork_run` does: its environment (over the call's),
    files written before its command starts (absolute guest path -> bytes), its own command
    (else the call's) and labels."""

    env: Dict[str, str] = field(default_factory=dict)
    files: Dict[str, bytes] = field(default_factory=dict)
    cmd: Optional[object] = None  # str (run with sh -c) or a list of arguments
    labels: Dict[str, str] = field(default_factory=dict)
