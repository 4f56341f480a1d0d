"""Endpoints (as the grove CLI's ``--endpoint``) to gRPC channels, sync and asyncio."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import grpc
import grpc.aio

DEFAULT_ENDPOINT = "unix:/run/grove/agentd.sock"

ChannelOptions = Sequence[Tuple[str, Any]]


def parse_endpoint(endpoint: str) -> Tuple[str, bool]:
    """``(grpc target, use TLS)`` for an endpoint.

    Accepted: ``unix:/path`` (a Unix socket, as agentd's ``--listen unix:PATH``),
    ``host:port`` and ``tcp:host:port`` (plaintext), ``http://host:port`` (plaintext) and
    ``https://host:port`` (TLS with the system's roots).
    """
    if endpoint.startswith("unix:"):
        path = endpoint[len("unix:") :]
        if path.startswith("//"):  # unix:///abs/path, gRPC's own spelling
            return endpoint, False
        if not path:
            raise ValueError(f"bad endpoint {endpoint!r}: unix: needs a socket path")
        return f"unix:{path}", False
    for prefix, tls in (("https://", True), ("http://", False), ("tcp:", False)):
        if endpoint.startswith(prefix):
            endpoint, use_tls = endpoint[len(prefix) :].rstrip("/"), tls
            break
    else:
        use_tls = False
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(
            f"bad endpoint {endpoint!r}: expected unix:PATH, HOST:PORT or http(s)://HOST:PORT"
        )
    return endpoint, use_tls


def _options(target: str, options: Optional[ChannelOptions]) -> List[Tuple[str, Any]]:
    opts = list(options or [])
    if target.startswith("unix:") and not any(k == "grpc.default_authority" for k, _ in opts):
        # gRPC would send the socket path as :authority, which agentd's HTTP/2 server
        # (hyper) refuses as malformed (RST_STREAM, PROTOCOL_ERROR).
        opts.append(("grpc.default_authority", "localhost"))
    return opts


def _auth_metadata(token: Optional[str]) -> List[Tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


class _AuthInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call (agentd on TCP wants it)."""

    def __init__(self, token: str) -> None:
        self._md = _auth_metadata(token)

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        md = list(d.metadata or []) + self._md
        return _Details(d.method, d.timeout, md, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, cont, details, request):  # type: ignore[no-untyped-def]
        return cont(self._details(details), request)

    def intercept_unary_stream(self, cont, details, request):  # type: ignore[no-untyped-def]
        return cont(self._details(details), request)

    def intercept_stream_unary(self, cont, details, it):  # type: ignore[no-untyped-def]
        return cont(self._details(details), it)

    def intercept_stream_stream(self, cont, details, it):  # type: ignore[no-untyped-def]
        return cont(self._details(details), it)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):  # type: ignore[no-untyped-def]
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def channel(
    endpoint: str, token: Optional[str] = None, options: Optional[ChannelOptions] = None
) -> grpc.Channel:
    """A blocking gRPC channel to agentd at ``endpoint`` (see :func:`parse_endpoint`)."""
    target, tls = parse_endpoint(endpoint)
    opts = _options(target, options)
    ch = (
        grpc.secure_channel(target, grpc.ssl_channel_credentials(), opts)
        if tls
        else grpc.insecure_channel(target, opts)
    )
    return grpc.intercept_channel(ch, _AuthInterceptor(token)) if token else ch


class _AioAuth(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self._md = _auth_metadata(token)

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        md = grpc.aio.Metadata(*(list(d.metadata or []) + self._md))
        return grpc.aio.ClientCallDetails(d.method, d.timeout, md, d.credentials, d.wait_for_ready)

    async def intercept_unary_unary(self, cont, details, request):  # type: ignore[no-untyped-def]
        return await cont(self._details(details), request)

    async def intercept_unary_stream(self, cont, details, request):  # type: ignore[no-untyped-def]
        return await cont(self._details(details), request)

    async def intercept_stream_unary(self, cont, details, it):  # type: ignore[no-untyped-def]
        return await cont(self._details(details), it)


def aio_channel(
    endpoint: str = DEFAULT_ENDPOINT,
    token: Optional[str] = None,
    options: Optional[ChannelOptions] = None,
) -> grpc.aio.Channel:
    """An asyncio channel (``grpc.aio``) to agentd, for the generated stubs in
    :mod:`grove_client.v1.sandbox_pb2_grpc`: many concurrent streams on one connection
    (the test host's scenario runs 1000 Connect streams on one channel)."""
    target, tls = parse_endpoint(endpoint)
    interceptors = [_AioAuth(token)] if token else None
    opts = _options(target, options)
    if tls:
        return grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(), opts, interceptors=interceptors  # type: ignore[arg-type]
        )
    return grpc.aio.insecure_channel(target, opts, interceptors=interceptors)  # type: ignore[arg-type]
