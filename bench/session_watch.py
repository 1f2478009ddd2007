"""Benchmark: progress-stream latency, event committed -> delivered, to 50 watchers.

Usage::

    .venv/bin/python bench/session_watch.py [--watchers 50] [--events 1000] [--rate 200]

Fifty WatchSession streams follow one session while a worker-like client
reports ReportStageStarted for its runs, one at a time at `--rate` per
second (each report is one committed transaction with one event). For
every event and every watcher the latency is the time from the report's
reply (the commit precedes it) to the watcher receiving the event; it is
also given from the moment the report was sent (an upper bound that
includes the report's own processing). Then a burst: 16 reports in flight
at once, as fast as they go: with 50 watchers that asks for 50 stream
messages per event, more than one process streams (DESIGN.md's bare
server-streaming figure is ~14,500 messages/s), so the burst shows
queueing, not the delivery path. Prints p50, p99 and max. DESIGN.md's
target: p99 <= 100 ms. Watchers, writer and services share this process.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import grpc
from docimport.common.v1 import common_pb2
from docimport.session.v1 import session_service_pb2 as pb
from docimport.session.v1 import session_service_pb2_grpc
from session_common import TOKENS, insert_manifest, private_database, private_redis, services


class Recorder:
    def __init__(self) -> None:
        self.messages: list = []

    async def publish(self, messages) -> None:  # type: ignore[no-untyped-def]
        self.messages.extend(messages)

    async def close(self) -> None:
        pass


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def run(
    db_url: str, broker_url: str, watchers: int, events: int, rate: float
) -> dict[str, list[float]]:
    recorder = Recorder()
    burst = 2000
    total = events + burst
    async with services(
        db_url,
        broker_url,
        enqueuer=recorder,
        max_in_flight_total=total + 1,
        dispatch_batch=5000,
        heartbeat_interval=5.0,
    ) as stack:
        manifest_id = await insert_manifest(stack.pool, total)
        operator = stack.session_stub("operator")
        session = (
            await operator.CreateSession(
                pb.CreateSessionRequest(
                    request_id=str(uuid.uuid4()),
                    manifest_id=manifest_id,
                    project_name="Bench v. Mark",
                    options=pb.SessionOptions(max_in_flight=total),
                    start=True,
                ),
                timeout=600,
            )
        ).session
        while await stack.session_server.dispatcher.run_once():
            pass
        messages = recorder.messages
        auth = (("authorization", f"Bearer {TOKENS['operator']}"),)
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{stack.session_port}") for _ in range(5)]
        received: list[dict[str, float]] = [{} for _ in range(watchers)]
        ready = [asyncio.Event() for _ in range(watchers)]

        async def watch(i: int) -> None:
            stub = session_service_pb2_grpc.SessionServiceStub(channels[i % len(channels)])
            call = stub.WatchSession(
                pb.WatchSessionRequest(session_id=session.session_id), metadata=auth
            )
            try:
                async for item in call:
                    if item.HasField("snapshot"):
                        ready[i].set()
                    elif (
                        item.HasField("document")
                        and item.document.state == pb.DOCUMENT_STATE_RUNNING
                    ):
                        received[i][item.document.document_id] = time.perf_counter()
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    raise

        tasks = [asyncio.create_task(watch(i)) for i in range(watchers)]
        for r in ready:
            await r.wait()
        writer_channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.session_port}")
        worker = session_service_pb2_grpc.SessionServiceStub(writer_channel)
        wauth = (("authorization", f"Bearer {TOKENS['worker']}"),)
        sent: dict[str, float] = {}
        acked: dict[str, float] = {}

        async def report(m) -> None:  # type: ignore[no-untyped-def]
            p = m.payload
            sent[p.document_id] = time.perf_counter()
            await worker.ReportStageStarted(
                pb.ReportStageStartedRequest(
                    document_id=p.document_id,
                    stage=common_pb2.STAGE_EXTRACT,
                    attempt=p.attempt,
                    task_id=m.task_id,
                    worker="bench",
                ),
                metadata=wauth,
            )
            acked[p.document_id] = time.perf_counter()

        interval = 1.0 / rate
        start = time.perf_counter()
        for k, m in enumerate(messages[:events]):
            delay = start + k * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await report(m)
        steady_ids = [m.payload.document_id for m in messages[:events]]
        queue = list(messages[events:])

        async def lane() -> None:
            while queue:
                await report(queue.pop())

        burst_start = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(16)))
        burst_rate = burst / (time.perf_counter() - burst_start)
        burst_ids = [m.payload.document_id for m in messages[events:]]
        deadline = time.perf_counter() + 30
        while any(len(r) < total for r in received) and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in [*channels, writer_channel]:
            await c.close()
    missing = sum(total - len(r) for r in received)
    assert missing == 0, f"{missing} deliveries missing"
    out: dict[str, list[float]] = {"burst_rate": [burst_rate]}
    for name, ids in (("steady", steady_ids), ("burst", burst_ids)):
        out[f"{name}/ack"] = [(r[d] - acked[d]) * 1000 for r in received for d in ids]
        out[f"{name}/sent"] = [(r[d] - sent[d]) * 1000 for r in received for d in ids]
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, default=50)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    args = parser.parse_args()
    with private_redis(14) as (broker_url, _client):
        async with private_database() as db_url:
            result = await run(db_url, broker_url, args.watchers, args.events, args.rate)
    print(
        f"{args.watchers} watchers; {args.events:,} events at {args.rate:.0f}/s, then 2,000 events with "
        f"16 reports in flight; latency in ms (p50 / p99 / max):"
    )
    burst_rate = result.pop("burst_rate")[0]
    print(
        f"  (the burst ran at {burst_rate:,.0f} events/s = {burst_rate * args.watchers:,.0f} stream messages/s)"
    )
    for name, values in result.items():
        phase, origin = name.split("/")
        label = "commit (report reply)" if origin == "ack" else "report sent (upper bound)"
        print(
            f"  {phase:6} from {label:26} {statistics.median(values):7.1f} / "
            f"{percentile(values, 99):7.1f} / {max(values):7.1f}   ({len(values):,} deliveries)"
        )
    print("  target: p99 <= 100 ms")


if __name__ == "__main__":
    asyncio.run(main())
