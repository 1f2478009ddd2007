"""All SQL of the session service: projects, sessions, documents, stage runs, events.

Owns the tables `session.projects`, `session.import_sessions`,
`session.session_documents`, `session.stage_runs`, `session.session_events`
and `session.progress_samples`; nothing else writes them. Returns frozen
dataclasses, never Records or protos; maps named constraints to domain
errors. Does not own the pool (the server's `serve` closes it). No gRPC,
no Celery here: callers publish and call other services after a commit;
the dispatcher's budget reservation is a callback run inside its round.

Consistency rules kept here:
- Every change of a document's state appends a `session_events` row, bumps
  the session's counters and assigns the event its per-session `seq` in the
  same transaction, by one UPDATE of the session row; that row lock orders
  commits, so events of a session become visible strictly in seq order and a
  reader resuming after seq N never misses one. The commit NOTIFYs
  `docimport_session` with `<session_id>:<last_seq>:<origin process>`.
- Lock order is documents (by id) then session rows (by id). The dispatcher
  locks its session row first but only with SKIP LOCKED and never waits on
  a document (SKIP LOCKED again), so it cannot close a cycle.
- Reports change a document only through its live run (at most one per
  document, a unique index); runs never leave a terminal state; transitions
  follow `states` (monotonic, DESIGN invariant 2): the Python paths check
  each change there; the two stage-report statements (the hot path: one
  statement per batch of reports, no round trip per row) encode the same
  transitions in SQL, and a test checks every event they write against
  `states`.
- A session completes only when no document is pending, queued or running.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import asyncpg

from services.common import db
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from services.common.tasks import STAGES
from services.session import states as st

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "docimport_session"
# An event's identity beyond its seq, for resume tokens: if Postgres loses
# committed events, their seqs are handed out again to other events, which
# differ in time (the writing transaction's now()) if not in content. Text
# forms that no session setting (TimeZone, DateStyle) changes.
_EVENT_DIGEST = (
    "left(md5(concat_ws('|', e.seq, extract(epoch FROM e.event_time), e.kind,"
    " e.document_id, e.payload::text)), 16)"
)
# Tags this process's NOTIFYs, so its own dispatcher is not woken by them twice.
ORIGIN = uuid.uuid4().hex[:12]
ZERO = Decimal(0)

_DOC_COLUMNS = (
    "document_id",
    "session_id",
    "manifest_file_id",
    "ordinal",
    "dispatch_rank",
    "relative_path",
    "raw_path",
    "sha256",
    "size_bytes",
    "category",
    "priority",
    "plan",
    "page_count",
    "ocr_page_count",
    "state",
    "stage",
    "error_class",
    "error_code",
    "error_message",
    "skip_reason",
    "attempts",
    "cost",
    "not_before",
    "created_at",
    "updated_at",
    "attempt_seq",
    "estimated_cost",
    "reservation_id",
    "reserved_amount",
    "problem_kind",
    "mime_type",
)
_COPY_DOC_COLUMNS = (
    "document_id",
    "session_id",
    "manifest_file_id",
    "ordinal",
    "dispatch_rank",
    "relative_path",
    "raw_path",
    "sha256",
    "size_bytes",
    "category",
    "priority",
    "plan",
    "page_count",
    "ocr_page_count",
    "state",
    "error_class",
    "error_code",
    "error_message",
    "skip_reason",
    "estimated_cost",
    "problem_kind",
    "mime_type",
)
_RUN_COLUMNS = (
    "document_id",
    "stage",
    "attempt",
    "session_id",
    "state",
    "task_id",
    "worker",
    "reservation_id",
    "reserved_amount",
    "queued_at",
    "started_at",
    "finished_at",
    "lease_expires_at",
    "duration_seconds",
    "error_class",
    "error_code",
    "error_message",
    "artifacts",
    "cache_hit",
    "cost",
    "stats",
)
_SESSION_SELECT = """
    SELECT s.*, p.name AS project_name, p.created_at AS project_created_at
    FROM session.import_sessions s JOIN session.projects p ON p.project_id = s.project_id
"""


# In-flight documents with no progress for $1 seconds (partial index
# session_documents_in_flight_idx). There are at most as many as the
# dispatcher lets be in flight, so listing them all stays small.
_STALLED_SQL = (
    "d.state IN ('queued', 'running') AND d.updated_at < now() - make_interval(secs => $1)"
)
# The pipeline overview's windows (the last hour and the last day) and its
# cap on sessions shown.
OVERVIEW_WINDOWS = (3600.0, 86400.0)
OVERVIEW_SESSIONS = 100


# ---------------------------------------------------------------- domain


@dataclass(frozen=True)
class Project:
    project_id: str
    name: str
    created_at: dt.datetime | None = None


@dataclass(frozen=True)
class DocumentCounts:
    pending: int = 0
    queued: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    skipped: int = 0
    cancelled: int = 0
    stalled: int = 0

    @property
    def total(self) -> int:
        return (
            self.pending
            + self.queued
            + self.running
            + self.completed
            + self.failed
            + self.skipped
            + self.cancelled
        )

    @property
    def active(self) -> int:
        return self.pending + self.queued + self.running

    def as_dict(self) -> dict[str, int]:
        return {s: getattr(self, s) for s in st.DOCUMENT_STATES}


@dataclass(frozen=True)
class StageCount:
    stage: str
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cache_hits: int = 0


_COUNT_KINDS = ("queued", "running", "succeeded", "failed", "cache_hits")

# Stage-run counts of the sessions in $1: the folded counts plus the deltas
# not folded yet (see migration 0043 and `fold_stage_counts`).
_STAGE_COUNTS_SQL = """
    SELECT session_id, stage, sum(queued)::int AS queued, sum(running)::int AS running,
           sum(succeeded)::int AS succeeded, sum(failed)::int AS failed,
           sum(cache_hits)::int AS cache_hits
    FROM (SELECT session_id, stage, queued, running, succeeded, failed, cache_hits
          FROM session.stage_counts WHERE session_id = ANY($1::uuid[])
          UNION ALL
          SELECT session_id, stage, queued, running, succeeded, failed, cache_hits
          FROM session.stage_count_deltas WHERE session_id = ANY($1::uuid[])) t
    GROUP BY session_id, stage
"""

# The same counts from the runs themselves (VerifySession's recount).
_STAGE_RECOUNT_SQL = """
    SELECT stage,
           count(*) FILTER (WHERE state = 'queued') AS queued,
           count(*) FILTER (WHERE state = 'running') AS running,
           count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE state = 'failed') AS failed,
           count(*) FILTER (WHERE state = 'succeeded' AND cache_hit) AS cache_hits
    FROM session.stage_runs WHERE session_id = $1 GROUP BY stage
"""


def _stage_counts(rows: Iterable[Any]) -> tuple[StageCount, ...]:
    """One StageCount per stage, in pipeline order, from rows of (stage, the kinds)."""
    by_stage = {r["stage"]: r for r in rows}
    return tuple(
        StageCount(stage, *(by_stage[stage][k] for k in _COUNT_KINDS))
        if stage in by_stage
        else StageCount(stage)
        for stage in STAGES
    )


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    request_id: str | None
    project: Project
    manifest_id: str
    source_path: str
    state: str
    state_reason: str
    budget_limit: Decimal | None
    max_in_flight: int
    category_priority: tuple[str, ...]
    estimated_cost: Decimal | None
    total_documents: int
    last_seq: int
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    updated_at: dt.datetime
    counts: DocumentCounts
    reported_cost: Decimal
    # The part of reported_cost spent on attempts that were lost or cancelled.
    wasted_cost: Decimal = ZERO
    # W3C traceparent of the call that started the session's work (tracing on).
    trace_context: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """A session with its stage counts, consistent with `session.last_seq`."""

    session: SessionInfo
    stages: tuple[StageCount, ...]
    # (sampled_at, finished documents), oldest first, for the rate and ETA.
    samples: tuple[tuple[dt.datetime, int], ...]
    db_now: dt.datetime
    # `Event.digest` of the event at `session.last_seq` (None: none, or pruned).
    last_event_digest: str | None = None


@dataclass(frozen=True)
class StageWindow:
    """One stage's runs that ended within the last `window_seconds`."""

    stage: str
    window_seconds: float
    finished: int
    succeeded: int
    failed: int
    expired: int
    cache_hits: int
    # Of runs that did work (cache hits left out); None when there were none.
    p50_seconds: float | None
    p95_seconds: float | None

    @property
    def runs_per_second(self) -> float:
        return self.finished / self.window_seconds

    @property
    def error_rate(self) -> float:
        return (self.failed + self.expired) / self.finished if self.finished else 0.0


@dataclass(frozen=True)
class Overview:
    """The whole pipeline as the database sees it (no broker data)."""

    db_now: dt.datetime
    sessions: tuple[Snapshot, ...]
    stage_windows: tuple[StageWindow, ...]
    stalled_total: int
    stalled: tuple[Document, ...]
    failures: tuple[Document, ...]


@dataclass(frozen=True)
class Document:
    document_id: str
    session_id: str
    manifest_file_id: str
    ordinal: int
    dispatch_rank: int
    relative_path: str
    raw_path: bytes
    sha256: str | None
    size_bytes: int
    category: str
    priority: int
    plan: str
    page_count: int
    ocr_page_count: int
    state: str
    stage: str | None
    error_class: str | None
    error_code: str | None
    error_message: str | None
    skip_reason: str | None
    attempts: int
    cost: Decimal
    not_before: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    attempt_seq: int
    estimated_cost: Decimal
    reservation_id: str | None
    reserved_amount: Decimal | None
    problem_kind: str | None
    mime_type: str
    stalled: bool = False


@dataclass(frozen=True)
class StageRun:
    document_id: str
    stage: str
    attempt: int
    session_id: str
    state: str
    task_id: str
    worker: str | None
    reservation_id: str | None
    reserved_amount: Decimal | None
    queued_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    lease_expires_at: dt.datetime
    duration_seconds: Decimal | None
    error_class: str | None
    error_code: str | None
    error_message: str | None
    artifacts: tuple[dict[str, Any], ...]
    cache_hit: bool
    cost: Decimal | None
    stats: dict[str, Any]


@dataclass(frozen=True)
class Event:
    session_id: str
    seq: int
    event_time: dt.datetime
    kind: str  # "document" | "state_change"
    document_id: str | None
    payload: dict[str, Any]
    relative_path: str = ""
    # What tells this event from another given the same seq (`_EVENT_DIGEST`).
    digest: str = ""


@dataclass(frozen=True)
class NewDocument:
    """A manifest file becoming a session document."""

    manifest_file_id: str
    ordinal: int
    dispatch_rank: int
    relative_path: str
    raw_path: bytes
    sha256: str | None
    size_bytes: int
    category: str
    priority: int
    plan: str
    page_count: int
    ocr_page_count: int
    state: str  # pending | skipped | failed
    skip_reason: str | None = None
    error_class: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    estimated_cost: Decimal = ZERO
    problem_kind: str | None = None
    mime_type: str = ""


@dataclass(frozen=True)
class NewSession:
    session_id: str
    request_id: str | None
    manifest_id: str
    source_path: str
    project_id: str | None
    project_name: str | None
    budget_limit: Decimal | None
    max_in_flight: int
    category_priority: tuple[str, ...]
    estimated_cost: Decimal | None
    start: bool
    trace_context: str | None = None


@dataclass(frozen=True)
class Timing:
    """Time limits of one stage run, seconds."""

    soft_time_limit: float
    time_limit: float
    # A new lease (renewed while the run is seen alive: see services/session/leases.py).
    lease: float
    # How long a started run may take before its worker stops it (hard limit plus grace).
    deadline: float
    # How long its message may wait in the queue before a worker drops it unread.
    message_ttl: float


@dataclass(frozen=True)
class DispatchDoc:
    """What a stage run's message needs of its document."""

    document_id: str
    relative_path: str
    raw_path: bytes
    sha256: str | None
    size_bytes: int
    plan: str
    category: str
    page_count: int
    ocr_page_count: int
    mime_type: str

    @classmethod
    def of(cls, row: asyncpg.Record) -> DispatchDoc:
        return cls(str(row["document_id"]), row["relative_path"], bytes(row["raw_path"]), row["sha256"],
                   row["size_bytes"], row["plan"], row["category"], row["page_count"],
                   row["ocr_page_count"], row["mime_type"])


@dataclass(frozen=True)
class Claimed:
    """A document claimed by a dispatch round, with the run it will get."""

    document: DispatchDoc
    stage: str
    attempt: int
    estimate: Decimal


@dataclass(frozen=True)
class Reservations:
    """What the budget granted for a round: reservation per document id."""

    granted: dict[str, tuple[str, Decimal]] = field(default_factory=dict)
    # Claimed documents the budget refused (they stay pending).
    refused: frozenset[str] = frozenset()
    # Set when the session must stop for its budget.
    exhausted_reason: str | None = None


