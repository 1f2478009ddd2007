"""Fault tests of an import through the real stack (issue 5, "Done when").

The manifest, cost and session services run in-process on ephemeral ports
(the session service with its dispatcher and reconciler, publishing through
the Celery enqueuer to a real Redis), and the worker is the real console
process (`python -m services.worker`, prefork pool, acks_late and
reject_on_worker_lost) in its own process group. A small source root (a
few files of the sample case, one of them a scan that needs OCR) is
scanned and imported, and a fault is injected mid-import:

- the worker's whole process group is SIGKILLed while a stage run is
  running; a fresh worker is started and the reconciler (short leases)
  re-enqueues the lost run as a new attempt;
- Redis loses every message (FLUSHDB of its database: queued tasks, the
  unacked set, results) while a stage runs and others wait in the queues;
  the reconciler re-enqueues the lost runs once their queue lease expires;
- the session service is stopped (server, dispatcher, reconciler, event hub)
  while documents are in flight and a new one is started on the same
  database and port; a watcher reconnects with its resume token.

Each time every document completes exactly once (one succeeded stage run per
stage), is charged exactly once (actual cost events of one attempt per stage,
the succeeded one), the budget has nothing left reserved, and VerifySession
says PASS.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import redis
from conftest import TOKENS
from docimport.cost.v1 import cost_service_pb2 as cpb
from docimport.cost.v1 import cost_service_pb2_grpc
from docimport.manifest.v1 import manifest_service_pb2 as mpb
from docimport.manifest.v1 import manifest_service_pb2_grpc
from docimport.session.v1 import session_service_pb2 as pb
from docimport.session.v1 import session_service_pb2_grpc

from services.common import convert
from services.common.channels import aio_channel
from services.common.config import ClientSettings
from services.cost.config import CostSettings
from services.cost.server import build_server as build_cost
from services.cost.store import CostStore
from services.manifest.config import ManifestSettings
from services.manifest.server import build_server as build_manifest
from services.manifest.store import ManifestStore
from services.session.config import SessionSettings
from services.session.queue import CeleryEnqueuer
from services.session.server import SessionServer
from services.session.server import build_server as build_session
from services.session.store import SessionStore

from .helpers import WorkerProcess, readable_case, wait_for

pytestmark = pytest.mark.integration

# A scan that needs OCR (seconds of work: a run to kill) and quick text files.
FILES = (
    "discovery/scanned_deposition_excerpt.pdf",
    "pleadings/complaint.pdf",
    "pleadings/answer.pdf",
    "correspondence/call_notes.txt",
)
SCAN = "scanned_deposition_excerpt.pdf"
STAGES = ("extract", "chunk", "entities")


@pytest.fixture
def small_case() -> Iterator[Path]:
    with readable_case(FILES) as target:
        yield target


@dataclass
class Stack:
    settings: SessionSettings
    session_server: SessionServer
    pool: asyncpg.Pool
    enqueuer: CeleryEnqueuer
    cost_port: int
    manifests: Any
    costs: Any
    session_builder: Any
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def session_port(self) -> int:
        return self.session_server.port

    def sessions(self) -> session_service_pb2_grpc.SessionServiceStub:
        channel = aio_channel(
            f"127.0.0.1:{self.session_port}", ClientSettings(), token=TOKENS["operator"]
        )
        self.channels.append(channel)
        return session_service_pb2_grpc.SessionServiceStub(channel)

    async def restart_session_service(self, down_for: float) -> None:
        """Stops the session service and starts a new one on the same database and port."""
        port = self.session_server.port
        await self.session_server.stop(0.5)
        await asyncio.sleep(down_for)
        self.settings = self.settings.model_copy(update={"port": port})
        self.session_server = await self.session_builder(self.settings)
        assert self.session_server.port == port


@pytest.fixture
def lease_base() -> float:
    """Seconds a stage run may take; a test whose point is not the OCR's speed raises it."""
    return 12.0


