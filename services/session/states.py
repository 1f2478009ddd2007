"""The state machines of sessions, documents and stage runs.

Owns which transitions are legal. Every writer (store, dispatcher,
reconciler) checks a change here before making it, so that a late or
duplicate report can never move a document backwards (DESIGN invariant 2).
Pure functions over state names; no I/O.

Documents: pending -> queued -> running -> pending (next stage, or a retry
after backoff) ... -> completed; failed / skipped / cancelled. A document's
position only moves forward in (stage, attempt): the stage run a report is
about must be the document's live run for the report to change it, and runs
never leave a terminal state.
"""

from __future__ import annotations

from services.common.tasks import STAGES

# -- documents
PENDING, QUEUED, RUNNING = "pending", "queued", "running"
COMPLETED, FAILED, SKIPPED, CANCELLED = "completed", "failed", "skipped", "cancelled"
DOCUMENT_STATES = (PENDING, QUEUED, RUNNING, COMPLETED, FAILED, SKIPPED, CANCELLED)
DOC_ACTIVE = frozenset({PENDING, QUEUED, RUNNING})
DOC_TERMINAL = frozenset({COMPLETED, FAILED, SKIPPED, CANCELLED})

DOC_TRANSITIONS: dict[str, frozenset[str]] = {
    # dispatched; cancelled with its session; failed when out of attempts
    PENDING: frozenset({QUEUED, CANCELLED, FAILED}),
    # a worker started it; back to pending when its lease expired or a paused
    # session refused it; a result may arrive without a start report
    QUEUED: frozenset({RUNNING, PENDING, COMPLETED, FAILED, CANCELLED}),
    # next stage or retry (pending), done, failed
    RUNNING: frozenset({PENDING, COMPLETED, FAILED, CANCELLED}),
    # only an operator's retry reopens a failure
    FAILED: frozenset({PENDING}),
    COMPLETED: frozenset(),
    SKIPPED: frozenset(),
    CANCELLED: frozenset(),
}

# -- stage runs
RUN_QUEUED, RUN_RUNNING, RUN_SUCCEEDED = "queued", "running", "succeeded"
RUN_FAILED, RUN_EXPIRED, RUN_CANCELLED = "failed", "expired", "cancelled"
RUN_LIVE = frozenset({RUN_QUEUED, RUN_RUNNING})
RUN_TRANSITIONS: dict[str, frozenset[str]] = {
    RUN_QUEUED: frozenset({RUN_RUNNING, RUN_SUCCEEDED, RUN_FAILED, RUN_EXPIRED, RUN_CANCELLED}),
    RUN_RUNNING: frozenset({RUN_SUCCEEDED, RUN_FAILED, RUN_EXPIRED, RUN_CANCELLED}),
    RUN_SUCCEEDED: frozenset(),
    RUN_FAILED: frozenset(),
    RUN_EXPIRED: frozenset(),
    RUN_CANCELLED: frozenset(),
}

# -- sessions
S_CREATED, S_RUNNING, S_PAUSED, S_BUDGET = "created", "running", "paused", "budget_exhausted"
S_COMPLETED, S_WITH_ERRORS, S_CANCELLED = "completed", "completed_with_errors", "cancelled"
SESSION_STATES = (S_CREATED, S_RUNNING, S_PAUSED, S_BUDGET, S_COMPLETED, S_WITH_ERRORS, S_CANCELLED)
SESSION_TERMINAL = frozenset({S_COMPLETED, S_WITH_ERRORS, S_CANCELLED})
SESSION_TRANSITIONS: dict[str, frozenset[str]] = {
    S_CREATED: frozenset({S_RUNNING, S_CANCELLED}),
    S_RUNNING: frozenset({S_PAUSED, S_BUDGET, S_COMPLETED, S_WITH_ERRORS, S_CANCELLED}),
    S_PAUSED: frozenset({S_RUNNING, S_COMPLETED, S_WITH_ERRORS, S_CANCELLED}),
    S_BUDGET: frozenset({S_RUNNING, S_PAUSED, S_COMPLETED, S_WITH_ERRORS, S_CANCELLED}),
    S_COMPLETED: frozenset(),
    # a retry of failed documents reopens the session
    S_WITH_ERRORS: frozenset({S_RUNNING}),
    S_CANCELLED: frozenset(),
}

RETRYABLE, PERMANENT = "retryable", "permanent"


def doc_may(old: str, new: str) -> bool:
    """True when a document may go from `old` to `new`."""
    return old == new or new in DOC_TRANSITIONS[old]


def run_may(old: str, new: str) -> bool:
    return new in RUN_TRANSITIONS[old]


def session_may(old: str, new: str) -> bool:
    return new in SESSION_TRANSITIONS[old]


def stage_index(stage: str | None) -> int:
    """0-based position of a stage; -1 before the first."""
    return STAGES.index(stage) if stage else -1


def finished_state(failed: int, cancelled: int = 0) -> str:
    """The terminal state of a session whose documents are all terminal."""
    return S_WITH_ERRORS if failed or cancelled else S_COMPLETED
