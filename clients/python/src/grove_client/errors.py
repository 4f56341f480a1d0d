"""gRPC status codes as exceptions.

Every call of this package raises a :class:`GroveError` subclass named for the status code
agentd answered with (docs/api.md lists which requests get which); the original
:class:`grpc.RpcError` is kept as ``__cause__``.
"""

from __future__ import annotations

from typing import Dict, NoReturn, Optional, Type

import grpc


class GroveError(Exception):
    """An error answer from agentd (or the transport): ``code`` and ``details``."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: Optional[grpc.StatusCode] = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgument(GroveError):
    """Malformed input (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(GroveError):
    """An unknown sandbox, snapshot, template, process or file (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(GroveError):
    """ALREADY_EXISTS."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(GroveError):
    """The state does not allow the request (FAILED_PRECONDITION), e.g. no guest agent."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(GroveError):
    """The host (or the guest's file system) cannot hold it (RESOURCE_EXHAUSTED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(GroveError):
    """PERMISSION_DENIED (e.g. a guest path outside its root)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(GroveError):
    """A missing or wrong bearer token (UNAUTHENTICATED)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(GroveError):
    """agentd or the guest agent cannot be reached (UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(GroveError):
    """DATA_LOSS: a corrupt snapshot, or a Connect stream that fell behind."""

    code = grpc.StatusCode.DATA_LOSS


class Unimplemented(GroveError):
    """UNIMPLEMENTED (a field reserved for a later version)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(GroveError):
    """The call's deadline passed (DEADLINE_EXCEEDED)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(GroveError):
    """CANCELLED."""

    code = grpc.StatusCode.CANCELLED


class Internal(GroveError):
    """A VMM or storage failure in agentd (INTERNAL)."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: Dict[grpc.StatusCode, Type[GroveError]] = {
    c.code: c
    for c in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        PermissionDenied,
        Unauthenticated,
        Unavailable,
        DataLoss,
        Unimplemented,
        DeadlineExceeded,
        Cancelled,
        Internal,
    )
}


def from_rpc_error(e: grpc.RpcError) -> GroveError:
    """The :class:`GroveError` for a gRPC error (its class picked by the status code)."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    cls = _BY_CODE.get(code, GroveError)
    return cls(details, code)


def raise_from(e: grpc.RpcError) -> NoReturn:
    """Raises :func:`from_rpc_error` of ``e`` with ``e`` as its ``__cause__``."""
    raise from_rpc_error(e) from e
