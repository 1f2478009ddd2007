"""`/metrics` of every service and of a real prefork worker after a small import (issue 6).

The manifest, cost and session services run in-process, each with its own
metrics port; the worker is the real console process (`python -m
services.worker`, prefork pool with one child, so its samples reach the
parent's port through prometheus_client's multiprocess files). A few files
of the sample case are scanned and imported; then each port is scraped over
HTTP, parsed with `prometheus_client.parser`, and the values are compared
with what Postgres and the services' own RPCs say: documents by state,
dispatched runs and stage-duration counts against `session.stage_runs`, cost
totals against the ledger, budget remaining against GetBudget, RPC counts
and codes, queue depths, watchers, and the worker's processes. Finally every
metric the Grafana dashboard and the alert rules use must be among the
scraped ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
import yaml
from conftest import ROOT, TOKENS
from docimport.cost.v1 import cost_service_pb2 as cpb
from docimport.cost.v1 import cost_service_pb2_grpc
from docimport.manifest.v1 import manifest_service_pb2 as mpb
from docimport.manifest.v1 import manifest_service_pb2_grpc
from docimport.session.v1 import session_service_pb2 as pb
from docimport.session.v1 import session_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

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
from services.session.config import SessionSettings
from services.session.queue import CeleryEnqueuer
from services.session.server import build_server as build_session
from services.session.store import SessionStore

from .helpers import WorkerProcess, readable_case, wait_for

pytestmark = pytest.mark.integration

FILES = (
    "pleadings/complaint.pdf",
    "pleadings/answer.pdf",
    "correspondence/call_notes.txt",
    "medical_records/corrupt_scan.pdf",
)
STAGES = ("extract", "chunk", "entities")
METRIC_NAME = re.compile(r"\bdocimport_[a-z0-9_]+")


@pytest.fixture
def small_case() -> Iterator[Path]:
    with readable_case(FILES) as target:
        yield target


class Scrape:
    """One parsed /metrics page: samples by name, each a list of (labels, value)."""

    def __init__(self, text: str) -> None:
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for metric_family in text_string_to_metric_families(text):
            for sample in metric_family.samples:
                self.samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))

    def values(self, name: str, **labels: str) -> list[float]:
        return [
            value
            for sample_labels, value in self.samples.get(name, [])
            if all(sample_labels.get(k) == v for k, v in labels.items())
        ]

    def total(self, name: str, **labels: str) -> float:
        return sum(self.values(name, **labels))

    def one(self, name: str, **labels: str) -> float:
        found = self.values(name, **labels)
        assert len(found) == 1, f"{name}{labels}: {found}"
        return found[0]


def _get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15) as response:
        assert response.status == 200
        return response.read().decode()


async def scrape(port: int) -> Scrape:
    # Off the event loop: the services' collectors run their queries on it.
    return Scrape(await asyncio.to_thread(_get, port))


def names_used_by_dashboard_and_alerts() -> set[str]:
    dashboard = json.loads((ROOT / "deploy/grafana/docimport-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


async def test_metrics_of_every_service_and_the_worker_after_an_import(
    db_url, pool, redis_url, token_env, small_case, tmp_path
):
    client = ClientSettings()
    ports = {name: free_port() for name in ("cost", "manifest", "session", "worker")}
    cost_settings = CostSettings(database_url=db_url, metrics_port=ports["cost"], **token_env)
    await CostStore(pool).ensure_default_price_book(cost_settings.price_book_file, None)
    cost = await build_cost(cost_settings, store=CostStore(pool))
    cost_channel = aio_channel(f"127.0.0.1:{cost.port}", client, token=TOKENS["service"])
    manifest = await build_manifest(
        ManifestSettings(
            database_url=db_url,
            source_roots=(small_case.parent,),
            scan_workers=1,
            metrics_port=ports["manifest"],
            **token_env,
        ),
        store=ManifestStore(pool),
        cost_stub=cost_service_pb2_grpc.CostServiceStub(cost_channel),
    )
    manifest_channel = aio_channel(f"127.0.0.1:{manifest.port}", client, token=TOKENS["service"])
    enqueuer = CeleryEnqueuer(redis_url)
    session_server = await build_session(
        SessionSettings(
            database_url=db_url,
            broker_url=redis_url,
            dispatch_interval=0.1,
            reconcile_interval=1.0,
            metrics_port=ports["session"],
            **token_env,
        ),
        store=SessionStore(pool),
        enqueuer=enqueuer,
        manifest_stub=manifest_service_pb2_grpc.ManifestServiceStub(manifest_channel),
        cost_stub=cost_service_pb2_grpc.CostServiceStub(cost_channel),
        background=True,
    )
    assert (cost.metrics_port, manifest.running.metrics_port, session_server.metrics_port) == (
        ports["cost"], ports["manifest"], ports["session"]
    )
    channels = [
        aio_channel(f"127.0.0.1:{port}", client, token=TOKENS["operator"])
        for port in (manifest.port, session_server.port, cost.port)
    ]
    anonymous = aio_channel(f"127.0.0.1:{session_server.port}", client, token="")
    channels.append(anonymous)
    manifests = manifest_service_pb2_grpc.ManifestServiceStub(channels[0])
    sessions = session_service_pb2_grpc.SessionServiceStub(channels[1])
    costs = cost_service_pb2_grpc.CostServiceStub(channels[2])
    worker = WorkerProcess(
        tmp_path,
        "worker",
        {
            "DOCIMPORT_BROKER_URL": redis_url,
            "DOCIMPORT_SESSION_ADDR": f"127.0.0.1:{session_server.port}",
            "DOCIMPORT_COST_ADDR": f"127.0.0.1:{cost.port}",
            "DOCIMPORT_TOKEN": TOKENS["worker"],
            "DOCIMPORT_ARTIFACT_DIR": str(tmp_path / "artifacts"),
            "DOCIMPORT_POOL": "prefork",
            "DOCIMPORT_CONCURRENCY": "1",
            "DOCIMPORT_OCR_ENGINE": "none",
            "DOCIMPORT_LOG_LEVEL": "WARNING",
            "DOCIMPORT_METRICS_PORT": str(ports["worker"]),
            "DOCIMPORT_METRICS_DIR": str(tmp_path / "worker-metrics"),
        },
    )
    watch_task: asyncio.Task[None] | None = None
    try:
        scanned = None
        async for event in manifests.AnalyzeSource(
            mpb.AnalyzeSourceRequest(
                request_id="metrics", source_path=str(small_case), case_name="Metrics"
            )
        ):
            if event.HasField("manifest"):
                scanned = event.manifest
        assert scanned is not None and scanned.state == mpb.MANIFEST_STATE_READY
        created = await sessions.CreateSession(
            pb.CreateSessionRequest(
                request_id="metrics-import",
                manifest_id=scanned.manifest_id,
                project_name="Metrics",
                options=pb.SessionOptions(budget=convert.money("25")),
                start=True,
            )
        )
        session_id = created.session.session_id

        # A watcher stays connected through the import.
        watching = asyncio.Event()

        async def watch() -> None:
            async for _ in sessions.WatchSession(pb.WatchSessionRequest(session_id=session_id)):
                watching.set()

        watch_task = asyncio.create_task(watch())
        await asyncio.wait_for(watching.wait(), 30)
        assert (await scrape(ports["session"])).one(
            "docimport_watchers", stream="WatchSession"
        ) == 1

        async def finished() -> bool:
            s = (await sessions.GetSession(pb.GetSessionRequest(session_id=session_id))).session
            return s.state in (pb.SESSION_STATE_COMPLETED, pb.SESSION_STATE_COMPLETED_WITH_ERRORS)

        try:
            await wait_for(finished, timeout=180, interval=0.5)
        except AssertionError:
            raise AssertionError(f"the import did not finish; worker log:\n{worker.tail()}") from None
        final = (await sessions.GetSession(pb.GetSessionRequest(session_id=session_id))).session
        watch_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await watch_task

        # Calls answered with errors: a malformed id and a missing token.
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await sessions.GetSession(pb.GetSessionRequest(session_id="not-a-uuid"))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await session_service_pb2_grpc.SessionServiceStub(anonymous).ListSessions(
                pb.ListSessionsRequest()
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        runs = {
            (r["stage"], r["state"]): r["n"]
            for r in await pool.fetch(
                "SELECT stage, state, count(*) AS n FROM session.stage_runs GROUP BY stage, state"
            )
        }
        reported = {
            stage: runs.get((stage, "succeeded"), 0) + runs.get((stage, "failed"), 0)
            for stage in STAGES
        }
        created_runs = {stage: sum(n for (s, _), n in runs.items() if s == stage) for stage in STAGES}
        assert sum(reported.values()) > 0

        # ---------------------------------------------------------- session
        async def watcher_gone() -> bool:
            return (await scrape(ports["session"])).one(
                "docimport_watchers", stream="WatchSession"
            ) == 0

        await wait_for(watcher_gone, timeout=10, interval=0.2)
        session_metrics = await scrape(ports["session"])
        final_state = pb.SessionState.Name(final.state).removeprefix("SESSION_STATE_").lower()
        assert session_metrics.one("docimport_sessions", state=final_state) == 1
        assert session_metrics.total("docimport_sessions") == 1
        for state in ("completed", "failed", "skipped", "pending", "queued", "running"):
            expected = getattr(final.counts, state)
            assert session_metrics.one(
                "docimport_documents", session_state=final_state, state=state
            ) == expected, state
        assert session_metrics.one("docimport_documents", session_state=final_state,
                                   state="completed") == final.counts.completed > 0
        assert session_metrics.one("docimport_documents_stalled") == 0
        for stage in STAGES:
            assert session_metrics.one("docimport_dispatched_total", stage=stage) == created_runs[stage]
            assert (
                session_metrics.one("docimport_stage_duration_seconds_count", stage=stage)
                == reported[stage]
            ), stage
            assert session_metrics.total("docimport_stage_results_total", stage=stage) == reported[stage]
            assert session_metrics.one("docimport_queue_messages", queue=stage) == 0
        assert session_metrics.total(
            "docimport_stage_results_total", outcome="succeeded"
        ) == sum(runs.get((stage, "succeeded"), 0) for stage in STAGES)
        rpc = "docimport_rpc_duration_seconds_count"
        # the worker delivers its runs' results several to a call (see services/worker/outbox.py)
        calls = session_metrics.one(rpc, method="ReportStageResults", code="OK", type="unary")
        assert 0 < calls <= sum(reported.values())
        assert session_metrics.one(rpc, method="GetSession", code="INVALID_ARGUMENT") == 1
        assert session_metrics.one(rpc, method="ListSessions", code="UNAUTHENTICATED") == 1
        assert session_metrics.one(rpc, method="CreateSession", code="OK") == 1
        assert session_metrics.one(rpc, method="WatchSession", type="server_stream") == 1
        assert session_metrics.total("docimport_metrics_collect_errors_total") == 0
        assert session_metrics.values("process_resident_memory_bytes")

        # ------------------------------------------------------------- cost
        ledger = await costs.GetSessionCosts(cpb.GetSessionCostsRequest(session_id=session_id))
        actual = convert.parse_money(ledger.actual_total, "x", places=16)
        estimate = convert.parse_money(ledger.estimate_total, "x", places=16)
        budget = (await costs.GetBudget(cpb.GetBudgetRequest(session_id=session_id))).budget
        remaining = convert.parse_money(budget.remaining, "x", places=16)
        cost_metrics = await scrape(ports["cost"])
        assert actual > 0
        assert cost_metrics.total("docimport_cost_amount_total", kind="actual") == pytest.approx(
            float(actual), rel=1e-9
        )
        assert cost_metrics.total("docimport_cost_amount_total", kind="estimate") == pytest.approx(
            float(estimate), rel=1e-9
        )
        assert cost_metrics.total("docimport_cost_events_total", kind="actual") > 0
        assert cost_metrics.one("docimport_budget_limit", session_id=session_id) == 25.0
        assert cost_metrics.one("docimport_budget_remaining", session_id=session_id) == pytest.approx(
            float(remaining), rel=1e-9
        )
        assert remaining < Decimal(25)
        assert cost_metrics.one("docimport_budget_reserved", session_id=session_id) == 0
        assert cost_metrics.one(rpc, method="RecordCosts", code="OK") > 0
        assert cost_metrics.one("docimport_watchers", stream="WatchCosts") == 0
        assert cost_metrics.total("docimport_metrics_collect_errors_total") == 0

        # --------------------------------------------------------- manifest
        manifest_metrics = await scrape(ports["manifest"])
        assert manifest_metrics.one(rpc, method="AnalyzeSource", code="OK") == 1
        assert manifest_metrics.one("docimport_scans_total", outcome="ready") == 1
        assert manifest_metrics.total("docimport_scanned_files_total") == len(FILES)
        assert manifest_metrics.one("docimport_scan_duration_seconds_count") == 1

        # ----------------------------------------------------------- worker
        # The task counts its run after its report: allow it that moment.
        async def worker_counted() -> bool:
            w = await scrape(ports["worker"])
            return all(
                w.one("docimport_worker_stage_duration_seconds_count", stage=s) == reported[s]
                for s in STAGES
            )

        await wait_for(worker_counted, timeout=15, interval=0.2)
        worker_metrics = await scrape(ports["worker"])
        for stage in STAGES:
            assert worker_metrics.one("docimport_worker_processes", queue=stage) == 1
            assert worker_metrics.total(
                "docimport_worker_runs_total", stage=stage, outcome="succeeded"
            ) == runs.get((stage, "succeeded"), 0)
        assert worker_metrics.total("docimport_worker_runs_total", outcome="error") == 0

        # ------------------------------------- what the dashboard and alerts use
        exported = set()
        for page in (session_metrics, cost_metrics, manifest_metrics, worker_metrics):
            exported |= set(page.samples)
        missing = names_used_by_dashboard_and_alerts() - exported
        assert not missing, f"used by deploy/ but not exported: {sorted(missing)}"
    finally:
        if watch_task is not None and not watch_task.done():
            watch_task.cancel()
        worker.stop()
        await session_server.stop(1.0)
        await enqueuer.close()
        for channel in [*channels, manifest_channel, cost_channel]:
            await channel.close()
        await manifest.close(1.0)
        await cost.stop(1.0)
    # The ports close with their servers.
    for name in ("cost", "manifest", "session"):
        with pytest.raises(OSError):
            await asyncio.to_thread(_get, ports[name])
