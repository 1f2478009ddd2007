"""Runs whose work is done but not yet delivered: the background half of a stage run.

Owns, per worker process, one delivery thread, its in-memory queue and
this process's share of the journal (services/worker/journal.py). A task
that has done its stage's work writes its run to the journal, hands it
here and returns, so its process takes its next task at once; the thread
delivers whatever has queued up meanwhile in one go (delivery.Deliverer).

Nothing finished is dropped. A delivery that fails (a service unreachable
or restarting, its database down) is tried again with exponential backoff
(`retry_base` doubling up to `retry_max` seconds), for up to `max_age`;
meanwhile the run keeps its lease, because the worker tells the session
service it holds it (services/worker/control.py). A run leaves the journal
once the session service has answered for it (accepted, or refused for
good: cancelled, superseded). A process killed with runs here leaves them
in the journal, and another process of the worker adopts them (every
`adopt_interval` seconds, and when its thread starts). A process that
exits normally delivers what it can within its drain timeout and leaves
the rest to the next.

The queue is bounded (`max_pending` runs): a task that would go past it
waits, so a slow service slows the worker down instead of filling its
memory. The thread is started on first use, in the process that runs tasks
(never in a prefork parent: threads do not survive fork).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from services.worker.delivery import Delivery
from services.worker.journal import Journal

logger = logging.getLogger(__name__)


class Outbox:
    """A bounded, journaled queue of finished runs, delivered in batches by one thread."""

    def __init__(
        self,
        deliver: Callable[[list[Delivery]], list[Delivery]],
        journal: Journal | None = None,
        *,
        max_pending: int = 16,
        max_batch: int = 64,  # under the session service's 100 reports a call
        linger: float = 0.0,
        retry_base: float = 0.5,
        retry_max: float = 30.0,
        max_age: float = 7 * 24 * 3600.0,
        adopt_interval: float = 5.0,
        stale_after: float = 20.0,
    ) -> None:
        self._deliver = deliver
        self.journal = journal
        self.max_pending = max(1, max_pending)
        self.max_batch = max(1, max_batch)
        # Seconds the thread waits for more runs after the first of a batch (fewer, larger
        # deliveries for a little latency).
        self.linger = max(0.0, linger)
        self.retry_base, self.retry_max, self.max_age = retry_base, retry_max, max_age
        self.adopt_interval, self.stale_after = adopt_interval, stale_after
        self._cond = threading.Condition()
        self._items: list[Delivery] = []  # waiting: due now or after a backoff
        self._busy = 0  # taken by the thread and not yet answered for
        self._thread: threading.Thread | None = None
        self._closed = False
        self._touched = False

    def put(self, item: Delivery) -> None:
        """Journals a run and queues it; waits while `max_pending` runs are pending."""
        if self.journal is not None:
            if not self._touched:  # alive before its first entry, so that none looks orphaned
                self.journal.touch()
                self._touched = True
            self.journal.add(item.entry())
        with self._cond:
            if self._closed:
                raise RuntimeError("the outbox is closed")
            self._start()
            while len(self._items) + self._busy >= self.max_pending and not self._closed:
                self._cond.wait()
            self._items.append(item)
            self._cond.notify_all()

    def start(self) -> None:
        """Starts the thread now (it adopts what dead processes left in the journal)."""
        with self._cond:
            self._start()

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="deliver-runs", daemon=True)
            self._thread.start()

    def pending(self) -> int:
        """Runs queued or being delivered."""
        with self._cond:
            return len(self._items) + self._busy

    def drain(self, timeout: float | None = None) -> bool:
        """Waits until everything queued so far is delivered; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._items or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Delivers what is queued (up to `timeout`), then stops the thread; False if some was
        left, in the journal, for the next process."""
        drained = self.drain(timeout)
        with self._cond:
            self._closed = True
            left = len(self._items) + self._busy
            self._cond.notify_all()
        if not drained:
            logger.warning(
                "%d finished runs were not delivered before this process exits; they stay in "
                "the outbox and the worker's next process delivers them",
                left,
            )
        return drained

    # -- the thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        next_adopt = 0.0
        while True:
            now = time.monotonic()
            if now >= next_adopt:
                self._adopt()
                next_adopt = now + self.adopt_interval
            with self._cond:
                batch = self._take(now)
                if not batch:
                    if self._closed:
                        return
                    due = min((i.due for i in self._items), default=next_adopt)
                    self._cond.wait(max(0.001, min(due, next_adopt) - now))
                    continue
            try:
                retry = self._deliver(batch)
            except Exception:  # noqa: BLE001 - the thread must go on: all are tried again
                logger.exception("delivering %d finished runs failed; will try again", len(batch))
                retry = batch
            self._settle(batch, retry)

    def _take(self, now: float) -> list[Delivery]:
        """The runs due now, after the linger (under the condition's lock)."""
        if not any(i.due <= now for i in self._items):
            return []
        if self.linger and not self._closed:
            until = now + self.linger
            while len(self._items) < self.max_batch and not self._closed:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            now = time.monotonic()
        batch = [i for i in self._items if i.due <= now][: self.max_batch]
        taken = set(map(id, batch))
        self._items = [i for i in self._items if id(i) not in taken]
        self._busy += len(batch)
        return batch

    def _settle(self, batch: list[Delivery], retry: list[Delivery]) -> None:
        """Forgets the runs answered for; schedules the others again (or gives them up)."""
        again = set(map(id, retry))
        now, wall = time.monotonic(), time.time()
        done = [d for d in batch if id(d) not in again]
        kept, dropped = [], []
        for d in retry:
            if wall - d.created > self.max_age:
                dropped.append(d)
                continue
            d.tries += 1
            d.due = now + min(self.retry_max, self.retry_base * 2 ** (d.tries - 1))
            kept.append(d)
        for d in dropped:
            d.run(logger.error, "giving up the delivery of run %s after %.0f s", d.task_id,
                  wall - d.created)
        if self.journal is not None:
            try:
                self.journal.remove(d.task_id for d in done + dropped)
                for d in kept:
                    self.journal.update(d.entry())
            except Exception:  # noqa: BLE001 - a journal entry left behind is delivered again
                logger.exception("could not update the outbox journal")
        with self._cond:
            self._items.extend(kept)
            self._busy -= len(batch)
            self._cond.notify_all()

    def _adopt(self) -> None:
        """Marks this process alive in the journal and takes over dead processes' runs."""
        if self.journal is None:
            return
        try:
            self.journal.touch()
            adopted = [Delivery.of(e) for e in self.journal.adopt(self.stale_after)]
        except Exception:  # noqa: BLE001 - tried again at the next interval
            logger.exception("could not read the outbox journal")
            return
        if adopted:
            logger.info("delivering %d finished runs a stopped process left", len(adopted))
            with self._cond:
                self._items.extend(adopted)
                self._cond.notify_all()
