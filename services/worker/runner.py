"""One stage of one document, start to finish: the body of every Celery task.

Owns the protocol a run follows with the services:

1. `ReportStageStarted`; if the session service answers proceed=false (the
   run was cancelled, superseded or is done), stop without doing anything.
   A run may skip this and start at once when its run cannot have been
   superseded yet: its message was not redelivered (by a worker that died
   holding it) and its first lease has more than `START_MARGIN` seconds to
   go (`start_unasked_until` in the payload; a lease only runs out unseen
   for the session service's `lease_ttl`). It then reports its start, with
   the time it began, from a watch thread of the runner's own only if it is
   still working `started_after` seconds later (one round trip instead of
   two for the many short runs). If that late answer is no (the session was
   cancelled), the run stops at its next deadline check, nothing is stored,
   and what it did is charged and reported as `not_wanted`; a paused
   session lets a run already under way finish.
2. Look the output up in the artifact store by (sha256, stage, processor
   version). A hit does no work and costs nothing: its cost events carry
   `cache_hit=True` and the units the original run used (kept in the
   artifact), so the cost service can report what the cache `saved`. A miss
   runs the stage and stores its artifact (with the background delivery, a
   local put leaves its fsyncs to the delivery thread's one `sync()` for
   several runs; a put that fails makes the run a retryable `io_error`).
3. Deliver (services/worker/delivery.py): `RecordCosts` (kind ACTUAL) and
   the result. By default (`background_deliveries` > 0) the task writes
   its run to the outbox (durable: services/worker/outbox.py, journal.py)
   and returns; the process's delivery thread delivers the runs that
   finished meanwhile together and tries again, with backoff, until the
   session service answers for each. Otherwise the task delivers its own
   run and fails when that fails (its lease then runs out).
   The cost events: CPU seconds of the run as local/compute_second
   (`time.process_time`, which in a prefork child is this task's CPU,
   onnxruntime's threads included), Textract pages as aws_textract/ocr_page,
   S3 requests as s3/get_request and put_request. Work done before a
   failure is charged too. Local OCR is charged through its CPU seconds
   (the price book has no local per-page price). The ledger key (session,
   document, stage, attempt, service, operation, kind) makes a replay free.
   The result: artifacts, stats, duration, the run's RecordCosts total,
   and on failure the error class (PERMANENT for corrupt, encrypted,
   unsupported, empty...; RETRYABLE otherwise), code and message.

A worker never enqueues anything and never retries a run itself: failures
are reported and the session service decides. The run stops cooperatively
at its deadline (the earlier of the payload's `lease_seconds` and the
deadline ReportStageStarted returns).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import grpc
from billiard.exceptions import SoftTimeLimitExceeded
from docimport.cost.v1 import cost_service_pb2
from docimport.session.v1 import session_service_pb2

from services.common import convert, telemetry
from services.common.logging import bind
from services.common.tasks import StagePayload
from services.worker.artifacts import ArtifactRef, ArtifactStore
from services.worker.delivery import Deliverer, Delivery
from services.worker.journal import Journal
from services.worker.outbox import Outbox
from services.worker.processors.base import (
    Deadline,
    PermanentError,
    RetryableError,
    StageError,
    Usage,
)
from services.worker.reporting import Reporter
from services.worker.stages import ARTIFACT_KINDS, Stage

if TYPE_CHECKING:
    from services.worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

COMPUTE = ("local", "compute_second")
OCR_PAGE = "ocr_page"
# Engines whose pages are priced per page; local engines are priced by CPU time.
PER_PAGE_OCR_SERVICES = frozenset({"aws_textract"})
MAX_MESSAGE = 2000
# Seconds before its first lease ends (the payload's `start_unasked_until`) a run still
# starts without asking: clock skew between the session service and this worker.
START_MARGIN = 10.0
_MICRO = Decimal("0.000001")
# Session-service answers to ReportStageStarted that mean "this run is not wanted".
_NOT_WANTED = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)


@dataclass
class RunOutcome:
    """What a run did; returned by the task (results are not stored) and logged."""

    proceed: bool
    succeeded: bool = False
    cache_hit: bool = False
    error_code: str = ""
    artifacts: list[ArtifactRef] = field(default_factory=list)
    cost: str = ""
    stats: dict[str, int] = field(default_factory=dict)
    permanent: bool = False
    # Wall time of the stage work (what is reported as the run's duration).
    seconds: float = 0.0
    # Handed to the delivery thread: artifacts and cost are not known when the task returns.
    queued: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "proceed": self.proceed,
            "succeeded": self.succeeded,
            "cache_hit": self.cache_hit,
            "error_code": self.error_code,
            "artifacts": [a.uri for a in self.artifacts],
            "cost": self.cost,
            "stats": self.stats,
            **({"delivery": "queued"} if self.queued else {}),
        }


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _stage_error(exc: BaseException, stage: str) -> StageError:
    """What a failure of a run's work is reported as: its own class, else retryable."""
    if isinstance(exc, StageError):
        return exc
    if isinstance(exc, SoftTimeLimitExceeded) or _caused_by(exc, SoftTimeLimitExceeded):
        # Libraries may wrap the soft limit (rapidocr raises ONNXRuntimeError from it).
        return RetryableError("time_limit", "the task hit its soft time limit")
    if isinstance(exc, OSError):
        logger.warning("I/O error in stage %s", stage, exc_info=exc)
        return RetryableError("io_error", f"{type(exc).__name__}: {exc}")
    logger.error("stage %s failed unexpectedly", stage, exc_info=exc)
    return RetryableError("internal", f"{type(exc).__name__}: {exc}")


