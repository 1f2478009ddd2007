"""Helpers of the session service tests: fakes of our own services and a harness."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from conftest import SAMPLE_CASE
from docimport.common.v1 import common_pb2
from docimport.cost.v1 import cost_service_pb2_grpc
from docimport.manifest.v1 import manifest_service_pb2 as mpb
from docimport.manifest.v1 import manifest_service_pb2_grpc
from docimport.session.v1 import session_service_pb2 as pb
from docimport.session.v1 import session_service_pb2_grpc

from services.common import convert
from services.common.channels import aio_channel
from services.common.config import ClientSettings
from services.session.config import SessionSettings
from services.session.queue import PublishError, StageMessage
from services.session.server import SessionServer
from services.session.store import SessionStore


class RecordingEnqueuer:
    """An Enqueuer that keeps what it was asked to publish (or fails on demand)."""

    def __init__(self) -> None:
        self.messages: list[StageMessage] = []
        self.fail = False

    async def publish(self, messages: Sequence[StageMessage]) -> None:
        if self.fail:
            raise PublishError("broker down (test)")
        self.messages.extend(messages)

    async def close(self) -> None:
        pass

    def take(self) -> list[StageMessage]:
        taken, self.messages = self.messages, []
        return taken


def mfile(
    path: str,
    *,
    plan: str = "text_layer",
    pages: int = 1,
    ocr_pages: int = 0,
    size: int = 1000,
    category: str = "pleadings",
    priority: int = 100,
    problem: str | None = None,
    duplicate_of: str = "",
    excluded: str = "",
    estimated: str = "0.01",
    parent: str = "",
) -> mpb.ManifestFile:
    f = mpb.ManifestFile(
        file_id=str(uuid.uuid4()),
        relative_path=path,
        raw_path=path.encode(),
        size_bytes=size,
        sha256=hashlib.sha256(path.encode()).hexdigest(),
        mime_type="application/pdf",
        type_family="pdf",
        category=category,
        priority=priority,
        plan=convert.plan_value(plan),
        page_count=pages,
        ocr_page_count=ocr_pages,
        duplicate_of_path=duplicate_of,
        exclusion_reason=excluded,
        estimated_cost=convert.money(estimated),
        family_parent_file_id=parent,
    )
    if duplicate_of:
        f.duplicate_of_file_id = str(uuid.uuid4())
    if problem:
        f.problem.CopyFrom(
            mpb.FileProblem(
                kind=mpb.ProblemKind.Value("PROBLEM_KIND_" + problem.upper()),
                message=f"the file is {problem}",
            )
        )
    f.importable = not (problem or duplicate_of or excluded or parent)
    return f


class FakeManifestService(manifest_service_pb2_grpc.ManifestServiceServicer):
    """Serves manifests defined by the test (GetManifest, ListManifestFiles)."""

    def __init__(self) -> None:
        self.manifests: dict[str, tuple[mpb.Manifest, list[mpb.ManifestFile]]] = {}
        self.list_calls = 0
        self.imported: list[str] = []

    def add(
        self,
        files: Sequence[mpb.ManifestFile],
        *,
        source: str = "/data/case",
        state: int = mpb.MANIFEST_STATE_READY,
        case: str = "Smith v. Jones",
    ) -> str:
        manifest_id = str(uuid.uuid4())
        for f in files:
            f.manifest_id = manifest_id
        manifest = mpb.Manifest(
            manifest_id=manifest_id,
            case_name=case,
            source_path=source,
            state=state,
            summary=mpb.ManifestSummary(file_count=len(files)),
        )
        self.manifests[manifest_id] = (manifest, list(files))
        return manifest_id

    async def GetManifest(self, request: Any, context: Any) -> Any:
        if request.manifest_id not in self.manifests:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such manifest")
        return mpb.GetManifestResponse(manifest=self.manifests[request.manifest_id][0])

    async def ImportManifest(self, request: Any, context: Any) -> Any:
        import json

        data = json.loads(request.manifest_json)
        files = [mfile(f["path"], category=f.get("category", "pleadings")) for f in data["files"]]
        manifest_id = self.add(
            files, source=request.source_path or data["source_path"], case=data["case_name"]
        )
        self.imported.append(manifest_id)
        return mpb.ImportManifestResponse(manifest=self.manifests[manifest_id][0])

    async def ListManifestFiles(self, request: Any, context: Any) -> Any:
        self.list_calls += 1
        if request.manifest_id not in self.manifests:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such manifest")
        files = self.manifests[request.manifest_id][1]
        start = int(request.page_token or 0)
        size = request.page_size or 100
        page = files[start : start + size]
        token = str(start + size) if start + size < len(files) else ""
        return mpb.ListManifestFilesResponse(
            files=page, next_page_token=token, total_size=len(files)
        )


@dataclass
class Harness:
    settings: SessionSettings
    server: SessionServer
    store: SessionStore
    pool: asyncpg.Pool
    enqueuer: RecordingEnqueuer
    manifests: FakeManifestService
    cost_port: int
    port: int
    manifest_port: int = 0
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    stubs: dict[str, session_service_pb2_grpc.SessionServiceStub] = field(default_factory=dict)
    cost: cost_service_pb2_grpc.CostServiceStub | None = None
    worker_cost: cost_service_pb2_grpc.CostServiceStub | None = None
    service_cost: cost_service_pb2_grpc.CostServiceStub | None = None

    @property
    def operator(self) -> session_service_pb2_grpc.SessionServiceStub:
        return self.stubs["operator"]

    @property
    def worker(self) -> session_service_pb2_grpc.SessionServiceStub:
        return self.stubs["worker"]

    def stub(self, token: str) -> session_service_pb2_grpc.SessionServiceStub:
        channel = aio_channel(f"127.0.0.1:{self.port}", ClientSettings(), token=token)
        self.channels.append(channel)
        return session_service_pb2_grpc.SessionServiceStub(channel)

    @property
    def dispatcher(self):  # type: ignore[no-untyped-def]
        return self.server.dispatcher

    @property
    def reconciler(self):  # type: ignore[no-untyped-def]
        return self.server.reconciler

    async def create(
        self,
        files: Sequence[mpb.ManifestFile] | None = None,
        *,
        manifest_id: str = "",
        project: str = "Smith v. Jones",
        start: bool = True,
        budget: str | None = None,
        max_in_flight: int = 0,
        priority: Sequence[str] = (),
        dry_run: bool = False,
        request_id: str | None = None,
    ) -> pb.CreateSessionResponse:
        if not manifest_id:
            manifest_id = self.manifests.add(
                files or [mfile(f"pleadings/doc{i}.pdf") for i in range(3)]
            )
        options = pb.SessionOptions(
            max_in_flight=max_in_flight, category_priority=list(priority), dry_run=dry_run
        )
        if budget is not None:
            options.budget.CopyFrom(convert.money(budget))
        return await self.operator.CreateSession(
            pb.CreateSessionRequest(
                request_id=request_id if request_id is not None else str(uuid.uuid4()),
                manifest_id=manifest_id,
                project_name=project,
                options=options,
                start=start,
            )
        )

    async def started(
        self, message: StageMessage, worker: str = "w1", began: dt.datetime | None = None
    ) -> pb.ReportStageStartedResponse:
        """ReportStageStarted; `began`: the start is reported late, the run began then."""
        p = message.payload
        request = pb.ReportStageStartedRequest(
            document_id=p.document_id,
            stage=convert.stage_value(p.stage),
            attempt=p.attempt,
            task_id=message.task_id,
            worker=worker,
        )
        if began is not None:
            request.started_at.CopyFrom(convert.timestamp(began))
        return await self.worker.ReportStageStarted(request)

    async def result(
        self,
        message: StageMessage,
        *,
        ok: bool = True,
        error_class: int = 0,
        message_text: str = "",
        cost: str | None = "0.001",
        artifacts: Sequence[Any] = (),
        code: str = "",
        cache_hit: bool = False,
        duration: float | None = None,
        charge: bool = False,
    ) -> pb.ReportStageResultResponse:
        """Reports the run's result; with `charge`, records its cost in the ledger first, as a
        worker does (Textract pages: `cost` must be a multiple of $0.0015)."""
        p = message.payload
        if charge and cost is not None:
            await self.charge(message, cost)
        request = pb.ReportStageResultRequest(
            document_id=p.document_id,
            stage=convert.stage_value(p.stage),
            attempt=p.attempt,
            task_id=message.task_id,
            worker="w1",
            succeeded=ok,
            error_class=error_class,
            error_message=message_text,
            error_code=code,
            artifacts=list(artifacts),
            cache_hit=cache_hit,
        )
        if cost is not None:
            request.cost.CopyFrom(convert.money(cost))
        if duration is not None:
            request.duration.CopyFrom(convert.duration(duration))
        return await self.worker.ReportStageResult(request)

    def cost_as_service(self) -> cost_service_pb2_grpc.CostServiceStub:
        """The cost service as another service (no grants needed) calls it."""
        if self.service_cost is None:
            channel = aio_channel(
                f"127.0.0.1:{self.cost_port}", ClientSettings(), token="sv-test-token"
            )
            self.channels.append(channel)
            self.service_cost = cost_service_pb2_grpc.CostServiceStub(channel)
        return self.service_cost

    async def charge(self, message: StageMessage, amount: str) -> None:
        """Records `amount` (a multiple of a $0.0015 Textract page) for the message's run."""
        from docimport.cost.v1 import cost_service_pb2 as cpb

        pages = Decimal(amount) / Decimal("0.0015")
        assert pages == pages.to_integral_value(), amount
        p = message.payload
        await self.cost_as_service().RecordCosts(cpb.RecordCostsRequest(events=[cpb.CostEvent(
            session_id=p.session_id, document_id=p.document_id,
            stage=convert.stage_value(p.stage), attempt=p.attempt, service="aws_textract",
            operation="ocr_page", units=str(int(pages)), kind=cpb.COST_KIND_ACTUAL,
        )]))

    async def dispatch(self) -> list[StageMessage]:
        await self.dispatcher.run_once()
        return self.enqueuer.take()

    async def run_to_end(self, session_id: str, *, rounds: int = 20) -> pb.Session:
        """Dispatches and reports success for everything until nothing is left."""
        for _ in range(rounds):
            messages = await self.dispatch()
            if not messages:
                break
            for m in messages:
                await self.started(m)
                await self.result(m)
        return (await self.operator.GetSession(pb.GetSessionRequest(session_id=session_id))).session


