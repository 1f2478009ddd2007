"""The one server interceptor of every docimport gRPC server.

Owns the order in which the platform wraps each call and the per-method
cache of wrapped handlers. For every call, outermost first:

1. RPC metrics (`metrics.RpcRecorder`): duration and the final status code,
   the one the caller gets, refusals included;
2. authentication (`auth.Authenticator`): the bearer token's scope against
   the method's policy; a refused call never reaches the servicer;
3. error mapping (`errors.abort_for`): a `DomainError` becomes its precise
   status with details, anything else INTERNAL, logged.

One interceptor instead of three, and a method's wrapped handler built once
(the registered handlers never change after start): a call costs one
coroutine and one metadata scan here, which the stage-report ingest of the
session service feels (bench/session_ingest.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.common.auth import Authenticator, refused
from services.common.errors import abort_for
from services.common.metrics import RpcRecorder

_PASS_THROUGH = (grpc.aio.AbortError, asyncio.CancelledError, KeyboardInterrupt, SystemExit)


class PlatformInterceptor(grpc.aio.ServerInterceptor):
    """Metrics, auth and error mapping around every handler, wrapped once per method."""

    def __init__(self, auth: Authenticator, rpc: RpcRecorder) -> None:
        self._auth = auth
        self._rpc = rpc
        # method -> (the registered handler, the wrapped one)
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = details.method
        entry = self._handlers.get(method)
        if entry is None:
            handler = await continuation(details)
            if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
                return None
            entry = self._handlers[method] = (handler, self._wrap(handler, method))
        refusal = self._auth.refusal(method, details.invocation_metadata)
        if refusal is not None:
            return self._wrap(refused(entry[0], *refusal), method)
        return entry[1]

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        des, ser = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, "unary"), des, ser
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method, "server_stream"), des, ser
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method, "client_stream"), des, ser
            )
        return grpc.stream_stream_rpc_method_handler(
            self._stream(handler.stream_stream, method, "bidi_stream"), des, ser
        )

    def _unary(
        self, behavior: Callable[..., Awaitable[Any]], method: str, kind: str
    ) -> Callable[..., Awaitable[Any]]:
        rpc = self._rpc

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            failure: BaseException | None = None
            try:
                return await behavior(request, context)
            except _PASS_THROUGH as exc:
                failure = exc
                raise
            except Exception as exc:  # noqa: BLE001 - this is the one place that maps errors
                failure = exc
                await abort_for(context, exc, method)
            finally:
                rpc.observe(method, kind, context, failure, time.perf_counter() - start)

        return wrapper

    def _stream(
        self, behavior: Callable[..., AsyncIterator[Any]], method: str, kind: str
    ) -> Callable[..., AsyncIterator[Any]]:
        rpc = self._rpc

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            failure: BaseException | None = None
            try:
                async for item in behavior(request, context):
                    yield item
            except _PASS_THROUGH as exc:
                failure = exc
                raise
            except Exception as exc:  # noqa: BLE001
                failure = exc
                await abort_for(context, exc, method)
            finally:
                rpc.observe(method, kind, context, failure, time.perf_counter() - start)

        return wrapper
