"""The parts that need no agentd: endpoints, error mapping, commands, write chunking."""

from __future__ import annotations

import io

import grpc
import pytest

import grove_client as gc
from grove_client.errors import from_rpc_error
from grove_client.files import WRITE_CHUNK, _chunks
from grove_client.process import argv_of, timeout_seconds


@pytest.mark.parametrize(
    "endpoint, target, tls",
    [
        ("unix:/run/grove/agentd.sock", "unix:/run/grove/agentd.sock", False),
        ("unix:///tmp/a.sock", "unix:///tmp/a.sock", False),
        ("127.0.0.1:7000", "127.0.0.1:7000", False),
        ("tcp:127.0.0.1:7000", "127.0.0.1:7000", False),
        ("http://localhost:7000", "localhost:7000", False),
        ("https://agentd.example:443/", "agentd.example:443", True),
    ],
)
def test_endpoints(endpoint: str, target: str, tls: bool) -> None:
    assert gc.parse_endpoint(endpoint) == (target, tls)


@pytest.mark.parametrize("endpoint", ["unix:", "localhost", "http://localhost", "host:port"])
def test_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(ValueError, match="bad endpoint"):
        gc.parse_endpoint(endpoint)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    "code, cls",
    [
        (grpc.StatusCode.NOT_FOUND, gc.NotFound),
        (grpc.StatusCode.INVALID_ARGUMENT, gc.InvalidArgument),
        (grpc.StatusCode.FAILED_PRECONDITION, gc.FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, gc.ResourceExhausted),
        (grpc.StatusCode.PERMISSION_DENIED, gc.PermissionDenied),
        (grpc.StatusCode.DATA_LOSS, gc.DataLoss),
        (grpc.StatusCode.UNAVAILABLE, gc.Unavailable),
    ],
)
def test_status_codes_map_to_exceptions(code: grpc.StatusCode, cls: type) -> None:
    e = from_rpc_error(FakeRpcError(code, "why"))
    assert type(e) is cls and isinstance(e, gc.GroveError)
    assert (e.code, e.details) == (code, "why")
    assert str(e) == f"{code.name}: why"


def test_unknown_codes_are_plain_grove_errors() -> None:
    e = from_rpc_error(FakeRpcError(grpc.StatusCode.ABORTED, "x"))
    assert type(e) is gc.GroveError and e.code == grpc.StatusCode.ABORTED


def test_commands() -> None:
    assert argv_of("echo hi") == ["sh", "-c", "echo hi"]
    assert argv_of(("ls", "-l")) == ["ls", "-l"]
    with pytest.raises(ValueError):
        argv_of([])
    assert (timeout_seconds(None), timeout_seconds(0), timeout_seconds(0.2)) == (0, 0, 1)
    assert timeout_seconds(2.5) == 3


def test_writes_are_chunked_lazily() -> None:
    big = bytes(range(256)) * (WRITE_CHUNK // 256 * 2 + 1)
    for src in (big, io.BytesIO(big), iter([big[:10], big[10:]])):
        chunks = list(_chunks(src))
        assert all(0 < len(c) <= WRITE_CHUNK for c in chunks)
        assert b"".join(chunks) == big
    assert list(_chunks("héllo")) == ["héllo".encode()]


class FakeProcessStub:
    """ProcessService.Connect answering from scripted event lists (an exception ends one)."""

    def __init__(self, scripts: list) -> None:
        self.scripts = scripts
        self.requests: list = []

    def Connect(self, req: object) -> object:  # noqa: N802 (the stub's name)
        self.requests.append(req)
        return _events(self.scripts.pop(0))


def _events(items: list):  # type: ignore[no-untyped-def]
    for x in items:
        if isinstance(x, Exception):
            raise x
        yield x


def test_connect_resumes_after_data_loss() -> None:
    from grove_client.v1 import sandbox_pb2 as pb

    def started() -> object:
        return pb.ProcessEvent(started=pb.ProcessStarted(process_id="p-1", pid=7))

    def out(seq: int) -> object:
        return pb.ProcessEvent(output=pb.ProcessOutput(stream=1, seq=seq, data=b"%d;" % seq))

    exit_ = pb.ProcessEvent(exit=pb.ProcessExit(code=3))
    lagged = FakeRpcError(grpc.StatusCode.DATA_LOSS, "fell 5 events behind")
    stub = FakeProcessStub(
        [[started(), out(0), out(1), lagged], [started(), out(1), out(2), out(3), exit_]]
    )

    class FakeClient:
        process = stub

    r = gc.Process(FakeClient(), "p-1").connect().collect()  # type: ignore[arg-type]
    assert (r.stdout, r.exit_code) == (b"0;1;2;3;", 3)
    assert [q.from_seq for q in stub.requests] == [0, 2]
    # Without resume, DATA_LOSS is the caller's.
    stub.scripts = [[started(), out(0), lagged]]
    with pytest.raises(gc.DataLoss) as e:
        gc.Process(FakeClient(), "p-1").connect(resume=False).collect()  # type: ignore[arg-type]
    assert isinstance(e.value.__cause__, grpc.RpcError)
