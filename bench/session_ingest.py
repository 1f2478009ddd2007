"""Benchmark: stage reports ingested by the session service against a bare grpc.aio unary echo.

Usage::

    .venv/bin/python bench/session_ingest.py [--runs 20000] [--concurrency 16] [--rounds 5]

Prints, in one run: the rate of a bare grpc.aio unary echo (a server that
returns the request's bytes, no interceptors) called with `--concurrency`
calls in flight over one channel, and the rate at which the session
service ingests stage reports with the same concurrency over the same kind
of plain channel (the worker token in each call's metadata; server side:
auth and error interceptors, validation, the
micro-batched transactions that move documents on, counters, events and
NOTIFY): ReportStageStarted, then ReportStageResult (success) for distinct
runs, each request built before the clock starts, as the echo's payload is
(until 2026-12-04 they were built inside the timed loop, which charged
protobuf construction to the service); and, on runs of their own,
ReportStageResults calls of `--batch` reports each, the way a worker's
delivery thread sends them (added 2026-12-04, later; reports per second, the same
number of calls in flight). The three alternate in rounds so
that load on the machine hits them alike; best and median rounds are printed. DESIGN.md's target: >= 0.5x the
echo rate. Client and servers share this process, as in the echo baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from docimport.common.v1 import common_pb2
from docimport.session.v1 import session_service_pb2 as pb
from session_common import TOKENS, private_database, private_redis, services

from services.common import convert

LAST: dict[str, list[float]] = {}


class Recorder:
    """An Enqueuer that keeps the messages (no broker in this benchmark)."""

    def __init__(self) -> None:
        self.messages: list = []

    async def publish(self, messages) -> None:  # type: ignore[no-untyped-def]
        self.messages.extend(messages)

    async def close(self) -> None:
        pass


async def drive(calls: list, concurrency: int) -> float:
    """Runs the coroutine factories with `concurrency` in flight; returns calls per second."""
    queue = list(reversed(calls))

    async def lane() -> None:
        while queue:
            await queue.pop()()

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return len(calls) / (time.perf_counter() - start)


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[Any]:
    """A bare grpc.aio server whose one unary method returns the request bytes."""

    async def echo(request: bytes, context: object) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    payload = pb.ReportStageResultRequest(
        document_id=str(uuid.uuid4()),
        stage=common_pb2.STAGE_EXTRACT,
        attempt=1,
        task_id=str(uuid.uuid4()),
        worker="bench-worker@host",
        succeeded=True,
        cost=convert.money("0.00012501"),
    ).SerializeToString()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/bench.Echo/Echo")
        await call(payload)
        yield lambda: call(payload)
    await server.stop(0)


async def ingest(
    db_url: str, broker_url: str, runs: int, concurrency: int, rounds: int, batch: int
) -> dict[str, list[float]]:
    recorder = Recorder()
    batched_runs = runs if batch > 1 else 0  # runs of their own, reported `batch` to a call
    runs += batched_runs
    async with services(
        db_url,
        broker_url,
        enqueuer=recorder,
        max_in_flight_total=runs + 1,
        dispatch_batch=5000,
        pool_size=12,
    ) as stack:
        from session_common import insert_manifest

        manifest_id = await insert_manifest(stack.pool, runs)
        operator = stack.session_stub("operator")
        await operator.CreateSession(
            pb.CreateSessionRequest(
                request_id=str(uuid.uuid4()),
                manifest_id=manifest_id,
                project_name="Bench v. Mark",
                options=pb.SessionOptions(max_in_flight=runs),
                start=True,
            ),
            timeout=600,
        )
        while await stack.session_server.dispatcher.run_once():
            pass
        messages = recorder.messages
        assert len(messages) == runs
        # A plain channel like the echo's; the worker's token goes in each call's metadata.
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.session_port}")
        stack.channels.append(channel)
        from docimport.session.v1 import session_service_pb2_grpc

        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        auth = (("authorization", f"Bearer {TOKENS['worker']}"),)

        class Worker:
            @staticmethod
            def ReportStageStarted(request):  # type: ignore[no-untyped-def]
                return stub.ReportStageStarted(request, metadata=auth)

            @staticmethod
            def ReportStageResult(request):  # type: ignore[no-untyped-def]
                return stub.ReportStageResult(request, metadata=auth)

            @staticmethod
            def ReportStageResults(request):  # type: ignore[no-untyped-def]
                return stub.ReportStageResults(request, metadata=auth)

        worker = Worker()

        # Each call's request is built when its factory is made, before the
        # clock starts, as the echo's payload is: the rate is that of
        # sending and ingesting reports, not of building protobuf messages.
        def run_key(m):  # type: ignore[no-untyped-def]
            return {"document_id": m.payload.document_id, "stage": common_pb2.STAGE_EXTRACT,
                    "attempt": m.payload.attempt, "task_id": m.task_id,
                    "worker": "bench-worker@host"}

        def started(m):  # type: ignore[no-untyped-def]
            request = pb.ReportStageStartedRequest(**run_key(m))
            return lambda: worker.ReportStageStarted(request)

        def result(m):  # type: ignore[no-untyped-def]
            request = pb.ReportStageResultRequest(
                **run_key(m), succeeded=True, cost=convert.money("0.00012501")
            )
            return lambda: worker.ReportStageResult(request)

        def results(group):  # type: ignore[no-untyped-def]
            request = pb.ReportStageResultsRequest(
                reports=[
                    pb.ReportStageResultRequest(
                        **run_key(m), succeeded=True, cost=convert.money("0.00012501")
                    )
                    for m in group
                ]
            )
            return lambda: worker.ReportStageResults(request)

        separate, messages = messages[len(messages) - batched_runs :], messages[: len(messages) - batched_runs]
        await started(messages[0])()
        rest = messages[1:]
        size = len(rest) // rounds
        rates: dict[str, list[float]] = {"echo": [], "started": [], "result": [], "results": []}
        async with echo_server() as echo_call:
            for i in range(rounds):
                # alternate, so that a load spike on the machine hits all of them alike
                part = rest[i * size : (i + 1) * size]
                started_calls = [started(m) for m in part]
                result_calls = [result(m) for m in part]
                rates["echo"].append(await drive([echo_call for _ in part], concurrency))
                rates["started"].append(await drive(started_calls, concurrency))
                rates["result"].append(await drive(result_calls, concurrency))
                if batched_runs:
                    own = separate[i * size : (i + 1) * size]
                    groups = [own[j : j + batch] for j in range(0, len(own), batch)]
                    calls = [results(g) for g in groups]
                    # reports per second: calls per second times the reports in each
                    rates["results"].append(await drive(calls, concurrency) * len(own) / len(calls))
        LAST.clear()
        LAST.update(rates)
        for m in rest[rounds * size :]:
            await started(m)()
            await result(m)()
        await result(messages[0])()
        if batched_runs:
            for m in separate[rounds * size :]:
                await result(m)()
        s = (
            await operator.GetSession(
                pb.GetSessionRequest(session_id=messages[0].payload.session_id)
            )
        ).session
        assert s.counts.running == 0 and s.stages[0].succeeded == runs, s
    return rates


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--batch", type=int, default=4,
        help="reports per ReportStageResults call (as a worker's delivery thread sends "
        "them; 1 = skip this measure)",
    )
    args = parser.parse_args()
    with private_redis(13) as (broker_url, _client):
        async with private_database() as db_url:
            rates = await ingest(
                db_url, broker_url, args.runs, args.concurrency, args.rounds, args.batch
            )
    best = {k: max(v) for k, v in rates.items() if v}
    median = {k: statistics.median(v) for k, v in rates.items() if v}
    per = (args.runs - 1) // args.rounds
    print(
        f"{args.rounds} alternating rounds of {per:,} calls each, {args.concurrency} in flight "
        f"(best / median of the rounds):"
    )
    print(f"  bare grpc.aio unary echo  {best['echo']:7,.0f} / {median['echo']:7,.0f} calls/s")
    for name, label in (("started", "ReportStageStarted"), ("result", "ReportStageResult")):
        print(
            f"  {label:24}  {best[name]:7,.0f} / {median[name]:7,.0f} reports/s = "
            f"{best[name] / best['echo']:.2f}x / {median[name] / median['echo']:.2f}x echo"
        )
    if "results" in best:
        label = f"ReportStageResults x{args.batch}"
        print(
            f"  {label:24}  {best['results']:7,.0f} / {median['results']:7,.0f} reports/s = "
            f"{best['results'] / best['echo']:.2f}x / {median['results'] / median['echo']:.2f}x "
            "echo (as workers deliver them)"
        )
    print("  target: >= 0.5x")


if __name__ == "__main__":
    asyncio.run(main())
