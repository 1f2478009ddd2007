"""Benchmark: N no-op documents through all three stages, docimport against bare Celery.

Usage::

    .venv/bin/python bench/session_end_to_end.py [--documents 10000] [--concurrency 2] [--rounds 1]
        [--max-in-flight CAP ...]

Prints, in one run, the wall time of N documents through extract, chunk and
entities:

- bare Celery: one chain of three no-op tasks per document, published by
  a plain `apply_async` loop; done when the last link of every chain ran
  (an INCR per document). The clock starts before the first publish.
- docimport: a session of N documents (manifest rows written straight into
  the database, as in the other session benchmarks) created and started
  with CreateSession; the real session service (dispatcher, Celery
  publishing, report ingest, counters, events) and the real cost service,
  and the real worker tasks whose stages do nothing (see
  bench/e2e_workers.py): per stage an artifact put, a RecordCosts and a
  result report, made by each worker process's delivery thread for the
  runs that finished meanwhile together (one syncfs, one RecordCosts, one
  ReportStageResults; see services/worker/outbox.py) while the task has
  returned; a run this short reports no start (see the worker's
  `started_after`; `--started-after 0` restores a ReportStageStarted
  before each run, the protocol before 2026-12-04). Done when GetSession (asked once
  a second, as `docimport status` in a loop would) says COMPLETED. The
  clock starts before CreateSession.

Both use the same worker process type (`python bench/e2e_workers.py`, the
Celery configuration and `celery worker` arguments of docimport-worker:
prefork, `--concurrency` processes, prefetch 1, acks_late, task events), the
same Redis and machine; the two alternate `--rounds` times. DESIGN.md's
target: docimport <= 1.3x the bare wall time.

Where the time goes (2,000 documents on the 2-core machine, CPU seconds of
each process from /proc over the run, divided by the 6,000 stage runs).
Before the dispatcher topped sessions up in batches: session service ~4.6
ms, worker children ~4.3, Postgres ~3.8, worker parent ~3.8, cost service
~1.9, Redis ~0.4 (a bare task: parent ~3.1, child ~1.6). After it: session
service ~3.1 ms, worker children ~3.8, worker parent ~3.3, Postgres ~2.8,
cost ~1.7; 111k -> 67k SQL statements for the run. The machine is then ~73% busy and the pipeline
is bound by the latency of the two worker processes, not by CPU: with
`--concurrency 4` the 2,000 documents take 42 s instead of 65 s. A run
waits on three round trips, each ~3.3 ms under this load against ~1.4 ms
alone (ReportStageStarted; RecordCosts, overlapped with the artifact's put
and its two fsyncs; ReportStageResult), ~12 ms in all, on top of Celery's
own ~8 ms hand-off per task that the bare side pays too. Sending the result
from a background thread (the task returning meanwhile) made no measurable
difference and was not kept. A ratio near 1.3x needs a run that waits on
at most one short round trip.

Short runs report only their result (2026-12-04): no ReportStageStarted
for a run that ends within `started_after` (1 s). 1,000 documents, three
alternating pairs against `--started-after 0`: 33.7 s against 37.4 s
(mean); session service CPU -31%, Postgres -27%. Then RecordCosts keeps
its database connection (no pool reset round trip a call): cost service
CPU about -12%. A run now waits on the artifact put (two fsyncs;
RecordCosts overlaps it) and then ReportStageResult, on top of Celery's
hand-off (py-spy of a worker child: 11% and 16% of its time). Per stage
run all processes together spend about 14 ms of CPU against about 7 for
a bare task (whose run keeps the 2 cores ~73% busy; one run of each on
1,000 documents), so even a pipeline that never waited would take ~1.5x
the bare time on 2 cores: what is left is the CPU of the session
service, Postgres and the cost service per run (~2.4, ~2.1 and ~1.7 ms)
and the worker child's own (~2 ms more than a bare task's).

What grew with N (found 2026-12-04 with pg_stat_statements and
auto_explain; fixed): the dispatcher's "which sessions have pending work"
probe had become a sequential scan of the session's documents (0.8 ms a
call at 6,000 documents, thousands of calls), and GetSession, polled here
once a second, had the cost service compute its full breakdown (37 ms at
6,000 documents). With both fixed, 10,000 documents took 281-340 s instead
of 436-446 s; with the batched top-up and the overlapped put, 275 s
(bare: 101.5 s in the same run, 2.71x).

Background delivery (2026-12-04, later; see services/worker/outbox.py):
the task returns once its work is done and each worker process's thread
delivers several runs at once. Each step measured with 2,000 documents
(one run each, so single readings on a noisy machine): the thread alone,
a run at a time, ~36 s (was ~42 s); its puts made durable by one syncfs
per batch instead of two fsyncs each (a put here: 1.06 ms of CPU with
fsyncs, 0.43 ms with one syncfs, 0.27 ms per file in batches of 8);
a 10 ms linger for more runs (~2 runs a delivery without, ~4 with: cost
service CPU 5.7 -> 3.7 s, Postgres 9.0 -> 7.5 s); one ReportStageResults
per delivery instead of a call per run: 29.7 s, session service CPU 11
-> 7.5 s. Two alternating pairs then: 25.5 s against bare's 20.0 s
(1.28x). All processes together then spend ~7.7 ms of CPU per stage run
(10,000 documents; bare: ~5.8, 2,000 documents); the worker processes
spend about what bare Celery's do, the rest is the session service,
Postgres and the cost service (~1.0, ~1.0 and ~0.55 ms a run).

Worker children and held connections (2026-12-05). py-spy of the worker's
main process showed 14-22% of its time replacing children: both sides
recycled a child every 200 tasks (`max_tasks_per_child`), and a fresh
docimport child also reconnects. Children are now replaced by memory
(1,536 MiB) and after 5,000 tasks: 2,000 documents, best of 2, bare 16.8 ->
14.0 s, docimport 24.5 -> 18.4 s. pg_stat_statements (3,000 documents): 2,585
pool resets (a round trip each) came from the dispatcher's rounds (three
checkouts a round) and from RecordCosts calls arriving at once; with the
dispatcher and the ledger keeping their connections (db.HeldConnection,
keep), 142, and 67k -> 57k statements. A 40 ms linger instead of 10: 9,000
results in 926 batches instead of 2,291 and 942 RecordCosts calls instead of
2,331 (about 10 runs a delivery instead of 4), 51.7k statements, the result
statement's time 2.0 -> 1.1 s. The services' CPU looked lower in a first
pair of runs (session service 8.1 and 8.7 s -> 5.9 and 6.7 s), but other
10 ms runs of the same day measured 5.0-6.0 s: within the noise, as are
the wall times. Then, per stage run (3,000 documents):
worker main process ~1.9 ms and children ~1.2 (bare: ~1.6 and ~0.9), session
service ~0.6, Postgres ~0.45, cost service ~0.25, Redis ~0.25; a bare task
~3.1 ms in all. The bare pipeline leaves the 2 cores ~60% busy (its
worker's main process, one thread, is its limit); docimport's keeps them
~60-70% busy, and its worker's main process then waits for a core more
often. Tried and not kept: fsync of each file and folder instead of one
syncfs (no difference); artifacts in /var/tmp instead of /tmp (file
creation in this machine's /tmp costs far more kernel time in a
micro-benchmark, but the pipeline's wall time did not change); uvloop
(speeds the echo as much as the service: ingest ratios unchanged).
10,000 documents with all of it, best of 2 each time: 1.40x, 1.21x, 1.36x
(bare 70.3 and 65.3 s, docimport 90.4 and 89.1 s), 1.28x (bare 78.5 and
76.8 s, docimport 100.0 and 98.1 s): around the 1.3x target, not reliably
under it.

The in-flight cap (2026-12-05, later). Sampling the Redis queues every 50 ms
(3,000 documents) found them empty in 16% of the samples (median 8 messages,
at most 29): a session's default cap of 32 runs, less the runs that had
finished but not been reported yet (the delivery linger), left the two worker
processes without work. With 256, now the session service's default
(DOCIMPORT_DEFAULT_MAX_IN_FLIGHT), never (median 198). `--max-in-flight`
takes several caps; each is a docimport run of its own in every round. In
one run of three rounds: bare 61.2, 61.5, 61.7 s; cap 32: 86.3, 89.4, 84.3 s
(1.36-1.45x); cap 256: 76.1, 76.3, 78.4 s (1.24-1.27x). Two more runs with
256, three rounds each: 1.13, 1.15, 1.17x and 1.14, 1.25, 1.10x a round.
Stage counts and ledger totals are now kept by statement triggers and folded
(migrations 0043 and 0044), so GetSession, polled here once a second, no
longer counts the session's runs or sums its ledger: at 10,000 documents
19.2 ms -> 4-6.5 ms (its database snapshot ~2 ms; the recount it did before,
printed alongside, 12-17 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from docimport.session.v1 import session_service_pb2 as pb
from session_common import (
    ROOT,
    TOKENS,
    insert_manifest,
    private_database,
    private_redis,
    services,
    stage_payloads,
)

from e2e_workers import DONE_KEY
from services.common.tasks import STAGES
from services.session.queue import CeleryEnqueuer


def start_worker(
    kind: str, broker_url: str, concurrency: int, env: dict[str, str]
) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DOCIMPORT_")}
    base.update(
        {
            "DOCIMPORT_BROKER_URL": broker_url,
            "DOCIMPORT_POOL": "prefork",
            "DOCIMPORT_CONCURRENCY": str(concurrency),
            "DOCIMPORT_LOG_LEVEL": "WARNING",
            "PYTHONPATH": f"{ROOT}:{ROOT / 'protos'}",
            **env,
        }
    )
    return subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "e2e_workers.py"), kind],
        env=base,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_worker(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(10)


def wait_ready(broker_url: str, timeout: float = 60.0) -> None:
    """Waits until a worker answers a Celery ping (it consumes its queues)."""
    from e2e_workers import bare_app
    from services.worker.config import WorkerSettings

    app = bare_app(WorkerSettings(broker_url=broker_url))
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if app.control.ping(timeout=0.5):
                return
        raise TimeoutError("the worker did not answer a ping")
    finally:
        app.close()


def bare_round(broker_url: str, client: Any, n: int, concurrency: int) -> float:
    from celery import chain

    from e2e_workers import bare_app
    from services.worker.config import WorkerSettings

    client.flushdb()
    settings = WorkerSettings(broker_url=broker_url)
    app = bare_app(settings)
    tasks = app.bench_tasks
    worker = start_worker("bare", broker_url, concurrency, {})
    try:
        # one warm-up document: the worker is up and consuming every queue
        chain(*(tasks[s].si({"warm": True}) for s in STAGES)).apply_async()
        deadline = time.monotonic() + 60
        while int(client.get(DONE_KEY) or 0) < 1:
            if time.monotonic() > deadline:
                raise TimeoutError("bare worker did not start")
            time.sleep(0.05)
        client.delete(DONE_KEY)
        payloads = stage_payloads(n)
        start = time.perf_counter()
        for p in payloads:
            chain(*(tasks[s].si(p) for s in STAGES)).apply_async()
        while int(client.get(DONE_KEY) or 0) < n:
            time.sleep(0.02)
        elapsed = time.perf_counter() - start
    finally:
        stop_worker(worker)
        app.close()
    return elapsed


async def time_get_session(stack: Any, stub: Any, session_id: str, n: int) -> None:
    """GetSession's latency on the finished session, against counting its runs' stages."""
    from services.session.store import _STAGE_RECOUNT_SQL, SessionStore

    store = SessionStore(stack.pool)
    calls, snapshots, recounts = [], [], []
    for _ in range(20):
        t0 = time.perf_counter()
        await stub.GetSession(pb.GetSessionRequest(session_id=session_id))
        t1 = time.perf_counter()
        await store.snapshot(session_id, stall_after=600.0)
        t2 = time.perf_counter()
        await stack.pool.fetch(_STAGE_RECOUNT_SQL, uuid.UUID(session_id))
        t3 = time.perf_counter()
        calls.append(t1 - t0)
        snapshots.append(t2 - t1)
        recounts.append(t3 - t2)
    print(
        f"  GetSession at {n:,} documents (median of 20): {statistics.median(calls) * 1000:.1f} ms;"
        f" its database snapshot {statistics.median(snapshots) * 1000:.1f} ms; a recount of"
        f" the runs' stages (what the snapshot did before) {statistics.median(recounts) * 1000:.1f} ms"
    )


async def docimport_round(
    broker_url: str,
    client: Any,
    n: int,
    concurrency: int,
    worker_env: dict[str, str],
    max_in_flight: int = 0,
) -> tuple[float, dict[str, int]]:
    client.flushdb()
    enqueuer = CeleryEnqueuer(broker_url)
    artifacts = tempfile.mkdtemp(prefix="di-bench-artifacts-")
    try:
        async with private_database() as db_url:
            async with services(
                db_url, broker_url, enqueuer=enqueuer, background=True, pool_size=12
            ) as stack:
                manifest_id = await insert_manifest(stack.pool, n)
                worker = start_worker(
                    "docimport",
                    broker_url,
                    concurrency,
                    {
                        "DOCIMPORT_SESSION_ADDR": f"127.0.0.1:{stack.session_port}",
                        "DOCIMPORT_COST_ADDR": f"127.0.0.1:{stack.cost_port}",
                        "DOCIMPORT_TOKEN": TOKENS["worker"],
                        "DOCIMPORT_ARTIFACT_DIR": artifacts,
                        "DOCIMPORT_OUTBOX_DIR": str(Path(artifacts) / "outbox"),
                        **worker_env,
                    },
                )
                try:
                    # the worker is consuming before the clock starts
                    await asyncio.to_thread(wait_ready, broker_url)
                    stub = stack.session_stub()
                    start = time.perf_counter()
                    created = await stub.CreateSession(
                        pb.CreateSessionRequest(
                            request_id=str(uuid.uuid4()),
                            manifest_id=manifest_id,
                            project_name="Bench v. Mark",
                            options=pb.SessionOptions(max_in_flight=max_in_flight),
                            start=True,
                        ),
                        timeout=600,
                    )
                    session_id = created.session.session_id
                    while True:
                        got = (
                            await stub.GetSession(pb.GetSessionRequest(session_id=session_id))
                        ).session
                        if got.state not in (
                            pb.SESSION_STATE_RUNNING,
                            pb.SESSION_STATE_CREATED,
                        ):
                            break
                        await asyncio.sleep(1.0)
                    elapsed = time.perf_counter() - start
                    await time_get_session(stack, stub, session_id, n)
                finally:
                    stop_worker(worker)
                counts = {
                    r["state"]: r["n"]
                    for r in await stack.pool.fetch(
                        "SELECT state, count(*) AS n FROM session.stage_runs GROUP BY state"
                    )
                }
                timeline = await stack.pool.fetchrow("""
                    WITH r AS (
                      SELECT stage, queued_at, started_at, finished_at,
                             lag(finished_at) OVER (PARTITION BY document_id
                                                    ORDER BY queued_at) AS prev_done
                      FROM session.stage_runs)
                    SELECT avg(extract(epoch FROM started_at - queued_at)) AS queue_wait,
                           avg(extract(epoch FROM finished_at - started_at)) AS running,
                           avg(extract(epoch FROM queued_at - prev_done)) AS next_stage_after,
                           extract(epoch FROM max(finished_at) - min(queued_at)) AS span
                    FROM r
                    """)
                print("  timeline (mean s):", {k: round(float(v), 4) for k, v in timeline.items()})
                assert got.state == pb.SESSION_STATE_COMPLETED, (got.state, got.counts)
                assert got.counts.completed == n, got.counts
                return elapsed, counts
    finally:
        await enqueuer.close()
        subprocess.run(["rm", "-rf", artifacts], check=False)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", choices=("bare", "docimport"), help="run one side (profiling)")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        nargs="+",
        default=[0],
        help="the session's in-flight cap (0: the session service's default); several: each "
        "is a docimport run of its own in every round, and each gets its ratio",
    )
    parser.add_argument(
        "--started-after",
        type=float,
        help="the docimport worker's DOCIMPORT_STARTED_AFTER (0: every run reports its start "
        "before working, the protocol before short runs reported only their result)",
    )
    args = parser.parse_args()
    worker_env = (
        {} if args.started_after is None else {"DOCIMPORT_STARTED_AFTER": str(args.started_after)}
    )
    n = args.documents
    caps = args.max_in_flight
    bare_times: list[float] = []
    di_times: dict[int, list[float]] = {cap: [] for cap in caps}
    with private_redis(13) as (broker_url, client):
        for _ in range(args.rounds):
            if args.only != "docimport":
                bare_times.append(
                    await asyncio.to_thread(bare_round, broker_url, client, n, args.concurrency)
                )
            if args.only != "bare":
                for cap in caps:
                    elapsed, runs = await docimport_round(
                        broker_url, client, n, args.concurrency, worker_env, cap
                    )
                    di_times[cap].append(elapsed)
    if args.only:
        times = bare_times or [t for ts in di_times.values() for t in ts]
        print(f"{args.only}: {min(times):.2f} s")
        return
    bare = min(bare_times)
    print(
        f"{n:,} no-op documents x {len(STAGES)} stages, prefork concurrency {args.concurrency}, "
        f"best of {args.rounds}"
    )
    print(f"  bare Celery chains   {bare:7.2f} s  ({n * len(STAGES) / bare:,.0f} tasks/s)")

    def label(cap: int) -> str:
        return f", in flight {cap or 'default'}" if len(caps) > 1 else ""

    for cap in caps:
        di = min(di_times[cap])
        print(
            f"  docimport session{label(cap)}    {di:7.2f} s  ({n * len(STAGES) / di:,.0f} stage runs/s) "
            f"= {di / bare:.2f}x bare wall time"
        )
    if args.rounds > 1:
        print("  every round          bare " + ", ".join(f"{t:.1f}" for t in bare_times) + " s")
        for cap in caps:
            print(
                f"                       docimport{label(cap)} "
                + ", ".join(f"{t:.1f}" for t in di_times[cap])
                + " s (ratios to the round's bare: "
                + ", ".join(f"{t / b:.2f}" for t, b in zip(di_times[cap], bare_times, strict=True))
                + ")"
            )
    print(f"  stage runs by state  {runs}")
    print("  target: <= 1.3x")


if __name__ == "__main__":
    asyncio.run(main())
