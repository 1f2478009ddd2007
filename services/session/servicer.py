"""SessionService: validation and proto <-> domain conversion for every RPC.

Owns the RPC surface of `docimport.session.v1.SessionService` and its scope
policy (`POLICY`: workers report stages; operators do everything else;
other services may read sessions; the pipeline overview is for operators).
No SQL (the store), no Celery (the dispatcher and its Enqueuer; the
overview's BrokerProbe), no environment reads (settings come in).

Decisions worth knowing:
- CreateSession streams the manifest's files page by page from the manifest
  service into one transaction of COPYs, so a 100,000-file manifest never
  sits in memory. Duplicates, exclusions and e-mail attachments (processed
  inside their e-mail) become `skipped` with the reason. Files the scan
  found broken (corrupt, encrypted, empty, unreadable, unsupported...) become
  permanent failures at once, carrying the scan's own reason: they are
  never dispatched, so no worker reads a file the scan could not trust
  (a symlink escape included), nothing is charged for them, and every
  manifest file is still accounted for by a row with an honest state.
- The session id of a create with a request_id is derived from it (uuid5),
  so a retried create, even one that crashed half way, targets the same id
  (and the same budget at the cost service). Dry runs write nothing: not the
  project, not the budget.
- Stage reports are applied in micro-batches: concurrent calls share one
  transaction (group commit), which is what lets ingest keep up with many
  workers; a batch that fails is retried call by call so one bad report
  cannot fail its neighbours. Each report of a ReportStageResults call is
  checked on its own (the generic input checks included, see INPUT_RULES):
  a bad one gets its own INVALID_ARGUMENT answer, the others are applied.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Any, Generic, TypeVar

import grpc
from docimport.session.v1 import session_service_pb2 as pb

from services.common import convert, telemetry
from services.common.auth import Scope, policy_for
from services.common.errors import (
    MAX_MESSAGE_BYTES,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Validator,
    clip,
    quote,
)
from services.common.logging import bind
from services.common.metrics import watching
from services.common.tasks import QUEUES, STAGES
from services.common.validate import RequestValidator, Rules, field_name
from services.session import states as st
from services.session.config import SessionSettings
from services.session.dispatcher import Dispatcher
from services.session.events import EventHub, WatchItem, parse_resume_token, watch
from services.session.leases import LeaseKeeper
from services.session.metrics import SessionMetrics
from services.session.peers import (
    CostPeer,
    FilePlanItem,
    ManifestFileInfo,
    ManifestInfo,
    ManifestPeer,
    PeerFailure,
    describe,
)
from services.session.queue import BrokerProbe, BrokerView
from services.session.store import (
    Document,
    Event,
    NewDocument,
    NewSession,
    Overview,
    ResultReport,
    SessionInfo,
    SessionStore,
    Snapshot,
    StageRun,
    StartedReport,
)
from services.session.verify import Verifier, VerifyReport

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SessionService"].full_name
_READ = {Scope.OPERATOR, Scope.SERVICE}
POLICY = policy_for(
    SERVICE_NAME,
    {
        "ReportStageStarted": {Scope.WORKER},
        "ReportStageResult": {Scope.WORKER},
        "ReportStageResults": {Scope.WORKER},
        "GetSession": _READ,
        "ListSessions": _READ,
        "ListSessionDocuments": _READ,
        "GetDocument": _READ,
        "WatchSession": _READ,
        "VerifySession": _READ,
        "GetPipelineOverview": {Scope.OPERATOR},
    },
)

# The generic input checks (services.common.validate): a failure's message may
# be long (it is cut to MAX_ERROR_MESSAGE when stored), and each report of a
# ReportStageResults call is checked on its own, so one bad report fails alone.
MAX_ERROR_MESSAGE = 4000
INPUT_RULES = Rules(
    max_chars={field_name(pb.ReportStageResultRequest, "error_message"): 64 * 1024},
    per_entry=frozenset({field_name(pb.ReportStageResultsRequest, "reports")}),
)
# A stage run's duration_seconds column is numeric(14, 6).
MAX_RUN_SECONDS = 10**8

# Session ids derived from request ids live in their own namespace.
REQUEST_NAMESPACE = uuid.UUID("5d0c7a47-6f0e-4b6f-9a53-64f0d2a1c3b7")
# Live sessions whose cost so far is remembered at once (see _cost_so_far).
_COST_CACHE_SIZE = 1024
MAX_NAME = 200
# Reports in one ReportStageResults call.
MAX_RESULTS = 100
# Errors of one report that fail a whole ReportStageResults call (the worker tries it again).
_CALL_ERRORS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})
# Pipeline overview: finished sessions stay on it this long by default;
# default and largest list lengths; the longest accepted windows.
OVERVIEW_FINISHED_WITHIN = 3600.0
OVERVIEW_LIST_DEFAULT, OVERVIEW_LIST_MAX = 10, 100
OVERVIEW_MAX_SECONDS = 7 * 86400.0

SESSION_PREFIX, DOC_PREFIX, CLASS_PREFIX = "SESSION_STATE_", "DOCUMENT_STATE_", "ERROR_CLASS_"


def _session_state(name: str) -> int:
    return convert.enum_value(pb.SessionState, name, SESSION_PREFIX)


def _doc_state(name: str | None) -> int:
    return convert.enum_value(pb.DocumentState, name, DOC_PREFIX)


def _error_class(name: str | None) -> int:
    return convert.enum_value(pb.ErrorClass, name, CLASS_PREFIX)


def _uuid_text(value: str, field_name: str, v: Validator | None = None) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        if v is not None:
            v.add(field_name, f"{quote(value)} is not a UUID")
            return ""
        raise InvalidArgument.field(field_name, f"{quote(value)} is not a UUID") from None


# ---------------------------------------------------------------- micro-batching

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Applies concurrent submissions together (group commit), in order.

    While `concurrency` batches are in flight, new submissions wait and are
    applied together in the next one, up to `max_batch`; an idle batcher
    first lets the event loop turn `gather_turns` times (calls already
    received join the batch), never waiting on a timer; `busy_gather_turns`
    times when its last batch held at least `busy_batch` calls (many callers:
    a longer gathering makes fewer, larger transactions; with 16 reports in
    flight, 6 turns instead of 2 raised the ingest rate by about a tenth),
    and `gather_turns` again once a batch is smaller (few callers, who would
    only wait: with two workers, 6 turns made an import 5% slower).
    """

    def __init__(
        self,
        apply: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_batch: int,
        concurrency: int = 2,
        gather_turns: int = 2,
        busy_gather_turns: int = 6,
        busy_batch: int = 3,
    ) -> None:
        self._apply = apply
        self._idle_turns = gather_turns
        self._busy_turns = max(gather_turns, busy_gather_turns)
        self._busy_batch = busy_batch
        self._last_batch = 0  # calls in the batch applied last
        self._max = max(1, max_batch)
        self._slots = max(1, concurrency)
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._running = 0

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._running < self._slots:
            self._running += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            # Let the calls that already arrived (the next loop turns) join this batch.
            busy = self._last_batch >= self._busy_batch
            for _ in range(self._busy_turns if busy else self._idle_turns):
                await asyncio.sleep(0)
            while self._queue:
                batch, self._queue = self._queue[: self._max], self._queue[self._max :]
                self._last_batch = len(batch)
                await self._run(batch)
        finally:
            self._running -= 1

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._apply([item for item, _ in batch])
        except Exception as exc:  # noqa: BLE001 - handed to the callers
            if len(batch) == 1:
                if not batch[0][1].done():
                    batch[0][1].set_exception(exc)
                return
            for one in batch:  # isolate the culprit: one call per transaction
                await self._run([one])
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


