"""The real stack the fault tests break: services, a prefork worker, a watcher, the checks.

The cost and manifest services run in this process; the session service and
the workers run as processes of their own (`python -m ...`), so that a test
can SIGKILL them. The session service runs with its default settings (lease
TTL, probe and reconcile intervals): the point is that recovery works as
shipped, not with leases shortened for the test. `Watcher` follows a session
through reconnects as the CLI does; `assert_one_truth` is what every fault
must end with.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from conftest import TOKENS
from docimport.cost.v1 import cost_service_pb2 as cpb
from docimport.cost.v1 import cost_service_pb2_grpc
from docimport.manifest.v1 import manifest_service_pb2 as mpb
from docimport.manifest.v1 import manifest_service_pb2_grpc
from docimport.session.v1 import session_service_pb2 as pb
from docimport.session.v1 import session_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import convert
from services.common.channels import aio_channel
from services.common.config import ClientSettings
from services.common.localinfra import free_port
from services.cost.config import CostSettings
from services.cost.server import build_server as build_cost
from services.cost.store import CostStore
from services.manifest.config import ManifestSettings
from services.manifest.server import build_server as build_manifest
from services.manifest.store import ManifestStore

from .helpers import WorkerProcess, wait_for

STAGES = ("extract", "chunk", "entities")
SESSION_SERVICE = "docimport.session.v1.SessionService"
FINISHED = (pb.SESSION_STATE_COMPLETED, pb.SESSION_STATE_COMPLETED_WITH_ERRORS)


@dataclass
class FaultStack:
    """Everything of one fault test; `close()` stops it all."""

    db_url: str
    redis_url: str
    tmp: Path
    case: Path
    pool: asyncpg.Pool
    cost_port: int = 0
    manifest_port: int = 0
    session_port: int = field(default_factory=free_port)
    session: WorkerProcess | None = None
    workers: list[WorkerProcess] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    servers: list[Any] = field(default_factory=list)

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls, db_url: str, redis_url: str, tmp: Path, case: Path, pool: asyncpg.Pool
    ) -> AsyncIterator[FaultStack]:
        stack = cls(db_url, redis_url, tmp, case, pool)
        try:
            await stack._start_peers()
            await stack.start_session()
            yield stack
        finally:
            await stack.close()

    async def _start_peers(self) -> None:
        tokens = {
            "operator_tokens": TOKENS["operator"], "worker_tokens": TOKENS["worker"],
            "service_tokens": TOKENS["service"], "token": TOKENS["service"],
            "host": "127.0.0.1", "port": 0, "shutdown_grace": 1.0,
        }
        cost_settings = CostSettings(database_url=self.db_url, **tokens)
        await CostStore(self.pool).ensure_default_price_book(cost_settings.price_book_file, None)
        cost = await build_cost(cost_settings, store=CostStore(self.pool))
        self.cost_port = cost.port
        cost_channel = self._channel(self.cost_port, TOKENS["service"])
        manifest = await build_manifest(
            ManifestSettings(database_url=self.db_url, source_roots=(self.case.parent,),
                             scan_workers=1, **tokens),
            store=ManifestStore(self.pool),
            cost_stub=cost_service_pb2_grpc.CostServiceStub(cost_channel),
        )
        self.manifest_port = manifest.port
        self.servers = [manifest, cost]

    def _channel(self, port: int, token: str) -> grpc.aio.Channel:
        channel = aio_channel(f"127.0.0.1:{port}", ClientSettings(), token=token)
        self.channels.append(channel)
        return channel

    # -- the session service -------------------------------------------------------------

    def _session_env(self) -> dict[str, str]:
        return {
            "DOCIMPORT_DATABASE_URL": self.db_url,
            "DOCIMPORT_BROKER_URL": self.redis_url,
            "DOCIMPORT_HOST": "127.0.0.1",
            "DOCIMPORT_PORT": str(self.session_port),
            "DOCIMPORT_MANIFEST_ADDR": f"127.0.0.1:{self.manifest_port}",
            "DOCIMPORT_COST_ADDR": f"127.0.0.1:{self.cost_port}",
            "DOCIMPORT_OPERATOR_TOKENS": TOKENS["operator"],
            "DOCIMPORT_WORKER_TOKENS": TOKENS["worker"],
            "DOCIMPORT_SERVICE_TOKENS": TOKENS["service"],
            "DOCIMPORT_TOKEN": TOKENS["service"],
            "DOCIMPORT_SHUTDOWN_GRACE": "2",
        }

    async def start_session(self) -> None:
        """The session service's process, on this stack's port (the same after a restart)."""
        self.session = WorkerProcess(self.tmp, "session", self._session_env(), "services.session")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.session_port}")
        try:
            health = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                try:
                    reply = await health.Check(
                        health_pb2.HealthCheckRequest(service=SESSION_SERVICE), timeout=1
                    )
                except grpc.aio.AioRpcError:
                    return False
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            await wait_for(serving, timeout=30, interval=0.1)
        finally:
            await channel.close()

    def kill_session(self) -> None:
        assert self.session is not None
        self.session.kill()

    def sessions(self) -> session_service_pb2_grpc.SessionServiceStub:
        return session_service_pb2_grpc.SessionServiceStub(
            self._channel(self.session_port, TOKENS["operator"])
        )

    # -- workers -------------------------------------------------------------------------

    @property
    def outbox_dir(self) -> Path:
        return self.tmp / "outbox"

    def start_worker(self, name: str, **env: str) -> WorkerProcess:
        """The real worker (prefork, one pool process), default settings otherwise."""
        worker = WorkerProcess(
            self.tmp,
            name,
            {
                "DOCIMPORT_BROKER_URL": self.redis_url,
                "DOCIMPORT_SESSION_ADDR": f"127.0.0.1:{self.session_port}",
                "DOCIMPORT_COST_ADDR": f"127.0.0.1:{self.cost_port}",
                "DOCIMPORT_TOKEN": TOKENS["worker"],
                "DOCIMPORT_ARTIFACT_DIR": str(self.tmp / "artifacts"),
                "DOCIMPORT_OUTBOX_DIR": str(self.outbox_dir),
                "DOCIMPORT_POOL": "prefork",
                "DOCIMPORT_CONCURRENCY": "1",
                "DOCIMPORT_LOG_LEVEL": "INFO",
                **env,
            },
        )
        self.workers.append(worker)
        return worker

    def outbox_runs(self) -> int:
        """Finished runs waiting in the workers' outbox journal."""
        path = self.outbox_dir / "outbox.sqlite3"
        if not path.exists():
            return 0
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
            try:
                return db.execute("SELECT count(*) FROM runs").fetchone()[0]
            except sqlite3.OperationalError:
                return 0

    # -- the import ----------------------------------------------------------------------

    async def analyze_and_import(self, *, start: bool = True) -> str:
        manifests = manifest_service_pb2_grpc.ManifestServiceStub(
            self._channel(self.manifest_port, TOKENS["operator"])
        )
        scanned = None
        async for event in manifests.AnalyzeSource(
            mpb.AnalyzeSourceRequest(request_id="faults", source_path=str(self.case),
                                     case_name="Faults")
        ):
            if event.HasField("manifest"):
                scanned = event.manifest
        assert scanned is not None and scanned.state == mpb.MANIFEST_STATE_READY
        created = await self.sessions().CreateSession(
            pb.CreateSessionRequest(
                request_id="faults-import",
                manifest_id=scanned.manifest_id,
                project_name="Faults",
                options=pb.SessionOptions(budget=convert.money("25")),
                start=start,
            )
        )
        return created.session.session_id

    async def wait_finished(self, session_id: str, timeout: float) -> float:
        """Seconds until the session finished (it must, within `timeout`)."""
        began = time.monotonic()

        async def finished() -> bool:
            try:
                s = await self.sessions().GetSession(
                    pb.GetSessionRequest(session_id=session_id), timeout=5
                )
            except grpc.aio.AioRpcError:
                return False
            return s.session.state in FINISHED

        try:
            await wait_for(finished, timeout=timeout, interval=0.5)
        except AssertionError:
            raise AssertionError(f"not finished in {timeout} s: {await self.describe(session_id)}")
        return time.monotonic() - began

    async def describe(self, session_id: str) -> str:
        runs = await self.pool.fetch(
            "SELECT stage, attempt, state, error_code, lease_expires_at - now() AS lease_left"
            " FROM session.stage_runs WHERE session_id = $1 ORDER BY queued_at", session_id,
        )
        logs = "\n".join(
            f"--- {p.log_path.name}\n{p.tail()[-1500:]}" for p in [self.session, *self.workers] if p
        )
        return f"{[dict(r) for r in runs]}\n{logs}"

    async def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        if self.session is not None:
            self.session.stop()
        for channel in self.channels:
            await channel.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.stop(0.5)


