"""Publishing stage runs to Celery: the `Enqueuer` protocol and `CeleryEnqueuer`.

The only module of the code base that imports Celery or kombu; the session
service is the only component that enqueues (DESIGN). Callers publish only
after the database transaction that created the runs has committed, so a
message never names a run Postgres does not know; a message lost after the
commit is recovered by the reconciler when its lease expires.

Owns one broker connection and the single thread that uses it (kombu
connections are not thread-safe); `close()` releases both.

Publishing is batched: each message is built by Celery itself
(`app.amqp.as_task_v2`, protocol 2, the same headers `apply_async` sends:
task id chosen by the session service, `timelimit` scaled by the file's
size, `expires` at the run's lease) and published with kombu's
`Producer.batch`, which buffers the LPUSHes of a batch in one Redis
pipeline (other transports publish one by one). Measured on the dev box,
that is ~12x a bare `send_task` loop; see bench/session_dispatch.py.
Messages go to the anonymous exchange with the queue name as routing key,
which is what Celery itself does for direct queues.

Tracing: since `apply_async` is not used, Celery's publish hook (and so its
OpenTelemetry instrumentation) never sees these messages. When a message
carries the trace context of the command that started its session, it is
published inside a PRODUCER span, child of that context, whose `traceparent`
goes into the message headers, where the worker's Celery instrumentation
finds it (see services.common.telemetry). Without one, nothing is done.
Flower shows each task's `argsrepr` (session, document, stage, attempt).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from services.common import telemetry
from services.common.tasks import QUEUES, TASK_NAMES, StagePayload

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageMessage:
    """One stage run to publish: its task id is already in `stage_runs`."""

    task_id: str
    payload: StagePayload
    # Seconds; the worker's soft limit raises inside the task, the hard one kills it.
    soft_time_limit: float
    time_limit: float
    # The run's lease: a worker discards the message after this.
    expires_at: dt.datetime
    # W3C traceparent of the call that started the session's work, if traced.
    trace_parent: str | None = None

    @property
    def stage(self) -> str:
        return self.payload.stage


class PublishError(RuntimeError):
    """The broker refused or lost a batch; some of it may have been published."""


class Enqueuer(Protocol):
    """Publishes stage runs; raises PublishError when the broker fails."""

    async def publish(self, messages: Sequence[StageMessage]) -> None: ...

    async def close(self) -> None: ...


class CeleryEnqueuer:
    """Publishes Celery protocol-2 messages in pipelined batches."""

    def __init__(
        self, broker_url: str, *, batch_size: int = 1000, origin: str | None = None
    ) -> None:
        from celery import Celery

        self._app = Celery("docimport-session", broker=broker_url, set_as_current=False)
        self._app.conf.update(
            broker_connection_retry_on_startup=True,
            task_serializer="json",
            accept_content=["json"],
        )
        self._batch_size = max(1, batch_size)
        self._origin = origin or f"docimport-session@{socket.gethostname()}"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="celery-publish")
        self._connection: Any = None
        self._producer: Any = None

    async def publish(self, messages: Sequence[StageMessage]) -> None:
        if not messages:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._publish_blocking, list(messages))

    def _ensure_producer(self) -> Any:
        if self._producer is None:
            from kombu import Producer

            connection = self._app.connection_for_write()
            connection.ensure_connection(max_retries=3)
            self._connection = connection
            self._producer = Producer(connection.default_channel)
        return self._producer

    def _reset(self) -> None:
        try:
            if self._connection is not None:
                self._connection.release()
        except Exception:  # noqa: BLE001 - the connection is already broken
            pass
        self._connection = None
        self._producer = None

    def _publish_blocking(self, messages: list[StageMessage]) -> None:
        amqp = self._app.amqp
        spans: list[Any] = []
        try:
            producer = self._ensure_producer()
            with producer.batch(self._batch_size):
                for message in messages:
                    payload = message.payload
                    task_name = TASK_NAMES[payload.stage]
                    headers, properties, body, _ = amqp.as_task_v2(
                        message.task_id,
                        task_name,
                        args=(payload.to_json(),),
                        time_limit=message.time_limit,
                        soft_time_limit=message.soft_time_limit,
                        expires=message.expires_at.isoformat(),
                        origin=self._origin,
                        # saferepr of the payload costs more than the publish; Flower shows this
                        argsrepr=describe(payload),
                        kwargsrepr="{}",
                    )
                    if message.trace_parent:
                        span = _publish_span(message, task_name)
                        if span is not None:
                            spans.append(span)
                            headers.update(telemetry.headers_of(span))
                    producer.publish(
                        body,
                        exchange="",
                        routing_key=QUEUES[payload.stage],
                        headers=headers,
                        serializer="json",
                        delivery_mode=2,
                        retry=False,
                        **properties,
                    )
        except Exception as exc:  # noqa: BLE001 - any broker failure is a PublishError
            self._reset()
            for span in spans:
                telemetry.failed(span, exc)
            raise PublishError(f"publishing {len(messages)} stage runs failed: {exc}") from exc
        finally:
            for span in spans:
                span.end()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._reset)
        self._executor.shutdown(wait=True)


class QueueDepths:
    """Reads how many messages wait in each stage queue (for `/metrics`).

    Called from the metrics scrape thread: it has its own broker connection
    (kombu connections are not thread-safe), made on first use and kept,
    dropped after a failure. `queue_declare` is kombu's transport-neutral
    way to ask a queue's size (on Redis: the LLEN of the list and of its
    priority lists); it creates nothing on Redis.
    """

    def __init__(self, broker_url: str, *, timeout: float = 2.0) -> None:
        from celery import Celery

        self._app = Celery("docimport-session-metrics", broker=broker_url, set_as_current=False)
        self._app.conf.update(
            broker_connection_retry_on_startup=False,
            broker_connection_timeout=timeout,
            broker_transport_options={"socket_timeout": timeout, "socket_connect_timeout": timeout},
        )
        self._connection: Any = None
        self._lock = threading.Lock()

    def read(self) -> dict[str, int]:
        with self._lock:
            try:
                if self._connection is None:
                    connection = self._app.connection_for_read()
                    connection.ensure_connection(max_retries=1)
                    self._connection = connection
                channel = self._connection.default_channel
                return {
                    queue: int(channel.queue_declare(queue=queue, passive=False).message_count)
                    for queue in QUEUES.values()
                }
            except Exception:
                self.close()
                raise

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.release()
            except Exception:  # noqa: BLE001 - already broken
                pass


def describe(payload: StagePayload) -> str:
    """What Flower and the worker's logs show as the task's arguments."""
    return (
        f"(session_id={payload.session_id}, document_id={payload.document_id}, "
        f"stage={payload.stage}, attempt={payload.attempt})"
    )


def _publish_span(message: StageMessage, task_name: str) -> Any:
    payload = message.payload
    return telemetry.publish_span(
        f"publish {task_name}",
        message.trace_parent,
        {
            "messaging.system": "celery",
            "messaging.operation": "publish",
            "messaging.destination.name": QUEUES[payload.stage],
            "messaging.message.id": message.task_id,
            "celery.task_name": task_name,
            "session_id": payload.session_id,
            "document_id": payload.document_id,
            "stage": payload.stage,
            "attempt": payload.attempt,
        },
    )
