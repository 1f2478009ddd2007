"""Background loops of a service process: a pass every interval, started once, stopped by cancel.

Owns `Background` (one named asyncio task; `stop()` cancels and awaits it)
and `periodically` (a pass every `interval` seconds; a pass that fails is
logged and the loop goes on: a loop must outlive a bad pass). The services'
loops (the session service's lease keeper and reconciler, the cost service's
expiry sweep and totals fold) are these.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

logger = logging.getLogger(__name__)


async def periodically(
    interval: float | Callable[[], float],
    action: Callable[[], Awaitable[object]],
    what: str,
    *,
    first_at_once: bool = False,
) -> None:
    """Runs `action` every `interval` seconds (a number, or read anew each time) until
    cancelled; with `first_at_once`, its first pass does not wait."""
    wait = first_at_once
    while True:
        if wait:
            wait = False
        else:
            await asyncio.sleep(interval() if callable(interval) else interval)
        try:
            await action()
        except Exception:  # noqa: BLE001 - a failed pass is retried on the next tick
            logger.exception("%s failed", what)


class Background:
    """One named background task of the process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._task: asyncio.Task[None] | None = None

    def start(self, loop: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._task is None:
            self._task = asyncio.create_task(loop(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
