"""The contract between the session service and the Celery workers.

Owns the task names, their queues and the payload of a stage run. The
session service publishes these (it is the only publisher); the worker
consumes them. Neither side imports the other: both import this module.
The payload is plain JSON (Celery's json serializer) so any worker version
that knows these names can read it; fields are only ever added.

A message may be lost or delivered twice: the payload carries the document,
stage and attempt so the session service can recognise a duplicate report,
and the task id is decided by the session service before publishing (it is
recorded in `session.stage_runs.task_id` in the same transaction that
creates the run).
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from typing import Any

STAGES = ("extract", "chunk", "entities")

# Celery task name and queue of each stage.
TASK_NAMES = {stage: f"docimport.{stage}" for stage in STAGES}
QUEUES = {stage: stage for stage in STAGES}
# The remote-control command a worker answers with the task ids of the runs it holds
# ({"held": [...]}): prefetched, running, or finished and not yet delivered.
HELD_COMMAND = "docimport_held"


def next_stage(stage: str) -> str | None:
    """The stage after `stage`, or None after the last."""
    index = STAGES.index(stage)
    return STAGES[index + 1] if index + 1 < len(STAGES) else None


@dataclass(frozen=True)
class StagePayload:
    """Everything a worker needs to run one stage of one document."""

    session_id: str
    document_id: str
    stage: str
    attempt: int
    # Absolute source directory of the manifest and the file's path under it.
    source_path: str
    relative_path: str
    # The path exactly as on disk (base64), for names that are not UTF-8.
    raw_path_b64: str
    sha256: str
    size_bytes: int
    plan: str
    category: str = "miscellaneous"
    page_count: int = 0
    ocr_page_count: int = 0
    # Seconds a started run may take (its deadline: the worker stops it by then).
    lease_seconds: float = 600.0
    # Until when (ISO 8601) the run cannot have been superseded, its first lease
    # running: before then a worker may start it without asking first.
    start_unasked_until: str = ""
    # What lets the worker charge this run's costs (services/common/grants.py).
    grant: str = ""
    # Extra per-stage hints; unknown keys are ignored.
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def raw_path(self) -> bytes:
        return base64.b64decode(self.raw_path_b64)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StagePayload:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def encode_raw_path(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
