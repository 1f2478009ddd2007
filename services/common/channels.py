"""gRPC client channels to docimport services, with the caller's token.

Owns how any docimport process (a service calling another, a worker, the
CLI) opens a channel: TLS when a CA is configured, the bearer token added
to every call's metadata by an interceptor, keepalive so long streams
survive idle proxies, and a retry policy for UNAVAILABLE (all docimport
writes are idempotent by request id or key, so a retry never does work
twice). Calls are balanced round-robin over every address the target
resolves to, so `dns:///docimport-session:50062` on a headless Kubernetes
Service spreads calls over all replicas (a single address behaves as
before). The caller owns the channel and closes it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import ClientSettings

_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

_OPTIONS = [
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def _with_token(metadata: Any, token: str) -> list[tuple[str, str]]:
    items = list(metadata or ())
    if token:
        items.append(("authorization", f"Bearer {token}"))
    return items


class _AioAuthBase:
    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            _with_token(details.metadata, self._token),
            details.credentials,
            details.wait_for_ready,
        )


# grpc.aio files an interceptor under one call type only, so each type has its own class.
class _AioAuthUnary(_AioAuthBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioAuthStream(_AioAuthBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: list[tuple[str, str]]):
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class _SyncAuth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(_SyncDetails(details, _with_token(details.metadata, self._token)), request)

    def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(_SyncDetails(details, _with_token(details.metadata, self._token)), request)


def _credentials(settings: ClientSettings) -> grpc.ChannelCredentials | None:
    tls = settings.tls
    if tls.ca_file is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=tls.ca_file.read_bytes())


def aio_channel(address: str, settings: ClientSettings, token: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel to `address` presenting `token` (default: settings.token)."""
    secret = settings.token.get_secret_value() if token is None else token
    interceptors = [_AioAuthUnary(secret), _AioAuthStream(secret)]
    credentials = _credentials(settings)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=_OPTIONS, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=_OPTIONS, interceptors=interceptors)


def sync_channel(address: str, settings: ClientSettings, token: str | None = None) -> grpc.Channel:
    """A blocking channel (workers, the CLI) to `address` presenting `token`."""
    secret = settings.token.get_secret_value() if token is None else token
    credentials = _credentials(settings)
    if credentials is None:
        base = grpc.insecure_channel(address, options=_OPTIONS)
    else:
        base = grpc.secure_channel(address, credentials, options=_OPTIONS)
    return grpc.intercept_channel(base, _SyncAuth(secret))


async def wait_serving(address: str, timeout: float = 30.0) -> None:
    """Waits until the server at `address` answers its health check SERVING."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no service answered SERVING on {address} within {timeout:.0f}s")
            await asyncio.sleep(0.1)
