"""The two Celery workers of bench/session_end_to_end.py, run as `python bench/e2e_workers.py KIND`.

Both are configured by `services.worker.app.configure` from the same
`DOCIMPORT_*` variables and started with the same `celery worker` arguments
(`services.worker.__main__.worker_argv`: pool, concurrency, queues, events),
so the only difference between them is docimport's own work:

- `bare`: three no-op tasks on the queues extract, chunk and entities; the
  client publishes one Celery chain per document (extract -> chunk ->
  entities, the worker publishes the next link), and the last link counts
  the document done with an INCR of `bench:e2e:done`.
- `docimport`: the real worker tasks (`services.worker.app.create_app`) with
  the real `StageRunner`, artifact store and gRPC reporting (started, cost
  events, result), whose three stages do nothing but produce an empty
  artifact. The session service enqueues, tracks and moves each document on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "protos"))

from services.common.tasks import QUEUES, STAGES, TASK_NAMES  # noqa: E402
from services.worker.config import WorkerSettings  # noqa: E402

DONE_KEY = "bench:e2e:done"


def bare_app(settings: WorkerSettings) -> Any:
    from celery import Celery

    from services.worker.app import configure

    app = Celery("bench-e2e-bare", set_as_current=False)
    configure(app, settings)
    tasks = {}
    for stage in STAGES:

        def noop(payload: dict[str, Any], _stage: str = stage) -> None:
            if _stage == STAGES[-1]:
                with app.pool.acquire(block=True) as connection:
                    connection.default_channel.client.incr(DONE_KEY)

        tasks[stage] = app.task(
            noop,
            name=TASK_NAMES[stage],
            queue=QUEUES[stage],
            shared=False,
            acks_late=True,
            reject_on_worker_lost=True,
            ignore_result=True,
        )
    app.bench_tasks = tasks  # type: ignore[attr-defined]
    return app


class NoopStage:
    """A stage that reads nothing and produces an empty artifact body."""

    processor = "noop"

    def __init__(self, name: str) -> None:
        self.name = name

    def prepare(self, payload: Any) -> Any:
        from services.worker.stages import Prepared

        return Prepared("noop-1")

    def run(self, payload: Any, prepared: Any, usage: Any, deadline: Any) -> Any:
        from services.worker.stages import StageOutput

        return StageOutput(body={})


def docimport_app(settings: WorkerSettings) -> Any:
    """docimport's worker app and runner as in production, with no-op stages."""
    from services.worker.app import build_runner, create_app

    def runner() -> Any:
        return build_runner(settings, stages=lambda store: {s: NoopStage(s) for s in STAGES})

    return create_app(settings, runner_factory=runner)


def main() -> None:
    from services.worker.__main__ import worker_argv

    kind = sys.argv[1]
    settings = WorkerSettings()
    app = bare_app(settings) if kind == "bare" else docimport_app(settings)
    app.worker_main(worker_argv(settings))


if __name__ == "__main__":
    main()