@pytest.fixture
async def stack(
    db_url: str,
    pool: asyncpg.Pool,
    redis_url: str,
    token_env: dict[str, Any],
    small_case: Path,
    lease_base: float,
) -> AsyncIterator[Stack]:
    client = ClientSettings()
    cost_settings = CostSettings(database_url=db_url, **token_env)
    await CostStore(pool).ensure_default_price_book(cost_settings.price_book_file, None)
    cost = await build_cost(cost_settings, store=CostStore(pool))
    cost_channel = aio_channel(f"127.0.0.1:{cost.port}", client, token=TOKENS["service"])
    manifest = await build_manifest(
        ManifestSettings(
            database_url=db_url, source_roots=(small_case.parent,), scan_workers=1, **token_env
        ),
        store=ManifestStore(pool),
        cost_stub=cost_service_pb2_grpc.CostServiceStub(cost_channel),
    )
    manifest_channel = aio_channel(f"127.0.0.1:{manifest.port}", client, token=TOKENS["service"])
    enqueuer = CeleryEnqueuer(redis_url)
    # Short leases: a run's soft limit is 12 s (the scan's OCR takes about 6 s
    # here), its running lease 14 s, and a queued message is given up 10 s
    # after its hard limit.
    settings = SessionSettings(
        database_url=db_url,
        broker_url=redis_url,
        dispatch_interval=0.1,
        reconcile_interval=0.5,
        lease_base=lease_base,
        lease_per_mib=0.0,
        time_limit_grace=1.0,
        queue_wait=10.0,
        retry_backoff_base=0.0,
        max_attempts=5,
        heartbeat_interval=1.0,
        **token_env,
    )

    async def session_builder(s: SessionSettings) -> SessionServer:
        return await build_session(
            s,
            store=SessionStore(pool),
            enqueuer=enqueuer,
            manifest_stub=manifest_service_pb2_grpc.ManifestServiceStub(manifest_channel),
            cost_stub=cost_service_pb2_grpc.CostServiceStub(cost_channel),
            background=True,
        )

    session_server = await session_builder(settings)
    operator_manifest = aio_channel(f"127.0.0.1:{manifest.port}", client, token=TOKENS["operator"])
    operator_cost = aio_channel(f"127.0.0.1:{cost.port}", client, token=TOKENS["operator"])
    s = Stack(
        settings,
        session_server,
        pool,
        enqueuer,
        cost.port,
        manifest_service_pb2_grpc.ManifestServiceStub(operator_manifest),
        cost_service_pb2_grpc.CostServiceStub(operator_cost),
        session_builder,
        channels=[manifest_channel, cost_channel, operator_manifest, operator_cost],
    )
    try:
        yield s
    finally:
        await s.session_server.stop(0.5)
        await enqueuer.close()
        for channel in s.channels:
            await channel.close()
        await manifest.close(0.5)
        await cost.stop(0.5)


def start_worker(
    stack: Stack, redis_url: str, tmp_path: Path, name: str, **env: str
) -> WorkerProcess:
    """The real worker (prefork, one child) reporting to this stack."""
    return WorkerProcess(
        tmp_path,
        name,
        {
            "DOCIMPORT_BROKER_URL": redis_url,
            "DOCIMPORT_SESSION_ADDR": f"127.0.0.1:{stack.session_port}",
            "DOCIMPORT_COST_ADDR": f"127.0.0.1:{stack.cost_port}",
            "DOCIMPORT_TOKEN": TOKENS["worker"],
            "DOCIMPORT_ARTIFACT_DIR": str(tmp_path / "artifacts"),
            "DOCIMPORT_POOL": "prefork",
            "DOCIMPORT_CONCURRENCY": "1",
            "DOCIMPORT_LOG_LEVEL": "INFO",
            "DOCIMPORT_RPC_TIMEOUT": "10",
            **env,
        },
    )


async def scan_and_create(stack: Stack, source: Path, *, start: bool) -> str:
    scanned = None
    async for event in stack.manifests.AnalyzeSource(
        mpb.AnalyzeSourceRequest(request_id="faults", source_path=str(source), case_name="Faults")
    ):
        if event.HasField("manifest"):
            scanned = event.manifest
    assert scanned is not None and scanned.state == mpb.MANIFEST_STATE_READY
    created = await stack.sessions().CreateSession(
        pb.CreateSessionRequest(
            request_id="faults-import",
            manifest_id=scanned.manifest_id,
            project_name="Faults",
            options=pb.SessionOptions(budget=convert.money("25")),
            start=start,
        )
    )
    return created.session.session_id


