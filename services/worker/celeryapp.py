"""The worker's Celery app as a module attribute, for the `celery` command.

`celery --app services.worker.celeryapp flower` (the Flower Deployment) and
`celery --app services.worker.celeryapp inspect ...` (an operator's shell)
need an importable app; this one is configured from the same `DOCIMPORT_*`
variables as `docimport-worker`, so they see the same broker, queues and
task names. Importing it with a bad configuration raises pydantic's
ValidationError naming the variable. The worker itself starts through
`docimport-worker`, never through this module.
"""

from __future__ import annotations

from services.worker.app import create_app
from services.worker.config import WorkerSettings

app = create_app(WorkerSettings())
