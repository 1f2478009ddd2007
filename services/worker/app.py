"""The Celery app of the worker: its configuration and one task per stage.

Owns the consumer side of the contract in `services.common.tasks`: tasks
`docimport.extract`, `docimport.chunk` and `docimport.entities` on queues of
the same names, each taking one positional argument (a StagePayload JSON
object). The session service is the only publisher; nothing here publishes
(no chaining, no `apply_async`, no `self.retry`, which would republish).

Delivery settings follow from "a message may be lost or delivered twice":
json only; `acks_late` with `reject_on_worker_lost` (a task whose process
dies is redelivered rather than lost) and prefetch 1 (a long OCR task never
holds others hostage); the Redis `visibility_timeout` longer than any task;
no result backend (outcomes go to the session service over gRPC). Events are
on (`-E`, `task_send_sent_event`) for Flower. Per-message `time_limit` /
`soft_time_limit` set by the session service override the defaults here.

Observability: Flower shows a task's `argsrepr` (session, document, stage
and attempt, set by the session service) and its result (which starts with
the session and document ids). From `task_prerun` to `task_postrun` every
log line of the process - Celery's own "succeeded"/"failed" lines included -
carries the session id, document id and task id (`bind_task_logs`); the
trace id comes from the span of the Celery instrumentation, which continues
the trace the session service put in the message headers.

Each worker process builds its `StageRunner` (channels, OCR engine, artifact
store) on its first task, after any fork; `create_app` accepts a ready
runner factory for tests.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Celery, signals
from kombu import Exchange, Queue

from services.common import logging as jsonlog
from services.common.tasks import QUEUES, STAGES, TASK_NAMES
from services.worker import control
from services.worker.config import WorkerSettings
from services.worker.metrics import WorkerMetrics
from services.worker.runner import StageRunner, worker_name

if TYPE_CHECKING:
    from services.worker.artifacts import ArtifactStore
    from services.worker.stages import Stage


def build_runner(
    settings: WorkerSettings,
    metrics: WorkerMetrics | None = None,
    *,
    stages: Callable[[ArtifactStore], dict[str, Stage]] | None = None,
) -> StageRunner:
    """The production runner: store and OCR engine from settings, real gRPC stubs.

    `stages` replaces the real stages (made from the store), e.g. by no-op ones in the
    end-to-end benchmark; everything else is as in production.
    """
    from services.worker.artifacts import open_store
    from services.worker.journal import Journal
    from services.worker.reporting import Reporter

    store = open_store(settings.store_url)
    return StageRunner(
        stages=(stages or functools.partial(real_stages, settings))(store),
        store=store,
        reporter=Reporter(settings),
        metrics=metrics,
        started_after=settings.started_after,
        background_deliveries=settings.background_deliveries,
        delivery_linger=settings.delivery_linger,
        journal=Journal(settings.effective_outbox_dir),
        outbox_max_age=settings.outbox_max_age,
    )


def real_stages(settings: WorkerSettings, store: ArtifactStore) -> dict[str, Stage]:
    """extract (with the OCR engine the settings choose), chunk and entities."""
    from services.worker.processors.extract import Extractor
    from services.worker.processors.ocr import select_engine
    from services.worker.stages import ChunkStage, EntitiesStage, ExtractStage

    engine = select_engine(
        settings.ocr_engine,
        threads=settings.effective_ocr_threads,
        tesseract_cmd=settings.tesseract_cmd,
        tesseract_lang=settings.tesseract_lang,
        dpi=settings.ocr_dpi,
        textract_region=settings.textract_region,
    )
    extractor = Extractor(engine, dpi=settings.ocr_dpi)
    return {
        "extract": ExtractStage(extractor),
        "chunk": ChunkStage(
            store, extractor, size=settings.chunk_size, overlap=settings.chunk_overlap
        ),
        "entities": EntitiesStage(store, extractor),
    }


class _LazyRunner:
    """One runner per process, built on first use (after a prefork fork)."""

    def __init__(self, factory: Callable[[], StageRunner]) -> None:
        self._factory = factory
        self._runner: StageRunner | None = None
        self._lock = threading.Lock()

    def get(self) -> StageRunner:
        with self._lock:
            if self._runner is None:
                self._runner = self._factory()
            return self._runner

    def drain(self, timeout: float) -> None:
        """Delivers the runs this process's runner still holds (see outbox), if it has one."""
        with self._lock:
            runner = self._runner
        if runner is not None:
            runner.drain(timeout)