async def wait_finished(stack: Stack, session_id: str, timeout: float) -> pb.Session:
    async def finished() -> bool:
        try:
            s = (
                await stack.sessions().GetSession(pb.GetSessionRequest(session_id=session_id))
            ).session
        except grpc.aio.AioRpcError:
            return False
        return s.state in (pb.SESSION_STATE_COMPLETED, pb.SESSION_STATE_COMPLETED_WITH_ERRORS)

    await wait_for(finished, timeout=timeout, interval=0.3)
    return (await stack.sessions().GetSession(pb.GetSessionRequest(session_id=session_id))).session


async def assert_exactly_once(stack: Stack, session_id: str) -> list[asyncpg.Record]:
    """Every document completed once and was charged once; returns its stage runs."""
    final = (await stack.sessions().GetSession(pb.GetSessionRequest(session_id=session_id))).session
    assert final.state == pb.SESSION_STATE_COMPLETED, await stack.pool.fetch(
        "SELECT stage, attempt, state, error_message FROM session.stage_runs"
        " WHERE session_id = $1 AND state <> 'succeeded' ORDER BY stage, attempt",
        session_id,
    )
    docs = await stack.pool.fetch(
        "SELECT document_id, relative_path, state FROM session.session_documents"
        " WHERE session_id = $1",
        session_id,
    )
    assert len(docs) == len(FILES)
    assert {d["state"] for d in docs} == {"completed"}, docs
    runs = await stack.pool.fetch(
        "SELECT document_id, stage, attempt, state, cost, error_message FROM session.stage_runs"
        " WHERE session_id = $1 ORDER BY document_id, stage, attempt",
        session_id,
    )
    succeeded: dict[tuple[Any, str], list[int]] = {}
    for r in runs:
        if r["state"] == "succeeded":
            succeeded.setdefault((r["document_id"], r["stage"]), []).append(r["attempt"])
    assert not [r for r in runs if r["state"] in ("queued", "running")]
    for d in docs:
        for stage in STAGES:
            assert len(succeeded.get((d["document_id"], stage), [])) == 1, (d, stage, runs)
    # Charged once: every attempt that ran to its end (succeeded, or failed
    # after doing real work, e.g. a time limit on a loaded machine) is charged
    # for what it did, once; an attempt that was lost (expired: killed, or its
    # message gone from the broker) or never ran is charged nothing; no
    # (document, stage, attempt, service, operation) is charged twice, and
    # each succeeded stage has its charge.
    events = await stack.pool.fetch(
        "SELECT document_id, stage, attempt, service, operation, amount, cache_hit"
        " FROM cost.cost_events WHERE session_id = $1 AND kind = 'actual'",
        session_id,
    )
    ended = {
        (r["document_id"], r["stage"], r["attempt"])
        for r in runs
        if r["state"] in ("succeeded", "failed")
    }
    charged: set[tuple[Any, str, int]] = set()
    seen: set[tuple[Any, str, int, str, str]] = set()
    for e in events:
        run = (e["document_id"], e["stage"], e["attempt"])
        key = (*run, e["service"], e["operation"])
        assert key not in seen, f"charged twice: {key}"
        assert run in ended, f"charged for an attempt that did not run to its end: {run}, {runs}"
        seen.add(key)
        charged.add(run)
    # the run's recorded cost is what the ledger holds for it
    for r in runs:
        run = (r["document_id"], r["stage"], r["attempt"])
        ledger = sum(
            (e["amount"] for e in events if (e["document_id"], e["stage"], e["attempt"]) == run),
            Decimal(0),
        )
        assert ledger == (r["cost"] or Decimal(0)), (run, ledger, r["cost"])
    for (document_id, stage), attempts in succeeded.items():
        assert (document_id, stage, attempts[0]) in charged, f"no cost events for {document_id}, {stage}"
    budget = (await stack.costs.GetBudget(cpb.GetBudgetRequest(session_id=session_id))).budget
    assert convert.parse_money(budget.reserved, "reserved", places=16) == 0
    open_reservations = await stack.pool.fetchval(
        "SELECT count(*) FROM cost.reservations WHERE session_id = $1 AND state = 'open'",
        session_id,
    )
    assert open_reservations == 0
    report = await stack.sessions().VerifySession(
        pb.VerifySessionRequest(session_id=session_id, deep=True)
    )
    assert report.verdict == pb.VERDICT_PASS, report
    assert report.counts.completed == len(FILES) and report.counts.unaccounted == 0
    return runs


