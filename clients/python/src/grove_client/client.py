"""The connection to agentd and the calls that are not about one sandbox (templates,
snapshots, processes by id, the node)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Tuple, TypeVar

import grpc

from ._channel import DEFAULT_ENDPOINT, ChannelOptions, channel
from .errors import GroveError, raise_from
from .models import ProcessInfo, Snapshot
from .process import Process
from .v1 import sandbox_pb2 as pb
from .v1 import sandbox_pb2_grpc as rpc

if TYPE_CHECKING:
    from .sandbox import Sandbox

T = TypeVar("T")

_EVENT_KINDS = {v: k[len("EVENT_KIND_") :].lower() for k, v in pb.EventKind.items()}


class Client:
    """A connection to agentd.

    ``endpoint`` is spelled as the grove CLI's ``--endpoint``: ``unix:/path/to/agentd.sock``
    (the default, ``unix:/run/grove/agentd.sock``), ``host:port`` or ``http(s)://host:port``;
    ``token`` is agentd's bearer token (TCP). The generated stubs are ``sandbox``,
    ``process``, ``fs``, ``template`` and ``node``, for what this layer does not cover.
    Use as a context manager, or :meth:`close` it.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        token: Optional[str] = None,
        options: Optional[ChannelOptions] = None,
    ) -> None:
        self.endpoint = endpoint
        self.channel = channel(endpoint, token, options)
        self.sandbox = rpc.SandboxServiceStub(self.channel)
        self.process = rpc.ProcessServiceStub(self.channel)
        self.fs = rpc.FilesystemServiceStub(self.channel)
        self.template = rpc.TemplateServiceStub(self.channel)
        self.node = rpc.NodeServiceStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _unary(self, method: Callable[[Any], T], request: Any) -> T:
        """One call, its gRPC error raised as a :class:`GroveError`."""
        try:
            return method(request)
        except grpc.RpcError as e:
            raise_from(e)

    # ------------------------------------------------------------------ node

    def node_info(self) -> pb.NodeInfo:
        """Host check, capacity, versions, standby pools."""
        return self._unary(self.node.Info, pb.InfoRequest())

    def metrics(self) -> str:
        """agentd's Prometheus text."""
        return self._unary(self.node.Metrics, pb.MetricsRequest()).text

    # ------------------------------------------------------------------ events

    def watch(
        self, sandbox_id: str = "", include_current: bool = False, timeout: Optional[float] = None
    ) -> Iterator[Tuple[str, Sandbox]]:
        """Lifecycle events of one sandbox (or of all) as agentd persists them: ``(kind,
        sandbox)`` with kind current, created, state_changed or deleted. ``timeout`` ends
        the stream (DeadlineExceeded) after that many seconds."""
        from .sandbox import Sandbox

        req = pb.WatchRequest(id=sandbox_id, include_current=include_current)
        try:
            for ev in self.sandbox.Watch(req, timeout=timeout):
                yield _EVENT_KINDS.get(ev.kind, "unspecified"), Sandbox(self, ev.sandbox)
        except grpc.RpcError as e:
            raise_from(e)

    # ------------------------------------------------------------------ templates

    def register_template(
        self,
        name: str,
        kernel: str,
        *,
        initrd: str = "",
        cmdline: str = "",
        vcpus: int = 0,
        memory_mib: int = 0,
        rootfs_image: str = "",
        rootfs_dir: str = "",
        disk_mib: int = 0,
        ready_text: str = "",
        ready_timeout: int = 0,
        guest_agent: bool = False,
    ) -> pb.Template:
        """Registers a template (paths on agentd's host). The ready check is ``ready_text``
        on the serial console when given, else guest-init's boot-timer write."""
        req = pb.RegisterTemplateRequest(
            name=name,
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            vcpus=vcpus,
            memory_mib=memory_mib,
            disk_mib=disk_mib,
            ready_check=pb.READY_CHECK_SERIAL_TEXT if ready_text else pb.READY_CHECK_BOOT_TIMER,
            ready_text=ready_text,
            ready_timeout_seconds=ready_timeout,
            guest_agent=guest_agent,
        )
        if rootfs_image:
            req.rootfs_image = rootfs_image
        elif rootfs_dir:
            req.rootfs_dir = rootfs_dir
        return self._unary(self.template.Register, req)

    def warm_template(
        self, name: str, on_progress: Optional[Callable[[pb.WarmProgress], None]] = None
    ) -> pb.Template:
        """Boots the template, waits for its ready check and snapshots it; the warm
        template. ``on_progress`` sees each stage."""
        last = None
        try:
            for m in self.template.Warm(pb.WarmRequest(name=name)):
                last = m
                if on_progress is not None:
                    on_progress(m)
        except grpc.RpcError as e:
            raise_from(e)
        if last is None or last.stage != pb.WarmProgress.STAGE_DONE:
            raise GroveError(f"warm of {name} ended without STAGE_DONE: {last}")
        return last.template

    def templates(self) -> List[pb.Template]:
        return list(self._unary(self.template.List, pb.ListTemplatesRequest()).templates)

    def delete_template(self, name: str) -> None:
        self._unary(self.template.Delete, pb.DeleteTemplateRequest(name=name))

    # ------------------------------------------------------------------ snapshots

    def snapshots(self) -> List[Snapshot]:
        m = self._unary(self.sandbox.ListSnapshots, pb.ListSnapshotsRequest())
        return [Snapshot.from_pb(s) for s in m.snapshots]

    def delete_snapshot(self, snapshot: Snapshot | int) -> None:
        sid = snapshot.id if isinstance(snapshot, Snapshot) else snapshot
        self._unary(self.sandbox.DeleteSnapshot, pb.DeleteSnapshotRequest(id=sid))

    # ------------------------------------------------------------------ processes

    def processes(self, sandbox_id: str = "") -> List[ProcessInfo]:
        """Processes of one sandbox, or of all: running ones and the last ended."""
        m = self._unary(self.process.List, pb.ListProcessesRequest(sandbox_id=sandbox_id))
        return [ProcessInfo.from_pb(p) for p in m.processes]

    def get_process(self, process_id: str) -> Process:
        """A handle to a process by id (signal, stdin, connect, wait)."""
        return Process(self, process_id)