# Seconds a process about to exit waits for its delivery thread (see outbox); the pods'
# terminationGracePeriodSeconds leaves 60 s after the longest task's hard limit.
DRAIN_SECONDS = 30.0

_STAGE_TASKS = frozenset(TASK_NAMES.values())
# task id -> the log context token to reset at postrun (one entry per running task).
_log_tokens: dict[str, Any] = {}


def _bind_task_logs(task_id: str | None = None, task: Any = None, args: Any = None,
                    **_: Any) -> None:
    if task_id is None or getattr(task, "name", None) not in _STAGE_TASKS:
        return
    payload = args[0] if args and isinstance(args[0], dict) else {}
    _log_tokens[task_id] = jsonlog.push(
        session_id=payload.get("session_id"),
        document_id=payload.get("document_id"),
        stage=payload.get("stage"),
        task_id=task_id,
    )


def _unbind_task_logs(task_id: str | None = None, **_: Any) -> None:
    token = _log_tokens.pop(task_id, None) if task_id is not None else None
    if token is not None:
        jsonlog.pop(token)


def bind_task_logs() -> None:
    """Log lines inside a stage task carry its session, document and task ids (once per process)."""
    signals.task_prerun.connect(_bind_task_logs, weak=False, dispatch_uid="docimport-log-bind")
    signals.task_postrun.connect(_unbind_task_logs, weak=False, dispatch_uid="docimport-log-unbind")


def configure(app: Celery, settings: WorkerSettings) -> None:
    app.conf.update(
        broker_url=settings.broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_time_limit=settings.default_time_limit,
        task_soft_time_limit=settings.default_soft_time_limit,
        task_queues=[
            Queue(QUEUES[stage], Exchange(QUEUES[stage], type="direct"), routing_key=QUEUES[stage])
            for stage in STAGES
        ],
        task_routes={TASK_NAMES[stage]: {"queue": QUEUES[stage]} for stage in STAGES},
        task_default_queue=QUEUES["extract"],
        task_create_missing_queues=False,
        worker_max_tasks_per_child=settings.max_tasks_per_child or None,
        worker_max_memory_per_child=settings.max_memory_per_child * 1024 or None,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
    )


def create_app(
    settings: WorkerSettings,
    *,
    runner_factory: Callable[[], StageRunner] | None = None,
    metrics: WorkerMetrics | None = None,
) -> Celery:
    """A configured Celery app with the three stage tasks registered.

    `metrics` (one per process: see `metrics`) is given to the production
    runner; a `runner_factory` brings its own.
    """
    app = Celery("docimport-worker", set_as_current=False)
    configure(app, settings)
    bind_task_logs()
    runner = _LazyRunner(runner_factory or (lambda: build_runner(settings, metrics)))

    def register(stage: str) -> None:
        @app.task(
            name=TASK_NAMES[stage],
            shared=False,  # bound to this app only: each app has its own runner
            bind=True,
            queue=QUEUES[stage],
            acks_late=True,
            reject_on_worker_lost=True,
            ignore_result=True,
            max_retries=0,
            typing=False,
        )
        def run_stage(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
            return runner.get().run(
                payload,
                task_id=self.request.id,
                worker=worker_name(self.request.hostname),
                stage=stage,
                redelivered=bool((self.request.delivery_info or {}).get("redelivered")),
            )

    for stage in STAGES:
        register(stage)
    app.docimport_runner = runner  # type: ignore[attr-defined]
    control.install(settings.effective_outbox_dir if settings.background_deliveries else None)

    def deliver_left_runs(**_: Any) -> None:
        # A process that runs tasks starts delivering at once: finished runs a killed process
        # left in the outbox journal are delivered even if no task comes (see outbox). In a
        # thread: building the runner (its OCR engine) may outlast Celery's patience with a
        # pool process's start.
        threading.Thread(
            target=lambda: runner.get().start_deliveries(), name="start-deliveries", daemon=True
        ).start()

    if settings.background_deliveries:
        signals.worker_process_init.connect(deliver_left_runs, weak=False)
        if settings.pool != "prefork":
            signals.worker_ready.connect(deliver_left_runs, weak=False)

    def deliver_before_exit(**_: Any) -> None:
        # A prefork child (recycled, or at a warm shutdown) or a solo/threads worker.
        runner.drain(DRAIN_SECONDS)

    signals.worker_process_shutdown.connect(deliver_before_exit, weak=False)
    signals.worker_shutdown.connect(deliver_before_exit, weak=False)
    if settings.health_port:
        from services.worker import health

        app.docimport_health = health.install(  # type: ignore[attr-defined]
            app, host="0.0.0.0", port=settings.health_port
        )
    return app