class Watcher:
    """A `docimport watch` of one session: reconnects and resumes after its last event."""

    def __init__(self, stack: FaultStack, session_id: str) -> None:
        self.stack, self.session_id = stack, session_id
        self.seqs: list[int] = []
        self.snapshot_seqs: list[int] = []
        self.connects = 0
        self.done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        token = ""  # resume after the last message had, named by its token
        while not self.done.is_set():
            channel = aio_channel(
                f"127.0.0.1:{self.stack.session_port}", ClientSettings(), token=TOKENS["operator"]
            )
            self.connects += 1
            try:
                stub = session_service_pb2_grpc.SessionServiceStub(channel)
                request = pb.WatchSessionRequest(session_id=self.session_id, resume_token=token)
                async for item in stub.WatchSession(request):
                    kind = item.WhichOneof("event")
                    token = item.resume_token
                    if kind == "snapshot":
                        self.snapshot_seqs.append(item.seq)
                    elif kind in ("document", "state_change"):
                        self.seqs.append(item.seq)
                        if kind == "state_change" and item.state_change.state in FINISHED:
                            self.done.set()
                            return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.3)
            finally:
                await channel.close()

    async def finish(self, timeout: float = 30.0) -> None:
        """Waits for the final event, then checks: no gap, no duplicate, every stored event."""
        assert self._task is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        finally:
            self.done.set()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        stored = [
            r["seq"]
            for r in await self.stack.pool.fetch(
                "SELECT seq FROM session.session_events WHERE session_id = $1 ORDER BY seq",
                self.session_id,
            )
        ]
        # one snapshot: every reconnect resumed after its last event (a durable database
        # never goes back in time, so no resume was answered with a snapshot)
        assert len(self.snapshot_seqs) == 1, self.snapshot_seqs
        first = self.snapshot_seqs[0]
        assert self.seqs == [s for s in stored if s > first], (self.seqs, stored)
        assert self.seqs == list(range(first + 1, first + 1 + len(self.seqs)))


