"""Runs whose work is done but not yet delivered: the background half of a stage run.

Owns, per worker process, one delivery thread and its queue. A task that
has done its stage's work hands the rest (storing its artifact, recording
its costs, reporting its result) to the outbox and returns, so the process
takes its next task at once; the thread delivers whatever has queued up
meanwhile in one go (see `StageRunner._deliver_batch`: one RecordCosts for
all of them, their results in flight together), which is what makes a busy
worker cheaper per run for itself and for both services.

What this trades: a task is acknowledged before its result is reported. A
process killed with runs still queued here loses their deliveries; nothing
is charged or reported for them, their leases run out and the session
service's reconciler runs them again (the path every lost message takes).
A process that exits normally (a prefork child replaced for its memory
or its task count, a warm shutdown) delivers everything first: `drain`,
called from Celery's process shutdown signals.

The queue is bounded (`max_pending` runs, artifacts included): a task that
would go past it waits, so a slow service slows the worker down instead of
filling its memory. The thread is started on first use, in the process that
runs tasks (never in a prefork parent: threads do not survive fork).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Outbox(Generic[T]):
    """A bounded queue of items delivered in batches by one background thread."""

    def __init__(
        self,
        deliver: Callable[[list[T]], None],
        *,
        max_pending: int = 16,
        max_batch: int = 64,  # under the session service's 100 reports a call
        linger: float = 0.0,
    ) -> None:
        self._deliver = deliver
        self.max_pending = max(1, max_pending)
        self.max_batch = max(1, max_batch)
        # Seconds the thread waits for more items after the first of a batch (fewer, larger
        # deliveries for a little latency).
        self.linger = max(0.0, linger)
        self._cond = threading.Condition()
        self._items: list[T] = []
        self._busy = 0  # items taken by the thread and not yet delivered
        self._thread: threading.Thread | None = None
        self._closed = False

    def put(self, item: T) -> None:
        """Queues an item; waits while `max_pending` items are queued or being delivered."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the outbox is closed")
            while len(self._items) + self._busy >= self.max_pending:
                self._cond.wait()
            self._items.append(item)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="deliver-runs", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> int:
        """Items queued or being delivered."""
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
        left undelivered."""
        drained = self.drain(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if not drained:
            logger.error(
                "%d finished runs were not delivered before shutdown; their leases will run "
                "out and the session service will run them again",
                self.pending(),
            )
        return drained

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                if self.linger and not self._closed:
                    until = time.monotonic() + self.linger
                    while len(self._items) < self.max_batch and not self._closed:
                        left = until - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                batch = self._items[: self.max_batch]
                del self._items[: len(batch)]
                self._busy = len(batch)
            try:
                self._deliver(batch)
            except Exception:  # the thread must go on; the runs' leases will bring them back
                logger.exception(
                    "could not deliver %d finished runs; their leases will run out and the "
                    "session service will run them again",
                    len(batch),
                )
            finally:
                with self._cond:
                    self._busy = 0
                    self._cond.notify_all()
