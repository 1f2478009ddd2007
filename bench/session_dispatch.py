"""Benchmark: create + enqueue a 100,000-document session against a bare apply_async loop.

Usage::

    .venv/bin/python bench/session_dispatch.py [--documents 100000] [--baseline 10000]
        [--batch 5000] [--no-budget]

Prints, in one run on the same machine and the same Redis: the rate of a
bare Celery `apply_async` loop publishing the same payload the session
service sends (a StagePayload of a 250 KB text-layer PDF, with task id,
time limits and expiry), and the rate at which the session service creates
a session from a 100,000-file manifest (the real manifest service reads it
over gRPC, in pages) and dispatches all of it: claims with FOR UPDATE SKIP
LOCKED, per-stage budget reservations with the real cost service
(ReserveBudget with allow_partial; off with --no-budget), stage runs with
task ids and leases, events, then pipelined publishing (kombu's
Producer.batch: one Redis pipeline per batch). Ratios are session rate
over bare rate; DESIGN.md's target is >= 1.0x, stretch >= 3x. Every
message is checked to be on its queue at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import time
import uuid

from docimport.session.v1 import session_service_pb2 as pb
from session_common import (
    insert_manifest,
    private_database,
    private_redis,
    rss_mib,
    services,
    stage_payloads,
)

from services.common import convert
from services.common.tasks import QUEUES, TASK_NAMES
from services.session.queue import CeleryEnqueuer


def bare_loop(broker_url: str, n: int) -> float:
    """Rate of a bare apply_async loop with the session service's payload and options."""
    from celery import Celery

    app = Celery("bench-bare", broker=broker_url, set_as_current=False)
    app.conf.broker_connection_retry_on_startup = True

    @app.task(name=TASK_NAMES["extract"], queue=QUEUES["extract"], shared=False)
    def extract(payload: dict) -> None:  # pragma: no cover - never run here
        pass

    payloads = stage_payloads(n)
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=20)).isoformat()
    extract.apply_async(args=[payloads[0]], task_id=str(uuid.uuid4()))  # connect first
    start = time.perf_counter()
    for p in payloads:
        extract.apply_async(
            args=[p],
            task_id=str(uuid.uuid4()),
            queue=QUEUES["extract"],
            time_limit=331,
            soft_time_limit=301,
            expires=expires,
        )
    elapsed = time.perf_counter() - start
    app.close()
    return n / elapsed


async def session_run(
    db_url: str, broker_url: str, n: int, batch: int, budget: bool
) -> dict[str, float]:
    enqueuer = CeleryEnqueuer(broker_url, batch_size=1000)
    try:
        async with services(
            db_url,
            broker_url,
            enqueuer=enqueuer,
            max_in_flight_total=n,
            dispatch_batch=batch,
            pool_size=12,
        ) as stack:
            manifest_id = await insert_manifest(stack.pool, n)
            stub = stack.session_stub()
            rss0 = rss_mib()
            options = pb.SessionOptions(max_in_flight=n)
            if budget:
                options.budget.CopyFrom(convert.money("100000"))
            t0 = time.perf_counter()
            created = await stub.CreateSession(
                pb.CreateSessionRequest(
                    request_id=str(uuid.uuid4()),
                    manifest_id=manifest_id,
                    project_name="Bench v. Mark",
                    options=options,
                    start=True,
                ),
                timeout=600,
            )
            t1 = time.perf_counter()
            dispatcher = stack.session_server.dispatcher
            dispatched = 0
            while dispatched < n:
                got = await dispatcher.run_once()
                if not got:
                    break
                dispatched += got
            t2 = time.perf_counter()
            rss1 = rss_mib()
            assert created.session.counts.total == n, created.session.counts
            return {
                "create": t1 - t0,
                "dispatch": t2 - t1,
                "dispatched": dispatched,
                "rss": rss1 - rss0,
            }
    finally:
        await enqueuer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--no-budget", action="store_true")
    args = parser.parse_args()
    with private_redis(12) as (broker_url, client):
        bare = await asyncio.to_thread(bare_loop, broker_url, args.baseline)
        client.flushdb()
        async with private_database() as db_url:
            result = await session_run(
                db_url, broker_url, args.documents, args.batch, not args.no_budget
            )
        on_queue = client.llen(QUEUES["extract"])
    n = args.documents
    total = result["create"] + result["dispatch"]
    print(f"bare apply_async loop ({args.baseline:,} messages): {bare:,.0f} tasks/s")
    print(
        f"session of {n:,} documents{'' if args.no_budget else ' with a budget'}: "
        f"create {result['create']:.2f}s, dispatch {result['dispatch']:.2f}s "
        f"({result['dispatched']:,} runs; {on_queue:,} messages on the queue)"
    )
    print(
        f"  dispatch rate        {n / result['dispatch']:,.0f} documents/s = "
        f"{n / result['dispatch'] / bare:.2f}x bare"
    )
    print(
        f"  create + dispatch    {n / total:,.0f} documents/s = {n / total / bare:.2f}x bare "
        f"(target >= 1.0x, stretch >= 3x)"
    )
    print(f"  RSS growth           {result['rss']:,.0f} MiB (the session service's process)")
    assert on_queue == n, "every dispatched run must be on its queue"


if __name__ == "__main__":
    asyncio.run(main())
