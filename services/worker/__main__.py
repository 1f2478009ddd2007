"""docimport-worker: runs a Celery worker from environment variables only.

Consumes the queues in `DOCIMPORT_QUEUES` (default all three) with the pool
in `DOCIMPORT_POOL` (prefork by default: one process per task, so CPU-bound
OCR runs in parallel and hard time limits can kill a stuck task; `solo` or
`threads` for debugging or tiny machines) and `DOCIMPORT_CONCURRENCY`
processes (default one per core), sending task events (`-E`) for Flower.
Gossip and mingle are off: workers never need to know each other, and they
cost broker round trips at scale. Command-line arguments are not accepted;
a missing or malformed variable exits with status 2 naming it.

With `DOCIMPORT_METRICS_PORT` set, this process serves the worker's
`/metrics` (prefork children's samples merged through multiprocess files;
see `services.worker.metrics`).

Tracing (when `OTEL_EXPORTER_OTLP_ENDPOINT` is set) is configured in the
process that runs the tasks: with the prefork pool in each child at
`worker_process_init` (an exporter's thread and gRPC channel do not survive
a fork), else in this process.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys

from pydantic import ValidationError

from services.common import logging as jsonlog
from services.common import telemetry
from services.common.config import describe_invalid
from services.worker import metrics as worker_metrics
from services.worker.app import create_app
from services.worker.config import WorkerSettings


def worker_argv(settings: WorkerSettings) -> list[str]:
    """The `celery worker` arguments for these settings."""
    return [
        "worker",
        "--queues",
        ",".join(settings.queues),
        "--pool",
        settings.pool,
        "--concurrency",
        str(1 if settings.pool == "solo" else settings.effective_concurrency),
        "--hostname",
        f"docimport-{'-'.join(settings.queues)}@{socket.gethostname()}",
        "--loglevel",
        settings.log_level.upper(),
        "--task-events",
        "--without-gossip",
        "--without-mingle",
    ]


def main() -> int:
    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        print(f"docimport-worker: bad configuration: {describe_invalid(exc)}", file=sys.stderr)
        return 2
    jsonlog.configure("worker", settings.log_level)
    metrics = http = directory = None
    if settings.metrics_port:
        # Before anything imports prometheus_client (see services/worker/metrics.py).
        directory = worker_metrics.prepare_environment(settings, os.environ)
        metrics = worker_metrics.WorkerMetrics(settings)
        http = worker_metrics.serve(settings, metrics)
    if settings.pool == "prefork":
        from celery import signals

        def child_tracing(**_: object) -> None:
            telemetry.configure("docimport-worker")

        signals.worker_process_init.connect(child_tracing, weak=False)
    else:
        telemetry.configure("docimport-worker")
    app = create_app(settings, metrics=metrics)
    try:
        app.worker_main(worker_argv(settings))
    finally:
        if http is not None:
            http.stop()
        if directory is not None and settings.metrics_dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
