"""The worker's answer to "which runs do you hold?": the `docimport_held` remote-control command.

Owns the command the session service's lease keeper broadcasts every few
seconds (services/session/leases.py, queue.CeleryRunTracker). The worker's
main process answers it (Celery runs remote control there, also while
every pool process is busy) with the task ids of every run it holds:
prefetched and not started, running in a pool process, and finished but
not yet delivered (its outbox journal, shared by its processes). The
session service renews the leases of those runs; a run no worker holds and
no queue holds is lost after its lease.

No gRPC here: the main process of a prefork worker forks pool processes,
and gRPC does not survive fork. The journal is opened per call, read and
closed, for the same reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery.worker import state as worker_state
from celery.worker.control import inspect_command

from services.common.tasks import HELD_COMMAND
from services.worker.journal import Journal

logger = logging.getLogger(__name__)

_outbox_dir: Path | None = None


def install(outbox_dir: Path | None) -> None:
    """Answers `docimport_held` in this worker, its outbox journal read from `outbox_dir`."""
    global _outbox_dir
    _outbox_dir = outbox_dir


def held_task_ids() -> list[str]:
    """Every run this worker holds: reserved (prefetched or running) and in its outbox."""
    held = {request.id for request in list(worker_state.reserved_requests)}
    held.update(request.id for request in list(worker_state.active_requests))
    if _outbox_dir is not None:
        journal = Journal(_outbox_dir)
        try:
            held.update(journal.task_ids())
        except Exception:  # noqa: BLE001 - the runs in the queues are still answered for
            logger.exception("could not read the outbox journal")
        finally:
            journal.close()
    return sorted(held)


@inspect_command(name=HELD_COMMAND)
def docimport_held(state: Any, **_: Any) -> dict[str, list[str]]:
    """The task ids of the stage runs this worker holds (see services.worker.control)."""
    return {"held": held_task_ids()}
