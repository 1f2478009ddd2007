"""Benchmark: RecordCosts ingest against a bare asyncpg copy of the same rows.

Usage::

    .venv/bin/python bench/cost_ledger.py [--events 50000] [--batch 100]
        [--concurrency 1,4,16] [--repeat 2]

Prints the rate at which the cost service records ledger events sent as
RecordCosts calls of `--batch` events (default 100) over gRPC, at each
`--concurrency` (calls in flight), as a ratio to the bare building block
measured in the same run: `asyncpg.copy_records_to_table` of the very same
rows (same ids, prices and amounts) into the same table, in one COPY. Also
printed for context: the same COPY cut into batches of `--batch` rows, one
after the other, and the rate of replays (every call sent again: nothing
is inserted, every event is read back and answered as first recorded).

The cost service runs as its own process (`python -m services.cost`, as
deployed), so client and server do not share an interpreter; on a 2-core
machine the client, the server and Postgres still share the cores, which
is also true of the baseline's client and Postgres. Each measurement runs
on an emptied ledger (TRUNCATE); the best of `--repeat` runs is kept.

The database is created, migrated and dropped by the benchmark: on the
server of DOCIMPORT_BENCH_DATABASE_URL (a URL whose user may create
databases), else on a private Postgres started with services.common.localinfra
under a temporary directory and stopped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "protos"))

import asyncpg  # noqa: E402
from docimport.common.v1 import common_pb2  # noqa: E402
from docimport.cost.v1 import cost_service_pb2 as pb  # noqa: E402
from docimport.cost.v1 import cost_service_pb2_grpc  # noqa: E402

from services.common import localinfra, scratchdb  # noqa: E402
from services.common.channels import wait_serving  # noqa: E402
from services.common.channels import aio_channel  # noqa: E402
from services.common.config import ClientSettings  # noqa: E402
from services.cost import pricing  # noqa: E402

TOKEN = "bench-worker-token"
COLUMNS = ["event_id", "session_id", "document_id", "stage", "attempt", "service", "operation", "kind",
           "units", "unit_price", "amount", "saved", "cache_hit", "category", "price_book_version"]
OPERATIONS = [("aws_textract", "ocr_page"), ("local", "compute_second"), ("s3", "put_request")]
STAGES = [(common_pb2.STAGE_EXTRACT, "extract"), (common_pb2.STAGE_CHUNK, "chunk"),
          (common_pb2.STAGE_ENTITIES, "entities")]
CATEGORIES = ["pleadings", "discovery", "correspondence", "medical_records"]


@contextlib.asynccontextmanager
async def private_database() -> AsyncIterator[str]:
    """A fresh, migrated database of this run; dropped (and a private server stopped) after."""
    async with scratchdb.scratch_database(
        os.environ.get("DOCIMPORT_BENCH_DATABASE_URL"), prefix="di_bench_cost"
    ) as url:
        yield url


@contextlib.contextmanager
def cost_service(database_url: str) -> Iterator[str]:
    """The cost service as its own process; yields its address, stops it with SIGTERM."""
    port = localinfra.free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DOCIMPORT_")},
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "protos")]),
        "DOCIMPORT_DATABASE_URL": database_url,
        "DOCIMPORT_HOST": "127.0.0.1",
        "DOCIMPORT_PORT": str(port),
        "DOCIMPORT_WORKER_TOKENS": TOKEN,
        "DOCIMPORT_DB_POOL_MAX": "20",
        "DOCIMPORT_LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen([sys.executable, "-m", "services.cost"], env=env, cwd=ROOT)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Workload:
    """`count` events of one session, as requests and as the rows the ledger stores."""

    def __init__(self, count: int, batch: int, prices: dict[tuple[str, str], Decimal], version: int,
                 seed: int) -> None:
        rng = random.Random(seed)
        self.session_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        self.events: list[pb.CostEvent] = []
        self.rows: list[tuple] = []
        self.total = Decimal(0)
        for i in range(count):
            document = uuid.UUID(int=rng.getrandbits(128), version=4)
            service, operation = OPERATIONS[i % len(OPERATIONS)]
            stage_value, stage = STAGES[i % len(STAGES)]
            if operation == "compute_second":
                units = Decimal(rng.randint(1, 5_000_000)) / 1_000_000  # CPU seconds, 6 places
            else:
                units = Decimal(rng.randint(1, 40))
            category = CATEGORIES[i % len(CATEGORIES)]
            price = prices[service, operation]
            amount = pricing.times(units, price)
            self.total += amount
            self.events.append(pb.CostEvent(
                session_id=str(self.session_id), document_id=str(document), stage=stage_value, attempt=1,
                service=service, operation=operation, units=str(units), kind=pb.COST_KIND_ACTUAL,
                category=category,
            ))
            event_id = pricing.event_id(str(self.session_id), str(document), stage, 1, service, operation,
                                        "actual")
            self.rows.append((event_id, self.session_id, document, stage, 1, service, operation, "actual",
                              units, price, amount, Decimal(0), False, category, version))
        self.requests = [pb.RecordCostsRequest(events=self.events[i:i + batch])
                         for i in range(0, count, batch)]


async def empty_ledger(conn: asyncpg.Connection) -> None:
    await conn.execute("TRUNCATE cost.cost_events")
    await conn.execute("VACUUM ANALYZE cost.cost_events")
    await conn.execute("CHECKPOINT")


async def bare_copy(conn: asyncpg.Connection, rows: list[tuple], batch: int | None) -> float:
    await empty_ledger(conn)
    started = time.perf_counter()
    if batch is None:
        await conn.copy_records_to_table("cost_events", schema_name="cost", columns=COLUMNS, records=rows)
    else:
        for i in range(0, len(rows), batch):
            await conn.copy_records_to_table("cost_events", schema_name="cost", columns=COLUMNS,
                                             records=rows[i:i + batch])
    return time.perf_counter() - started


async def record_costs(stub: cost_service_pb2_grpc.CostServiceStub, requests: list[pb.RecordCostsRequest],
                       concurrency: int) -> tuple[float, int]:
    """Sends every request with `concurrency` calls in flight; returns (seconds, replays)."""
    queue = iter(requests)
    replays = 0

    async def caller() -> None:
        nonlocal replays
        for request in queue:
            reply = await stub.RecordCosts(request, timeout=60)
            replays += reply.replayed_count

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - started, replays


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", default="1,4,16", help="calls in flight, comma-separated")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each measurement; the best is kept")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    async with private_database() as url:
        with cost_service(url) as address:
            await wait_serving(address)
            channel = aio_channel(address, ClientSettings(), token=TOKEN)
            stub = cost_service_pb2_grpc.CostServiceStub(channel)
            conn = await asyncpg.connect(url)
            try:
                book = await conn.fetch("SELECT service, operation, unit_price, version FROM cost.prices "
                                        "WHERE version = (SELECT max(version) FROM cost.price_books)")
                prices = {(r["service"], r["operation"]): r["unit_price"] for r in book}
                version = book[0]["version"]
                work = Workload(args.events, args.batch, prices, version, seed=7)
                # Warm both paths (connections, prepared statements, caches) on other rows.
                warm = Workload(2_000, args.batch, prices, version, seed=8)
                await bare_copy(conn, warm.rows, None)
                await record_costs(stub, warm.requests, max(levels))

                copy_all = min([await bare_copy(conn, work.rows, None) for _ in range(args.repeat)])
                copy_batched = min([await bare_copy(conn, work.rows, args.batch) for _ in range(args.repeat)])
                results = []
                for level in levels:
                    best = None
                    for _ in range(args.repeat):
                        await empty_ledger(conn)
                        seconds, replays = await record_costs(stub, work.requests, level)
                        assert replays == 0
                        best = seconds if best is None else min(best, seconds)
                    results.append((level, best))
                stored = await conn.fetchval("SELECT sum(amount) FROM cost.cost_events WHERE session_id = $1",
                                             work.session_id)
                assert stored == work.total, (stored, work.total)
                replay = None
                for _ in range(args.repeat):
                    seconds, replays = await record_costs(stub, work.requests, max(levels))
                    assert replays == args.events
                    replay = seconds if replay is None else min(replay, seconds)
                count = await conn.fetchval("SELECT count(*) FROM cost.cost_events")
                assert count == args.events
            finally:
                await conn.close()
                await channel.close()

    n = args.events
    base = n / copy_all
    print(f"cost ledger ingest: {n:,} events, RecordCosts batches of {args.batch}, "
          f"{os.cpu_count()} CPUs, best of {args.repeat}")
    print(f"  baseline  copy_records_to_table, one COPY      {base:>10,.0f} rows/s   1.00x")
    print(f"  context   copy_records_to_table, {args.batch}-row COPYs  {n / copy_batched:>10,.0f} rows/s   "
          f"{(n / copy_batched) / base:.3f}x")
    for level, seconds in results:
        rate = n / seconds
        print(f"  RecordCosts, {level:>2} in flight                  {rate:>10,.0f} events/s "
              f"{rate / base:.3f}x")
    rate = n / replay
    print(f"  RecordCosts replays, {max(levels):>2} in flight          {rate:>10,.0f} events/s "
          f"{rate / base:.3f}x")
    print(f"  ledger total {work.total} USD, exact")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
