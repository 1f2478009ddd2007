"""The shared server bootstrap: health, reflection, auth scopes, errors, drain."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import TOKENS
from services.common import errors
from services.common.auth import Scope
from services.common.channels import aio_channel
from services.common.config import ClientSettings, ServiceSettings
from services.common.grpc_server import build_server, serve_until_stopped

SERVICE = "test.v1.EchoService"
# Requests whose handler has returned after its sleep (server side).
_SLEPT: list[bytes] = []


def _identity(data: bytes) -> bytes:
    return data


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"missing":
        raise errors.NotFound("thing", "missing")
    if request == b"bad":
        raise errors.InvalidArgument.field("name", "must not be 'bad'")
    if request == b"quota":
        raise errors.ResourceExhausted(
            "over budget",
            violations=[errors.QuotaViolation("session/x", "limit 1.00, reserved 0.50, spent 0.75")],
        )
    if request == b"boom":
        raise RuntimeError("SELECT secret FROM table")  # a bug: must not leak
    if request.startswith(b"sleep:"):
        await asyncio.sleep(float(request[6:]))
        _SLEPT.append(request)
    return request


async def _stream(request: bytes, context: grpc.aio.ServicerContext):
    for i in range(3):
        yield b"%d" % i
    raise errors.FailedPrecondition("stream ended badly", subject="session/1")


def _register(server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo, _identity, _identity),
            "WorkerOnly": grpc.unary_unary_rpc_method_handler(_echo, _identity, _identity),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream, _identity, _identity),
        },
    )
    server.add_generic_rpc_handlers((handler,))


POLICY = {
    f"/{SERVICE}/Echo": {Scope.OPERATOR, Scope.SERVICE},
    f"/{SERVICE}/WorkerOnly": {Scope.WORKER},
    f"/{SERVICE}/Stream": {Scope.OPERATOR},
}


def settings(**extra: object) -> ServiceSettings:
    return ServiceSettings(
        database_url="postgresql://unused/none",
        host="127.0.0.1",
        port=0,
        operator_tokens=TOKENS["operator"],
        worker_tokens=TOKENS["worker"],
        service_tokens=TOKENS["service"],
        shutdown_grace=3.0,
        **extra,
    )


@pytest.fixture
async def running():
    server = await build_server(settings(), register=_register, service_names=[SERVICE], policy=POLICY)
    yield server
    await server.stop(None)


def call(channel: grpc.aio.Channel, method: str, data: bytes, timeout: float = 5.0):
    return channel.unary_unary(f"/{SERVICE}/{method}", _identity, _identity)(data, timeout=timeout)


async def test_health_reports_serving_without_a_token(running):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(running):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names = {s.name for s in reply.list_services_response.service}
            break
    assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_no_token_is_unauthenticated(running):
    async with aio_channel(f"127.0.0.1:{running.port}", ClientSettings(), token="") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, "Echo", b"hi")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_unknown_token_is_unauthenticated(running):
    async with aio_channel(f"127.0.0.1:{running.port}", ClientSettings(), token="forged") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, "Echo", b"hi")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_wrong_scope_is_permission_denied(running):
    address = f"127.0.0.1:{running.port}"
    async with aio_channel(address, ClientSettings(), token=TOKENS["worker"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, "Echo", b"hi")
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert await call(channel, "WorkerOnly", b"ok") == b"ok"
    async with aio_channel(address, ClientSettings(), token=TOKENS["operator"]) as channel:
        assert await call(channel, "Echo", b"hi") == b"hi"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, "WorkerOnly", b"hi")
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_streams_are_guarded_too(running):
    async with aio_channel(f"127.0.0.1:{running.port}", ClientSettings(), token=TOKENS["worker"]) as channel:
        stream = channel.unary_stream(f"/{SERVICE}/Stream", _identity, _identity)(b"")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stream:
                pass
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_domain_errors_map_to_precise_codes_with_details(running):
    async with aio_channel(f"127.0.0.1:{running.port}", ClientSettings(), token=TOKENS["operator"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, "Echo", b"missing")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        info = errors.details_of(caught.value, error_details_pb2.ResourceInfo)
        assert info[0].resource_type == "thing"

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, "Echo", b"bad")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        bad = errors.details_of(caught.value, error_details_pb2.BadRequest)
        assert [(v.field, v.description) for v in bad[0].field_violations] == [("name", "must not be 'bad'")]

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, "Echo", b"quota")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        quota = errors.details_of(caught.value, error_details_pb2.QuotaFailure)
        assert quota[0].violations[0].subject == "session/x"

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, "Echo", b"boom")
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "SELECT" not in caught.value.details()

        stream = channel.unary_stream(f"/{SERVICE}/Stream", _identity, _identity)(b"")
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for item in stream:
                got.append(item)
        assert got == [b"0", b"1", b"2"]
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        failure = errors.details_of(caught.value, error_details_pb2.PreconditionFailure)
        assert failure[0].violations[0].subject == "session/1"


async def test_shutdown_drains_an_in_flight_call_within_the_grace():
    config = settings()
    _SLEPT.clear()
    released: list[list[bytes]] = []  # per on_stop run: the handlers that had returned by then

    async def release() -> None:
        released.append(list(_SLEPT))

    running = await build_server(
        config, register=_register, service_names=[SERVICE], policy=POLICY, on_stop=[release]
    )
    stop = asyncio.Event()
    cleaned = []

    async def cleanup() -> None:
        cleaned.append(time.monotonic())

    serving = asyncio.create_task(serve_until_stopped(running, config, cleanup=[cleanup], stop_event=stop))
    async with aio_channel(f"127.0.0.1:{running.port}", ClientSettings(), token=TOKENS["operator"]) as channel:
        in_flight = asyncio.ensure_future(call(channel, "Echo", b"sleep:1.0"))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        stop.set()
        assert await in_flight == b"sleep:1.0"
        await asyncio.wait_for(serving, timeout=config.shutdown_grace + 1)
    assert time.monotonic() - started < config.shutdown_grace
    assert cleaned, "cleanup ran after the drain"
    assert released == [[b"sleep:1.0"]], "on_stop ran once, after the in-flight call's handler"
    # New calls are refused once stopped (a channel without retries, to see the code).
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        echo = channel.unary_unary(f"/{SERVICE}/Echo", _identity, _identity)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await echo(b"late", timeout=2.0, metadata=[("authorization", f"Bearer {TOKENS['operator']}")])
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_metrics_listen_on_their_own_host_loopback_unless_configured(monkeypatch):
    from services.common.localinfra import free_port

    # The gRPC port on every interface does not open /metrics with it.
    wide = settings().model_copy(update={"host": "0.0.0.0", "metrics_port": free_port()})
    assert wide.metrics_host == "127.0.0.1"
    server = await build_server(wide, register=_register, service_names=[SERVICE], policy=POLICY)
    try:
        assert server.metrics_http is not None and server.metrics_http.host == "127.0.0.1"
    finally:
        await server.stop(None)
    monkeypatch.setenv("DOCIMPORT_METRICS_HOST", "0.0.0.0")
    opened = settings(metrics_port=free_port())
    server = await build_server(opened, register=_register, service_names=[SERVICE], policy=POLICY)
    try:
        assert server.metrics_http is not None and server.metrics_http.host == "0.0.0.0"
    finally:
        await server.stop(None)