@dataclass(frozen=True)
class Dispatched:
    """A stage run created by a dispatch round, ready to publish."""

    session_id: str
    document: DispatchDoc
    source_path: str
    stage: str
    attempt: int
    task_id: str
    timing: Timing
    lease_expires_at: dt.datetime
    # When its message expires (Celery's `expires`).
    message_expires_at: dt.datetime


@dataclass(frozen=True)
class DispatchRound:
    session_id: str
    dispatched: tuple[Dispatched, ...]
    # True when the round stopped at its `limit` (more may be waiting and fit
    # the session's cap); False when it stopped at the session's cap or ran out.
    saturated: bool
    budget_exhausted: bool = False
    # The session's trace context: its runs are published as children of it.
    trace_context: str | None = None


@dataclass(frozen=True)
class StartedReport:
    document_id: str
    stage: str
    attempt: int
    task_id: str
    worker: str
    # When the worker began the run, when it reports the start late (None: now).
    began: dt.datetime | None = None


@dataclass(frozen=True)
class StartedOutcome:
    found: bool
    proceed: bool = False
    # When the run must end (its worker stops it by then).
    deadline: dt.datetime | None = None
    # Reservation to release when the run was refused.
    release: str | None = None


@dataclass(frozen=True)
class ResultReport:
    document_id: str
    stage: str
    attempt: int
    task_id: str
    worker: str
    succeeded: bool
    error_class: str | None
    error_code: str
    error_message: str
    artifacts: tuple[dict[str, Any], ...]
    cache_hit: bool
    duration_seconds: float | None
    cost: Decimal | None
    stats: dict[str, Any]


@dataclass(frozen=True)
class ResultOutcome:
    found: bool
    replayed: bool = False
    document_state: str = ""
    # (reservation id, actual) to settle with the cost service.
    settle: tuple[str, Decimal] | None = None
    session_id: str = ""
    # The report named a task id that is not the run's: nothing changed.
    wrong_task: bool = False
    # The run's state when it was no longer live (expired, cancelled): not applied.
    stale: str = ""


@dataclass(frozen=True)
class MetricCounts:
    """What the metrics scrape reads: sessions by state, documents by (session state, state)."""

    sessions: dict[str, int]
    documents: dict[tuple[str, str], int]
    stalled: int


@dataclass(frozen=True)
class Retried:
    count: int
    session: SessionInfo


@dataclass(frozen=True)
class Expired:
    """Runs the reconciler expired, and reservations to settle (documents that failed)."""

    count: int
    settle: tuple[tuple[str, Decimal], ...]
    sessions: frozenset[str]


# ---------------------------------------------------------------- helpers


