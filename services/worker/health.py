"""The worker's HTTP health probe: `/livez` and `/readyz` for Kubernetes.

A Celery worker has no gRPC port, and the usual stand-ins are poor probes:
`celery inspect ping` starts a Python process per probe and fails whenever
the broker is briefly away (restarting a healthy worker for Redis's sake),
and "the process exists" proves nothing. This module owns a consumer
bootstep that ticks on the consumer's own event-loop timer and a tiny
stdlib HTTP server (one daemon thread in the worker's main process) that
reads what the steps recorded:

- `/livez` answers 200 while the consumer's event loop has ticked within
  `stale_after` seconds, 503 otherwise (a wedged main loop is restarted).
  While the consumer is not running - starting, or reconnecting after a
  broker loss, which Celery retries on its own and gives up by exiting -
  it answers 200: a broker outage is no reason to restart a worker.
- `/readyz` answers 200 while the consumer is started (connected to the
  broker and consuming its queues) and the loop is live, 503 otherwise
  (a new pod counts toward a rollout only once it takes work).

The tick runs in the main process, so a long task in a prefork child never
makes the worker look dead; with `--pool solo` a task blocks the loop, so
use prefork (the default) wherever a liveness probe is configured. Off
unless `DOCIMPORT_HEALTH_PORT` is set; it never touches the broker itself.
"""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from celery import Celery, bootsteps

logger = logging.getLogger(__name__)


class HealthState:
    """What the probe answers from: the last tick and whether the consumer runs."""

    def __init__(self, stale_after: float) -> None:
        self.stale_after = stale_after
        self._lock = threading.Lock()
        self._last_tick: float | None = None
        self._consuming = False

    def tick(self) -> None:
        with self._lock:
            self._last_tick = time.monotonic()

    def set_consuming(self, consuming: bool) -> None:
        with self._lock:
            self._consuming = consuming
            if consuming:
                self._last_tick = time.monotonic()

    def live(self) -> bool:
        with self._lock:
            if not self._consuming:
                return True
            return self._fresh()

    def ready(self) -> bool:
        with self._lock:
            return self._consuming and self._fresh()

    def _fresh(self) -> bool:
        return self._last_tick is not None and time.monotonic() - self._last_tick <= self.stale_after


def _handler(state: HealthState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            checks = {"/livez": state.live, "/readyz": state.ready}
            check = checks.get(self.path.split("?", 1)[0])
            if check is None:
                self.send_error(404)
                return
            ok = check()
            body = b"ok\n" if ok else b"unhealthy\n"
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # probes every few seconds would drown the worker's log

    return Handler


class HealthServer:
    """The HTTP server thread; `port` is the bound port (0 asks for a free one)."""

    def __init__(self, state: HealthState, host: str, port: int) -> None:
        self._server = ThreadingHTTPServer((host, port), _handler(state))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="docimport-health", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        logger.info("worker health probe on :%d (/livez, /readyz)", self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def install(app: Celery, *, host: str, port: int, interval: float = 5.0) -> HealthState:
    """Adds the probe's two bootsteps to `app`.

    The server starts as a worker step right after the pool (so prefork
    children are forked before its thread exists, and the probe answers
    while the consumer is still connecting); the tick and the consuming flag
    belong to a consumer step, which Celery stops and restarts around a
    broker connection loss.
    """
    state = HealthState(stale_after=max(3 * interval, 15.0))

    class HealthServerStep(bootsteps.StartStopStep):
        """Serves /livez and /readyz from the worker's main process."""

        requires = {"celery.worker.components:Pool"}

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self._server: HealthServer | None = None

        def start(self, w: Any) -> None:
            if self._server is None:
                self._server = HealthServer(state, host, port)
                self._server.start()

        def stop(self, w: Any) -> None:
            if self._server is not None:
                self._server.stop()
                self._server = None

    class HealthTick(bootsteps.StartStopStep):
        """Ticks on the consumer's event-loop timer; marks consuming."""

        requires = {"celery.worker.consumer.tasks:Tasks"}

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self._timer: Any = None

        def start(self, c: Any) -> None:
            if self._timer is None:  # the worker's timer outlives consumer restarts
                self._timer = c.timer.call_repeatedly(interval, state.tick, priority=10)
            state.set_consuming(True)

        def stop(self, c: Any) -> None:
            # Called on a broker connection loss too, before the consumer restarts.
            state.set_consuming(False)

        def shutdown(self, c: Any) -> None:
            state.set_consuming(False)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    app.steps["worker"].add(HealthServerStep)
    app.steps["consumer"].add(HealthTick)
    return state