async def assert_one_truth(stack: FaultStack, session_id: str, documents: int) -> list[Any]:
    """Every document completed; no stage succeeded twice; one money truth; verify PASS.

    Returns the session's stage runs.
    """
    sessions = stack.sessions()
    final = (await sessions.GetSession(pb.GetSessionRequest(session_id=session_id))).session
    runs = await stack.pool.fetch(
        "SELECT document_id, stage, attempt, state, cost, task_id FROM session.stage_runs"
        " WHERE session_id = $1 ORDER BY document_id, stage, attempt",
        session_id,
    )
    assert final.state == pb.SESSION_STATE_COMPLETED, [dict(r) for r in runs]
    assert final.counts.completed == documents
    assert not [r for r in runs if r["state"] in ("queued", "running")]
    succeeded: dict[tuple[Any, str], int] = {}
    for r in runs:
        if r["state"] == "succeeded":
            succeeded[r["document_id"], r["stage"]] = succeeded.get((r["document_id"], r["stage"]), 0) + 1
    assert len(succeeded) == documents * len(STAGES) and set(succeeded.values()) == {1}, runs
    # one money truth: the ledger, the session's cost and the budget's spent amount
    ledger = await stack.pool.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM cost.cost_events"
        " WHERE session_id = $1 AND kind = 'actual'",
        session_id,
    )
    costs = cost_service_pb2_grpc.CostServiceStub(stack._channel(stack.cost_port, TOKENS["operator"]))
    budget = (await costs.GetBudget(cpb.GetBudgetRequest(session_id=session_id))).budget
    assert ledger > 0
    assert Decimal(final.cost_so_far.amount) == ledger == Decimal(budget.spent.amount)
    assert Decimal(budget.reserved.amount) == 0
    by_run = {
        (r["document_id"], r["stage"], r["attempt"]): r["amount"]
        for r in await stack.pool.fetch(
            "SELECT document_id, stage, attempt, sum(amount) AS amount FROM cost.cost_events"
            " WHERE session_id = $1 AND kind = 'actual' GROUP BY 1, 2, 3",
            session_id,
        )
    }
    for r in runs:
        key = (r["document_id"], r["stage"], r["attempt"])
        assert by_run.get(key, Decimal(0)) == (r["cost"] or Decimal(0)), (key, r["state"])
    report = await sessions.VerifySession(pb.VerifySessionRequest(session_id=session_id, deep=True))
    assert report.verdict == pb.VERDICT_PASS, report
    return runs
