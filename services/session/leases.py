"""The lease keeper: renews the leases of stage runs seen alive, and says when expiry is safe.

Owns a background task of `server.serve` (`stop()` ends it). Every
`probe_interval` seconds it looks at the broker and the workers
(`RunTracker.sight`: messages waiting in the stage queues; runs the workers
hold, prefetched, running or finished and waiting in their outbox) and
renews for `lease_ttl` seconds the lease of every live run it saw. Runs it
saw that are no longer wanted (cancelled, finished, expired) are taken back
(`RunTracker.forget`: revoked, purged from the queues), so that no queued
run of a cancelled session starts its work.

A run not seen for `lease_ttl` seconds is lost (a killed worker, a flushed
broker) and the reconciler expires it, but only while `may_expire()`: the
keeper has looked successfully, with no gap, for a whole `lease_ttl`. A
fresh process, or one that could not reach Postgres or the broker for a
while, first looks long enough to renew what is alive, so that an outage
never passes for the death of the runs it could not see. With several
replicas, each looks and renews; any may expire.

When the broker lost its data (its epoch key vanished: flushed, or restarted
without persistence), the queued runs nobody holds are lost at once: their
leases end now, expiry is trusted at once (the loss is the evidence), and
the slots they held are freed within a reconcile pass.

No SQL here (the store), no Celery (the tracker).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from services.common.loops import Background, periodically
from services.session.config import SessionSettings
from services.session.queue import RunTracker, Sighting
from services.session.store import SessionStore

logger = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews leases from what the tracker sees; gates the reconciler's expiry."""

    def __init__(
        self,
        store: SessionStore,
        tracker: RunTracker | None,
        settings: SessionSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._tracker = tracker
        self._settings = settings
        self._clock = clock
        self._seeing_since: float | None = None  # start of the current run of good looks
        self._last_look = float("-inf")
        self._failing = False
        # Until when a loss of the broker's data, seen by a good look, makes expiry safe at
        # once (the loss is the evidence; it does not wait for a whole lease of looks).
        self._loss_seen_until = float("-inf")
        self._loop = Background("lease-keeper")
        self.renewed = 0  # leases renewed by the last look

    def may_expire(self) -> bool:
        """True when a lease that ran out means a lost run (see the module docstring).

        Without a tracker (tests that drive runs by hand) leases run out by time alone.
        """
        if self._tracker is None:
            return True
        now = self._clock()
        fresh = now - self._last_look <= 2 * self._settings.probe_interval + 10.0
        if fresh and now < self._loss_seen_until:
            return True  # the broker lost its data, seen by a good look just now
        return (
            fresh
            and self._seeing_since is not None
            and now - self._seeing_since >= self._settings.lease_ttl
        )

    async def look(self) -> Sighting | None:
        """One look: renews what is alive, takes back what is not wanted; None if it failed."""
        if self._tracker is None:
            return None
        began = self._clock()
        try:
            sighting = await self._tracker.sight()
            self.renewed, gone = await self._store.renew_leases(
                sorted(sighting.alive), self._settings.lease_ttl
            )
        except Exception as exc:  # noqa: BLE001 - a failed look only delays expiry
            self._seeing_since = None
            if not self._failing:
                logger.warning("cannot see which runs are alive (%s); expiry waits", exc)
            self._failing = True
            return None
        now = self._clock()
        if self._seeing_since is None:
            self._seeing_since = now
        if self._failing:
            logger.info("seeing runs again; leases expire %g s from now at the earliest",
                        self._settings.lease_ttl)
        self._failing = False
        self._last_look = now
        if gone:
            await self.take_back(gone)
        if sighting.broker_lost:
            # runs queued since this look began may be on the broker unseen: they are spared
            await self._broker_lost(sighting, self._clock() - began + 1.0)
        return sighting

    async def _broker_lost(self, sighting: Sighting, recent: float) -> None:
        """The broker lost every message it held: queued runs nobody holds are lost now, and
        their slots are freed at the reconciler's next pass instead of a lease later."""
        try:
            lost = await self._store.end_unseen_queued(sorted(sighting.alive), older_than=recent)
        except Exception as exc:  # noqa: BLE001 - their leases still run out
            logger.warning("the broker lost its data; its runs wait for their leases (%s)", exc)
            return
        logger.warning("the broker lost its data: %d queued runs are lost and run again", lost)
        self._loss_seen_until = self._clock() + 3 * self._settings.reconcile_interval

    async def take_back(self, task_ids: list[str]) -> None:
        """Takes back the messages of runs no longer wanted now (a cancel), not at the next look."""
        if self._tracker is None or not task_ids:
            return
        try:
            await self._tracker.forget(task_ids)
        except Exception as exc:  # noqa: BLE001 - the next look tries again
            logger.warning("could not take back %d cancelled runs yet: %s", len(task_ids), exc)

    def start(self) -> None:
        if self._tracker is not None:
            self._loop.start(lambda: periodically(
                lambda: self._settings.probe_interval, self.look, "a look at the live runs",
                first_at_once=True,
            ))

    async def stop(self) -> None:
        await self._loop.stop()