def _uuid(value: str, field_name: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise InvalidArgument.field(field_name, f"{value!r} is not a UUID") from None


def _s(value: Any) -> str | None:
    return None if value is None else str(value)


async def _set_trace_context(conn: asyncpg.Connection, sid: uuid.UUID, traceparent: str) -> None:
    await conn.execute(
        "UPDATE session.import_sessions SET trace_context = $2 WHERE session_id = $1",
        sid,
        traceparent,
    )


def _session(row: asyncpg.Record, stalled: int = 0) -> SessionInfo:
    counts = DocumentCounts(
        pending=row["count_pending"],
        queued=row["count_queued"],
        running=row["count_running"],
        completed=row["count_completed"],
        failed=row["count_failed"],
        skipped=row["count_skipped"],
        cancelled=row["count_cancelled"],
        stalled=stalled,
    )
    return SessionInfo(
        session_id=str(row["session_id"]),
        request_id=row["request_id"],
        project=Project(str(row["project_id"]), row["project_name"], row["project_created_at"]),
        manifest_id=str(row["manifest_id"]),
        source_path=row["source_path"],
        state=row["state"],
        state_reason=row["state_reason"],
        budget_limit=row["budget_limit"],
        max_in_flight=row["max_in_flight"],
        category_priority=tuple(row["category_priority"] or ()),
        estimated_cost=row["estimated_cost"],
        total_documents=row["total_documents"],
        last_seq=row["last_seq"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        updated_at=row["updated_at"],
        counts=counts,
        reported_cost=row["reported_cost"],
        wasted_cost=row["wasted_cost"],
        trace_context=row["trace_context"],
    )


def _document(row: asyncpg.Record | dict[str, Any], stalled: bool = False) -> Document:
    values = {name: row[name] for name in _DOC_COLUMNS}
    for key in ("document_id", "session_id", "manifest_file_id"):
        values[key] = str(values[key])
    values["raw_path"] = bytes(values["raw_path"])
    values["reservation_id"] = _s(values["reservation_id"])
    return Document(**values, stalled=stalled)


def _run(row: asyncpg.Record | dict[str, Any]) -> StageRun:
    values = {name: row[name] for name in _RUN_COLUMNS}
    values["document_id"] = str(values["document_id"])
    values["session_id"] = str(values["session_id"])
    values["reservation_id"] = _s(values["reservation_id"])
    values["artifacts"] = tuple(values["artifacts"] or ())
    values["stats"] = dict(values["stats"] or {})
    return StageRun(**values)


def _cost_text(value: Decimal | None) -> str:
    if value is None:
        return "0"
    return format(value.normalize(), "f") if value else "0"


class _Changes:
    """Document and session changes of one transaction, flushed together.

    Collects events (in order), counter deltas and reported cost per session;
    `flush` applies them with one UPDATE per session (which assigns the seqs),
    completes sessions left with no active document, copies the events and
    queues the NOTIFY.
    """

    def __init__(self) -> None:
        self.events: dict[uuid.UUID, list[tuple[str, uuid.UUID | None, dict[str, Any]]]] = (
            defaultdict(list)
        )
        self.deltas: dict[uuid.UUID, Counter[str]] = defaultdict(Counter)
        self.cost: dict[uuid.UUID, Decimal] = defaultdict(Decimal)
        self.session_states: dict[uuid.UUID, list[tuple[str, str]]] = defaultdict(list)
        self.last_seq: dict[str, int] = {}

    def doc(
        self,
        doc: dict[str, Any],
        old_state: str,
        old_stage: str | None,
        *,
        attempt: int = 0,
        cache_hit: bool = False,
        cost: Decimal | None = None,
    ) -> None:
        new_state = doc["state"]
        if not st.doc_may(old_state, new_state):
            raise AssertionError(f"illegal document transition {old_state} -> {new_state}")
        session_id = doc["session_id"]
        if old_state != new_state:
            self.deltas[session_id][old_state] -= 1
            self.deltas[session_id][new_state] += 1
        if cost:
            self.cost[session_id] += cost
        payload = {
            "state": new_state,
            "prev": old_state,
            "stage": doc["stage"] or "",
            "prev_stage": old_stage or "",
            "attempt": attempt,
        }
        if doc.get("error_class") and new_state in (st.FAILED, st.PENDING):
            payload["error_class"] = doc["error_class"]
            payload["error_message"] = doc.get("error_message") or ""
        if cache_hit:
            payload["cache_hit"] = True
        if cost:
            payload["cost"] = _cost_text(cost)
        self.events[session_id].append(("document", doc["document_id"], payload))

    def session_state(self, session_id: uuid.UUID, state: str, reason: str = "") -> None:
        self.session_states[session_id].append((state, reason))

    def note(self, session_id: uuid.UUID, kind: str, payload: dict[str, Any]) -> None:
        """An event that changes no counter (e.g. the session was created)."""
        self.events[session_id].append((kind, None, payload))

    def touch(self, session_id: uuid.UUID) -> None:
        """Includes a session in the flush (for its completion check)."""
        self.deltas[session_id] += Counter()

    def touched(self) -> set[uuid.UUID]:
        return set(self.events) | set(self.session_states) | set(self.deltas)

    async def flush(self, conn: asyncpg.Connection, *, complete: bool = True) -> None:
        rows: list[tuple[Any, ...]] = []
        for session_id in sorted(self.touched()):
            events = self.events.get(session_id, [])
            delta = self.deltas.get(session_id, Counter())
            row = await conn.fetchrow(
                """
                UPDATE session.import_sessions SET
                    last_seq = last_seq + $2,
                    count_pending = count_pending + $3, count_queued = count_queued + $4,
                    count_running = count_running + $5, count_completed = count_completed + $6,
                    count_failed = count_failed + $7, count_skipped = count_skipped + $8,
                    count_cancelled = count_cancelled + $9,
                    reported_cost = reported_cost + $10,
                    updated_at = now()
                WHERE session_id = $1
                RETURNING state, last_seq, count_pending + count_queued + count_running AS active,
                          count_failed, count_cancelled, now() AS db_now
                """,
                session_id,
                len(events),
                delta[st.PENDING],
                delta[st.QUEUED],
                delta[st.RUNNING],
                delta[st.COMPLETED],
                delta[st.FAILED],
                delta[st.SKIPPED],
                delta[st.CANCELLED],
                self.cost.get(session_id, ZERO),
            )
            if row is None:
                raise NotFound("session", str(session_id))
            seq = row["last_seq"] - len(events)
            now = row["db_now"]
            for kind, document_id, payload in events:
                seq += 1
                rows.append((session_id, seq, now, kind, document_id, payload))
            state = row["state"]
            wanted = list(self.session_states.get(session_id, []))
            final_state = [s for s, _ in wanted][-1] if wanted else state
            if (
                complete
                and row["active"] == 0
                and final_state in (st.S_RUNNING, st.S_PAUSED, st.S_BUDGET)
            ):
                final = st.finished_state(row["count_failed"], row["count_cancelled"])
                wanted.append((final, "every document is completed, failed or skipped"))
            for new_state, reason in wanted:
                if new_state == state:
                    continue
                if not st.session_may(state, new_state):
                    raise FailedPrecondition(
                        f"session is {state}; it cannot become {new_state}", subject=str(session_id)
                    )
                changed = await conn.fetchrow(
                    """
                    UPDATE session.import_sessions SET
                        state = $2, state_reason = $3, last_seq = last_seq + 1, updated_at = now(),
                        started_at = CASE WHEN $2 = 'running' THEN coalesce(started_at, now())
                                          ELSE started_at END,
                        finished_at = CASE WHEN $2 IN ('completed', 'completed_with_errors', 'cancelled')
                                           THEN now() WHEN $2 = 'running' THEN NULL
                                           ELSE finished_at END
                    WHERE session_id = $1
                    RETURNING last_seq
                    """,
                    session_id,
                    new_state,
                    reason,
                )
                rows.append(
                    (
                        session_id,
                        changed["last_seq"],
                        now,
                        "state_change",
                        None,
                        {"state": new_state, "reason": reason, "prev": state},
                    )
                )
                state = new_state
                seq = changed["last_seq"]
            self.last_seq[str(session_id)] = seq
        if rows:
            # jsonb has no binary COPY encoder with the pool's JSON codec: unnest text instead.
            await conn.execute(
                """
                INSERT INTO session.session_events (session_id, seq, event_time, kind, document_id, payload)
                SELECT s, q, t, k, d, p::jsonb
                FROM unnest($1::uuid[], $2::bigint[], $3::timestamptz[], $4::text[], $5::uuid[], $6::text[])
                     AS u(s, q, t, k, d, p)
                """,
                [r[0] for r in rows],
                [r[1] for r in rows],
                [r[2] for r in rows],
                [r[3] for r in rows],
                [r[4] for r in rows],
                [json.dumps(r[5], separators=(",", ":")) for r in rows],
            )
            for session_id, last in self.last_seq.items():
                await conn.execute(
                    "SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, f"{session_id}:{last}:{ORIGIN}"
                )


async def _write_docs(conn: asyncpg.Connection, docs: Sequence[dict[str, Any]]) -> None:
    """Writes back the mutable columns of documents loaded and changed in Python."""
    if not docs:
        return
    await conn.execute(
        """
        UPDATE session.session_documents d SET
            state = u.state, stage = u.stage, error_class = u.error_class,
            error_code = u.error_code, error_message = u.error_message,
            attempts = u.attempts, attempt_seq = u.attempt_seq, not_before = u.not_before,
            cost = u.cost, reservation_id = u.reservation_id, reserved_amount = u.reserved_amount,
            updated_at = now()
        FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                    $7::int[], $8::int[], $9::timestamptz[], $10::numeric[], $11::uuid[],
                    $12::numeric[])
             AS u(document_id, state, stage, error_class, error_code, error_message,
                  attempts, attempt_seq, not_before, cost, reservation_id, reserved_amount)
        WHERE d.document_id = u.document_id
        """,
        [d["document_id"] for d in docs],
        [d["state"] for d in docs],
        [d["stage"] for d in docs],
        [d["error_class"] for d in docs],
        [d["error_code"] for d in docs],
        [d["error_message"] for d in docs],
        [d["attempts"] for d in docs],
        [d["attempt_seq"] for d in docs],
        [d["not_before"] for d in docs],
        [d["cost"] for d in docs],
        [d["reservation_id"] for d in docs],
        [d["reserved_amount"] for d in docs],
    )


async def _write_runs(conn: asyncpg.Connection, runs: Sequence[dict[str, Any]]) -> None:
    """Writes back the mutable columns of stage runs loaded and changed in Python."""
    if not runs:
        return
    await conn.execute(
        """
        UPDATE session.stage_runs r SET
            state = u.state, worker = u.worker, started_at = u.started_at,
            finished_at = u.finished_at, lease_expires_at = u.lease_expires_at,
            duration_seconds = u.duration_seconds, error_class = u.error_class,
            error_code = u.error_code, error_message = u.error_message,
            artifacts = u.artifacts::jsonb, cache_hit = u.cache_hit, cost = u.cost,
            stats = u.stats::jsonb
        FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[],
                    $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::numeric[],
                    $10::text[], $11::text[], $12::text[], $13::text[], $14::bool[],
                    $15::numeric[], $16::text[])
             AS u(document_id, stage, attempt, state, worker, started_at, finished_at,
                  lease_expires_at, duration_seconds, error_class, error_code, error_message,
                  artifacts, cache_hit, cost, stats)
        WHERE r.document_id = u.document_id AND r.stage = u.stage AND r.attempt = u.attempt
        """,
        [r["document_id"] for r in runs],
        [r["stage"] for r in runs],
        [r["attempt"] for r in runs],
        [r["state"] for r in runs],
        [r["worker"] for r in runs],
        [r["started_at"] for r in runs],
        [r["finished_at"] for r in runs],
        [r["lease_expires_at"] for r in runs],
        [r["duration_seconds"] for r in runs],
        [r["error_class"] for r in runs],
        [r["error_code"] for r in runs],
        [r["error_message"] for r in runs],
        [json.dumps(list(r["artifacts"] or [])) for r in runs],
        [r["cache_hit"] for r in runs],
        [r["cost"] for r in runs],
        [json.dumps(dict(r["stats"] or {})) for r in runs],
    )


_PREFIXED: dict[tuple[str, tuple[str, ...]], tuple[tuple[str, str], ...]] = {}


def _mutable(row: asyncpg.Record, prefix: str, names: tuple[str, ...]) -> dict[str, Any]:
    keys = _PREFIXED.get((prefix, names))
    if keys is None:
        keys = _PREFIXED[(prefix, names)] = tuple((prefix + n, n) for n in names)
    return {name: row[key] for key, name in keys}


_RUN_DOC_SELECT = """
    SELECT {run_cols}, {doc_cols}, s.state AS s_state, now() AS db_now
    FROM session.stage_runs r
    JOIN session.session_documents d ON d.document_id = r.document_id
    JOIN session.import_sessions s ON s.session_id = d.session_id
""".format(
    run_cols=", ".join(f"r.{c} AS r_{c}" for c in _RUN_COLUMNS),
    doc_cols=", ".join(f"d.{c} AS d_{c}" for c in _DOC_COLUMNS),
)


def _task_ids(n: int) -> list[str]:
    """n random (version 4) UUIDs from one read of the OS's random source."""
    raw = os.urandom(16 * n)
    return [str(uuid.UUID(bytes=raw[i : i + 16], version=4)) for i in range(0, 16 * n, 16)]


def _dedupe(keys: Sequence[Any]) -> tuple[list[int], list[int]]:
    """(positions of the first occurrence of each key, index into those for every position)."""
    first: dict[Any, int] = {}
    unique: list[int] = []
    index: list[int] = []
    for position, key in enumerate(keys):
        if key not in first:
            first[key] = len(unique)
            unique.append(position)
        index.append(first[key])
    return unique, index


# First key of the session dispatch advisory locks ("disp"); the second is the session id's hash.
_DISPATCH_LOCK = 0x64697370


async def _retrying(fn: Callable[[], Awaitable[Any]], attempts: int = 4) -> Any:
    """Runs a transaction again when Postgres aborted it for a deadlock."""
    for attempt in range(1, attempts + 1):
        try:
            return await fn()
        except (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError):
            if attempt == attempts:
                raise
            logger.info("transaction conflicted; retrying (attempt %d)", attempt)
            await asyncio.sleep(0.01 * attempt)
    raise AssertionError("unreachable")


# The end of both report statements: given `nd` (one row per document that
# changes: session_id, document_id, ord, doc_old_state, d_state, payload,
# cost_add), add the counter deltas to the sessions, finish sessions left
# with nothing active (when $complete), assign the events their seqs, NOTIFY.
# SET expressions read the locked, latest version of a session row (not the
# statement's snapshot), so the completion test sees every earlier commit.
_REPORT_TAIL = """
agg AS (
    SELECT session_id, count(payload) AS n,
        sum((d_state = 'pending')::int - (doc_old_state = 'pending')::int) AS dp,
        sum((d_state = 'queued')::int - (doc_old_state = 'queued')::int) AS dq,
        sum((d_state = 'running')::int - (doc_old_state = 'running')::int) AS dr,
        sum((d_state = 'completed')::int - (doc_old_state = 'completed')::int) AS dco,
        sum((d_state = 'failed')::int - (doc_old_state = 'failed')::int) AS df,
        sum((d_state = 'skipped')::int - (doc_old_state = 'skipped')::int) AS ds,
        sum((d_state = 'cancelled')::int - (doc_old_state = 'cancelled')::int) AS dca,
        coalesce(sum(cost_add), 0) AS cost
    FROM nd GROUP BY session_id
),
slock AS (
    SELECT s.session_id FROM session.import_sessions s
    WHERE s.session_id IN (SELECT session_id FROM agg) ORDER BY s.session_id FOR UPDATE
),
sess AS (
    UPDATE session.import_sessions s SET
        count_pending = s.count_pending + agg.dp, count_queued = s.count_queued + agg.dq,
        count_running = s.count_running + agg.dr, count_completed = s.count_completed + agg.dco,
        count_failed = s.count_failed + agg.df, count_skipped = s.count_skipped + agg.ds,
        count_cancelled = s.count_cancelled + agg.dca, reported_cost = s.reported_cost + agg.cost,
        updated_at = now(),
        last_seq = s.last_seq + agg.n + (DONE)::int,
        state = CASE WHEN DONE THEN
                     CASE WHEN s.count_failed + agg.df + s.count_cancelled + agg.dca > 0
                          THEN 'completed_with_errors' ELSE 'completed' END
                ELSE s.state END,
        state_reason = CASE WHEN DONE THEN 'every document is completed, failed or skipped'
                            ELSE s.state_reason END,
        finished_at = CASE WHEN DONE THEN now() ELSE s.finished_at END
    FROM agg
    WHERE s.session_id = agg.session_id AND s.session_id IN (SELECT session_id FROM slock)
    RETURNING s.session_id, s.last_seq, agg.n, s.state,
              -- finished by this statement (now() is this transaction's start)
              (s.state IN ('completed', 'completed_with_errors') AND s.finished_at = now()
               AND agg.n > 0) AS done
),
ev AS (
    INSERT INTO session.session_events (session_id, seq, event_time, kind, document_id, payload)
    SELECT nd.session_id,
           sess.last_seq - sess.n - sess.done::int
             + row_number() OVER (PARTITION BY nd.session_id ORDER BY nd.ord),
           now(), 'document', nd.document_id, nd.payload
    FROM nd JOIN sess USING (session_id) WHERE nd.payload IS NOT NULL
    UNION ALL
    SELECT sess.session_id, sess.last_seq, now(), 'state_change', NULL,
           jsonb_build_object('state', sess.state,
                              'reason', 'every document is completed, failed or skipped')
    FROM sess WHERE sess.done
    RETURNING 1
),
nt AS (
    SELECT pg_notify($NOTIFY_CHANNEL, sess.session_id::text || ':' || sess.last_seq || ':' || $ORIGIN)
    FROM sess
)
""".replace(
    "DONE",
    "($COMPLETE AND s.state IN ('running', 'paused', 'budget_exhausted') "
    "AND s.count_pending + agg.dp + s.count_queued + agg.dq "
    "+ s.count_running + agg.dr = 0)",
)


def _numbered(sql: str, first: int, names: Sequence[str]) -> str:
    for i, name in enumerate(names):
        sql = sql.replace(f"${name}", f"${first + i}")
    return sql


_TAIL_PARAMS = ("COMPLETE", "NOTIFY_CHANNEL", "ORIGIN")

# ReportStageResult for a batch, in one statement (one implicit transaction):
# lock the reported runs and their documents, decide - replay (the run
# already finished), stale (no longer live: nothing changes) or apply - and
# apply: the run finishes; the document goes on to the next stage (pending),
# completes, retries after a backoff (pending, not_before) or fails
# (permanent, or out of attempts); its reservation is closed when it is done.
# These are the transitions of `states` (a test checks every event against
# them). Then the tail: counters, completion, events, NOTIFY.
_RESULTS_SQL = _numbered(
    """
WITH u AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::bool[], $6::text[],
                         $7::text[], $8::text[], $9::text[], $10::bool[], $11::numeric[],
                         $12::numeric[], $13::text[], $14::text[])
      WITH ORDINALITY AS u(document_id, stage, attempt, worker, ok, error_class, error_code,
                           error_message, artifacts, cache_hit, duration, cost, stats, task_id,
                           ord)
),
cur AS (
    SELECT u.ord, r.state AS r_state, r.task_id AS r_task, r.cost AS r_cost, d.session_id,
           d.state AS d_state, d.stage AS d_stage, d.attempts, d.attempt_seq, d.cost AS d_cost,
           d.reservation_id, d.reserved_amount
    FROM (SELECT * FROM u ORDER BY document_id) u
    CROSS JOIN LATERAL (
        SELECT r.state, r.task_id, r.cost FROM session.stage_runs r
        WHERE r.document_id = u.document_id AND r.stage = u.stage AND r.attempt = u.attempt
        FOR UPDATE) r
    CROSS JOIN LATERAL (
        SELECT * FROM session.session_documents d WHERE d.document_id = u.document_id
        FOR UPDATE) d
),
dec AS (
    SELECT u.*, c.session_id, c.d_state AS doc_old_state, c.d_stage AS old_stage, c.attempts,
           c.attempt_seq, c.d_cost, c.reservation_id, c.reserved_amount,
           CASE WHEN u.ok THEN CASE u.stage WHEN 'extract' THEN 'chunk' WHEN 'chunk' THEN 'entities' END
           END AS next_stage,
           (NOT u.ok AND (u.error_class = 'permanent' OR c.attempts >= $15)) AS gives_up
    FROM u JOIN cur c USING (ord)
    WHERE c.r_state IN ('queued', 'running') AND u.task_id = c.r_task
),
nd0 AS (
    SELECT dec.*,
        CASE WHEN ok THEN CASE WHEN next_stage IS NULL THEN 'completed' ELSE 'pending' END
             WHEN gives_up THEN 'failed' ELSE 'pending' END AS d_state,
        coalesce(next_stage, old_stage) AS d_stage,
        CASE WHEN ok THEN NULL ELSE error_class END AS d_error_class,
        CASE WHEN ok THEN NULL ELSE nullif(error_code, '') END AS d_error_code,
        CASE WHEN ok THEN NULL
             WHEN gives_up AND error_class <> 'permanent'
                  THEN error_message || ' (gave up after ' || attempts || ' attempts)'
             ELSE error_message END AS d_error_message,
        CASE WHEN next_stage IS NOT NULL THEN 0 ELSE attempts END AS d_attempts,
        CASE WHEN next_stage IS NOT NULL THEN 0 ELSE attempt_seq END AS d_attempt_seq,
        CASE WHEN NOT ok AND NOT gives_up
             THEN now() + make_interval(secs => least($16 * power(2, greatest(attempts - 1, 0)), $17))
        END AS d_not_before,
        d_cost + coalesce(cost, 0) AS d_new_cost,
        coalesce(cost, 0) AS cost_add,
        ((ok AND next_stage IS NULL) OR gives_up) AND reservation_id IS NOT NULL AS settle
    FROM dec
),
nd AS (
    SELECT nd0.*,
        jsonb_strip_nulls(jsonb_build_object(
            'state', d_state, 'prev', doc_old_state, 'stage', coalesce(d_stage, ''),
            'prev_stage', coalesce(old_stage, ''), 'attempt', attempt,
            'error_class', CASE WHEN d_state IN ('failed', 'pending') THEN d_error_class END,
            'error_message', CASE WHEN d_state IN ('failed', 'pending') AND d_error_class IS NOT NULL
                                  THEN coalesce(d_error_message, '') END,
            'cache_hit', CASE WHEN cache_hit AND ok THEN true END,
            'cost', CASE WHEN coalesce(cost, 0) <> 0 THEN trim_scale(cost)::text END)) AS payload
    FROM nd0
),
runs AS (
    UPDATE session.stage_runs r SET
        state = CASE WHEN nd.ok THEN 'succeeded' ELSE 'failed' END, finished_at = now(),
        worker = coalesce(nullif(nd.worker, ''), r.worker),
        -- a run that reported only its result (a short one) began its duration ago
        started_at = coalesce(r.started_at,
                              now() - make_interval(secs => coalesce(nd.duration, 0)::float8)),
        duration_seconds = round(nd.duration, 6), error_class = nd.d_error_class,
        error_code = nd.d_error_code,
        error_message = CASE WHEN nd.ok THEN NULL ELSE nd.error_message END,
        artifacts = nd.artifacts::jsonb, cache_hit = nd.cache_hit, cost = nd.cost,
        stats = nd.stats::jsonb
    FROM nd WHERE r.document_id = nd.document_id AND r.stage = nd.stage AND r.attempt = nd.attempt
    RETURNING 1
),
docs AS (
    UPDATE session.session_documents d SET
        state = nd.d_state, stage = nd.d_stage, error_class = nd.d_error_class,
        error_code = nd.d_error_code, error_message = nd.d_error_message, attempts = nd.d_attempts,
        attempt_seq = nd.d_attempt_seq, not_before = nd.d_not_before, cost = nd.d_new_cost,
        reservation_id = CASE WHEN nd.settle THEN NULL ELSE nd.reservation_id END,
        reserved_amount = CASE WHEN nd.settle THEN NULL ELSE nd.reserved_amount END,
        updated_at = now()
    FROM nd WHERE d.document_id = nd.document_id
    RETURNING 1
),
"""
    + _REPORT_TAIL
    + """
SELECT u.ord, c.r_state, c.d_state AS old_doc_state, nd.d_state AS new_doc_state, c.session_id,
       CASE WHEN nd.settle THEN nd.reservation_id END AS settle_id, nd.d_new_cost AS settle_amount,
       u.task_id = c.r_task AS same_task, c.r_cost,
       (SELECT count(*) FROM nt) AS notified
FROM u LEFT JOIN cur c USING (ord) LEFT JOIN nd USING (ord)
ORDER BY u.ord
""",
    18,
    _TAIL_PARAMS,
)

# What a run no longer live (expired, cancelled) was charged, reported with its late result:
# its charge is on the run, its document and its session (the money it cost is spent all the
# same), once; the run itself stays as it is. Runs locked in document order.
_LATE_COSTS_SQL = """
WITH u AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::numeric[])
      AS u(document_id, stage, attempt, task_id, cost)
),
runs AS (
    UPDATE session.stage_runs r SET cost = u.cost
    FROM (SELECT * FROM u ORDER BY document_id) u
    WHERE r.document_id = u.document_id AND r.stage = u.stage AND r.attempt = u.attempt
      AND r.task_id = u.task_id AND r.state IN ('expired', 'cancelled') AND r.cost IS NULL
    RETURNING r.session_id, r.document_id, u.cost
),
docs AS (
    UPDATE session.session_documents d SET cost = coalesce(d.cost, 0) + x.cost
    FROM (SELECT document_id, sum(cost) AS cost FROM runs GROUP BY document_id) x
    WHERE d.document_id = x.document_id
    RETURNING 1
)
UPDATE session.import_sessions s
SET reported_cost = s.reported_cost + x.cost, wasted_cost = s.wasted_cost + x.cost
FROM (SELECT session_id, sum(cost) AS cost FROM runs GROUP BY session_id ORDER BY session_id) x
WHERE s.session_id = x.session_id
"""

# ReportStageStarted for a batch, in one statement: a queued run of a running
# session starts (run and document running, lease extended); a run already
# running is a redelivery or a duplicate and goes on (its lease extended); a
# queued run of a paused, out-of-budget (unless its document was admitted)
# or cancelled session is refused, unless the worker says it began the run
# earlier (`began`: a start reported late, see the worker's
# `started_after`), which lets it finish while its session is paused or out
# of budget: a refused run is cancelled and its document
# goes back to pending (the attempt does not count), or is cancelled with
# its session. Anything else (another task id, a finished run) is refused
# without a change. The runs and documents are looked up one by one by
# primary key, in document order (the lock order), through LATERAL
# subqueries with FOR UPDATE, which the planner cannot flatten into a join:
# a hash join over a table whose statistics lag behind its growth (a new
# session's runs) would scan all of it for every report.
_STARTED_SQL = _numbered(
    """
WITH u AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[],
                         $6::timestamptz[])
      WITH ORDINALITY AS u(document_id, stage, attempt, task_id, worker, began, ord)
),
cur AS (
    SELECT u.ord, r.state AS r_state, r.task_id AS r_task, d.session_id, d.state AS d_state,
           d.stage AS d_stage, d.attempts, d.reservation_id, d.size_bytes, s.state AS s_state
    FROM (SELECT * FROM u ORDER BY document_id) u
    CROSS JOIN LATERAL (
        SELECT r.state, r.task_id FROM session.stage_runs r
        WHERE r.document_id = u.document_id AND r.stage = u.stage AND r.attempt = u.attempt
        FOR UPDATE) r
    CROSS JOIN LATERAL (
        SELECT * FROM session.session_documents d WHERE d.document_id = u.document_id
        FOR UPDATE) d
    JOIN session.import_sessions s ON s.session_id = d.session_id
),
act AS (
    SELECT u.*, c.r_state, c.r_task, c.session_id, c.d_state, c.d_stage, c.attempts, c.reservation_id,
           c.size_bytes, c.s_state,
        CASE WHEN u.task_id <> '' AND u.task_id <> c.r_task THEN 'none'
             WHEN c.r_state = 'running' THEN 'extend'
             WHEN c.r_state <> 'queued' THEN 'none'
             WHEN c.s_state = 'running'
                  OR (c.s_state = 'budget_exhausted' AND c.reservation_id IS NOT NULL) THEN 'start'
             -- a run already under way (reported late) finishes while its session is paused
             WHEN u.began IS NOT NULL AND c.s_state IN ('paused', 'budget_exhausted') THEN 'start'
             ELSE 'refuse' END AS action,
        -- the run's deadline: time limit (scaled by size) plus grace
        ceil($7 + $8 * c.size_bytes / 1048576.0) + ceil($9) + $9 AS deadline_seconds
    FROM u JOIN cur c USING (ord)
),
nd0 AS (
    SELECT act.ord, act.session_id, act.document_id, act.d_state AS doc_old_state, act.d_stage,
           act.attempt, act.attempts, act.reservation_id, act.action,
        CASE WHEN action = 'start' THEN 'running'
             WHEN s_state = 'cancelled' AND d_state IN ('pending', 'queued', 'running') THEN 'cancelled'
             WHEN d_state = 'queued' THEN 'pending'
             ELSE d_state END AS d_state,
        0 AS cost_add
    FROM act WHERE action IN ('start', 'refuse')
),
nd AS (
    SELECT nd0.*,
        CASE WHEN d_state <> doc_old_state THEN jsonb_build_object(
            'state', d_state, 'prev', doc_old_state, 'stage', coalesce(d_stage, ''),
            'prev_stage', coalesce(d_stage, ''), 'attempt', attempt) END AS payload,
        (d_state = 'cancelled' AND reservation_id IS NOT NULL) AS release
    FROM nd0
),
runs AS (
    UPDATE session.stage_runs r SET
        state = CASE a.action WHEN 'start' THEN 'running' WHEN 'refuse' THEN 'cancelled'
                ELSE r.state END,
        started_at = CASE WHEN a.action = 'start' THEN least(coalesce(a.began, now()), now())
                          ELSE r.started_at END,
        finished_at = CASE WHEN a.action = 'refuse' THEN now() ELSE r.finished_at END,
        worker = CASE WHEN a.action = 'refuse' THEN r.worker
                      ELSE coalesce(nullif(a.worker, ''), r.worker) END,
        lease_expires_at = CASE WHEN a.action = 'refuse' THEN r.lease_expires_at
                                ELSE greatest(r.lease_expires_at,
                                              now() + make_interval(secs => $10)) END,
        error_code = CASE WHEN a.action = 'refuse' THEN 'refused' ELSE r.error_code END,
        error_message = CASE WHEN a.action = 'refuse'
                             THEN 'session ' || a.s_state || ' when the run started'
                             ELSE r.error_message END
    FROM act a
    WHERE r.document_id = a.document_id AND r.stage = a.stage AND r.attempt = a.attempt
      AND a.action IN ('start', 'extend', 'refuse')
    RETURNING r.document_id, r.stage, r.attempt,
              now() + make_interval(secs => a.deadline_seconds) AS deadline
),
docs AS (
    UPDATE session.session_documents d SET
        state = nd.d_state,
        attempts = CASE WHEN nd.doc_old_state = 'queued' AND nd.d_state = 'pending'
                        THEN greatest(nd.attempts - 1, 0) ELSE nd.attempts END,
        reservation_id = CASE WHEN nd.release THEN NULL ELSE d.reservation_id END,
        reserved_amount = CASE WHEN nd.release THEN NULL ELSE d.reserved_amount END,
        updated_at = now()
    FROM nd WHERE d.document_id = nd.document_id AND nd.d_state <> nd.doc_old_state
    RETURNING 1
),
"""
    + _REPORT_TAIL
    + """
SELECT u.ord, c.ord IS NOT NULL AS found, a.action, runs.deadline,
       CASE WHEN nd.release THEN nd.reservation_id END AS release_id,
       (SELECT count(*) FROM nt) AS notified
FROM u LEFT JOIN cur c USING (ord) LEFT JOIN act a USING (ord) LEFT JOIN nd USING (ord)
LEFT JOIN runs ON runs.document_id = u.document_id AND runs.stage = u.stage AND runs.attempt = u.attempt
ORDER BY u.ord
""",
    11,
    _TAIL_PARAMS,
)


# ---------------------------------------------------------------- the store


class SessionStore:
    """The session service's persistence; every method is one or a few transactions."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        # The report ingest runs one short transaction after another: each
        # kind keeps its connection (see db.HeldConnection); `close()` gives
        # them back. A started report commits without waiting for its WAL
        # flush (the next synchronous commit, e.g. the run's result, flushes
        # it): a database crash can lose only the last few, and a run whose
        # start was lost still looks queued (its lease renewed while its
        # worker holds it), and its result is accepted as from a queued run.
        # Results, dispatch rounds and the cost ledger stay synchronous.
        # Both statements run on one generic plan made of primary-key lookups in
        # nested loops: planning them costs more than running them for a batch
        # of one, and a plan chosen from the statistics of a table that grew
        # since (a new session's stage runs, at first "170 rows") would scan
        # the whole table for every report. Their joins between the batch's
        # own rows (at most report_batch) stay cheap as nested loops.
        plan = {
            "plan_cache_mode": "force_generic_plan",
            "enable_seqscan": "off",
            "enable_hashjoin": "off",
            "enable_mergejoin": "off",
        }
        self._started_conn = db.HeldConnection(pool, {"synchronous_commit": "off", **plan})
        self._results_conn = db.HeldConnection(pool, plan)
        # A dispatcher's rounds: three short statements or transactions a round, serially.
        self._dispatch_conn = db.HeldConnection(pool)

    async def close(self) -> None:
        """Returns the connections this store holds to the pool (before the pool closes)."""
        await self._started_conn.close()
        await self._results_conn.close()
        await self._dispatch_conn.close()

    # ------------------------------------------------------------ projects

    async def find_project(
        self, *, project_id: str | None = None, name: str | None = None
    ) -> Project | None:
        async with self.pool.acquire() as conn:
            return await self._find_project(conn, project_id=project_id, name=name)

    async def _find_project(
        self, conn: asyncpg.Connection, *, project_id: str | None, name: str | None
    ) -> Project | None:
        if project_id:
            row = await conn.fetchrow(
                "SELECT * FROM session.projects WHERE project_id = $1",
                _uuid(project_id, "project_id"),
            )
        else:
            row = await conn.fetchrow(
                "SELECT * FROM session.projects WHERE lower(btrim(name)) = lower(btrim($1))", name
            )
        return (
            None if row is None else Project(str(row["project_id"]), row["name"], row["created_at"])
        )

    async def _ensure_project(self, conn: asyncpg.Connection, spec: NewSession) -> Project:
        if spec.project_id:
            found = await self._find_project(conn, project_id=spec.project_id, name=None)
            if found is None:
                raise NotFound("project", spec.project_id)
            return found
        name = (spec.project_name or "").strip()
        # ON CONFLICT on the case-insensitive unique index: a project is reused, never duplicated.
        row = await conn.fetchrow(
            """
            INSERT INTO session.projects (project_id, name) VALUES ($1, $2)
            ON CONFLICT ((lower(btrim(name)))) DO UPDATE SET name = session.projects.name
            RETURNING *
            """,
            uuid.uuid4(),
            name,
        )
        return Project(str(row["project_id"]), row["name"], row["created_at"])

    # ------------------------------------------------------------ sessions

    async def find_by_request_id(self, request_id: str) -> SessionInfo | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(_SESSION_SELECT + " WHERE s.request_id = $1", request_id)
        return None if row is None else _session(row)

    async def create_session(
        self, spec: NewSession, batches: AsyncIterator[Sequence[NewDocument]]
    ) -> tuple[SessionInfo, bool]:
        """Creates the session and its documents in one transaction.

        `batches` is consumed inside the transaction (the caller streams the
        manifest's pages into it). Returns (session, created); a concurrent
        create with the same request_id returns the session it made, created False.
        """
        session_id = uuid.UUID(spec.session_id)
        async with self.pool.acquire() as conn:
            try:
                async with conn.transaction():
                    project = await self._ensure_project(conn, spec)
                    await conn.execute(
                        """
                        INSERT INTO session.import_sessions
                            (session_id, request_id, project_id, manifest_id, source_path,
                             budget_limit, max_in_flight, category_priority, estimated_cost,
                             trace_context)
                        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                        """,
                        session_id,
                        spec.request_id,
                        uuid.UUID(project.project_id),
                        uuid.UUID(spec.manifest_id),
                        spec.source_path,
                        spec.budget_limit,
                        spec.max_in_flight,
                        list(spec.category_priority),
                        spec.estimated_cost,
                        spec.trace_context,
                    )
                    counts: Counter[str] = Counter()
                    estimated = ZERO
                    async for batch in batches:
                        records = []
                        for doc in batch:
                            counts[doc.state] += 1
                            if doc.state == st.PENDING:
                                estimated += doc.estimated_cost
                            records.append(
                                (
                                    uuid.uuid4(),
                                    session_id,
                                    uuid.UUID(doc.manifest_file_id),
                                    doc.ordinal,
                                    doc.dispatch_rank,
                                    doc.relative_path,
                                    doc.raw_path,
                                    doc.sha256,
                                    doc.size_bytes,
                                    doc.category,
                                    doc.priority,
                                    doc.plan,
                                    doc.page_count,
                                    doc.ocr_page_count,
                                    doc.state,
                                    doc.error_class,
                                    doc.error_code,
                                    doc.error_message,
                                    doc.skip_reason,
                                    doc.estimated_cost,
                                    doc.problem_kind,
                                    doc.mime_type,
                                )
                            )
                        if records:
                            await conn.copy_records_to_table(
                                "session_documents",
                                schema_name="session",
                                columns=_COPY_DOC_COLUMNS,
                                records=records,
                            )
                    await conn.execute(
                        """
                        UPDATE session.import_sessions SET
                            total_documents = $2, count_pending = $3, count_skipped = $4,
                            count_failed = $5, estimated_cost = coalesce(estimated_cost, $6)
                        WHERE session_id = $1
                        """,
                        session_id,
                        sum(counts.values()),
                        counts[st.PENDING],
                        counts[st.SKIPPED],
                        counts[st.FAILED],
                        estimated,
                    )
                    changes = _Changes()
                    changes.note(
                        session_id,
                        "state_change",
                        {"state": st.S_CREATED, "reason": "created", "prev": ""},
                    )
                    if spec.start:
                        changes.session_state(session_id, st.S_RUNNING, "started")
                    await changes.flush(conn)
            except asyncpg.UniqueViolationError as exc:
                # A concurrent create of the same request id got there first (its session id is
                # derived from the request id, so either key may be the one that conflicts).
                if spec.request_id and exc.constraint_name in (
                    "import_sessions_request_id_key", "import_sessions_pkey"
                ):
                    existing = await self.find_by_request_id(spec.request_id)
                    if existing is not None:
                        return existing, False
                if exc.constraint_name == "import_sessions_pkey":
                    raise AlreadyExists(f"session {spec.session_id} already exists") from None
                if exc.constraint_name == "session_documents_file_key":
                    raise InvalidArgument("the manifest lists a file twice") from None
                raise
        return await self.get_session(spec.session_id), True

    async def get_session(
        self, session_id: str, *, stall_after: float | None = None
    ) -> SessionInfo:
        sid = _uuid(session_id, "session_id")
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(_SESSION_SELECT + " WHERE s.session_id = $1", sid)
            if row is None:
                raise NotFound("session", session_id)
            stalled = 0
            if stall_after is not None:
                stalled = await self._stalled_count(conn, sid, stall_after)
        return _session(row, stalled)

    async def _stalled_count(
        self, conn: asyncpg.Connection, sid: uuid.UUID, stall_after: float
    ) -> int:
        return await conn.fetchval(
            """
            SELECT count(*) FROM session.session_documents
            WHERE session_id = $1 AND state IN ('queued', 'running')
              AND updated_at < now() - make_interval(secs => $2)
            """,
            sid,
            stall_after,
        )

    async def metric_counts(self, *, stall_after: float) -> MetricCounts:
        """Sessions and their document counters by state, and stalled documents (for /metrics).

        One grouped pass over `import_sessions` (its counters, not
        `session_documents`), and a stalled count bounded by the documents
        in flight of active sessions (the (session_id, state) index).
        """
        columns = ", ".join(f"sum(count_{state})::bigint AS {state}" for state in st.DOCUMENT_STATES)
        async with self.pool.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                rows = await conn.fetch(
                    f"SELECT state, count(*) AS sessions, {columns} "
                    "FROM session.import_sessions GROUP BY state"
                )
                stalled = await conn.fetchval(
                    """
                    SELECT count(*) FROM session.import_sessions s
                    JOIN session.session_documents d ON d.session_id = s.session_id
                    WHERE s.state IN ('running', 'paused', 'budget_exhausted')
                      AND d.state IN ('queued', 'running')
                      AND d.updated_at < now() - make_interval(secs => $1)
                    """,
                    stall_after,
                )
        return MetricCounts(
            sessions={r["state"]: r["sessions"] for r in rows},
            documents={(r["state"], state): r[state] for r in rows for state in st.DOCUMENT_STATES},
            stalled=stalled,
        )

    async def snapshot(self, session_id: str, *, stall_after: float) -> Snapshot:
        """The session, its stage counts and progress samples, as of one instant."""
        sid = _uuid(session_id, "session_id")
        async with self.pool.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                row = await conn.fetchrow(_SESSION_SELECT + " WHERE s.session_id = $1", sid)
                if row is None:
                    raise NotFound("session", session_id)
                stalled = await self._stalled_count(conn, sid, stall_after)
                stage_rows = await conn.fetch(_STAGE_COUNTS_SQL, [sid])
                samples = await conn.fetch(
                    "SELECT sampled_at, finished FROM session.progress_samples "
                    "WHERE session_id = $1 ORDER BY sampled_at",
                    sid,
                )
                now = await conn.fetchrow(
                    f"SELECT now() AS now, (SELECT {_EVENT_DIGEST} FROM session.session_events e"
                    " WHERE e.session_id = $1 AND e.seq = $2) AS digest",
                    sid,
                    row["last_seq"],
                )
        return Snapshot(
            _session(row, stalled),
            _stage_counts(stage_rows),
            tuple((r["sampled_at"], r["finished"]) for r in samples),
            now["now"],
            now["digest"],
        )

    async def list_sessions(
        self,
        *,
        state: str | None,
        project_name: str | None,
        created_after: dt.datetime | None,
        limit: int,
        cursor: dict[str, Any] | None,
    ) -> tuple[list[SessionInfo], dict[str, Any] | None]:
        conditions, args = [], []
        if state:
            args.append(state)
            conditions.append(f"s.state = ${len(args)}")
        if project_name:
            args.append(project_name)
            conditions.append(f"lower(btrim(p.name)) = lower(btrim(${len(args)}))")
        if created_after:
            args.append(created_after)
            conditions.append(f"s.created_at > ${len(args)}")
        if cursor:
            try:
                at = dt.datetime.fromisoformat(cursor["c"])
                after_id = uuid.UUID(cursor["i"])
            except (KeyError, ValueError, TypeError):
                raise InvalidArgument.field(
                    "page_token", "is not a token this service issued"
                ) from None
            args.extend([at, after_id])
            conditions.append(f"(s.created_at, s.session_id) < (${len(args) - 1}, ${len(args)})")
        where = (" WHERE " + " AND ".join(conditions)) if conditions else ""
        args.append(limit + 1)
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                _SESSION_SELECT
                + where
                + f" ORDER BY s.created_at DESC, s.session_id DESC LIMIT ${len(args)}",
                *args,
            )
        sessions = [_session(r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = sessions[-1]
            next_cursor = {"c": last.created_at.isoformat(), "i": last.session_id}
        return sessions, next_cursor

    async def _set_session_state(
        self,
        session_id: str,
        allowed_from: Iterable[str],
        new_state: str,
        reason: str,
        *,
        noop_states: Iterable[str] = (),
        trace_context: str | None = None,
    ) -> SessionInfo:
        """Moves the session; with `trace_context`, its next runs join that trace."""
        sid = _uuid(session_id, "session_id")

        async def run() -> None:
            async with self.pool.acquire() as conn, conn.transaction():
                current = await conn.fetchval(
                    "SELECT state FROM session.import_sessions WHERE session_id = $1 FOR UPDATE",
                    sid,
                )
                if current is None:
                    raise NotFound("session", session_id)
                if trace_context is not None:
                    await _set_trace_context(conn, sid, trace_context)
                if current in noop_states:
                    return
                if current not in allowed_from:
                    raise FailedPrecondition(
                        f"session is {current}; it cannot become {new_state}",
                        subject=f"sessions/{session_id}",
                    )
                changes = _Changes()
                changes.session_state(sid, new_state, reason)
                # A session with nothing left to do finishes at once.
                await changes.flush(conn)

        await _retrying(run)
        return await self.get_session(session_id)

    async def start_session(
        self, session_id: str, *, trace_context: str | None = None
    ) -> SessionInfo:
        return await self._set_session_state(
            session_id,
            (st.S_CREATED,),
            st.S_RUNNING,
            "started",
            noop_states=(st.S_RUNNING, *st.SESSION_TERMINAL - {st.S_CANCELLED}),
            trace_context=trace_context,
        )

    async def pause_session(
        self, session_id: str, reason: str = "paused by an operator"
    ) -> SessionInfo:
        return await self._set_session_state(
            session_id,
            (st.S_RUNNING, st.S_BUDGET),
            st.S_PAUSED,
            reason,
            noop_states=(st.S_PAUSED,),
        )

    async def resume_session(
        self,
        session_id: str,
        reason: str = "resumed by an operator",
        *,
        trace_context: str | None = None,
    ) -> SessionInfo:
        return await self._set_session_state(
            session_id,
            (st.S_PAUSED, st.S_BUDGET, st.S_CREATED),
            st.S_RUNNING,
            reason,
            noop_states=(st.S_RUNNING,),
            trace_context=trace_context,
        )

    async def cancel_session(
        self, session_id: str, *, batch: int = 5000
    ) -> tuple[SessionInfo, list[str], list[str]]:
        """Cancels the session, then its active documents and live runs in batches.

        Returns the session, the reservations of cancelled runs to release and the task ids
        of the runs cancelled (their messages are to be taken back).
        """
        await self._set_session_state(
            session_id,
            (st.S_CREATED, st.S_RUNNING, st.S_PAUSED, st.S_BUDGET),
            st.S_CANCELLED,
            "cancelled by an operator",
            noop_states=(st.S_CANCELLED,),
        )
        sid = uuid.UUID(session_id)
        release: list[str] = []
        tasks: list[str] = []

        async def one_batch() -> int:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    f"""
                    SELECT {", ".join(_DOC_COLUMNS)} FROM session.session_documents
                    WHERE session_id = $1 AND state IN ('pending', 'queued', 'running')
                    ORDER BY document_id LIMIT $2 FOR UPDATE
                    """,
                    sid,
                    batch,
                )
                if not rows:
                    return 0
                ids = [r["document_id"] for r in rows]
                cancelled = await conn.fetch(
                    """
                    UPDATE session.stage_runs SET state = 'cancelled', finished_at = now()
                    WHERE document_id = ANY($1::uuid[]) AND state IN ('queued', 'running')
                    RETURNING task_id
                    """,
                    ids,
                )
                tasks.extend(r["task_id"] for r in cancelled)
                changes = _Changes()
                docs = []
                for row in rows:
                    doc = dict(row)
                    doc["state"] = st.CANCELLED
                    if doc["reservation_id"]:
                        release.append(str(doc["reservation_id"]))
                        doc.update(reservation_id=None, reserved_amount=None)
                    changes.doc(doc, row["state"], row["stage"])
                    docs.append(doc)
                await _write_docs(conn, docs)
                await changes.flush(conn, complete=False)
                return len(rows)

        while await _retrying(one_batch) == batch:
            pass
        return await self.get_session(session_id), release, tasks

    # ------------------------------------------------------------ documents

    async def list_documents(
        self,
        session_id: str,
        *,
        state: str | None,
        stage: str | None,
        error_class: str | None,
        category: str | None,
        stalled: bool | None,
        stall_after: float,
        limit: int,
        after_ordinal: int | None,
    ) -> tuple[list[Document], int | None]:
        sid = _uuid(session_id, "session_id")
        args: list[Any] = [sid, stall_after]
        conditions = ["d.session_id = $1"]
        for column, value in (
            ("state", state),
            ("stage", stage),
            ("error_class", error_class),
            ("category", category),
        ):
            if value:
                args.append(value)
                conditions.append(f"d.{column} = ${len(args)}")
        stalled_expr = (
            "(d.state IN ('queued', 'running') "
            "AND d.updated_at < now() - make_interval(secs => $2))"
        )
        if stalled is True:
            conditions.append(stalled_expr)
        elif stalled is False:
            conditions.append(f"NOT {stalled_expr}")
        if after_ordinal is not None:
            args.append(after_ordinal)
            conditions.append(f"d.ordinal > ${len(args)}")
        args.append(limit + 1)
        async with self.pool.acquire() as conn:
            exists = await conn.fetchval(
                "SELECT 1 FROM session.import_sessions WHERE session_id = $1", sid
            )
            if not exists:
                raise NotFound("session", session_id)
            rows = await conn.fetch(
                f"""
                SELECT d.*, {stalled_expr} AS is_stalled FROM session.session_documents d
                WHERE {" AND ".join(conditions)} ORDER BY d.ordinal LIMIT ${len(args)}
                """,
                *args,
            )
        docs = [_document(r, r["is_stalled"]) for r in rows[:limit]]
        return docs, (docs[-1].ordinal if len(rows) > limit else None)

    async def get_document(
        self, document_id: str, *, stall_after: float
    ) -> tuple[Document, list[StageRun]]:
        did = _uuid(document_id, "document_id")
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                """
                SELECT d.*, (d.state IN ('queued', 'running')
                             AND d.updated_at < now() - make_interval(secs => $2)) AS is_stalled
                FROM session.session_documents d WHERE d.document_id = $1
                """,
                did,
                stall_after,
            )
            if row is None:
                raise NotFound("document", document_id)
            runs = await conn.fetch(
                """
                SELECT * FROM session.stage_runs WHERE document_id = $1
                ORDER BY array_position(ARRAY['extract', 'chunk', 'entities'], stage), attempt
                """,
                did,
            )
        return _document(row, row["is_stalled"]), [_run(r) for r in runs]

    async def iter_documents(
        self, session_id: str, *, page: int = 5000
    ) -> AsyncIterator[list[Document]]:
        """Every document of a session in ordinal order, a page at a time."""
        sid = _uuid(session_id, "session_id")
        after = -1
        while True:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(
                    "SELECT * FROM session.session_documents WHERE session_id = $1 AND ordinal > $2 "
                    "ORDER BY ordinal LIMIT $3",
                    sid,
                    after,
                    page,
                )
            if not rows:
                return
            yield [_document(r) for r in rows]
            after = rows[-1]["ordinal"]

    async def iter_runs(
        self, session_id: str, *, states: Sequence[str] = (), page: int = 5000
    ) -> AsyncIterator[list[StageRun]]:
        sid = _uuid(session_id, "session_id")
        after: tuple[uuid.UUID, str, int] = (uuid.UUID(int=0), "", 0)
        while True:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(
                    """
                    SELECT * FROM session.stage_runs
                    WHERE session_id = $1 AND (cardinality($2::text[]) = 0 OR state = ANY($2::text[]))
                      AND (document_id, stage, attempt) > ($3, $4, $5)
                    ORDER BY document_id, stage, attempt LIMIT $6
                    """,
                    sid,
                    list(states),
                    *after,
                    page,
                )
            if not rows:
                return
            yield [_run(r) for r in rows]
            last = rows[-1]
            after = (last["document_id"], last["stage"], last["attempt"])

    async def stage_count_drift(self, session_id: str) -> dict[str, tuple[int, int]]:
        """Stage counts that differ from a recount of the runs: {"extract succeeded": (kept, recounted)}."""
        sid = _uuid(session_id, "session_id")
        async with self.pool.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                kept = _stage_counts(await conn.fetch(_STAGE_COUNTS_SQL, [sid]))
                recounted = _stage_counts(await conn.fetch(_STAGE_RECOUNT_SQL, sid))
        return {
            f"{a.stage} {kind}": (getattr(a, kind), getattr(b, kind))
            for a, b in zip(kept, recounted, strict=True)
            for kind in _COUNT_KINDS
            if getattr(a, kind) != getattr(b, kind)
        }

    async def fold_stage_counts(self) -> None:
        """Adds the stage-count deltas written so far to `stage_counts`.

        One statement: the deltas it deletes and the counts it adds commit
        together, so a reader sees each change once. Deltas written meanwhile
        wait for the next fold; two replicas folding at once each fold what
        the other did not (a delta row is deleted once).
        """
        async with self.pool.acquire() as conn:
            await conn.execute(
                """
                WITH gone AS (DELETE FROM session.stage_count_deltas RETURNING *)
                INSERT INTO session.stage_counts AS c
                    (session_id, stage, queued, running, succeeded, failed, cache_hits)
                SELECT g.session_id, g.stage, sum(g.queued), sum(g.running), sum(g.succeeded),
                       sum(g.failed), sum(g.cache_hits)
                FROM gone g
                -- the deltas of a deleted session (its runs went with it) are dropped
                WHERE EXISTS (SELECT 1 FROM session.import_sessions i
                              WHERE i.session_id = g.session_id)
                GROUP BY g.session_id, g.stage ORDER BY g.session_id, g.stage
                ON CONFLICT (session_id, stage) DO UPDATE SET
                    queued = c.queued + excluded.queued,
                    running = c.running + excluded.running,
                    succeeded = c.succeeded + excluded.succeeded,
                    failed = c.failed + excluded.failed,
                    cache_hits = c.cache_hits + excluded.cache_hits
                """
            )

    async def recount(self, session_id: str) -> DocumentCounts:
        sid = _uuid(session_id, "session_id")
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT state, count(*) AS n FROM session.session_documents WHERE session_id = $1 "
                "GROUP BY state",
                sid,
            )
        return DocumentCounts(**{r["state"]: r["n"] for r in rows})

    async def retry_documents(
        self,
        session_id: str,
        *,
        failed: bool,
        stalled: bool,
        document_ids: Sequence[str],
        force: bool,
        stall_after: float,
        trace_context: str | None = None,
    ) -> Retried:
        sid = _uuid(session_id, "session_id")
        ids = [_uuid(d, f"document_ids[{i}]") for i, d in enumerate(document_ids)]

        async def run() -> int:
            async with self.pool.acquire() as conn, conn.transaction():
                state = await conn.fetchval(
                    "SELECT state FROM session.import_sessions WHERE session_id = $1", sid
                )
                if state is None:
                    raise NotFound("session", session_id)
                if state == st.S_CANCELLED:
                    raise FailedPrecondition(
                        "the session is cancelled; nothing can be retried",
                        subject=f"sessions/{session_id}",
                    )
                if trace_context is not None:
                    await _set_trace_context(conn, sid, trace_context)
                rows = await conn.fetch(
                    f"""
                    SELECT {", ".join(_DOC_COLUMNS)},
                           (state IN ('queued', 'running')
                            AND updated_at < now() - make_interval(secs => $6)) AS is_stalled
                    FROM session.session_documents
                    WHERE session_id = $1 AND (
                        ($2 AND state = 'failed' AND ($4 OR error_class = 'retryable'))
                     OR ($3 AND state IN ('queued', 'running')
                         AND updated_at < now() - make_interval(secs => $6))
                     OR document_id = ANY($5::uuid[]))
                    ORDER BY document_id FOR UPDATE
                    """,
                    sid,
                    failed,
                    stalled,
                    force,
                    ids,
                    stall_after,
                )
                found = {r["document_id"] for r in rows}
                missing = [str(i) for i in ids if i not in found]
                if missing:
                    raise NotFound(
                        "document",
                        missing[0],
                        f"document {missing[0]} is not in session {session_id}",
                    )
                explicit = set(ids)
                changes = _Changes()
                docs: list[dict[str, Any]] = []
                stalled_ids: list[uuid.UUID] = []
                for row in rows:
                    doc = dict(row)
                    doc.pop("is_stalled")
                    old_state, old_stage = doc["state"], doc["stage"]
                    if old_state == st.FAILED:
                        if doc["error_class"] == st.PERMANENT and not force:
                            raise FailedPrecondition(
                                f"document {doc['document_id']} failed permanently "
                                f"({doc['error_message']}); retry it with force",
                                subject=f"documents/{doc['document_id']}",
                            )
                    elif row["is_stalled"]:
                        stalled_ids.append(doc["document_id"])
                    elif doc["document_id"] in explicit:
                        raise FailedPrecondition(
                            f"document {doc['document_id']} is {old_state}; only failed or stalled "
                            "documents can be retried",
                            subject=f"documents/{doc['document_id']}",
                        )
                    else:
                        continue
                    doc.update(
                        state=st.PENDING,
                        attempts=0,
                        not_before=None,
                        error_class=None,
                        error_code=None,
                        error_message=None,
                    )
                    changes.doc(doc, old_state, old_stage)
                    docs.append(doc)
                if stalled_ids:
                    # The documents go on: they keep their budget reservation.
                    await conn.execute(
                        """
                        UPDATE session.stage_runs SET state = 'expired', finished_at = now(),
                            error_class = 'retryable', error_code = 'stalled',
                            error_message = 'retried by an operator after stalling'
                        WHERE document_id = ANY($1::uuid[]) AND state IN ('queued', 'running')
                        """,
                        stalled_ids,
                    )
                await _write_docs(conn, docs)
                if docs and state == st.S_WITH_ERRORS:
                    changes.session_state(sid, st.S_RUNNING, "documents retried")
                await changes.flush(conn)
                return len(docs)

        count = await _retrying(run)
        return Retried(count, await self.get_session(session_id))

    # ------------------------------------------------------------ dispatch

    async def dispatchable_sessions(self, topup: float) -> list[str]:
        """Running sessions with a document ready to dispatch and room to top up, oldest first.

        Room to top up: at least `topup` of the session's in-flight cap free
        (at least one slot), or, with any slot free, fewer runs than that
        queued (the workers are about to run dry). Its counters say how many
        runs are queued and running (see `dispatch_session`).

        A probe per session along the pending index, in dispatch order: as an
        EXISTS, the planner turned it into a scan of the session's documents,
        which grows with the session (the pending ones are the last rows).
        """
        async with self._dispatch_conn.acquire() as conn:
            rows = await conn.fetch(
                """
                SELECT s.session_id FROM session.import_sessions s
                CROSS JOIN LATERAL (
                    SELECT greatest(1, ceil(s.max_in_flight * $1::float8))::int AS batch,
                           s.max_in_flight - s.count_queued - s.count_running AS room) t
                CROSS JOIN LATERAL (
                    SELECT 1 FROM session.session_documents d
                    WHERE d.session_id = s.session_id AND d.state = 'pending'
                      AND (d.not_before IS NULL OR d.not_before <= now())
                      AND (s.state = 'running' OR d.reservation_id IS NOT NULL)
                    ORDER BY d.dispatch_rank, d.ordinal
                    LIMIT 1) ready
                WHERE s.state IN ('running', 'budget_exhausted')
                  AND t.room > 0 AND (t.room >= t.batch OR s.count_queued < t.batch)
                ORDER BY s.created_at
                """,
                topup,
            )
        return [str(r["session_id"]) for r in rows]

    async def live_runs(self) -> int:
        async with self._dispatch_conn.acquire() as conn:
            return await conn.fetchval(
                "SELECT count(*) FROM session.stage_runs WHERE state IN ('queued', 'running')"
            )

    async def dispatch_session(
        self,
        session_id: str,
        *,
        limit: int,
        timing: Callable[[int], Timing],
        reserve: Callable[[SessionInfo, list[Claimed]], Awaitable[Reservations]],
    ) -> DispatchRound:
        """One dispatch round for one session, in one transaction.

        Takes the session's dispatch lock, without waiting (another
        dispatcher working on it means this one moves on), claims up to min(limit, the session's
        free in-flight slots) pending documents with FOR UPDATE SKIP LOCKED,
        documents resuming a later stage or a retry first, then by dispatch
        rank; calls `reserve` (inside the transaction: its keys are
        idempotent, so a rollback and a new round reserve nothing twice);
        creates the stage runs with their task ids and leases and marks the
        documents queued. The caller publishes after this returns.
        """
        sid = uuid.UUID(session_id)
        async with self._dispatch_conn.acquire() as conn, conn.transaction():
            # One dispatcher per session at a time, by a transaction-scoped
            # advisory lock rather than the session row's lock: stage reports
            # update that row (counters) all the time and must not wait for a
            # dispatch round; this round takes the row's lock only at its end,
            # in the counters update, just before it commits.
            if not await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock($1, hashtext($2))", _DISPATCH_LOCK, session_id
            ):
                return DispatchRound(session_id, (), False)
            row = await conn.fetchrow(
                _SESSION_SELECT
                + " WHERE s.session_id = $1 AND s.state IN ('running', 'budget_exhausted')",
                sid,
            )
            if row is None:
                return DispatchRound(session_id, (), False)
            session = _session(row)
            # A document is queued or running exactly while it has its one live run
            # (stage_runs_one_live_key), so the session's counters are its live runs.
            live = session.counts.queued + session.counts.running
            room = min(limit, session.max_in_flight - live)
            if room <= 0:
                return DispatchRound(session_id, (), False)
            cols = ", ".join(_DOC_COLUMNS)
            # Out of budget, only documents already admitted (reserved) go on.
            admitted_only = session.state == st.S_BUDGET
            rows = list(
                await conn.fetch(
                    f"""
                SELECT {cols} FROM session.session_documents
                WHERE session_id = $1 AND state = 'pending' AND stage IS NOT NULL
                  AND (not_before IS NULL OR not_before <= now())
                  AND (NOT $3 OR reservation_id IS NOT NULL)
                ORDER BY dispatch_rank, ordinal LIMIT $2 FOR UPDATE SKIP LOCKED
                """,
                    sid,
                    room,
                    admitted_only,
                )
            )
            if len(rows) < room and not admitted_only:
                rows += await conn.fetch(
                    f"""
                    SELECT {cols} FROM session.session_documents
                    WHERE session_id = $1 AND state = 'pending' AND stage IS NULL
                      AND (not_before IS NULL OR not_before <= now())
                    ORDER BY dispatch_rank, ordinal LIMIT $2 FOR UPDATE SKIP LOCKED
                    """,
                    sid,
                    room - len(rows),
                )
            if not rows:
                return DispatchRound(session_id, (), False)
            claimed = []
            budgeted = session.budget_limit is not None
            for r in rows:
                # A document is admitted by reserving its whole estimate before its
                # first stage is enqueued; it keeps that reservation to its end.
                needs = (
                    budgeted and r["reservation_id"] is None and (r["estimated_cost"] or ZERO) > 0
                )
                claimed.append(
                    Claimed(
                        DispatchDoc.of(r),
                        r["stage"] or STAGES[0],
                        r["attempt_seq"] + 1,
                        r["estimated_cost"] if needs else ZERO,
                    )
                )
            # The cost service reserves while the runs are prepared here.
            reserving = None
            if any(c.estimate > 0 for c in claimed):
                reserving = asyncio.get_running_loop().create_task(reserve(session, claimed))
            try:
                db_now = await conn.fetchval("SELECT now()")
                prepared = []
                ids = _task_ids(len(claimed))
                for c, r, task_id in zip(claimed, rows, ids, strict=True):
                    t = timing(c.document.size_bytes)
                    lease = db_now + dt.timedelta(seconds=t.lease)
                    doc = dict(r)
                    doc.update(
                        state=st.QUEUED,
                        stage=c.stage,
                        attempts=r["attempts"] + 1,
                        attempt_seq=c.attempt,
                        not_before=None,
                    )
                    prepared.append((c, r, doc, t, task_id, lease))
                reservations = await reserving if reserving is not None else Reservations()
            finally:
                if reserving is not None and not reserving.done():
                    reserving.cancel()
            run_records, docs, dispatched = [], [], []
            changes = _Changes()
            for c, r, doc, t, task_id, lease in prepared:
                document_id = c.document.document_id
                if document_id in reservations.refused:
                    continue
                granted = reservations.granted.get(document_id)
                reservation = uuid.UUID(granted[0]) if granted else None
                run_records.append(
                    (
                        r["document_id"],
                        c.stage,
                        c.attempt,
                        sid,
                        st.RUN_QUEUED,
                        task_id,
                        reservation,
                        granted[1] if granted else None,
                        db_now,
                        lease,
                    )
                )
                if granted:
                    doc.update(reservation_id=reservation, reserved_amount=granted[1])
                changes.doc(doc, r["state"], r["stage"], attempt=c.attempt)
                docs.append(doc)
                dispatched.append(
                    Dispatched(
                        session_id,
                        c.document,
                        session.source_path,
                        c.stage,
                        c.attempt,
                        task_id,
                        t,
                        lease,
                        db_now + dt.timedelta(seconds=t.message_ttl),
                    )
                )
            if run_records:
                await conn.copy_records_to_table(
                    "stage_runs",
                    schema_name="session",
                    columns=(
                        "document_id",
                        "stage",
                        "attempt",
                        "session_id",
                        "state",
                        "task_id",
                        "reservation_id",
                        "reserved_amount",
                        "queued_at",
                        "lease_expires_at",
                    ),
                    records=run_records,
                )
                await _write_docs(conn, docs)
            if reservations.exhausted_reason:
                changes.session_state(sid, st.S_BUDGET, reservations.exhausted_reason)
            await changes.flush(conn, complete=False)
        return DispatchRound(
            session_id,
            tuple(dispatched),
            saturated=len(rows) >= limit and not reservations.exhausted_reason,
            budget_exhausted=reservations.exhausted_reason is not None,
            trace_context=session.trace_context,
        )

    async def undo_dispatch(self, dispatched: Sequence[Dispatched], reason: str) -> list[str]:
        """Puts back runs whose messages could not be published; the attempt does not count.

        Returns reservations to release.
        """
        release: list[str] = []

        async def run() -> None:
            release.clear()
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    _RUN_DOC_SELECT
                    + """
                    WHERE r.task_id = ANY($1::text[]) AND r.state = 'queued'
                    ORDER BY r.document_id FOR UPDATE OF r, d
                    """,
                    [d.task_id for d in dispatched],
                )
                changes, docs, runs = _Changes(), [], []
                for row in rows:
                    run_ = _mutable(row, "r_", _RUN_COLUMNS)
                    doc = _mutable(row, "d_", _DOC_COLUMNS)
                    run_.update(
                        state=st.RUN_EXPIRED,
                        finished_at=row["db_now"],
                        error_class=st.RETRYABLE,
                        error_code="publish_failed",
                        error_message=reason,
                    )
                    runs.append(run_)
                    if doc["state"] == st.QUEUED:
                        if (
                            run_["reservation_id"]
                            and doc["reservation_id"] == run_["reservation_id"]
                        ):
                            # admitted by this very dispatch: give the budget back
                            release.append(str(run_["reservation_id"]))
                            doc.update(reservation_id=None, reserved_amount=None)
                        old = doc["state"]
                        doc.update(
                            state=st.PENDING,
                            attempts=max(0, doc["attempts"] - 1),
                            not_before=row["db_now"] + dt.timedelta(seconds=1),
                        )
                        changes.doc(doc, old, doc["stage"], attempt=run_["attempt"])
                        docs.append(doc)
                await _write_runs(conn, runs)
                await _write_docs(conn, docs)
                await changes.flush(conn, complete=False)

        await _retrying(run)
        return release

    # ------------------------------------------------------------ reports

    async def apply_started(
        self,
        reports: Sequence[StartedReport],
        *,
        limits: tuple[float, float, float],
        lease_ttl: float,
    ) -> list[StartedOutcome]:
        """Applies ReportStageStarted calls in one statement; one outcome per report.

        `limits` is (base seconds, seconds per MiB, grace) of a run's deadline;
        a started run's lease is renewed for `lease_ttl`.
        """
        unique, index = _dedupe([(r.document_id, r.stage, r.attempt) for r in reports])
        first = [reports[i] for i in unique]

        async def run() -> list[asyncpg.Record]:
            async with self._started_conn.acquire() as conn:
                return await conn.fetch(
                    _STARTED_SQL,
                    [uuid.UUID(r.document_id) for r in first],
                    [r.stage for r in first],
                    [r.attempt for r in first],
                    [r.task_id for r in first],
                    [r.worker for r in first],
                    [r.began for r in first],
                    limits[0],
                    limits[1],
                    limits[2],
                    lease_ttl,
                    False,
                    NOTIFY_CHANNEL,
                    ORIGIN,
                )

        rows = await _retrying(run)
        outcomes = []
        for row in rows:
            if not row["found"]:
                outcomes.append(StartedOutcome(found=False))
            else:
                proceed = row["action"] in ("start", "extend")
                outcomes.append(
                    StartedOutcome(
                        True,
                        proceed,
                        row["deadline"] if proceed else None,
                        release=_s(row["release_id"]),
                    )
                )
        # a duplicate in the same batch: the first one started the run, this one is a redelivery
        return [outcomes[i] for i in index]

    async def apply_results(
        self,
        reports: Sequence[ResultReport],
        *,
        max_attempts: int,
        backoff: tuple[float, float],
    ) -> list[ResultOutcome]:
        """Applies ReportStageResult calls in one statement; one outcome per report.

        Idempotent by (document, stage, attempt): a report about a run already
        succeeded or failed is a replay and changes nothing; a report about a
        run that is no longer live (expired, cancelled) changes nothing either.
        `backoff` is (base, cap) seconds of the retry delay.
        """
        keys = [(r.document_id, r.stage, r.attempt) for r in reports]
        unique, index = _dedupe(keys)
        first = [reports[i] for i in unique]

        async def run() -> list[asyncpg.Record]:
            async with self._results_conn.acquire() as conn:
                return await conn.fetch(
                    _RESULTS_SQL,
                    [uuid.UUID(r.document_id) for r in first],
                    [r.stage for r in first],
                    [r.attempt for r in first],
                    [r.worker for r in first],
                    [r.succeeded for r in first],
                    [None if r.succeeded else r.error_class for r in first],
                    [r.error_code for r in first],
                    [r.error_message for r in first],
                    [json.dumps(list(r.artifacts)) for r in first],
                    [r.cache_hit for r in first],
                    [
                        Decimal(str(r.duration_seconds)) if r.duration_seconds is not None else None
                        for r in first
                    ],
                    [r.cost for r in first],
                    [json.dumps(r.stats) for r in first],
                    [r.task_id for r in first],
                    max_attempts,
                    backoff[0],
                    backoff[1],
                    True,
                    NOTIFY_CHANNEL,
                    ORIGIN,
                )

        rows = await _retrying(run)
        outcomes = []
        late: list[ResultReport] = []
        for report, row in zip(first, rows, strict=True):
            if row["r_state"] is None:
                outcomes.append(ResultOutcome(found=False))
                continue
            sid = str(row["session_id"])
            if not row["same_task"]:
                outcomes.append(ResultOutcome(True, session_id=sid, wrong_task=True))
            elif row["new_doc_state"] is not None:
                settle = (
                    (str(row["settle_id"]), row["settle_amount"] or ZERO)
                    if row["settle_id"]
                    else None
                )
                outcomes.append(ResultOutcome(True, False, row["new_doc_state"], settle, sid))
            elif row["r_state"] in (st.RUN_SUCCEEDED, st.RUN_FAILED):
                outcomes.append(ResultOutcome(True, True, row["old_doc_state"], session_id=sid))
            else:
                logger.info(
                    "stale result for %s/%s attempt %d (run %s); not applied",
                    report.document_id,
                    report.stage,
                    report.attempt,
                    row["r_state"],
                )
                if report.cost is not None and row["r_cost"] is None:
                    late.append(report)
                outcomes.append(
                    ResultOutcome(True, False, row["old_doc_state"], session_id=sid,
                                  stale=row["r_state"])
                )
        if late:
            await self._record_late_costs(late)
        result = []
        for position, i in enumerate(index):
            outcome = outcomes[i]
            if position != unique[i] and outcome.found and not outcome.replayed:
                # the same report twice in one batch: the second is a replay of the first
                outcome = replace(outcome, replayed=True, settle=None)
            result.append(outcome)
        return result

    # ------------------------------------------------------------ reconciler

    async def renew_leases(self, task_ids: Sequence[str], ttl: float) -> tuple[int, list[str]]:
        """Renews for `ttl` seconds the leases of the live runs among `task_ids` (seen alive).

        Returns how many were renewed and the task ids among them of runs no
        longer live (finished, cancelled, expired), whose messages must not
        run. A run locked at the moment (a report of it being applied, which
        is news of it too) is skipped; rows are locked in document order, like
        every other writer's, and never waited for.
        """
        if not task_ids:
            return 0, []
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                """
                WITH live AS (
                    SELECT r.document_id, r.stage, r.attempt FROM session.stage_runs r
                    WHERE r.task_id = ANY($1::text[]) AND r.state IN ('queued', 'running')
                    ORDER BY r.document_id FOR UPDATE SKIP LOCKED
                ),
                renewed AS (
                    UPDATE session.stage_runs r SET lease_expires_at =
                        greatest(r.lease_expires_at, now() + make_interval(secs => $2))
                    FROM live
                    WHERE r.document_id = live.document_id AND r.stage = live.stage
                      AND r.attempt = live.attempt
                    RETURNING 1
                )
                SELECT (SELECT count(*) FROM renewed) AS renewed,
                       array(SELECT r.task_id FROM session.stage_runs r
                             WHERE r.task_id = ANY($1::text[])
                               AND r.state NOT IN ('queued', 'running')) AS gone
                """,
                list(task_ids),
                ttl,
            )
        return row["renewed"], list(row["gone"])

    async def end_unseen_queued(self, alive: Sequence[str], *, older_than: float) -> int:
        """After the broker lost its data: queued runs queued over `older_than` seconds ago and
        not seen alive now (their messages were in the broker) are lost; their leases end now,
        so the reconciler gives their documents a new attempt at its next pass. Returns how
        many. Rows are locked in document order and never waited for."""
        async with self.pool.acquire() as conn:
            return await conn.fetchval(
                """
                WITH lost AS (
                    SELECT r.document_id, r.stage, r.attempt FROM session.stage_runs r
                    WHERE r.state = 'queued' AND r.lease_expires_at > now()
                      AND r.queued_at < now() - make_interval(secs => $2)
                      AND NOT (r.task_id = ANY($1::text[]))
                    ORDER BY r.document_id FOR UPDATE SKIP LOCKED
                ),
                ended AS (
                    UPDATE session.stage_runs r SET lease_expires_at = now()
                    FROM lost WHERE r.document_id = lost.document_id AND r.stage = lost.stage
                      AND r.attempt = lost.attempt
                    RETURNING 1
                )
                SELECT count(*) FROM ended
                """,
                list(alive),
                older_than,
            )

    async def _record_late_costs(self, reports: Sequence[ResultReport]) -> None:
        """Puts what runs no longer live were charged on them, their documents and sessions."""

        async def run() -> None:
            async with self._results_conn.acquire() as conn:
                await conn.execute(
                    _LATE_COSTS_SQL,
                    [uuid.UUID(r.document_id) for r in reports],
                    [r.stage for r in reports],
                    [r.attempt for r in reports],
                    [r.task_id for r in reports],
                    [r.cost for r in reports],
                )

        await _retrying(run)

    async def expire_leases(self, *, max_attempts: int, limit: int = 1000) -> Expired:
        """Expires live runs whose lease ran out; their documents get a new attempt."""
        settle: list[tuple[str, Decimal]] = []
        sessions: set[str] = set()

        async def run() -> int:
            settle.clear()
            sessions.clear()
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    _RUN_DOC_SELECT
                    + """
                    WHERE r.state IN ('queued', 'running') AND r.lease_expires_at < now()
                    ORDER BY r.document_id LIMIT $1 FOR UPDATE OF r, d SKIP LOCKED
                    """,
                    limit,
                )
                changes, docs, runs = _Changes(), [], []
                for row in rows:
                    run_ = _mutable(row, "r_", _RUN_COLUMNS)
                    doc = _mutable(row, "d_", _DOC_COLUMNS)
                    now = row["db_now"]
                    where = run_["state"]
                    message = (
                        f"lease expired while {where} (a lost message or a dead worker); "
                        f"attempt {run_['attempt']}"
                    )
                    run_.update(
                        state=st.RUN_EXPIRED,
                        finished_at=now,
                        error_class=st.RETRYABLE,
                        error_code="lease_expired",
                        error_message=message,
                    )
                    runs.append(run_)
                    old = doc["state"]
                    if old not in (st.QUEUED, st.RUNNING) or doc["stage"] != run_["stage"]:
                        continue
                    if doc["attempts"] >= max_attempts:
                        doc.update(
                            state=st.FAILED,
                            error_class=st.RETRYABLE,
                            error_code="lease_expired",
                            error_message=f"{message}; gave up after {doc['attempts']} attempts",
                        )
                        if doc["reservation_id"]:
                            settle.append((str(doc["reservation_id"]), doc["cost"] or ZERO))
                            doc.update(reservation_id=None, reserved_amount=None)
                    else:
                        doc.update(
                            state=st.PENDING,
                            error_class=st.RETRYABLE,
                            error_code="lease_expired",
                            error_message=message,
                            not_before=None,
                        )
                    changes.doc(doc, old, doc["stage"], attempt=run_["attempt"])
                    docs.append(doc)
                    sessions.add(str(doc["session_id"]))
                await _write_runs(conn, runs)
                await _write_docs(conn, docs)
                await changes.flush(conn)
                return len(rows)

        count = await _retrying(run)
        return Expired(count, tuple(settle), frozenset(sessions))

    async def complete_idle_sessions(self) -> list[str]:
        """Finishes running sessions with no active document (a safety net)."""
        async with self.pool.acquire() as conn:
            ids = await conn.fetch(
                "SELECT session_id FROM session.import_sessions WHERE state IN "
                "('running', 'paused', 'budget_exhausted') "
                "AND count_pending + count_queued + count_running = 0"
            )
        done = []
        for row in ids:

            async def run(sid: uuid.UUID = row["session_id"]) -> None:
                async with self.pool.acquire() as conn, conn.transaction():
                    changes = _Changes()
                    changes.touch(sid)
                    await changes.flush(conn)

            await _retrying(run)
            done.append(str(row["session_id"]))
        return done

    async def sample_progress(self, *, keep_seconds: float = 900.0) -> None:
        """Records finished-document counts of active sessions; prunes old samples."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """
                INSERT INTO session.progress_samples (session_id, sampled_at, finished)
                SELECT session_id, clock_timestamp(), count_completed + count_failed
                FROM session.import_sessions
                WHERE state IN ('running', 'paused', 'budget_exhausted')
                   OR finished_at > now() - interval '2 minutes'
                ON CONFLICT DO NOTHING
                """
            )
            await conn.execute(
                "DELETE FROM session.progress_samples WHERE sampled_at < now() - make_interval(secs => $1)",
                keep_seconds,
            )

    async def sessions_in_state(self, state: str) -> list[SessionInfo]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                _SESSION_SELECT + " WHERE s.state = $1 ORDER BY s.created_at", state
            )
        return [_session(r) for r in rows]

    async def next_estimate(self, session_id: str) -> Decimal | None:
        """The smallest estimate of a pending document still to be admitted by the budget."""
        async with self.pool.acquire() as conn:
            return await conn.fetchval(
                """
                SELECT min(estimated_cost) FROM session.session_documents
                WHERE session_id = $1 AND state = 'pending' AND reservation_id IS NULL
                  AND estimated_cost > 0
                """,
                uuid.UUID(session_id),
            )

    # ------------------------------------------------------------ pipeline overview

    async def overview(
        self,
        *,
        stall_after: float,
        finished_within: float,
        failure_limit: int,
        stalled_limit: int,
        windows: Sequence[float] = OVERVIEW_WINDOWS,
        session_limit: int = OVERVIEW_SESSIONS,
    ) -> Overview:
        """The whole pipeline as of one instant (one read-only snapshot).

        Every query is bounded by an index: active sessions by their state
        (or recent `finished_at`), stage-run windows by `stage_runs_finished_idx`,
        stalled documents by the partial index of in-flight documents, and
        failures by the partial index of failed documents (migration 0031).
        """
        async with self.pool.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                db_now: dt.datetime = await conn.fetchval("SELECT now()")
                rows = await conn.fetch(
                    _SESSION_SELECT
                    + """
                    WHERE s.state IN ('created', 'running', 'paused', 'budget_exhausted')
                       OR s.finished_at > now() - make_interval(secs => $1)
                    ORDER BY s.finished_at IS NOT NULL, s.created_at DESC, s.session_id
                    LIMIT $2
                    """,
                    finished_within,
                    session_limit,
                )
                ids = [r["session_id"] for r in rows]
                stage_rows = await conn.fetch(_STAGE_COUNTS_SQL, ids)
                samples = await conn.fetch(
                    "SELECT session_id, sampled_at, finished FROM session.progress_samples "
                    "WHERE session_id = ANY($1::uuid[]) ORDER BY session_id, sampled_at",
                    ids,
                )
                stalled_rows = await conn.fetch(
                    f"""
                    SELECT d.*, true AS is_stalled FROM session.session_documents d
                    WHERE {_STALLED_SQL}
                    ORDER BY d.updated_at, d.document_id
                    """,
                    stall_after,
                )
                window_rows = await conn.fetch(
                    """
                    SELECT w.secs, r.stage,
                           count(*) AS finished,
                           count(*) FILTER (WHERE r.state = 'succeeded') AS succeeded,
                           count(*) FILTER (WHERE r.state = 'failed') AS failed,
                           count(*) FILTER (WHERE r.state = 'expired') AS expired,
                           count(*) FILTER (WHERE r.state = 'succeeded' AND r.cache_hit)
                               AS cache_hits,
                           percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY
                               coalesce(r.duration_seconds,
                                        extract(epoch FROM r.finished_at - r.started_at)))
                               FILTER (WHERE r.state IN ('succeeded', 'failed')
                                       AND NOT r.cache_hit AND r.started_at IS NOT NULL)
                               AS pcts
                    FROM unnest($1::float8[]) AS w(secs)
                    JOIN session.stage_runs r
                      ON r.finished_at > now() - make_interval(secs => w.secs)
                     AND r.state IN ('succeeded', 'failed', 'expired')
                    WHERE r.finished_at > now() - make_interval(secs => $2)
                    GROUP BY w.secs, r.stage
                    """,
                    list(windows),
                    max(windows),
                )
                failure_rows = await conn.fetch(
                    """
                    SELECT d.* FROM session.session_documents d
                    WHERE d.state = 'failed' AND d.updated_at > now() - make_interval(secs => $1)
                    ORDER BY d.updated_at DESC, d.document_id
                    LIMIT $2
                    """,
                    max(windows),
                    failure_limit,
                )
        stalled_by_session = Counter(str(r["session_id"]) for r in stalled_rows)
        stages_by_session: dict[str, list[asyncpg.Record]] = defaultdict(list)
        for r in stage_rows:
            stages_by_session[str(r["session_id"])].append(r)
        samples_by_session: dict[str, list[tuple[dt.datetime, int]]] = defaultdict(list)
        for r in samples:
            samples_by_session[str(r["session_id"])].append((r["sampled_at"], r["finished"]))
        snapshots = []
        for row in rows:
            sid = str(row["session_id"])
            info = _session(row, stalled_by_session.get(sid, 0))
            stages = _stage_counts(stages_by_session.get(sid, ()))
            snapshots.append(
                Snapshot(info, stages, tuple(samples_by_session.get(sid, ())), db_now)
            )
        found = {(r["secs"], r["stage"]): r for r in window_rows}
        stage_windows = []
        for secs in windows:
            for stage in STAGES:
                r = found.get((secs, stage))
                pcts = (r["pcts"] if r is not None else None) or (None, None)
                stage_windows.append(
                    StageWindow(
                        stage=stage,
                        window_seconds=secs,
                        finished=r["finished"] if r else 0,
                        succeeded=r["succeeded"] if r else 0,
                        failed=r["failed"] if r else 0,
                        expired=r["expired"] if r else 0,
                        cache_hits=r["cache_hits"] if r else 0,
                        p50_seconds=pcts[0],
                        p95_seconds=pcts[1],
                    )
                )
        return Overview(
            db_now=db_now,
            sessions=tuple(snapshots),
            stage_windows=tuple(stage_windows),
            stalled_total=len(stalled_rows),
            stalled=tuple(_document(r, True) for r in stalled_rows[:stalled_limit]),
            failures=tuple(_document(r) for r in failure_rows),
        )

    # ------------------------------------------------------------ events

    async def events_after(self, session_id: str, after_seq: int, limit: int) -> list[Event]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"""
                SELECT e.*, d.relative_path, {_EVENT_DIGEST} AS digest
                FROM session.session_events e
                LEFT JOIN session.session_documents d ON d.document_id = e.document_id
                WHERE e.session_id = $1 AND e.seq > $2 ORDER BY e.seq LIMIT $3
                """,
                uuid.UUID(session_id),
                after_seq,
                limit,
            )
        return [
            Event(
                str(r["session_id"]),
                r["seq"],
                r["event_time"],
                r["kind"],
                _s(r["document_id"]),
                r["payload"],
                r["relative_path"] or "",
                r["digest"],
            )
            for r in rows
        ]

    async def prune_events(self, older_than_seconds: float, limit: int) -> int:
        """Deletes up to `limit` events of sessions finished more than `older_than_seconds` ago.

        Only terminal sessions lose events; a session's `last_seq` stays, so
        a watcher resuming into the deleted range gets a snapshot (see
        `events.watch`). Returns how many were deleted (the reconciler calls
        again while a pass deletes a full `limit`).
        """
        async with self.pool.acquire() as conn:
            status = await conn.execute(
                """
                WITH old AS (
                    SELECT e.session_id, e.seq
                    FROM session.import_sessions s
                    JOIN session.session_events e ON e.session_id = s.session_id
                    WHERE s.state = ANY($1::text[])
                      AND s.finished_at < now() - make_interval(secs => $2)
                    LIMIT $3
                )
                DELETE FROM session.session_events e USING old
                WHERE e.session_id = old.session_id AND e.seq = old.seq
                """,
                sorted(st.SESSION_TERMINAL),
                older_than_seconds,
                limit,
            )
        return int(status.split()[-1])

    async def resume_point(self, session_id: str, seq: int) -> tuple[int, str, str | None] | None:
        """(last seq, state, digest of the event at `seq` or None); None: no such session."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                f"""
                SELECT s.last_seq, s.state,
                       (SELECT {_EVENT_DIGEST} FROM session.session_events e
                        WHERE e.session_id = s.session_id AND e.seq = $2) AS digest
                FROM session.import_sessions s WHERE s.session_id = $1
                """,
                _uuid(session_id, "session_id"),
                seq,
            )
        return None if row is None else (row["last_seq"], row["state"], row["digest"])

    async def last_seq(self, session_id: str) -> tuple[int, str] | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT last_seq, state FROM session.import_sessions WHERE session_id = $1",
                _uuid(session_id, "session_id"),
            )
        return None if row is None else (row["last_seq"], row["state"])