async def test_a_worker_killed_mid_task_is_recovered_exactly_once(
    stack: Stack, redis_url: str, small_case: Path, tmp_path: Path
) -> None:
    worker = start_worker(stack, redis_url, tmp_path, "worker-1")
    second: WorkerProcess | None = None
    try:
        session_id = await scan_and_create(stack, small_case, start=True)

        async def scan_running() -> asyncpg.Record | None:
            return await stack.pool.fetchrow(
                "SELECT r.document_id, r.attempt, r.task_id FROM session.stage_runs r"
                " JOIN session.session_documents d USING (document_id)"
                " WHERE r.session_id = $1 AND r.state = 'running' AND r.stage = 'extract'"
                " AND d.relative_path LIKE $2",
                session_id,
                f"%{SCAN}",
            )

        await wait_for(scan_running, timeout=40, interval=0.05)
        killed = await scan_running()
        assert killed is not None, worker.tail()
        await asyncio.sleep(0.5)  # well inside the OCR
        worker.kill()
        still = await stack.pool.fetchval(
            "SELECT state FROM session.stage_runs"
            " WHERE document_id = $1 AND stage = 'extract' AND attempt = $2",
            killed["document_id"],
            killed["attempt"],
        )
        assert still == "running", "the run finished before the kill; OCR was too quick"

        second = start_worker(stack, redis_url, tmp_path, "worker-2")
        await wait_finished(stack, session_id, timeout=60)
        runs = await assert_exactly_once(stack, session_id)
        lost = [
            r
            for r in runs
            if r["document_id"] == killed["document_id"]
            and r["stage"] == "extract"
            and r["attempt"] == killed["attempt"]
        ]
        assert [r["state"] for r in lost] == ["expired"]
        redone = [
            r for r in runs if r["document_id"] == killed["document_id"] and r["stage"] == "extract"
        ]
        assert redone[-1]["state"] == "succeeded" and redone[-1]["attempt"] > killed["attempt"]
    finally:
        if worker.process.poll() is None:
            worker.stop()
        if second is not None:
            second.stop()


@pytest.mark.parametrize("lease_base", [60.0])  # a fresh child loads the OCR engine per task
async def test_a_pool_child_exiting_after_each_task_delivers_its_runs_first(
    stack: Stack, redis_url: str, small_case: Path, tmp_path: Path
) -> None:
    """A prefork child recycled after every task (`max_tasks_per_child` 1) exits right after its
    task returns, its run still in the delivery thread's hands (held there by a long linger):
    the child delivers before it exits, so no run is lost to its lease and run again."""
    worker = start_worker(
        stack,
        redis_url,
        tmp_path,
        "recycled",
        DOCIMPORT_MAX_TASKS_PER_CHILD="1",
        DOCIMPORT_DELIVERY_LINGER="0.5",
    )
    try:
        session_id = await scan_and_create(stack, small_case, start=True)
        # a lost delivery would not come back before its lease (60 s) ran out
        await wait_finished(stack, session_id, timeout=120)
        runs = await assert_exactly_once(stack, session_id)
        assert {(r["attempt"], r["state"]) for r in runs} == {(1, "succeeded")}, runs
        log = worker.log_path.read_text(errors="replace")
        assert "could not deliver" not in log and "were not delivered" not in log, log[-4000:]
    finally:
        worker.stop()


