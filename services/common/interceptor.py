"""The one server interceptor of every docimport gRPC server.

Owns the order in which the platform wraps each call and the per-method
cache of wrapped handlers. For every call, outermost first:

1. RPC metrics (`metrics.RpcRecorder`): duration and the final status code,
   the one the caller gets, refusals included;
2. authentication (`auth.Authenticator`): the bearer token's scope against
   the method's policy; a refused call never reaches the servicer, and its
   body is never decoded;
3. decoding and the generic input checks: gRPC hands the wrapper the raw
   body (the handler's deserializer is taken over), which is decoded here,
   so an undecodable body is INVALID_ARGUMENT, not gRPC's UNKNOWN; then
   `validate.RequestValidator` checks every field (NULs, lengths, enums,
   times) before the servicer sees the request;
4. error mapping (`errors.abort_for`): a `DomainError` becomes its precise
   status with details, anything else INTERNAL, logged.

One interceptor instead of four, and a method's wrapped handler and its
check built once (the registered handlers never change after start): a
call costs one coroutine, one metadata scan, the decoding gRPC would have
done and a check planned per message type, which the stage-report ingest
of the session service feels (bench/session_ingest.py). Request-streaming
methods (none in docimport; reflection's) keep gRPC's own decoding.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from services.common.auth import Authenticator, refused
from services.common.errors import InvalidArgument, abort_for
from services.common.metrics import RpcRecorder
from services.common.validate import RequestValidator

_PASS_THROUGH = (grpc.aio.AbortError, asyncio.CancelledError, KeyboardInterrupt, SystemExit)


class PlatformInterceptor(grpc.aio.ServerInterceptor):
    """Metrics, auth, decoding, input checks and error mapping around every handler, wrapped once per method."""

    def __init__(
        self, auth: Authenticator, rpc: RpcRecorder, validator: RequestValidator | None = None
    ) -> None:
        self._auth = auth
        self._rpc = rpc
        self._validator = validator or RequestValidator()
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
        ser = handler.response_serializer
        if handler.stream_unary or handler.stream_stream:
            des = handler.request_deserializer
            if handler.stream_unary:
                return grpc.stream_unary_rpc_method_handler(
                    self._unary(handler.stream_unary, method, "client_stream", None), des, ser
                )
            return grpc.stream_stream_rpc_method_handler(
                self._stream(handler.stream_stream, method, "bidi_stream", None), des, ser
            )
        # The raw body comes in (no deserializer): decoded in the wrapper.
        decode = self._decoder(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, "unary", decode), None, ser
            )
        return grpc.unary_stream_rpc_method_handler(
            self._stream(handler.unary_stream, method, "server_stream", decode), None, ser
        )

    def _decoder(self, deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        """Body -> checked request (raises InvalidArgument); None passes the body on as it is."""
        if deserializer is None:
            return None
        try:
            descriptor = getattr(deserializer(b""), "DESCRIPTOR", None)
        except Exception:  # noqa: BLE001 - not a protobuf message: decoded, not checked
            descriptor = None
        check = self._validator.checker(descriptor) if descriptor is not None else None
        name = descriptor.name if descriptor is not None else "request"

        def decode(body: bytes) -> Any:
            try:
                request = deserializer(body)
            except DecodeError:
                raise InvalidArgument(f"the request body is not a valid {name} message") from None
            if check is not None:
                check(request, body)
            return request

        return decode

    def _unary(
        self,
        behavior: Callable[..., Awaitable[Any]],
        method: str,
        kind: str,
        decode: Callable[[bytes], Any] | None,
    ) -> Callable[..., Awaitable[Any]]:
        rpc = self._rpc

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            failure: BaseException | None = None
            try:
                if decode is not None:
                    request = decode(request)
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
        self,
        behavior: Callable[..., AsyncIterator[Any]],
        method: str,
        kind: str,
        decode: Callable[[bytes], Any] | None,
    ) -> Callable[..., AsyncIterator[Any]]:
        rpc = self._rpc

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            failure: BaseException | None = None
            try:
                if decode is not None:
                    request = decode(request)
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