async def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


def stage_of(value: int) -> str:
    return common_pb2.Stage.Name(value)


def tune(harness: Harness, **values: Any) -> None:
    """Changes settings of a running harness (they are frozen; the services share the object)."""
    for key, value in values.items():
        harness.settings.__dict__[key] = value


async def work(
    harness: Harness,
    message: StageMessage,
    artifact_dir: Any,
    *,
    record_cost: bool = True,
    ok: bool = True,
    error_class: int = 0,
    text: str = "",
) -> pb.ReportStageResultResponse:
    """What a worker does for one message: start, write an artifact, record its cost, report."""
    from docimport.cost.v1 import cost_service_pb2 as cpb

    p = message.payload
    await harness.started(message)
    artifacts = []
    cost = "0"
    if ok:
        path = artifact_dir / f"{p.document_id}.{p.stage}.{p.attempt}.json"
        data = f'{{"document": "{p.document_id}", "stage": "{p.stage}"}}'.encode()
        path.write_bytes(data)
        artifacts.append(
            pb.Artifact(
                kind=p.stage,
                uri=path.resolve().as_uri(),
                sha256=hashlib.sha256(data).hexdigest(),
                size_bytes=len(data),
            )
        )
    if record_cost:
        if harness.worker_cost is None:
            channel = aio_channel(
                f"127.0.0.1:{harness.cost_port}", ClientSettings(), token="wk-test-token"
            )
            harness.channels.append(channel)
            harness.worker_cost = cost_service_pb2_grpc.CostServiceStub(channel)
        recorded = await harness.worker_cost.RecordCosts(
            cpb.RecordCostsRequest(
                events=[
                    cpb.CostEvent(
                        session_id=p.session_id,
                        document_id=p.document_id,
                        stage=convert.stage_value(p.stage),
                        attempt=p.attempt,
                        service="local",
                        operation="compute_second",
                        units="1.5",
                        kind=cpb.COST_KIND_ACTUAL,
                        category=p.category,
                        grant=p.grant,  # as a worker does: the run's grant, from its message
                    )
                ]
            )
        )
        cost = recorded.total.amount
    return await harness.result(
        message, ok=ok, error_class=error_class, message_text=text, cost=cost, artifacts=artifacts
    )