def worker_name(hostname: str | None = None) -> str:
    """`celery@host:pid`, as reported in `worker` fields (at most 200 characters)."""
    name = f"{hostname or socket.gethostname()}"[:180]
    return f"{name}:{os.getpid()}"


def _readable(data: bytes) -> dict[str, Any] | None:
    """The artifact's JSON object, or None when it is damaged."""
    try:
        body = json.loads(data)
    except ValueError:
        return None
    return body if isinstance(body, dict) and "stats" in body else None


def _units(value: float | int | Decimal) -> str:
    if isinstance(value, int):
        return str(max(value, 0))
    amount = Decimal(value) if not isinstance(value, float) else Decimal(f"{value:.6f}")
    return format(max(amount, Decimal(0)).quantize(_MICRO), "f")


class StageRunner:
    """Runs tasks' payloads against the stages, the store and the services."""

    def __init__(
        self,
        *,
        stages: dict[str, Stage],
        store: ArtifactStore,
        reporter: Reporter,
        metrics: WorkerMetrics | None = None,
        started_after: float = 0.0,
        background_deliveries: int = 0,
        delivery_linger: float = 0.0,
        journal: Journal | None = None,
        outbox_max_age: float = 7 * 24 * 3600.0,
    ) -> None:
        self.stages = stages
        self.store = store
        self.reporter = reporter
        self.deliverer = Deliverer(store, reporter)
        # The outbox's durable half (finished runs survive this process); None: memory only.
        self.journal = journal
        self.outbox_max_age = outbox_max_age
        self.metrics = metrics
        # Seconds a run works before it reports its start (0: it reports first; see step 1).
        self.started_after = started_after
        # Runs a process may hand to its delivery thread (see outbox); 0: each task delivers
        # its own run before it returns.
        self.background_deliveries = background_deliveries
        self.delivery_linger = delivery_linger
        self._outbox: Outbox | None = None
        self._outbox_lock = threading.Lock()  # the threads pool's tasks share the runner
        self._starts: _StartWatch | None = None

    def run(
        self,
        payload_json: dict[str, Any],
        *,
        task_id: str,
        worker: str,
        stage: str,
        redelivered: bool = False,
    ) -> dict[str, Any]:
        """Runs one task; `redelivered`: its message came back from a worker that did not
        acknowledge it (Celery's delivery_info), so its run may have been superseded."""
        try:
            payload = StagePayload.from_json(payload_json)
        except (TypeError, ValueError, AttributeError) as exc:
            # Without a document id nothing can be reported: the lease will expire.
            logger.error("malformed stage payload dropped: %s", exc, extra={"task_id": task_id})
            return RunOutcome(proceed=False, error_code="bad_payload").summary()
        with bind(session_id=payload.session_id, document_id=payload.document_id):
            try:
                outcome = self._run(
                    payload,
                    task_id=task_id,
                    worker=worker,
                    task_stage=stage,
                    redelivered=redelivered,
                )
            except BaseException:
                if self.metrics is not None:
                    self.metrics.failed(payload.stage)
                raise
            if self.metrics is not None:
                self.metrics.finished(payload.stage, outcome)
            logger.info(
                "stage %s attempt %d %s",
                payload.stage,
                payload.attempt,
                "skipped"
                if not outcome.proceed
                else ("succeeded" if outcome.succeeded else "failed"),
                extra={"stage": payload.stage, "task_id": task_id, **outcome.summary()},
            )
            # The task's result: Flower shows it on the task's page, ids first.
            return {
                "session_id": payload.session_id,
                "document_id": payload.document_id,
                "stage": payload.stage,
                "attempt": payload.attempt,
                **outcome.summary(),
            }

    # -- the protocol -------------------------------------------------------

    def _run(
        self,
        payload: StagePayload,
        *,
        task_id: str,
        worker: str,
        task_stage: str,
        redelivered: bool = False,
    ) -> RunOutcome:
        stage_enum = convert.stage_value(payload.stage) if payload.stage in ARTIFACT_KINDS else 0
        # the run's key, as both reports give it
        run_key = {
            "document_id": payload.document_id,
            "stage": stage_enum,
            "attempt": payload.attempt,
            "task_id": task_id,
            "worker": worker,
        }
        start = session_service_pb2.ReportStageStartedRequest(**run_key)
        started = None
        if not self._may_start_unasked(payload, redelivered):
            started = _ask_start(self.reporter, start)
            if started is None or not started.proceed:
                return RunOutcome(proceed=False)

        deadline = Deadline(self._lease_left(payload, started))
        late = None if started is not None else self._start_watch().begin(start, deadline)
        wall_start = time.monotonic()
        cpu_start = time.process_time()
        self.store.take_requests()  # forget anything counted before this run
        usage = Usage()
        outcome = RunOutcome(proceed=True)
        stored_usage: dict[str, Any] | None = None
        error: StageError | None = None
        store_artifact: Callable[[], ArtifactRef] | None = None  # a put still to be done
        try:
            if task_stage != payload.stage or payload.stage not in self.stages:
                raise PermanentError(
                    "bad_payload",
                    f"task for stage {task_stage!r} got a payload for {payload.stage!r}",
                )
            stage = self.stages[payload.stage]
            prepared = stage.prepare(payload)
            hit = self.store.get(payload.sha256, stage.name, prepared.version)
            body = _readable(hit.data) if hit is not None else None
            if hit is not None and body is None:
                logger.error("cached artifact %s is unreadable; redoing the stage", hit.ref.uri)
            if hit is not None and body is not None:
                outcome.cache_hit = True
                outcome.artifacts = [hit.ref]
                outcome.stats = {k: int(v) for k, v in body.get("stats", {}).items()}
                stored_usage = body.get("usage", {})
            else:
                run_cpu = time.process_time()
                output = stage.run(payload, prepared, usage, deadline)
                body = {
                    "schema": 1,
                    "stage": stage.name,
                    "kind": ARTIFACT_KINDS[stage.name],
                    "processor": {"name": stage.processor, "version": prepared.version},
                    "source_sha256": payload.sha256,
                    "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "stats": output.stats,
                    "usage": {
                        "compute_seconds": _units(time.process_time() - run_cpu),
                        "ocr_pages": usage.ocr_pages,
                    },
                    **output.body,
                }
                data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
                outcome.stats = dict(output.stats)
                put = functools.partial(
                    self.store.put,
                    payload.sha256, stage.name, prepared.version, data, replace=hit is not None,
                )
                if self.store.bills_requests:
                    # the put is a billed request: store first, so that the cost events count it
                    outcome.artifacts = [put()]
                else:
                    store_artifact = put
            outcome.succeeded = True
        except Exception as exc:  # noqa: BLE001 - every failure is reported (see _stage_error)
            error = _stage_error(exc, payload.stage)

        refused = late is not None and self._start_watch().finish(late)
        cpu_seconds = time.process_time() - cpu_start
        outcome.seconds = time.monotonic() - wall_start
        if refused:
            # No longer wanted (its session was cancelled): nothing is stored; what it did is
            # charged, reported as a failure the session service refuses.
            outcome, store_artifact = RunOutcome(proceed=False, seconds=outcome.seconds), None
            error = RetryableError("not_wanted", "the session service stopped this run")
        needs_sync = False
        if store_artifact is not None and error is None:
            background = self.background_deliveries > 0
            try:  # its fsyncs are left to the delivery thread's one sync for several runs
                outcome.artifacts = [store_artifact(durable=not background)]
                needs_sync = background
            except Exception as exc:  # noqa: BLE001 - reported like a failure of the stage
                outcome.succeeded, outcome.artifacts = False, []
                error = _stage_error(exc, payload.stage)
        events = self._cost_events(payload, stage_enum, cpu_seconds, usage, stored_usage)
        if error is not None:
            outcome.succeeded = False
            outcome.error_code, outcome.permanent = error.code, error.permanent
            outcome.stats.setdefault("ocr_pages", usage.total_ocr_pages)
        delivery = Delivery(
            task_id,
            payload.session_id,
            payload.document_id,
            payload.stage,
            self._result_request(run_key, payload.stage, outcome, error),
            events,
            needs_sync=needs_sync,
            traceparent=telemetry.current_traceparent(),
            context=contextvars.copy_context(),
        )
        if self.background_deliveries > 0:
            # Step 3 from the process's delivery thread (see outbox).
            outcome.queued = True
            self._outbox_of_process().put(delivery)
        elif self.deliverer.deliver([delivery]):
            raise RuntimeError(f"could not deliver the result of run {task_id}; see the log")
        return outcome

    # -- delivery: the put, the costs and the result -------------------------

    @staticmethod
    def _result_request(
        run_key: dict[str, Any], stage: str, outcome: RunOutcome, error: StageError | None
    ) -> session_service_pb2.ReportStageResultRequest:
        """The run's result, without its cost (known once its events are recorded)."""
        request = session_service_pb2.ReportStageResultRequest(
            **run_key,
            succeeded=error is None,
            cache_hit=outcome.cache_hit,
            duration=convert.duration(Decimal(f"{outcome.seconds:.6f}")),
            stats=session_service_pb2.StageStats(
                **{
                    k: int(v)
                    for k, v in outcome.stats.items()
                    if k in ("pages", "ocr_pages", "characters", "chunks", "entities")
                }
            ),
            artifacts=[
                session_service_pb2.Artifact(
                    kind=ARTIFACT_KINDS.get(stage, ""),
                    uri=a.uri,
                    sha256=a.sha256,
                    size_bytes=a.size_bytes,
                )
                for a in outcome.artifacts
            ],
        )
        if error is not None:
            request.error_class = (
                session_service_pb2.ERROR_CLASS_PERMANENT
                if error.permanent
                else session_service_pb2.ERROR_CLASS_RETRYABLE
            )
            # text from a library or a file: Postgres text cannot hold a NUL (the session service
            # refuses a report carrying one), so it is dropped here
            request.error_code = error.code.replace("\x00", "")
            request.error_message = error.message.replace("\x00", "")[:MAX_MESSAGE]
        return request

    def drain(self, timeout: float | None = None) -> bool:
        """Delivers every run handed to the delivery thread and stops it (a process about to
        exit: no run may be handed over after this); False if some were left after `timeout`
        seconds."""
        if self._outbox is None:
            return True
        return self._outbox.close(timeout)

    # -- helpers --------------------------------------------------------------

    def _start_watch(self) -> _StartWatch:
        """The watch that reports the start of runs that last (made on first use)."""
        if self._starts is None:
            self._starts = _StartWatch(self.reporter, self.started_after)
        return self._starts

    def start_deliveries(self) -> None:
        """Starts this process's delivery thread (it adopts runs dead processes left)."""
        if self.background_deliveries > 0:
            self._outbox_of_process().start()

    def _outbox_of_process(self) -> Outbox:
        """The delivery thread's queue (made on first use, in the process that runs tasks)."""
        with self._outbox_lock:
            if self._outbox is None:
                self._outbox = Outbox(
                    self.deliverer.deliver,
                    self.journal,
                    max_pending=self.background_deliveries,
                    linger=self.delivery_linger,
                    max_age=self.outbox_max_age,
                )
            return self._outbox

    def _may_start_unasked(self, payload: StagePayload, redelivered: bool) -> bool:
        """True when a run may work before it reports its start (step 1)."""
        until = _expiry(payload.start_unasked_until)
        if self.started_after <= 0 or redelivered or until is None:
            return False
        return (until - dt.datetime.now(dt.UTC)).total_seconds() > START_MARGIN

    @staticmethod
    def _lease_left(
        payload: StagePayload, started: session_service_pb2.ReportStageStartedResponse | None
    ) -> float:
        """Seconds the run may take: the earlier lease, less a margin for the reports."""
        left = float(payload.lease_seconds or 0) or 600.0
        expires = (
            convert.from_timestamp(started.lease_expires_at)
            if started is not None and started.HasField("lease_expires_at")
            else None
        )
        if expires is not None:
            left = min(left, (expires - dt.datetime.now(dt.UTC)).total_seconds())
        return max(1.0, left - min(30.0, 0.1 * max(left, 0.0)))

    def _cost_events(
        self,
        payload: StagePayload,
        stage_enum: int,
        cpu_seconds: float,
        usage: Usage,
        stored_usage: dict[str, Any] | None,
    ) -> list[cost_service_pb2.CostEvent]:
        now = convert.timestamp(dt.datetime.now(dt.UTC))
        cache_hit = stored_usage is not None

        def event(
            service: str, operation: str, units: str, hit: bool = False
        ) -> cost_service_pb2.CostEvent:
            return cost_service_pb2.CostEvent(
                session_id=payload.session_id,
                document_id=payload.document_id,
                stage=stage_enum,
                attempt=payload.attempt,
                service=service,
                operation=operation,
                units=units,
                kind=cost_service_pb2.COST_KIND_ACTUAL,
                category=payload.category,
                grant=payload.grant,
                cache_hit=hit,
                occurred_at=now,
            )

        events: list[cost_service_pb2.CostEvent] = []
        if stored_usage is not None:
            # The work the cache saved, at what it took the first time.
            events.append(
                event(
                    *COMPUTE, _units(Decimal(str(stored_usage.get("compute_seconds", "0")))), True
                )
            )
            for service, pages in sorted(dict(stored_usage.get("ocr_pages", {})).items()):
                if service in PER_PAGE_OCR_SERVICES and int(pages):
                    events.append(event(service, OCR_PAGE, _units(int(pages)), True))
        else:
            events.append(event(*COMPUTE, _units(cpu_seconds)))
            for service, pages in sorted(usage.ocr_pages.items()):
                if service in PER_PAGE_OCR_SERVICES and pages:
                    events.append(event(service, OCR_PAGE, _units(pages)))
        for (service, operation), count in sorted(self.store.take_requests().items()):
            if count:
                events.append(event(service, operation, _units(count)))
        if cache_hit:
            logger.debug("cache hit: %d saved-cost events", len(events))
        return events


