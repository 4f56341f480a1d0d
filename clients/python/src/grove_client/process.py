"""Processes in a sandbox (ProcessService): a handle by process id and the event stream of
Start and Connect."""

from __future__ import annotations

import math
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import grpc

from .errors import DataLoss, GroveError, from_rpc_error, raise_from
from .models import Exit, Output, RunResult
from .v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from .client import Client

Cmd = Union[str, Sequence[str]]

# SendStdin takes at most 4 MiB per call.
STDIN_CHUNK = 1 << 20


def argv_of(cmd: Cmd) -> List[str]:
    """A command as argv: a string runs through ``sh -c``, a sequence as it is."""
    if isinstance(cmd, str):
        return ["sh", "-c", cmd]
    argv = list(cmd)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError(f"a command is a string or a non-empty list of strings, not {cmd!r}")
    return argv


def timeout_seconds(timeout: Optional[float]) -> int:
    """Seconds for a ``timeout_seconds`` field (rounded up; None or 0: no limit)."""
    return 0 if not timeout else max(1, math.ceil(timeout))


class Process:
    """A process agentd started, by its id (``p-N``): signal it, feed its stdin, wait for
    it, or connect to its output from any client."""

    def __init__(self, client: Client, process_id: str, pid: int = 0) -> None:
        self.client = client
        self.id = process_id
        #: Its pid in the guest (0 when not known).
        self.pid = pid

    def __repr__(self) -> str:
        return f"Process({self.id!r})"

    def signal(self, signal: int = 15) -> None:
        """Sends ``signal`` (1..=64) to the process's group."""
        self.client._unary(
            self.client.process.Signal,
            pb.SignalProcessRequest(process_id=self.id, signal=signal),
        )

    def kill(self) -> None:
        """SIGKILL."""
        self.signal(9)

    def send_stdin(self, data: bytes, eof: bool = False) -> None:
        """Feeds its stdin (it was started with stdin open); ``eof`` closes it after."""
        for i in range(0, max(len(data), 1), STDIN_CHUNK):
            chunk = data[i : i + STDIN_CHUNK]
            last = i + STDIN_CHUNK >= len(data)
            self.client._unary(
                self.client.process.SendStdin,
                pb.SendStdinRequest(process_id=self.id, data=chunk, eof=eof and last),
            )

    def close_stdin(self) -> None:
        self.send_stdin(b"", eof=True)

    def resize(self, rows: int, cols: int) -> None:
        """Changes a PTY process's terminal size."""
        self.client._unary(
            self.client.process.Resize,
            pb.ResizeProcessRequest(process_id=self.id, rows=rows, cols=cols),
        )

    def wait(self) -> Exit:
        """Blocks until the process ends; its exit."""
        m = self.client._unary(self.client.process.Wait, pb.WaitProcessRequest(process_id=self.id))
        return Exit.from_pb(m)

    def connect(self, from_seq: int = 0, resume: bool = True) -> ProcessStream:
        """Attaches to its output: what agentd kept (its last 1 MiB) from ``from_seq`` on,
        then live output, then the exit.

        A client that falls too far behind the live output gets DATA_LOSS from agentd; with
        ``resume`` the stream then connects again from the next sequence number it has not
        seen (output already dropped from agentd's 1 MiB is then skipped).
        """
        return ProcessStream(self.client, connect=(self.id, from_seq, resume))


class ProcessStream(Iterator[Output]):
    """The life of a process as it happens: iterate for its :class:`Output` chunks;
    ``exit`` is set once the stream ended (iteration stops there).

    Made by :meth:`Sandbox.start` and :meth:`Process.connect`. The process does not depend
    on the stream: :meth:`cancel` (or dropping the stream) leaves it running.
    """

    def __init__(
        self,
        client: Client,
        start: Optional[pb.StartProcessRequest] = None,
        connect: Optional[Tuple[str, int, bool]] = None,
    ) -> None:
        self._client = client
        self._resume = False
        self._next_seq = 0
        self._process_id = ""
        self.exit: Optional[Exit] = None
        if start is not None:
            self._call = self._open(lambda: client.process.Start(start))
        elif connect is not None:
            self._process_id, self._next_seq, self._resume = connect
            self._call = self._open(self._connect)
        else:
            raise ValueError("a ProcessStream needs a start request or a process to connect to")
        first = self._next_event()
        if first is None or first.WhichOneof("event") != "started":
            raise GroveError(f"the process stream began with {first!r}, not started")
        #: The process (its id for Signal, SendStdin, Connect, Wait).
        self.process = Process(client, first.started.process_id, first.started.pid)
        self._process_id = self.process.id

    def _connect(self) -> Any:
        return self._client.process.Connect(
            pb.ConnectProcessRequest(process_id=self._process_id, from_seq=self._next_seq)
        )

    @staticmethod
    def _open(make: Callable[[], Any]) -> Any:
        try:
            return make()
        except grpc.RpcError as e:
            raise_from(e)

    def _next_event(self) -> Optional[pb.ProcessEvent]:
        try:
            return next(self._call)
        except StopIteration:
            return None
        except grpc.RpcError as e:
            err = from_rpc_error(e)
            if not (isinstance(err, DataLoss) and self._resume):
                raise err from e
        # Fell behind the live output: connect again from the first chunk not seen yet.
        self._call = self._open(self._connect)
        again = self._next_event()
        if again is None or again.WhichOneof("event") != "started":
            raise GroveError(f"{self._process_id}: reconnect began with {again!r}")
        return self._next_event()

    def __iter__(self) -> ProcessStream:
        return self

    def __next__(self) -> Output:
        while self.exit is None:
            ev = self._next_event()
            if ev is None:
                raise GroveError(f"{self.process.id}: the stream ended without an exit")
            kind = ev.WhichOneof("event")
            if kind == "output":
                if ev.output.seq < self._next_seq:
                    continue  # already seen (a replay after a reconnect)
                self._next_seq = ev.output.seq + 1
                return Output.from_pb(ev.output)
            if kind == "exit":
                self.exit = Exit.from_pb(ev.exit)
        raise StopIteration

    def collect(self) -> RunResult:
        """Reads the rest of the stream: the exit and the output of both streams."""
        out: Dict[str, List[bytes]] = {"stdout": [], "stderr": []}
        for o in self:
            out[o.stream].append(o.data)
        assert self.exit is not None
        x = self.exit
        return RunResult(
            process_id=self.process.id,
            exit_code=x.code,
            signal=x.signal,
            stdout=b"".join(out["stdout"]),
            stderr=b"".join(out["stderr"]),
            timed_out=x.timed_out,
            error=x.error,
            checkpoint=x.checkpoint,
        )

    def cancel(self) -> None:
        """Stops reading (the process runs on)."""
        self._call.cancel()