async def test_a_session_service_restart_loses_nothing_and_watchers_resume(
    stack: Stack, redis_url: str, small_case: Path, tmp_path: Path
) -> None:
    session_id = await scan_and_create(stack, small_case, start=False)
    seqs: list[int] = []
    snapshot_seqs: list[int] = []
    connects = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal connects
        token = ""  # resume after the last message had, named by its token
        while not done.is_set():
            channel = aio_channel(
                f"127.0.0.1:{stack.session_port}", ClientSettings(), token=TOKENS["operator"]
            )
            try:
                stub = session_service_pb2_grpc.SessionServiceStub(channel)
                connects += 1
                async for item in stub.WatchSession(
                    pb.WatchSessionRequest(session_id=session_id, resume_token=token)
                ):
                    kind = item.WhichOneof("event")
                    token = item.resume_token
                    if kind == "snapshot":
                        snapshot_seqs.append(item.seq)
                    elif kind in ("document", "state_change"):
                        seqs.append(item.seq)
                        if kind == "state_change" and item.state_change.state in (
                            pb.SESSION_STATE_COMPLETED,
                            pb.SESSION_STATE_COMPLETED_WITH_ERRORS,
                        ):
                            done.set()
                            return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
            finally:
                await channel.close()

    watcher = asyncio.create_task(watch())
    await wait_for(lambda: snapshot_seqs, timeout=10)
    worker = start_worker(stack, redis_url, tmp_path, "worker")
    try:
        await stack.sessions().StartSession(pb.StartSessionRequest(session_id=session_id))

        async def in_flight() -> bool:
            counts = await stack.pool.fetchrow(
                "SELECT count(*) FILTER (WHERE state = 'completed') AS done,"
                " count(*) FILTER (WHERE state IN ('queued', 'running')) AS busy"
                " FROM session.session_documents WHERE session_id = $1",
                session_id,
            )
            return counts["done"] >= 1 and counts["busy"] >= 1

        await wait_for(in_flight, timeout=40, interval=0.05)
        seen_before = len(seqs)
        await stack.restart_session_service(down_for=1.0)
        await wait_finished(stack, session_id, timeout=60)
        await asyncio.wait_for(watcher, timeout=15)
        await assert_exactly_once(stack, session_id)
    finally:
        done.set()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
        worker.stop()
    assert connects >= 2, "the watcher never had to reconnect"
    assert 0 < seen_before < len(seqs)
    stored = [
        r["seq"]
        for r in await stack.pool.fetch(
            "SELECT seq FROM session.session_events WHERE session_id = $1 ORDER BY seq",
            session_id,
        )
    ]
    assert len(snapshot_seqs) == 1, "resuming across the restart took a snapshot"
    first = snapshot_seqs[0]
    assert seqs == [s for s in stored if s > first], (seqs, stored, snapshot_seqs)
    assert seqs == list(range(first + 1, first + 1 + len(seqs)))


# The scan's OCR must not hit its time limit on a loaded machine here: what is
# lost is the broker's data, not a slow run.
@pytest.mark.parametrize("lease_base", [25.0])
async def test_redis_losing_its_data_mid_import_loses_no_document(
    stack: Stack, redis_url: str, small_case: Path, tmp_path: Path
) -> None:
    worker = start_worker(stack, redis_url, tmp_path, "worker")
    try:
        session_id = await scan_and_create(stack, small_case, start=True)

        async def queued_behind_a_running_run() -> bool:
            counts = await stack.pool.fetchrow(
                "SELECT count(*) FILTER (WHERE state = 'running') AS running,"
                " count(*) FILTER (WHERE state = 'queued') AS queued"
                " FROM session.stage_runs WHERE session_id = $1",
                session_id,
            )
            return counts["running"] >= 1 and counts["queued"] >= 1

        await wait_for(queued_behind_a_running_run, timeout=40, interval=0.02)
        lost = {
            (r["document_id"], r["stage"], r["attempt"])
            for r in await stack.pool.fetch(
                "SELECT document_id, stage, attempt FROM session.stage_runs"
                " WHERE session_id = $1 AND state = 'queued'",
                session_id,
            )
        }
        client = redis.Redis.from_url(redis_url)
        try:
            assert client.dbsize() > 0, "nothing was in Redis to lose"
            client.flushdb()
        finally:
            client.close()
        await wait_finished(stack, session_id, timeout=90)
        runs = await assert_exactly_once(stack, session_id)
        state = {(r["document_id"], r["stage"], r["attempt"]): r["state"] for r in runs}
        # The messages Redis lost were given up (expired) and re-enqueued as new
        # attempts; a run the worker had already taken before the flush ran.
        assert any(state[run] == "expired" for run in lost), (lost, state)
        assert all(state[run] in ("expired", "succeeded") for run in lost), (lost, state)
    finally:
        worker.stop()