class _LateStart:
    """One run's start, reported by `_StartWatch` if the run lasts; `finish()` when its work ends."""

    __slots__ = ("answered", "deadline", "due", "refused", "request")

    def __init__(
        self,
        request: session_service_pb2.ReportStageStartedRequest,
        deadline: Deadline,
        due: float,
    ) -> None:
        request.started_at.CopyFrom(convert.timestamp(dt.datetime.now(dt.UTC)))
        self.request, self.deadline, self.due = request, deadline, due
        self.refused = False
        self.answered = threading.Event()


class _StartWatch:
    """Reports the start of runs still working `after` seconds after they began.

    One daemon thread per process (made on first use, so in the process that
    runs tasks) looks at the runs under way every tenth of `after` or so: a
    run that ends before its start is due costs a set entry and no
    thread switch. The report carries the time the run began; a refusal
    stops the run at its next deadline check. A report that cannot be
    delivered is logged and forgotten: the run's result, reported next,
    settles the run.
    """

    def __init__(self, reporter: Reporter, after: float) -> None:
        self._reporter = reporter
        self._after = after
        self._tick = min(max(after / 10, 0.01), 0.5)
        self._lock = threading.Lock()
        self._runs: set[_LateStart] = set()  # under way, start not yet taken to be reported
        self._thread: threading.Thread | None = None

    def begin(
        self, request: session_service_pb2.ReportStageStartedRequest, deadline: Deadline
    ) -> _LateStart:
        run = _LateStart(request, deadline, time.monotonic() + self._after)
        with self._lock:
            self._runs.add(run)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=contextvars.copy_context().run,
                    args=(self._watch,),
                    name="report-started",
                    daemon=True,
                )
                self._thread.start()
        return run

    def finish(self, run: _LateStart) -> bool:
        """True when the session service said it no longer wants the run."""
        with self._lock:
            taken = run not in self._runs  # the watch is reporting, or has reported, its start
            self._runs.discard(run)
        if taken:
            run.answered.wait()
        return run.refused

    def _watch(self) -> None:
        while True:
            time.sleep(self._tick)
            now = time.monotonic()
            with self._lock:
                due = [run for run in self._runs if run.due <= now]
                self._runs.difference_update(due)
            for run in due:
                try:
                    self._report(run)
                finally:
                    run.answered.set()

    def _report(self, run: _LateStart) -> None:
        try:
            started = _ask_start(self._reporter, run.request)
        except grpc.RpcError as exc:
            logger.warning("could not report the run's start: %s: %s", exc.code(), exc.details())
            return
        except Exception:  # the watch thread must go on; the result will follow
            logger.exception("could not report the run's start")
            return
        if started is None or not started.proceed:
            run.refused = True
            run.deadline.stop(RetryableError("not_wanted", "the session service stopped this run"))


def _ask_start(
    reporter: Reporter, request: session_service_pb2.ReportStageStartedRequest
) -> session_service_pb2.ReportStageStartedResponse | None:
    """The session service's answer to a run's start; None when it refused the run outright
    (an answer in `_NOT_WANTED`, logged). Any other gRPC error is raised."""
    try:
        return reporter.stage_started(request)
    except grpc.RpcError as exc:
        if exc.code() not in _NOT_WANTED:
            raise
        logger.warning("session service refused the run: %s: %s", exc.code(), exc.details())
        return None


def _expiry(value: str | dt.datetime | None) -> dt.datetime | None:
    """A message's `expires` (ISO 8601 text or a datetime) as an aware datetime; None if unknown."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, dt.datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
