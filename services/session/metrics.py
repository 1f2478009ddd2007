"""The session service's Prometheus metrics (on top of `services.common.metrics`).

Owns these families:

- `docimport_sessions{state}` and `docimport_documents{session_state,state}`:
  read on scrape from the per-session counters of `session.import_sessions`
  (kept in the same transaction as each document change, so they are
  exactly what users see), one grouped query over the sessions table;
- `docimport_documents_stalled`: queued or running documents of active
  sessions with no progress for `DOCIMPORT_STALL_AFTER` seconds, read on
  scrape through the (session_id, state) index, so its cost is bounded by
  the documents in flight;
- `docimport_queue_messages{queue}`: messages waiting in each Celery queue,
  read from the broker on scrape (`queue.QueueDepths`);
- `docimport_dispatched_total{stage}` and
  `docimport_dispatch_failures_total`: stage runs published (the dispatch
  rate is its `rate()`), counted by the dispatcher after each batch;
- `docimport_stage_duration_seconds{stage}` and
  `docimport_stage_results_total{stage,outcome}`: the worker-reported
  duration and outcome of each stage run, counted once per run (replayed
  reports are not), on the ReportStageResult hot path: every child is
  bound here once, so an update is two dict lookups and two increments;
- `docimport_watchers{stream="WatchSession"}`: open progress streams.

No SQL here (the store answers `metric_counts`) and no Celery (the
broker is read through `queue.QueueDepths`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from services.common.metrics import STAGE_BUCKETS, ServiceMetrics, family
from services.common.tasks import QUEUES, STAGES
from services.session import states as st

logger = logging.getLogger(__name__)

OUTCOMES = ("succeeded", "failed_retryable", "failed_permanent")



def _sessions_family() -> Any:
    return family("gauge", "docimport_sessions", "Import sessions by state.", ["state"])


def _documents_family() -> Any:
    return family(
        "gauge",
        "docimport_documents",
        "Documents by document state and by the state of their session.",
        ["session_state", "state"],
    )


def _stalled_family() -> Any:
    return family(
        "gauge",
        "docimport_documents_stalled",
        "Queued or running documents of active sessions with no progress past the stall threshold.",
    )


def _queue_family() -> Any:
    return family("gauge", "docimport_queue_messages", "Messages waiting in each Celery queue.",
                  ["queue"])


class QueueCollector(Collector):
    """`docimport_queue_messages`, read from the broker at each scrape."""

    def __init__(self, read: Callable[[], Mapping[str, int]], errors: Any) -> None:
        self._read = read
        self._errors = errors

    def describe(self) -> Iterable[Metric]:
        return [_queue_family()]

    def collect(self) -> Iterable[Metric]:
        try:
            depths = self._read()
        except Exception:  # noqa: BLE001 - a broker outage must not fail the scrape
            self._errors.inc()
            logger.warning("reading the Celery queue depths failed", exc_info=True)
            return []
        metric = _queue_family()
        for queue in QUEUES.values():
            metric.add_metric([queue], float(depths.get(queue, 0)))
        return [metric]


class SessionMetrics(ServiceMetrics):
    """The session service's registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        dispatched = Counter(
            "docimport_dispatched", "Stage runs published to Celery, by stage.", ["stage"],
            registry=r,
        )
        self.dispatched = {stage: dispatched.labels(stage) for stage in STAGES}
        self.dispatch_failures = Counter(
            "docimport_dispatch_failures",
            "Stage runs whose publish failed (put back and dispatched again).",
            registry=r,
        )
        duration = Histogram(
            "docimport_stage_duration_seconds",
            "Duration of stage runs as reported by the workers (each run counted once).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.stage_duration = {stage: duration.labels(stage) for stage in STAGES}
        results = Counter(
            "docimport_stage_results",
            "Stage runs reported by the workers, by outcome (each run counted once).",
            ["stage", "outcome"],
            registry=r,
        )
        self.stage_results = {
            (stage, outcome): results.labels(stage, outcome)
            for stage in STAGES
            for outcome in OUTCOMES
        }
        cache_hits = Counter(
            "docimport_stage_cache_hits",
            "Stage runs answered from the artifact cache, by stage.",
            ["stage"],
            registry=r,
        )
        self.cache_hits = {stage: cache_hits.labels(stage) for stage in STAGES}
        self.watch_session = self.watchers.labels("WatchSession")

    # ---------------------------------------------------------------- hot path

    def stage_reported(
        self, stage: str, succeeded: bool, error_class: str | None, cache_hit: bool,
        duration: float | None,
    ) -> None:
        """One stage run's first result report (O(1): bound children only)."""
        if succeeded:
            outcome = "succeeded"
        elif error_class == "permanent":
            outcome = "failed_permanent"
        else:
            outcome = "failed_retryable"
        self.stage_results[(stage, outcome)].inc()
        if cache_hit:
            self.cache_hits[stage].inc()
        if duration is not None:
            self.stage_duration[stage].observe(duration)

    def published(self, stages: Iterable[str]) -> None:
        counts: dict[str, int] = {}
        for stage in stages:
            counts[stage] = counts.get(stage, 0) + 1
        for stage, count in counts.items():
            self.dispatched[stage].inc(count)

    # -------------------------------------------------------------- scrape-time

    def watch_database(self, store: Any, *, stall_after: float) -> None:
        """Registers the documents-by-state, sessions and stalled families (read on scrape)."""

        async def read() -> list[Metric]:
            counts = await store.metric_counts(stall_after=stall_after)
            sessions, documents, stalled = _sessions_family(), _documents_family(), _stalled_family()
            for state in st.SESSION_STATES:
                sessions.add_metric([state], float(counts.sessions.get(state, 0)))
            for (session_state, state), value in sorted(counts.documents.items()):
                documents.add_metric([session_state, state], float(value))
            stalled.add_metric([], float(counts.stalled))
            return [sessions, documents, stalled]

        self.add_database_collector(
            "session_counts", read, [_sessions_family(), _documents_family(), _stalled_family()]
        )

    def watch_queues(self, read: Callable[[], Mapping[str, int]]) -> None:
        """Registers `docimport_queue_messages`, read by `read` at each scrape."""
        self.registry.register(QueueCollector(read, self.collect_errors.labels("queues")))
