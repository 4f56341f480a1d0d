"""Python client for Grove's agentd (gRPC API ``grove.v1``, ``proto/sandbox.proto``).

>>> from grove_client import Client, Sandbox
>>> with Client("unix:/run/grove/agentd.sock") as c:
...     sb = Sandbox.create(c, template="linux")
...     print(sb.run("echo hello").stdout)
...     sb.delete()

The generated code is :mod:`grove_client.v1.sandbox_pb2` (messages) and
:mod:`grove_client.v1.sandbox_pb2_grpc` (stubs); :func:`aio_channel` gives an asyncio
channel for them.
"""

from ._channel import DEFAULT_ENDPOINT, aio_channel, parse_endpoint
from .client import Client
from .errors import (
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    GroveError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from .files import Files, FileWatch
from .models import Child, Exit, FileEvent, FileInfo, Output, ProcessInfo, RunResult, Snapshot
from .process import Process, ProcessStream
from .sandbox import ChildResult, Sandbox

__all__ = [
    "DEFAULT_ENDPOINT",
    "AlreadyExists",
    "Cancelled",
    "Child",
    "ChildResult",
    "Client",
    "DataLoss",
    "DeadlineExceeded",
    "Exit",
    "FailedPrecondition",
    "FileEvent",
    "FileInfo",
    "FileWatch",
    "Files",
    "GroveError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "Output",
    "PermissionDenied",
    "Process",
    "ProcessInfo",
    "ProcessStream",
    "ResourceExhausted",
    "RunResult",
    "Sandbox",
    "Snapshot",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "aio_channel",
    "parse_endpoint",
]
