"""The reconciler: recovers lost work and keeps sessions moving.

Owns a background task of `server.serve` (`stop()` ends it). Every
`reconcile_interval` seconds:
- expires stage runs whose lease ran out (a dead worker, a broker that lost
  its queue: nobody saw the run alive for `lease_ttl`; see leases.py), when
  the lease keeper says a lease that ran out means that: the run becomes `expired`,
  and the document goes back to pending so the dispatcher enqueues a new
  attempt at once (keeping its budget reservation); past `max_attempts` it
  fails (retryable class, so an operator's retry may reopen it) and its
  reservation is settled with what it cost;
- records progress samples (documents per second, ETA);
- folds the stage-count deltas that writes to stage runs left into the
  per-session stage counts (GetSession reads those, not the runs);
- resumes budget_exhausted sessions whose budget was raised;
- finishes sessions left with no active document (a safety net: reports
  already finish them in the same transaction);
- deletes the events of sessions finished more than `event_retention_days`
  ago (watchers resuming into them get a snapshot).
Retryable errors reported by workers back off exponentially
(`retry_backoff_base` * 2**(attempt-1), capped by `retry_backoff_max`): the
store sets the document's `not_before` when the report lands, and the
dispatcher does not claim it before then.
Stalled documents (queued or running with no progress for `stall_after`)
are computed when read, not written. No SQL here.
"""

from __future__ import annotations

import logging
from decimal import Decimal

from services.common import convert
from services.common.loops import Background, periodically
from services.session import states as st
from services.session.config import SessionSettings
from services.session.dispatcher import Dispatcher
from services.session.leases import LeaseKeeper
from services.session.peers import CostPeer, PeerFailure, describe
from services.session.store import SessionStore

logger = logging.getLogger(__name__)

PRUNE_BATCH = 10_000  # events deleted per statement (a pass repeats until one deletes fewer)


class Reconciler:
    def __init__(
        self,
        store: SessionStore,
        dispatcher: Dispatcher,
        settings: SessionSettings,
        cost: CostPeer | None = None,
        keeper: LeaseKeeper | None = None,
    ) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._settings = settings
        self._cost = cost
        self._keeper = keeper
        self._loop = Background("reconciler")

    async def run_once(self) -> int:
        """One pass; returns the number of runs expired."""
        expired = 0
        while self._keeper is None or self._keeper.may_expire():
            result = await self._store.expire_leases(max_attempts=self._settings.max_attempts)
            expired += result.count
            await self._dispatcher.settle(result.settle)
            if result.count < 1000:
                break
        if expired:
            logger.warning("re-enqueueing %d stage runs whose lease expired", expired)
            self._dispatcher.wake()
        await self._resume_raised_budgets()
        await self._store.complete_idle_sessions()
        await self._store.sample_progress()
        await self._store.fold_stage_counts()
        await self._prune_events()
        return expired

    async def _prune_events(self) -> None:
        days = self._settings.event_retention_days
        if days <= 0:
            return
        pruned = 0
        while True:
            count = await self._store.prune_events(days * 86400, limit=PRUNE_BATCH)
            pruned += count
            if count < PRUNE_BATCH:
                break
        if pruned:
            logger.info("deleted %d events of sessions finished over %g days ago", pruned, days)

    async def _resume_raised_budgets(self) -> None:
        if self._cost is None:
            return
        for session in await self._store.sessions_in_state(st.S_BUDGET):
            try:
                budget = await self._cost.get_budget(session.session_id)
            except PeerFailure as exc:
                logger.warning(
                    "cannot read the budget of %s: %s", session.session_id, describe(exc)
                )
                continue
            if budget is None:
                continue
            remaining = budget.remaining
            need = await self._store.next_estimate(session.session_id) or Decimal(0)
            if remaining > 0 and remaining >= need:
                logger.info("budget of %s raised; resuming", session.session_id)
                try:
                    await self._store.resume_session(
                        session.session_id,
                        reason=f"budget raised: {convert.format_money(remaining)} available",
                    )
                except Exception:  # noqa: BLE001 - cancelled or paused meanwhile
                    logger.info("session %s not resumed", session.session_id)
                    continue
                self._dispatcher.wake()

    def start(self) -> None:
        self._loop.start(lambda: periodically(
            lambda: self._settings.reconcile_interval, self.run_once, "reconcile pass",
            first_at_once=True,
        ))

    async def stop(self) -> None:
        await self._loop.stop()