async def work_to_end(
    harness: Harness, session_id: str, artifact_dir: Any, **kw: Any
) -> pb.Session:
    while messages := await harness.dispatch():
        for m in messages:
            await work(harness, m, artifact_dir, **kw)
    return (await harness.operator.GetSession(pb.GetSessionRequest(session_id=session_id))).session


# ---------------------------------------------------------------- real processes and files


@contextlib.contextmanager
def readable_case(files: Sequence[str] | None = None) -> Iterator[Path]:
    """A world-readable copy of examples/sample-case (or of `files` of it), removed afterwards.

    World-readable because the scan reports what it cannot read, and a test
    running as root under a private Postgres account must not see that.
    """
    root = Path(tempfile.mkdtemp(prefix="di-session-case-"))
    root.chmod(0o755)
    target = root / "smith-v-jones"
    if files is None:
        shutil.copytree(SAMPLE_CASE, target)
    else:
        for name in files:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(SAMPLE_CASE / name, target / name)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    try:
        yield target
    finally:
        shutil.rmtree(root, ignore_errors=True)


class WorkerProcess:
    """`python -m services.worker` (or another component's `module`) in its own process group,
    configured by `env` only, its output in `<name>.log`."""

    def __init__(
        self, tmp_path: Path, name: str, env: dict[str, str], module: str = "services.worker"
    ) -> None:
        self.log_path = tmp_path / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module],
            env={"PATH": os.environ.get("PATH", ""), **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL to the whole process group: the main process and its pool children."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self._log.close()

    def stop(self) -> None:
        """SIGTERM (a warm shutdown), then SIGKILL to whatever of the group is left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        if not self._log.closed:
            self._log.close()

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]
