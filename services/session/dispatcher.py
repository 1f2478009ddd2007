"""The dispatcher: turns pending documents into published stage runs.

Owns the dispatch loop (a background task of `server.serve`; `stop()` ends
it). Each round, for every running session with ready documents, the store
claims a batch with FOR UPDATE SKIP LOCKED inside one transaction (so any
number of replicas may dispatch at once without double-dispatching), caps
it by the session's and the service's in-flight limits, reserves budget
with the cost service when the session has one (ReserveBudget with every
item of the batch and allow_partial; RESOURCE_EXHAUSTED or a partial grant
marks the session budget_exhausted), creates the stage runs with their
task ids and leases, commits, and only then publishes the batch through
the Enqueuer, each run carrying the session's trace context (that of the call
that started the work; see services.common.telemetry). A failed publish puts
the runs back (their attempt does not count). No SQL here, no Celery: the store and the Enqueuer do those.

Budget: a document is admitted by reserving its whole estimate (the
manifest's price of the file) before its first stage is enqueued; later
stages and retries run on that reservation, which is settled with the
document's actual cost when it completes or fails (released if cancelled).
So a budget never strands a document half-processed: when it runs out,
documents already started finish, and new ones wait for a raise.

The loop wakes on `wake()` (a stage result, start, resume or retry in this
process) or on any session NOTIFY (another replica), else every
`dispatch_interval` seconds. A woken loop waits `dispatch_coalesce` before
its round, so a stream of stage results makes one round per window rather
than one per result (each round is several statements and a publish), and
a session takes part only when it can be topped up by a batch
(`dispatch_topup` of its cap free) or its queue is running low: with two
workers and the default cap of 32, a 2,000-document import made rounds of
6.4 documents on average instead of 2.2. The
overall cap counts live runs at the start of a round: with several replicas
it may be passed by at most one batch per other replica; the per-session
cap is exact (the session row is locked while its round is computed).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from decimal import Decimal

from services.common import convert, grants
from services.common.errors import NotFound
from services.common.tasks import StagePayload, encode_raw_path
from services.session.config import SessionSettings
from services.session.peers import BudgetRefused, CostPeer, PeerFailure, describe
from services.session.queue import Enqueuer, PublishError, StageMessage
from services.session.metrics import SessionMetrics
from services.session.store import (
    Claimed,
    Dispatched,
    Reservations,
    SessionInfo,
    SessionStore,
    Timing,
)

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


def timing_for(settings: SessionSettings, size_bytes: int) -> Timing:
    """Time limits, lease and deadline of a stage run, scaled by the file's size.

    The deadline is computed the same way in the store's ReportStageStarted
    statement (`deadline_seconds` there).
    """
    soft = math.ceil(settings.lease_base + settings.lease_per_mib * (size_bytes / MIB))
    hard = soft + math.ceil(settings.time_limit_grace)
    grace = settings.time_limit_grace
    return Timing(soft, hard, settings.lease_ttl, hard + grace, settings.queue_wait)


# How long a run's grant outlives its message and its deadline: its worker may deliver its
# costs that much later (a service unreachable for a while; see the worker's outbox).
GRANT_SLACK = 7 * 24 * 3600.0


def message_for(
    d: Dispatched, trace_parent: str | None = None, grant_key: bytes | None = None
) -> StageMessage:
    doc = d.document
    grant = ""
    if grant_key is not None:
        until = d.message_expires_at.timestamp() + d.timing.deadline + GRANT_SLACK
        grant = grants.sign(grant_key, d.session_id, doc.document_id, d.stage, d.attempt, until)
    payload = StagePayload(
        session_id=d.session_id,
        document_id=doc.document_id,
        stage=d.stage,
        attempt=d.attempt,
        source_path=d.source_path,
        relative_path=doc.relative_path,
        raw_path_b64=encode_raw_path(doc.raw_path),
        sha256=doc.sha256 or "",
        size_bytes=doc.size_bytes,
        plan=doc.plan,
        category=doc.category,
        page_count=doc.page_count,
        ocr_page_count=doc.ocr_page_count,
        lease_seconds=d.timing.deadline,
        start_unasked_until=d.lease_expires_at.isoformat(),
        grant=grant,
        options={"task_id": d.task_id, "mime_type": doc.mime_type},
    )
    return StageMessage(
        task_id=d.task_id,
        payload=payload,
        soft_time_limit=d.timing.soft_time_limit,
        time_limit=d.timing.time_limit,
        expires_at=d.message_expires_at,
        trace_parent=trace_parent,
    )


class Dispatcher:
    """Claims, reserves, records and publishes stage runs in batches."""

    def __init__(
        self,
        store: SessionStore,
        enqueuer: Enqueuer,
        settings: SessionSettings,
        cost: CostPeer | None = None,
        metrics: SessionMetrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._store = store
        self._enqueuer = enqueuer
        self._settings = settings
        self._cost = cost
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.published = 0
        # Runs are granted to workers with the key of this service's own token (see grants).
        token = settings.token.get_secret_value()
        self._grant_key = grants.grant_key(token) if token else None

    def wake(self) -> None:
        self._wakeup.set()

    def timing(self, size_bytes: int) -> Timing:
        return timing_for(self._settings, size_bytes)

    async def run_once(self) -> int:
        """One pass over every dispatchable session; returns the runs created.

        Publishing a batch overlaps with claiming the next one (the publisher
        has its own thread); a batch is published only after its commit, and
        the pass returns only when everything it created is published.
        """
        total = 0
        sessions = await self._store.dispatchable_sessions(self._settings.dispatch_topup)
        if not sessions:
            return 0
        room_total = self._settings.max_in_flight_total - await self._store.live_runs()
        if room_total <= 0:
            return 0
        publishing: asyncio.Task[None] | None = None
        try:
            for session_id in sessions:
                while room_total > 0 and not self._stopping:
                    limit = min(self._settings.dispatch_batch, room_total)
                    round_ = await self._store.dispatch_session(
                        session_id,
                        limit=limit,
                        timing=self.timing,
                        reserve=self._reserve,
                    )
                    if round_.dispatched:
                        if publishing is not None:
                            await publishing
                        publishing = asyncio.create_task(
                            self._publish(round_.dispatched, round_.trace_context)
                        )
                        total += len(round_.dispatched)
                        room_total -= len(round_.dispatched)
                    if round_.budget_exhausted:
                        logger.info(
                            "session %s stopped by its budget",
                            session_id,
                            extra={"session_id": session_id},
                        )
                    if not round_.saturated or not round_.dispatched:
                        break
        finally:
            if publishing is not None:
                await publishing
        return total

    async def _publish(
        self, dispatched: Sequence[Dispatched], trace_parent: str | None = None
    ) -> None:
        try:
            await self._enqueuer.publish(
                [message_for(d, trace_parent, self._grant_key) for d in dispatched]
            )
            self.published += len(dispatched)
            if self._metrics is not None:
                self._metrics.published(d.stage for d in dispatched)
        except PublishError as exc:
            if self._metrics is not None:
                self._metrics.dispatch_failures.inc(len(dispatched))
            logger.warning("publish failed; %d runs put back: %s", len(dispatched), exc)
            release = await self._store.undo_dispatch(dispatched, str(exc))
            await self.release(release)

    # ---------------------------------------------------------------- budget

    async def _reserve(self, session: SessionInfo, claimed: list[Claimed]) -> Reservations:
        """Admits the documents of a batch that need it; refused ones stay pending."""
        paid = [c for c in claimed if c.estimate > 0]
        everything = frozenset(c.document.document_id for c in paid)
        if self._cost is None:
            return Reservations(refused=everything)
        items = [
            (f"{c.document.document_id}/{c.stage}/{c.attempt}", c.estimate, c.document.document_id)
            for c in paid
        ]
        # Held until the document is done: all its stages, retries included.
        longest = self.timing(max(c.document.size_bytes for c in paid))
        ttl = max(24 * 3600.0, 3 * (longest.message_ttl + longest.deadline))
        try:
            try:
                reserved = await self._cost.reserve(session.session_id, items, ttl)
            except NotFound:
                # The budget was never set (a crash between create and SetBudget): set it now.
                await self._cost.set_budget(session.session_id, session.budget_limit or Decimal(0))
                reserved = await self._cost.reserve(session.session_id, items, ttl)
        except BudgetRefused as exc:
            return Reservations(
                refused=everything,
                exhausted_reason=(
                    f"budget exhausted: the next document needs "
                    f"{convert.format_money(paid[0].estimate)}; raise the budget "
                    f"to resume ({exc})"
                ),
            )
        except PeerFailure as exc:
            logger.warning(
                "cannot reserve budget for session %s: %s; will retry",
                session.session_id,
                describe(exc),
            )
            return Reservations(refused=everything)
        granted = {c.document.document_id: g for c, g in zip(paid, reserved.granted, strict=False)}
        refused = frozenset(c.document.document_id for c in paid[len(reserved.granted) :])
        reason = None
        if reserved.exhausted or refused:
            left = reserved.budget.remaining if reserved.budget else Decimal(0)
            limit = reserved.budget.limit if reserved.budget else session.budget_limit or Decimal(0)
            reason = (
                f"budget exhausted: {convert.format_money(left)} left of "
                f"{convert.format_money(limit)}; raise the budget to resume"
            )
        return Reservations(granted=granted, refused=refused, exhausted_reason=reason)

    async def release(self, reservation_ids: Sequence[str]) -> None:
        """Gives reservations of runs that will not run back to the budget."""
        if not reservation_ids or self._cost is None:
            return
        try:
            await self._cost.release(reservation_ids)
        except PeerFailure as exc:
            # They expire on their own (their TTL); nothing is lost.
            logger.warning(
                "releasing %d reservations failed: %s", len(reservation_ids), describe(exc)
            )

    async def settle(self, settlements: Sequence[tuple[str, Decimal]]) -> None:
        """Settles reservations with the actual costs workers reported."""
        if not settlements or self._cost is None:
            return
        try:
            await self._cost.settle(settlements)
        except PeerFailure as exc:
            logger.warning("settling %d reservations failed: %s", len(settlements), describe(exc))

    # ---------------------------------------------------------------- loop

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._loop(), name="dispatcher")

    async def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _loop(self) -> None:
        delay = self._settings.dispatch_interval
        while not self._stopping:
            self._wakeup.clear()
            try:
                await self.run_once()
                delay = self._settings.dispatch_interval
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must outlive a bad round
                logger.exception("dispatch round failed")
                delay = min(max(delay * 2, 1.0), 30.0)
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=delay)
            except TimeoutError:
                continue
            if self._settings.dispatch_coalesce > 0 and not self._stopping:
                await asyncio.sleep(self._settings.dispatch_coalesce)
