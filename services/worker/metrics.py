"""The worker's Prometheus metrics, correct under Celery's prefork pool.

Owns these families, served on `DOCIMPORT_METRICS_PORT` (0 = off) by the
worker's main process:

- `docimport_worker_stage_duration_seconds{stage}`: wall time of each stage
  run the worker did (what it reports as the run's duration);
- `docimport_worker_runs_total{stage,outcome}`: runs by outcome:
  `succeeded`, `failed_retryable`, `failed_permanent`, `not_wanted` (the
  session service answered proceed=false) and `error` (the report could
  not be delivered: the task failed, or the delivery thread gave up on it
  after the task was counted by its outcome; the lease will bring it back);
- `docimport_worker_cache_hits_total{stage}`;
- `docimport_worker_processes{queue}`: pool processes consuming each queue
  (its absence across all workers is the "no workers" alert).

Why multiprocess mode: with the prefork pool (the production default) the
tasks run in child processes, while the one HTTP port is served by the
main process; an ordinary registry in a child is invisible to the parent
and lost whenever a child is recycled (`max_tasks_per_child`). So the
worker uses prometheus_client's multiprocess mode: every process writes its
samples to memory-mapped files in a directory private to this worker
(`DOCIMPORT_METRICS_DIR`, else a fresh temporary directory; emptied at
start, because files of an earlier run would be counted again), and the
parent's `/metrics` merges them on scrape with `MultiProcessCollector`:
counters and histograms of recycled children keep counting, as Prometheus
expects of counters. No gauge is written by the children (a gauge would
need per-process modes and `mark_process_dead`); the one gauge,
`docimport_worker_processes`, is computed by the parent from its settings.
Rejected alternatives: a port per child (ports change as children are
recycled, and Prometheus would have to discover them) and shipping values
to the parent through Celery events or task results (the parent sees when
a task ends, not the stage's own duration or outcome).

prometheus_client decides the mode from `PROMETHEUS_MULTIPROC_DIR` when it
is first imported, so `__main__` sets that variable (`prepare_environment`)
before importing the app; `WorkerMetrics` refuses to start in the wrong
mode rather than serve numbers that silently miss the children. With the
`solo` and `threads` pools the tasks run in the serving process and an
ordinary registry is used.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import Any

from services.worker.config import WorkerSettings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OUTCOMES = ("succeeded", "failed_retryable", "failed_permanent", "not_wanted", "error")


def multiprocess_wanted(settings: WorkerSettings) -> bool:
    return bool(settings.metrics_port) and settings.pool == "prefork"


def prepare_environment(settings: WorkerSettings, environ: MutableMapping[str, str]) -> Path | None:
    """Sets up multiprocess mode (a fresh, empty directory) when it is needed; returns it."""
    if not multiprocess_wanted(settings):
        return None
    if settings.metrics_dir is not None:
        directory = settings.metrics_dir
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
    else:
        directory = Path(tempfile.mkdtemp(prefix="docimport-worker-metrics-"))
    environ[MULTIPROC_ENV] = str(directory)
    return directory


class WorkerMetrics:
    """The worker's metrics and the registry its main process serves."""

    def __init__(self, settings: WorkerSettings) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram, values

        from services.common.metrics import STAGE_BUCKETS, new_registry
        from services.common.tasks import STAGES

        self.multiprocess = multiprocess_wanted(settings)
        if self.multiprocess:
            if not getattr(values.ValueClass, "_multiprocess", False) or not os.environ.get(MULTIPROC_ENV):
                raise RuntimeError(
                    "the prefork pool needs prometheus_client's multiprocess mode: call "
                    "prepare_environment() before anything imports prometheus_client"
                )
            from prometheus_client import multiprocess

            # The metric objects live in a registry nobody serves; what is served
            # is the merge of every process's files.
            metrics_registry = CollectorRegistry()
            self.registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry)
        else:
            self.registry = metrics_registry = new_registry()
        duration = Histogram(
            "docimport_worker_stage_duration_seconds",
            "Wall time of the stage runs this worker did.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=metrics_registry,
        )
        runs = Counter("docimport_worker_runs", "Stage runs by outcome.", ["stage", "outcome"],
                       registry=metrics_registry)
        hits = Counter("docimport_worker_cache_hits", "Stage runs answered from the artifact cache.",
                       ["stage"], registry=metrics_registry)
        self.duration = {stage: duration.labels(stage) for stage in STAGES}
        self.runs = {(stage, o): runs.labels(stage, o) for stage in STAGES for o in OUTCOMES}
        self.cache_hits = {stage: hits.labels(stage) for stage in STAGES}
        self.registry.register(_ProcessesCollector(settings))

    def finished(self, stage: str, outcome: Any) -> None:
        """A run ended with `outcome` (a runner.RunOutcome)."""
        if stage not in self.duration:
            return
        if not outcome.proceed:
            name = "not_wanted"
        elif outcome.succeeded:
            name = "succeeded"
        else:
            name = "failed_permanent" if outcome.permanent else "failed_retryable"
        self.runs[(stage, name)].inc()
        if outcome.proceed:
            self.duration[stage].observe(outcome.seconds)
            if outcome.cache_hit:
                self.cache_hits[stage].inc()

    def failed(self, stage: str) -> None:
        """A run whose result could not be reported (the task fails, or the delivery thread
        gave up on it)."""
        if stage in self.duration:
            self.runs[(stage, "error")].inc()


class _ProcessesCollector:
    """`docimport_worker_processes{queue}`, from the worker's settings."""

    def __init__(self, settings: WorkerSettings) -> None:
        self._queues = tuple(settings.queues)
        self._processes = 1 if settings.pool == "solo" else settings.effective_concurrency

    def _family(self) -> Any:
        from services.common.metrics import family

        return family("gauge", "docimport_worker_processes",
                      "Pool processes of this worker consuming each queue.", ["queue"])

    def describe(self) -> Iterable[Any]:
        return [self._family()]

    def collect(self) -> Iterable[Any]:
        metric = self._family()
        for queue in self._queues:
            metric.add_metric([queue], float(self._processes))
        return [metric]


def serve(settings: WorkerSettings, metrics: WorkerMetrics) -> Any:
    """Starts the `/metrics` port of this worker (None when `metrics_port` is 0)."""
    from services.common.metrics import serve_metrics

    return serve_metrics(metrics.registry, settings.metrics_port, settings.metrics_host)