async def prefetch(source: AsyncIterator[T], depth: int = 2) -> AsyncIterator[T]:
    """Iterates `source` in a task of its own, up to `depth` items ahead of the consumer."""
    queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue(maxsize=depth)

    async def produce() -> None:
        try:
            async for item in source:
                await queue.put((True, item))
            await queue.put((False, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((False, exc))

    task = asyncio.get_running_loop().create_task(produce())
    try:
        while True:
            more, item = await queue.get()
            if not more:
                if isinstance(item, Exception):
                    raise item
                return
            yield item
    finally:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the producer is being discarded
            pass


# ---------------------------------------------------------------- conversion


def rate_and_eta(snapshot: Snapshot) -> tuple[float, float | None]:
    """Documents finished per second over the last minute, and seconds left."""
    info = snapshot.session
    finished_now = info.counts.completed + info.counts.failed
    points = [*snapshot.samples, (snapshot.db_now, finished_now)]
    window = [p for p in points if (snapshot.db_now - p[0]).total_seconds() <= 65]
    rate = 0.0
    if len(window) >= 2:
        elapsed = (window[-1][0] - window[0][0]).total_seconds()
        if elapsed >= 1:
            rate = max(0.0, (window[-1][1] - window[0][1]) / elapsed)
    active = info.counts.active
    eta = active / rate if rate > 0 and active else (0.0 if not active else None)
    return rate, eta


def session_proto(
    info: SessionInfo, *, snapshot: Snapshot | None = None, cost_so_far: Decimal | None = None
) -> pb.Session:
    c = info.counts
    options = pb.SessionOptions(
        max_in_flight=info.max_in_flight, category_priority=list(info.category_priority)
    )
    if info.budget_limit is not None:
        options.budget.CopyFrom(convert.money(info.budget_limit))
    message = pb.Session(
        session_id=info.session_id,
        project=pb.Project(
            project_id=info.project.project_id,
            name=info.project.name,
            created_at=convert.timestamp(info.project.created_at),
        ),
        manifest_id=info.manifest_id,
        state=_session_state(info.state),
        options=options,
        counts=pb.DocumentCounts(
            total=c.total,
            pending=c.pending,
            queued=c.queued,
            running=c.running,
            completed=c.completed,
            failed=c.failed,
            skipped=c.skipped,
            cancelled=c.cancelled,
            stalled=c.stalled,
        ),
        cost_so_far=convert.money(cost_so_far if cost_so_far is not None else info.reported_cost),
        wasted_cost=convert.money(info.wasted_cost),
        created_at=convert.timestamp(info.created_at),
        started_at=convert.timestamp(info.started_at),
        finished_at=convert.timestamp(info.finished_at),
        request_id=info.request_id or "",
        last_seq=info.last_seq,
        state_reason=info.state_reason,
    )
    if info.estimated_cost is not None:
        message.estimated_cost.CopyFrom(convert.money(info.estimated_cost))
    if snapshot is not None:
        for s in snapshot.stages:
            message.stages.add(
                stage=convert.stage_value(s.stage),
                queued=s.queued,
                running=s.running,
                succeeded=s.succeeded,
                failed=s.failed,
                cache_hits=s.cache_hits,
            )
        rate, eta = rate_and_eta(snapshot)
        message.documents_per_second = rate
        if eta is not None:
            message.eta.CopyFrom(convert.duration(round(eta, 3)))
    return message


def document_proto(doc: Document, runs: Sequence[StageRun] = ()) -> pb.Document:
    message = pb.Document(
        document_id=doc.document_id,
        session_id=doc.session_id,
        manifest_file_id=doc.manifest_file_id,
        relative_path=doc.relative_path,
        sha256=doc.sha256 or "",
        size_bytes=doc.size_bytes,
        category=doc.category,
        priority=doc.priority,
        plan=convert.plan_value(doc.plan),
        state=_doc_state(doc.state),
        stage=convert.stage_value(doc.stage),
        error_class=_error_class(doc.error_class),
        error_message=doc.error_message or "",
        skip_reason=doc.skip_reason or "",
        attempts=doc.attempts,
        stalled=doc.stalled,
        cost=convert.money(doc.cost),
        updated_at=convert.timestamp(doc.updated_at),
        page_count=doc.page_count,
    )
    for run in runs:
        r = message.stage_runs.add(
            stage=convert.stage_value(run.stage),
            attempt=run.attempt,
            state=convert.enum_value(pb.StageRunState, run.state, "STAGE_RUN_STATE_"),
            task_id=run.task_id,
            worker=run.worker or "",
            queued_at=convert.timestamp(run.queued_at),
            started_at=convert.timestamp(run.started_at),
            finished_at=convert.timestamp(run.finished_at),
            lease_expires_at=convert.timestamp(run.lease_expires_at),
            error_class=_error_class(run.error_class),
            error_code=run.error_code or "",
            error_message=run.error_message or "",
            cache_hit=run.cache_hit,
        )
        if run.duration_seconds is not None:
            r.duration.CopyFrom(convert.duration(run.duration_seconds))
        if run.cost is not None:
            r.cost.CopyFrom(convert.money(run.cost))
        for a in run.artifacts:
            r.artifacts.add(
                kind=str(a.get("kind", "")),
                uri=str(a.get("uri", "")),
                sha256=str(a.get("sha256", "")),
                size_bytes=int(a.get("size_bytes") or 0),
            )
    return message


def event_proto(event: Event) -> pb.WatchSessionResponse:
    response = pb.WatchSessionResponse(
        seq=event.seq, event_time=convert.timestamp(event.event_time)
    )
    p = event.payload
    if event.kind == "state_change":
        response.state_change.CopyFrom(
            pb.SessionStateChange(
                state=_session_state(p.get("state", "")), reason=p.get("reason", "")
            )
        )
        return response
    response.document.CopyFrom(
        pb.DocumentEvent(
            document_id=event.document_id or "",
            relative_path=event.relative_path,
            state=_doc_state(p.get("state")),
            stage=convert.stage_value(p.get("stage")),
            error_class=_error_class(p.get("error_class")),
            error_message=p.get("error_message", ""),
            cache_hit=bool(p.get("cache_hit")),
            previous_state=_doc_state(p.get("prev")),
            previous_stage=convert.stage_value(p.get("prev_stage")),
            attempt=int(p.get("attempt") or 0),
        )
    )
    if "cost" in p:
        response.document.cost.CopyFrom(convert.money(p["cost"]))
    return response


def verify_proto(report: VerifyReport) -> pb.VerifySessionResponse:
    severity = {
        "info": pb.SEVERITY_INFO,
        "warning": pb.SEVERITY_WARNING,
        "error": pb.SEVERITY_ERROR,
    }
    verdict = {"pass": pb.VERDICT_PASS, "warn": pb.VERDICT_WARN, "fail": pb.VERDICT_FAIL}
    message = pb.VerifySessionResponse(
        session_id=report.session_id,
        verdict=verdict[report.verdict],
        counts=pb.VerifyCounts(
            manifest_files=report.manifest_files,
            completed=report.completed,
            skipped=report.skipped,
            failed=report.failed,
            unaccounted=report.unaccounted,
            in_progress=report.in_progress,
        ),
        findings=[
            pb.Finding(
                severity=severity[f.severity],
                code=f.code,
                message=f.message,
                count=f.count,
                document_ids=list(f.document_ids),
            )
            for f in report.findings
        ],
        recommendations=list(report.recommendations),
        completeness_percent=report.completeness_percent,
    )
    if report.actual_cost is not None:
        message.actual_cost.CopyFrom(convert.money(report.actual_cost))
    if report.estimated_cost is not None:
        message.estimated_cost.CopyFrom(convert.money(report.estimated_cost))
    return message


def overview_proto(
    overview: Overview,
    broker: BrokerView | None,
    costs: Sequence[Decimal],
    stall_after: float,
) -> pb.GetPipelineOverviewResponse:
    message = pb.GetPipelineOverviewResponse(
        generated_at=convert.timestamp(overview.db_now),
        sessions=[
            session_proto(snap.session, snapshot=snap, cost_so_far=cost)
            for snap, cost in zip(overview.sessions, costs, strict=True)
        ],
        stall_after=convert.duration(stall_after),
        stalled_total=overview.stalled_total,
        stalled_documents=[document_proto(d) for d in overview.stalled],
        recent_failures=[document_proto(d) for d in overview.failures],
    )
    for w in overview.stage_windows:
        stats = message.stage_stats.add(
            stage=convert.stage_value(w.stage),
            window=convert.duration(w.window_seconds),
            finished=w.finished,
            succeeded=w.succeeded,
            failed=w.failed,
            expired=w.expired,
            cache_hits=w.cache_hits,
            runs_per_second=w.runs_per_second,
            error_rate=w.error_rate,
        )
        if w.p50_seconds is not None:
            stats.p50_duration.CopyFrom(convert.duration(round(w.p50_seconds, 6)))
        if w.p95_seconds is not None:
            stats.p95_duration.CopyFrom(convert.duration(round(w.p95_seconds, 6)))
    if broker is None:
        message.broker.error = "no broker is configured for this service"
        return message
    message.broker.reachable = broker.reachable
    message.broker.error = broker.error
    if broker.workers_checked_at is not None:
        message.broker.workers_checked_at.CopyFrom(convert.timestamp(broker.workers_checked_at))
    for stage in STAGES:
        queue = QUEUES[stage]
        if queue in broker.queue_depths:
            message.queues.add(
                queue=queue,
                stage=convert.stage_value(stage),
                messages=broker.queue_depths[queue],
            )
    for worker in broker.workers:
        message.workers.add(hostname=worker.hostname, queues=list(worker.queues))
    return message


# ---------------------------------------------------------------- create helpers


def classify(f: ManifestFileInfo) -> tuple[str, dict[str, Any]]:
    """A manifest file's initial document state and its reason fields."""
    if f.exclusion_reason:
        return st.SKIPPED, {"skip_reason": f"excluded by the manifest: {f.exclusion_reason}"}
    if f.family_parent_file_id:
        return st.SKIPPED, {"skip_reason": "e-mail attachment: processed with its e-mail"}
    if f.duplicate_of_file_id or f.duplicate_of_path:
        return st.SKIPPED, {
            "skip_reason": f"duplicate of {f.duplicate_of_path or f.duplicate_of_file_id}"
        }
    if f.problem_kind:
        reason = f.problem_message or f.problem_kind.replace("_", " ")
        return st.FAILED, {
            "error_class": st.PERMANENT,
            "error_code": f.problem_kind,
            "error_message": f"{reason} (found by the manifest scan)",
            "problem_kind": f.problem_kind,
        }
    if f.plan == "unsupported":
        return st.FAILED, {
            "error_class": st.PERMANENT,
            "error_code": "unsupported",
            "error_message": f"unsupported file type {f.mime_type or 'unknown'} "
            "(found by the manifest scan)",
            "problem_kind": "unsupported",
        }
    return st.PENDING, {}


def dispatch_rank(category: str, priority: int, order: dict[str, int]) -> int:
    """Listed categories first, in the given order; the rest by manifest priority."""
    key = category.lower()
    if key in order:
        return order[key]
    return len(order) + max(0, priority)


# ---------------------------------------------------------------- the servicer


class SessionServicer:
    def __init__(
        self,
        store: SessionStore,
        settings: SessionSettings,
        dispatcher: Dispatcher,
        hub: EventHub,
        manifest: ManifestPeer | None,
        cost: CostPeer | None,
        metrics: SessionMetrics | None = None,
        probe: BrokerProbe | None = None,
        keeper: LeaseKeeper | None = None,
    ) -> None:
        self._metrics = metrics if metrics is not None else SessionMetrics()
        self._store = store
        self._settings = settings
        self._dispatcher = dispatcher
        self._hub = hub
        self._manifest = manifest
        self._cost = cost
        self._probe = probe
        self._keeper = keeper
        self._verifier = Verifier(store, manifest, cost, page_size=settings.manifest_page_size)
        self._started = MicroBatcher(
            self._apply_started,
            max_batch=settings.report_batch,
            concurrency=settings.report_concurrency,
        )
        self._results = MicroBatcher(
            self._apply_results,
            max_batch=settings.report_batch,
            concurrency=settings.report_concurrency,
        )
        self._background: set[asyncio.Task[None]] = set()
        self._inputs = RequestValidator(INPUT_RULES)
        # session id -> (monotonic time, actual cost): see _cost_so_far
        self._costs_seen: dict[str, tuple[float, Decimal]] = {}

    # ------------------------------------------------------------ create

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: Any
    ) -> pb.CreateSessionResponse:
        v = Validator()
        if len(request.request_id) > MAX_NAME:
            v.add("request_id", f"must be at most {MAX_NAME} characters")
        v.require(request.manifest_id, "manifest_id")
        manifest_id = (
            _uuid_text(request.manifest_id, "manifest_id", v) if request.manifest_id else ""
        )
        which = request.WhichOneof("project")
        project_name = request.project_name.strip() if which == "project_name" else None
        project_id = None
        if which is None:
            v.add("project", "project_name or project_id is required")
        elif which == "project_name":
            if not project_name:
                v.add("project_name", "must not be blank")
            elif len(project_name) > MAX_NAME:
                v.add("project_name", f"must be at most {MAX_NAME} characters")
        else:
            project_id = _uuid_text(request.project_id, "project_id", v)
        options = request.options
        if options.max_in_flight < 0:
            v.add("options.max_in_flight", "must not be negative")
        elif options.max_in_flight > 1_000_000:
            v.add("options.max_in_flight", "must be at most 1000000")
        budget: Decimal | None = None
        if options.HasField("budget"):
            try:
                budget = convert.parse_money(options.budget, "options.budget")
            except InvalidArgument as exc:
                for violation in exc.violations:
                    v.add(violation.field, violation.description)
            else:
                if budget >= convert.MAX_AMOUNT:
                    v.add("options.budget", f"must be less than {convert.MAX_AMOUNT:,}")
                    budget = None
        order: dict[str, int] = {}
        for i, category in enumerate(options.category_priority):
            if not category.strip():
                v.add(f"options.category_priority[{i}]", "must not be blank")
            order.setdefault(category.strip().lower(), len(order))
        v.check()
        dry_run = options.dry_run
        with bind(manifest_id=manifest_id, request_id=request.request_id):
            if request.request_id and not dry_run:
                existing = await self._store.find_by_request_id(request.request_id)
                if existing is not None:
                    return await self._created(existing, request, manifest_id, None)
            if self._manifest is None:
                raise FailedPrecondition("no manifest service is configured")
            manifest = await self._manifest.get_manifest(manifest_id)
            if not manifest.ready:
                raise FailedPrecondition(
                    f"manifest {manifest_id} is {manifest.state_name}; only a ready manifest can be imported",
                    subject=f"manifests/{manifest_id}",
                )
            if budget is not None and self._cost is None:
                raise FailedPrecondition("a budget needs the cost service, which is not configured")
            if project_id and await self._store.find_project(project_id=project_id) is None:
                raise NotFound("project", project_id)
            if dry_run:
                return pb.CreateSessionResponse(plan=await self._plan(manifest_id, order, budget))
            session_id = (
                str(uuid.uuid5(REQUEST_NAMESPACE, request.request_id))
                if request.request_id
                else str(uuid.uuid4())
            )
            spec = NewSession(
                session_id=session_id,
                request_id=request.request_id or None,
                manifest_id=manifest_id,
                source_path=manifest.source_path,
                project_id=project_id,
                project_name=project_name,
                budget_limit=budget,
                max_in_flight=options.max_in_flight or self._settings.default_max_in_flight,
                category_priority=tuple(c.strip() for c in options.category_priority),
                estimated_cost=None,
                start=request.start,
                trace_context=telemetry.current_traceparent() if request.start else None,
            )
            # Pages are fetched and priced ahead while the previous one is copied.
            info, created = await self._store.create_session(
                spec,
                prefetch(self._documents(manifest_id, order, price_unpriced=budget is not None)),
            )
            if created:
                logger.info(
                    "session created",
                    extra={"session_id": info.session_id, "documents": info.total_documents},
                )
            return await self._created(info, request, manifest_id, manifest)

    async def _created(
        self,
        info: SessionInfo,
        request: pb.CreateSessionRequest,
        manifest_id: str,
        manifest: ManifestInfo | None,
    ) -> pb.CreateSessionResponse:
        """The answer to a create of `info`, made now or by an earlier call with its request id.

        Every call with one request id gets the same session: the one whose
        row was stored first. Its side effects at the cost service follow that
        row, not the call (the budget its creator asked for, the estimate of
        its manifest), and are idempotent, so a caller that lost a race, or
        retries after a crash, changes nothing and repairs what is missing.
        """
        if info.manifest_id != manifest_id:
            raise AlreadyExists(
                f"request_id {request.request_id!r} already created session "
                f"{info.session_id} from another manifest"
            )
        if self._cost is not None:
            if info.budget_limit is not None:
                await self._cost.set_budget(info.session_id, info.budget_limit)
            if manifest is None and self._manifest is not None:
                manifest = await self._manifest.get_manifest(manifest_id)
            if manifest is not None and manifest.estimate_lines and manifest.price_book_version:
                await self._cost.record_estimate(
                    info.session_id, manifest.estimate_lines, manifest.price_book_version
                )
        if request.start:
            self._dispatcher.wake()
        return pb.CreateSessionResponse(session=await self._session_message(info.session_id))

    async def _documents(
        self, manifest_id: str, order: dict[str, int], *, price_unpriced: bool
    ) -> AsyncIterator[list[NewDocument]]:
        """The manifest's files as new documents, a page at a time (fetched ahead).

        Each document carries the manifest's own estimate of the file; files
        the manifest did not price are priced here (EstimateCost) when the
        session has a budget to admit them against.
        """
        assert self._manifest is not None
        ordinal = 0
        pages = prefetch(self._manifest.iter_files(manifest_id, self._settings.manifest_page_size))
        async for page in pages:
            states = [classify(f) for f in page]
            priced: dict[str, Decimal] = {}
            unpriced = [
                f
                for f, (state, _) in zip(page, states, strict=True)
                if state == st.PENDING and f.estimated_cost is None
            ]
            if price_unpriced and unpriced and self._cost is not None:
                priced = await self._cost.estimate_files(
                    [
                        FilePlanItem(
                            f.file_id, f.plan, f.page_count, f.ocr_page_count, f.size_bytes
                        )
                        for f in unpriced
                    ]
                )
            batch = []
            for f, (state, reason) in zip(page, states, strict=True):
                estimate = (
                    f.estimated_cost if f.estimated_cost is not None else priced.get(f.file_id)
                )
                batch.append(
                    NewDocument(
                        manifest_file_id=f.file_id,
                        ordinal=ordinal,
                        dispatch_rank=dispatch_rank(f.category, f.priority, order),
                        relative_path=f.relative_path,
                        raw_path=f.raw_path,
                        sha256=f.sha256 or None,
                        size_bytes=f.size_bytes,
                        category=f.category,
                        priority=f.priority,
                        plan=f.plan,
                        page_count=f.page_count,
                        ocr_page_count=f.ocr_page_count,
                        state=state,
                        estimated_cost=(estimate or Decimal(0))
                        if state == st.PENDING
                        else Decimal(0),
                        mime_type=f.mime_type,
                        **reason,
                    )
                )
                ordinal += 1
            yield batch

    async def _plan(
        self, manifest_id: str, order: dict[str, int], budget: Decimal | None
    ) -> pb.DryRunPlan:
        documents = skipped = problems = 0
        estimated = Decimal(0)
        categories: dict[str, list[int]] = {}
        async for batch in self._documents(manifest_id, order, price_unpriced=budget is not None):
            for doc in batch:
                if doc.state == st.SKIPPED:
                    skipped += 1
                elif doc.state == st.FAILED:
                    problems += 1
                else:
                    documents += 1
                    estimated += doc.estimated_cost
                    entry = categories.setdefault(doc.category, [doc.dispatch_rank, 0])
                    entry[0] = min(entry[0], doc.dispatch_rank)
                    entry[1] += 1
        ordered = sorted(categories.items(), key=lambda item: (item[1][0], item[0]))
        return pb.DryRunPlan(
            documents=documents,
            skipped=skipped,
            problem_files=problems,
            estimated_cost=convert.money(estimated),
            categories=[pb.CategoryPlan(category=name, documents=n) for name, (_, n) in ordered],
            within_budget=budget is None or estimated <= budget,
        )

    # ------------------------------------------------------------ lifecycle

    async def StartSession(
        self, request: pb.StartSessionRequest, context: Any
    ) -> pb.StartSessionResponse:
        session_id = self._session_id(request.session_id)
        await self._store.start_session(
            session_id, trace_context=telemetry.current_traceparent()
        )
        self._dispatcher.wake()
        return pb.StartSessionResponse(session=await self._session_message(session_id))

    async def PauseSession(
        self, request: pb.PauseSessionRequest, context: Any
    ) -> pb.PauseSessionResponse:
        session_id = self._session_id(request.session_id)
        await self._store.pause_session(session_id)
        return pb.PauseSessionResponse(session=await self._session_message(session_id))

    async def ResumeSession(
        self, request: pb.ResumeSessionRequest, context: Any
    ) -> pb.ResumeSessionResponse:
        session_id = self._session_id(request.session_id)
        await self._store.resume_session(
            session_id, trace_context=telemetry.current_traceparent()
        )
        self._dispatcher.wake()
        return pb.ResumeSessionResponse(session=await self._session_message(session_id))

    async def CancelSession(
        self, request: pb.CancelSessionRequest, context: Any
    ) -> pb.CancelSessionResponse:
        session_id = self._session_id(request.session_id)
        _, release, tasks = await self._store.cancel_session(session_id)
        if self._keeper is not None:  # no queued run of it may start its work now
            await self._keeper.take_back(tasks)
        await self._dispatcher.release(release)
        return pb.CancelSessionResponse(session=await self._session_message(session_id))

    # ------------------------------------------------------------ reads

    @staticmethod
    def _session_id(value: str) -> str:
        if not value:
            raise InvalidArgument.field("session_id", "is required")
        return _uuid_text(value, "session_id")

    async def _cost_so_far(self, info: SessionInfo) -> Decimal:
        """The session's actual cost from the ledger (reused for `cost_cache_seconds`).

        The cost service keeps per-session totals (it no longer sums the
        ledger for them), but a call is still a round trip: a live session's
        figure is reused for a moment, so that pollers (`status` in a loop,
        dashboards) cost the cost service one call per interval. A finished
        session's figure is always fresh: it is the final one.
        """
        if self._cost is None:
            return info.reported_cost
        now = time.monotonic()
        live = info.state not in st.SESSION_TERMINAL
        cached = self._costs_seen.get(info.session_id)
        if live and cached is not None and now - cached[0] < self._settings.cost_cache_seconds:
            return cached[1]
        try:
            total = (await self._cost.session_costs(info.session_id)).actual_total
        except PeerFailure as exc:
            logger.info("cost service unavailable (%s); showing reported costs", describe(exc))
            return info.reported_cost
        if live:
            if len(self._costs_seen) >= _COST_CACHE_SIZE:
                self._costs_seen.clear()
            self._costs_seen[info.session_id] = (now, total)
        else:
            self._costs_seen.pop(info.session_id, None)
        return total

    async def _session_message(self, session_id: str) -> pb.Session:
        snap = await self._store.snapshot(session_id, stall_after=self._settings.stall_after)
        return session_proto(
            snap.session, snapshot=snap, cost_so_far=await self._cost_so_far(snap.session)
        )

    async def GetSession(
        self, request: pb.GetSessionRequest, context: Any
    ) -> pb.GetSessionResponse:
        return pb.GetSessionResponse(
            session=await self._session_message(self._session_id(request.session_id))
        )

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Any
    ) -> pb.ListSessionsResponse:
        size = convert.page_size(request.page_size)
        if request.state and request.state not in pb.SessionState.values():
            raise InvalidArgument.field("state", "is not a session state")
        state = convert.enum_name(pb.SessionState, request.state, SESSION_PREFIX) or None
        after = (
            convert.from_timestamp(request.created_after)
            if request.HasField("created_after")
            else None
        )
        cursor = convert.decode_page_token(request.page_token)
        if cursor is not None:  # the store reads it; its values must be ones the store can use
            convert.cursor_time(cursor, "c")
            convert.cursor_uuid(cursor, "i")
        sessions, cursor = await self._store.list_sessions(
            state=state,
            project_name=request.project_name.strip() or None,
            created_after=after,
            limit=size,
            cursor=cursor,
        )
        return pb.ListSessionsResponse(
            sessions=[session_proto(s) for s in sessions],
            next_page_token=convert.encode_page_token(cursor) if cursor else "",
        )

    async def ListSessionDocuments(
        self, request: pb.ListSessionDocumentsRequest, context: Any
    ) -> pb.ListSessionDocumentsResponse:
        session_id = self._session_id(request.session_id)
        size = convert.page_size(request.page_size)
        cursor = convert.decode_page_token(request.page_token)
        after = None
        if cursor is not None:
            after = convert.cursor_int(cursor, "o", bits=32)  # ordinal is an integer
        v = Validator()
        if request.state and request.state not in pb.DocumentState.values():
            v.add("state", "is not a document state")
        if request.error_class and request.error_class not in pb.ErrorClass.values():
            v.add("error_class", "is not an error class")
        if request.stage and convert.stage_name(request.stage) not in STAGES:
            v.add("stage", "is not a stage")
        v.check()
        docs, next_ordinal = await self._store.list_documents(
            session_id,
            state=convert.enum_name(pb.DocumentState, request.state, DOC_PREFIX) or None,
            stage=convert.stage_name(request.stage) or None,
            error_class=convert.enum_name(pb.ErrorClass, request.error_class, CLASS_PREFIX) or None,
            category=request.category.strip() or None,
            stalled=request.stalled if request.HasField("stalled") else None,
            stall_after=self._settings.stall_after,
            limit=size,
            after_ordinal=after,
        )
        return pb.ListSessionDocumentsResponse(
            documents=[document_proto(d) for d in docs],
            next_page_token=convert.encode_page_token({"o": next_ordinal})
            if next_ordinal is not None
            else "",
        )

    async def GetDocument(
        self, request: pb.GetDocumentRequest, context: Any
    ) -> pb.GetDocumentResponse:
        if not request.document_id:
            raise InvalidArgument.field("document_id", "is required")
        document_id = _uuid_text(request.document_id, "document_id")
        doc, runs = await self._store.get_document(
            document_id, stall_after=self._settings.stall_after
        )
        return pb.GetDocumentResponse(document=document_proto(doc, runs))

    async def RetryDocuments(
        self, request: pb.RetryDocumentsRequest, context: Any
    ) -> pb.RetryDocumentsResponse:
        session_id = self._session_id(request.session_id)
        if not (request.failed or request.stalled or request.document_ids):
            raise InvalidArgument.field(
                "failed", "say what to retry: failed, stalled or document_ids"
            )
        v = Validator()
        ids = [_uuid_text(d, f"document_ids[{i}]", v) for i, d in enumerate(request.document_ids)]
        v.check()
        retried = await self._store.retry_documents(
            session_id,
            failed=request.failed,
            stalled=request.stalled,
            document_ids=ids,
            force=request.force,
            stall_after=self._settings.stall_after,
            trace_context=telemetry.current_traceparent(),
        )
        if retried.count:
            self._dispatcher.wake()
        return pb.RetryDocumentsResponse(
            retried=retried.count, session=await self._session_message(session_id)
        )

    # ------------------------------------------------------------ watch

    async def WatchSession(
        self, request: pb.WatchSessionRequest, context: Any
    ) -> AsyncIterator[pb.WatchSessionResponse]:
        session_id = self._session_id(request.session_id)
        if request.resume_after_seq < 0:
            raise InvalidArgument.field("resume_after_seq", "must not be negative")
        after, digest = request.resume_after_seq, None
        if request.resume_token:
            parsed = parse_resume_token(request.resume_token)
            if parsed is None:
                raise InvalidArgument.field("resume_token", "is not a token this service issued")
            if after not in (0, parsed[0]):
                raise InvalidArgument.field(
                    "resume_after_seq", f"must be 0 or the resume token's seq ({parsed[0]})"
                )
            after, digest = parsed
        heartbeat = self._settings.heartbeat_interval
        if request.HasField("heartbeat_interval"):
            heartbeat = request.heartbeat_interval.ToTimedelta().total_seconds()
            if not 0.1 <= heartbeat <= 300:
                raise InvalidArgument.field("heartbeat_interval", "must be between 0.1 s and 300 s")
        items = watch(
            self._hub,
            self._store,
            session_id,
            resume_after_seq=after,
            resume_digest=digest,
            heartbeat=heartbeat,
            coalesce_after=self._settings.watch_coalesce_after,
            stall_after=self._settings.stall_after,
        )
        with watching(self._metrics.watch_session):
            async for item in items:
                yield await self._watch_message(item)

    async def _watch_message(self, item: WatchItem) -> pb.WatchSessionResponse:
        if item.kind == "event":
            assert item.event is not None
            message = event_proto(item.event)
            message.resume_token = item.token
            return message
        now = convert.timestamp(dt.datetime.now(dt.UTC))
        if item.kind == "snapshot":
            assert item.snapshot is not None
            info = item.snapshot.session
            session = session_proto(
                info, snapshot=item.snapshot, cost_so_far=await self._cost_so_far(info)
            )
            return pb.WatchSessionResponse(
                seq=item.seq, event_time=now, snapshot=session, resume_token=item.token
            )
        return pb.WatchSessionResponse(
            seq=item.seq, event_time=now, heartbeat=pb.Heartbeat(), resume_token=item.token
        )

    # ------------------------------------------------------------ overview

    @staticmethod
    def _seconds(request: Any, name: str, default: float, low: float, v: Validator) -> float:
        if not request.HasField(name):
            return default
        seconds = getattr(request, name).ToTimedelta().total_seconds()
        if not low <= seconds <= OVERVIEW_MAX_SECONDS:
            v.add(name, f"must be between {low:g} s and 7 days")
        return seconds

    async def GetPipelineOverview(
        self, request: pb.GetPipelineOverviewRequest, context: Any
    ) -> pb.GetPipelineOverviewResponse:
        v = Validator()
        stall_after = self._seconds(request, "stall_after", self._settings.stall_after, 1, v)
        finished_within = self._seconds(
            request, "finished_within", OVERVIEW_FINISHED_WITHIN, 0, v
        )
        limits = {}
        for name in ("failure_limit", "stalled_limit"):
            value = getattr(request, name)
            if not 0 <= value <= OVERVIEW_LIST_MAX:
                v.add(name, f"must be between 0 and {OVERVIEW_LIST_MAX} (0: the default)")
            limits[name] = value or OVERVIEW_LIST_DEFAULT
        v.check()
        queues = [QUEUES[stage] for stage in STAGES]
        overview, broker = await asyncio.gather(
            self._store.overview(
                stall_after=stall_after,
                finished_within=finished_within,
                failure_limit=limits["failure_limit"],
                stalled_limit=limits["stalled_limit"],
            ),
            self._probe.view(queues) if self._probe is not None else asyncio.sleep(0),
        )
        costs = await asyncio.gather(*(self._cost_so_far(s.session) for s in overview.sessions))
        return overview_proto(overview, broker, costs, stall_after)

    # ------------------------------------------------------------ worker reports

    @staticmethod
    def _run_key(request: Any, v: Validator) -> tuple[str, str]:
        """The run a report is about; its task id is required (a run is known by it too)."""
        if not request.task_id:
            v.add("task_id", "is required")
        elif len(request.task_id) > MAX_NAME:
            v.add("task_id", f"must be at most {MAX_NAME} characters")
        document_id = ""
        if not request.document_id:
            v.add("document_id", "is required")
        else:
            document_id = _uuid_text(request.document_id, "document_id", v)
        stage = convert.stage_name(request.stage) if request.stage in (1, 2, 3) else ""
        if not stage:
            v.add("stage", "must be a stage (extract, chunk or entities)")
        if request.attempt < 1:
            v.add("attempt", "must be at least 1")
        if len(request.worker) > MAX_NAME:
            v.add("worker", f"must be at most {MAX_NAME} characters")
        return document_id, stage

    async def ReportStageStarted(
        self, request: pb.ReportStageStartedRequest, context: Any
    ) -> pb.ReportStageStartedResponse:
        v = Validator()
        document_id, stage = self._run_key(request, v)
        began = None
        if request.HasField("started_at"):
            try:
                began = convert.from_timestamp(request.started_at)
            except (ValueError, OverflowError):
                v.add("started_at", "is not a valid timestamp")
        v.check()
        outcome = await self._started.submit(
            StartedReport(
                document_id, stage, request.attempt, request.task_id, request.worker, began
            )
        )
        if not outcome.found:
            raise NotFound("stage run", f"{document_id}/{stage}/{request.attempt}")
        if outcome.release:
            await self._dispatcher.release([outcome.release])
        response = pb.ReportStageStartedResponse(proceed=outcome.proceed)
        if outcome.deadline is not None:
            response.lease_expires_at.CopyFrom(convert.timestamp(outcome.deadline))
        return response

    async def _apply_started(self, reports: list[StartedReport]) -> list[Any]:
        settings = self._settings
        return await self._store.apply_started(
            reports,
            limits=(settings.lease_base, settings.lease_per_mib, settings.time_limit_grace),
            lease_ttl=settings.lease_ttl,
        )

    async def ReportStageResult(
        self, request: pb.ReportStageResultRequest, context: Any
    ) -> pb.ReportStageResultResponse:
        v = Validator()
        document_id, stage = self._run_key(request, v)
        error_class = None
        if not request.succeeded:
            if request.error_class not in (pb.ERROR_CLASS_RETRYABLE, pb.ERROR_CLASS_PERMANENT):
                v.add("error_class", "a failure must say whether it is retryable or permanent")
            else:
                error_class = convert.enum_name(pb.ErrorClass, request.error_class, CLASS_PREFIX)
            if not request.error_message.strip():
                v.add("error_message", "a failure must carry its message")
        cost = None
        if request.HasField("cost"):
            try:
                cost = convert.parse_money(request.cost, "cost", places=convert.LEDGER_PLACES)
            except InvalidArgument as exc:
                for violation in exc.violations:
                    v.add(violation.field, violation.description)
            else:
                if cost >= convert.MAX_AMOUNT:
                    v.add("cost", f"must be less than {convert.MAX_AMOUNT:,}")
        for i, artifact in enumerate(request.artifacts):
            if not artifact.uri:
                v.add(f"artifacts[{i}].uri", "is required")
        duration = None
        if request.HasField("duration"):
            duration = request.duration.ToTimedelta().total_seconds()
            if not 0 <= duration < MAX_RUN_SECONDS:
                v.add("duration", f"must be at least 0 and less than {MAX_RUN_SECONDS:,} seconds")
        v.check()
        stats = request.stats
        report = ResultReport(
            document_id=document_id,
            stage=stage,
            attempt=request.attempt,
            task_id=request.task_id,
            worker=request.worker,
            succeeded=request.succeeded,
            error_class=error_class,
            error_code=request.error_code[:MAX_NAME],
            error_message=request.error_message[:MAX_ERROR_MESSAGE],
            artifacts=tuple(
                {"kind": a.kind, "uri": a.uri, "sha256": a.sha256, "size_bytes": a.size_bytes}
                for a in request.artifacts
            ),
            cache_hit=request.cache_hit,
            duration_seconds=duration,
            cost=cost,
            stats={
                "pages": stats.pages,
                "ocr_pages": stats.ocr_pages,
                "characters": stats.characters,
                "chunks": stats.chunks,
                "entities": stats.entities,
            },
        )
        outcome = await self._results.submit(report)
        run = f"{document_id}/{stage}/{request.attempt}"
        if not outcome.found:
            raise NotFound("stage run", run)
        if outcome.wrong_task:
            logger.warning("refused a result of run %s from task %s: not the run's task",
                           run, request.task_id[:80], extra={"document_id": document_id})
            raise PermissionDenied(
                f"stage run {run} was not dispatched as task {request.task_id[:80]!r}"
            )
        if outcome.stale:
            raise FailedPrecondition(
                f"stage run {run} is {outcome.stale}; its result was not applied"
                + (" (its cost was recorded)" if cost is not None else ""),
                subject=f"stage_runs/{run}",
            )
        if not outcome.replayed:
            self._metrics.stage_reported(
                stage, request.succeeded, error_class, request.cache_hit, duration
            )
        return pb.ReportStageResultResponse(
            replayed=outcome.replayed, document_state=_doc_state(outcome.document_state)
        )

    async def ReportStageResults(
        self, request: pb.ReportStageResultsRequest, context: Any
    ) -> pb.ReportStageResultsResponse:
        if not 1 <= len(request.reports) <= MAX_RESULTS:
            raise InvalidArgument.field("reports", f"must hold 1 to {MAX_RESULTS} reports")

        async def answer(report: pb.ReportStageResultRequest) -> pb.StageResultAnswer:
            try:
                # The generic checks the interceptor left to each report (INPUT_RULES).
                self._inputs.check(report)
                return pb.StageResultAnswer(result=await self.ReportStageResult(report, context))
            except DomainError as exc:
                if exc.code in _CALL_ERRORS:
                    raise
                return pb.StageResultAnswer(
                    code=exc.code.value[0], message=clip(exc.message, MAX_MESSAGE_BYTES)
                )

        # All submitted at once: the micro-batcher applies them in one transaction.
        answers = await asyncio.gather(*(answer(r) for r in request.reports))
        return pb.ReportStageResultsResponse(answers=answers)

    async def _apply_results(self, reports: list[ResultReport]) -> list[Any]:
        outcomes = await self._store.apply_results(
            reports,
            max_attempts=self._settings.max_attempts,
            backoff=(self._settings.retry_backoff_base, self._settings.retry_backoff_max),
        )
        settlements = [o.settle for o in outcomes if o.settle is not None]
        if settlements:
            task = asyncio.get_running_loop().create_task(self._dispatcher.settle(settlements))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        if any(o.found and not o.replayed and o.document_state == st.PENDING for o in outcomes):
            self._dispatcher.wake()
        return outcomes

    async def drain(self) -> None:
        """Waits for settlements still being sent (at shutdown)."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=5)

    async def close(self) -> None:
        """At shutdown, after the server stopped: drains, then gives back held connections."""
        await self.drain()
        await self._store.close()

    # ------------------------------------------------------------ verify

    async def VerifySession(
        self, request: pb.VerifySessionRequest, context: Any
    ) -> pb.VerifySessionResponse:
        session_id = self._session_id(request.session_id)
        with bind(session_id=session_id):
            report = await self._verifier.verify(session_id, deep=request.deep)
        return verify_proto(report)
