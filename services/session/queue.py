"""Publishing stage runs to Celery (`CeleryEnqueuer`) and reading the broker (`CeleryProbe`).

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

`CeleryProbe` answers the pipeline overview's questions only the broker
can: how deep each stage queue is and which workers are online (see its
docstring for the costs and the caching). `CeleryRunTracker` tells the
lease keeper which runs are alive (messages waiting in the stage queues,
runs the workers hold) and takes unwanted runs back (revoke, purge).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
import socket
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from services.common import telemetry
from services.common.tasks import HELD_COMMAND, QUEUES, TASK_NAMES, StagePayload

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
    """Reads how many messages wait in each stage queue.

    Used by the `/metrics` scrape thread and by `CeleryProbe` (the pipeline
    overview), each with its own instance: it has its own broker connection
    (kombu connections are not thread-safe), made on first use and kept,
    dropped after a failure. A passive `queue_declare` is kombu's
    transport-neutral way to ask a queue's size (on Redis: the LLEN of the
    list and of its priority lists); it creates nothing, and a queue nobody
    declared yet is empty, not an error.
    """

    def __init__(self, broker_url: str, *, timeout: float = 2.0) -> None:
        from celery import Celery

        self._app = Celery("docimport-session-depths", broker=broker_url, set_as_current=False)
        self._app.conf.update(
            broker_connection_retry_on_startup=False,
            broker_connection_timeout=timeout,
            broker_transport_options={"socket_timeout": timeout, "socket_connect_timeout": timeout},
        )
        self._connection: Any = None
        self._lock = threading.Lock()

    def read(self, queues: Sequence[str] | None = None) -> dict[str, int]:
        with self._lock:
            try:
                if self._connection is None:
                    connection = self._app.connection_for_read()
                    connection.ensure_connection(max_retries=1)
                    self._connection = connection
                channel = self._connection.default_channel
                depths = {}
                for name in queues if queues is not None else QUEUES.values():
                    try:
                        declared = channel.queue_declare(queue=name, passive=True)
                        depths[name] = int(declared.message_count)
                    except self._connection.channel_errors as exc:
                        # 404 (a str on kombu's virtual transports): never declared, so empty
                        if str(getattr(exc, "reply_code", "")) != "404":
                            raise
                        depths[name] = 0
                return depths
            except Exception:
                self._close()
                raise

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.release()
            except Exception:  # noqa: BLE001 - already broken
                pass

    def close(self) -> None:
        with self._lock:
            self._close()


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

# ---------------------------------------------------------------- observing the broker


@dataclass(frozen=True)
class WorkerInfo:
    """A Celery worker that answered a broadcast, and the queues it consumes."""

    hostname: str
    queues: tuple[str, ...]


@dataclass(frozen=True)
class BrokerView:
    """Queue depths and workers online, or why the broker could not say."""

    queue_depths: dict[str, int]
    workers: tuple[WorkerInfo, ...]
    workers_checked_at: dt.datetime | None
    error: str = ""

    @property
    def reachable(self) -> bool:
        return not self.error


class BrokerProbe(Protocol):
    """Reads what only the broker knows, for the pipeline overview."""

    async def view(self, queues: Sequence[str]) -> BrokerView: ...

    async def close(self) -> None: ...


class CeleryProbe:
    """Queue depths by a passive queue declare; workers by a broadcast ping.

    Depths come from a `QueueDepths` of its own. Workers are
    asked with Celery's remote control (`inspect().active_queues()`), which
    waits the whole `ping_timeout` for answers, so the answer is cached for
    `workers_ttl` seconds and refreshed in the background while the cached
    one is served (only the first call waits). Depths (through their
    `QueueDepths`) and workers each have their own connection and thread
    (kombu connections are not thread-safe), and neither shares the
    publisher's: a slow broker never delays publishing.
    """

    def __init__(
        self, broker_url: str, *, ping_timeout: float = 1.0, workers_ttl: float = 5.0
    ) -> None:
        from celery import Celery

        self._app = Celery("docimport-session-probe", broker=broker_url, set_as_current=False)
        self._app.conf.update(broker_connection_retry_on_startup=True)
        self._ping_timeout = ping_timeout
        self._workers_ttl = workers_ttl
        # One thread each (kombu connections are not thread-safe): depths, workers.
        self._depths_thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="celery-probe-depths"
        )
        self._workers_thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="celery-probe-workers"
        )
        self._depths = QueueDepths(broker_url)
        self._connection: Any = None  # the workers thread's
        self._workers: tuple[WorkerInfo, ...] = ()
        self._workers_at: dt.datetime | None = None
        self._workers_error = ""
        self._workers_checked = float("-inf")
        self._refresh: asyncio.Task[None] | None = None

    def _workers_connection(self) -> Any:
        if self._connection is None:
            connection = self._app.connection_for_read()
            connection.ensure_connection(max_retries=1, timeout=2)
            self._connection = connection
        return self._connection

    def _reset(self) -> None:
        connection, self._connection = self._connection, None
        try:
            if connection is not None:
                connection.release()
        except Exception:  # noqa: BLE001 - the connection is already broken
            pass

    def _workers_blocking(self) -> tuple[WorkerInfo, ...]:
        try:
            inspect = self._app.control.inspect(
                timeout=self._ping_timeout, connection=self._workers_connection()
            )
            replies = inspect.active_queues() or {}
        except Exception:
            self._reset()
            raise
        return tuple(
            WorkerInfo(host, tuple(sorted(str(q.get("name", "")) for q in queues or ())))
            for host, queues in sorted(replies.items())
        )

    async def _refresh_workers(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            workers = await loop.run_in_executor(self._workers_thread, self._workers_blocking)
        except Exception as exc:  # noqa: BLE001 - reported by view()
            self._workers_error = f"asking the workers failed: {type(exc).__name__}: {exc}"
            return
        finally:
            self._workers_checked = loop.time()
        self._workers, self._workers_error = workers, ""
        self._workers_at = dt.datetime.now(dt.UTC)

    async def view(self, queues: Sequence[str]) -> BrokerView:
        loop = asyncio.get_running_loop()
        if loop.time() - self._workers_checked > self._workers_ttl and (
            self._refresh is None or self._refresh.done()
        ):
            self._refresh = loop.create_task(self._refresh_workers())
        try:
            depths = await loop.run_in_executor(
                self._depths_thread, self._depths.read, list(queues)
            )
        except Exception as exc:  # noqa: BLE001 - reported in the overview, not raised
            logger.info("broker unreachable for the pipeline overview: %s", exc)
            return BrokerView({}, (), None, error=f"{type(exc).__name__}: {exc}")
        if self._workers_at is None and self._refresh is not None:
            await asyncio.shield(self._refresh)  # no answer yet: wait for the first
        return BrokerView(depths, self._workers, self._workers_at, error=self._workers_error)

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._workers_thread, self._reset)
        await loop.run_in_executor(self._depths_thread, self._depths.close)
        self._workers_thread.shutdown(wait=True)
        self._depths_thread.shutdown(wait=True)


# ---------------------------------------------------------------- which runs are alive


@dataclass(frozen=True)
class Sighting:
    """Task ids seen alive in one look at the broker and the workers."""

    # Messages waiting in the stage queues.
    queued: frozenset[str]
    # Runs held by the workers that answered: prefetched, running, or finished and
    # waiting in their outbox.
    held: frozenset[str]
    workers: int
    # The broker lost its data since the last look (flushed, or restarted without
    # persistence): every queued message it held is gone, whatever the leases say.
    broker_lost: bool = False

    @property
    def alive(self) -> frozenset[str]:
        return self.queued | self.held


class RunTracker(Protocol):
    """Sees which runs are alive; takes back the messages of runs no longer wanted."""

    async def sight(self) -> Sighting: ...

    async def forget(self, task_ids: Sequence[str]) -> None: ...

    async def close(self) -> None: ...


class CeleryRunTracker:
    """Reads the stage queues (Redis lists) and asks the workers what they hold.

    A look is one LRANGE per stage queue (and its priority lists), whose
    messages carry their task id in their headers, and one broadcast of the
    workers' `docimport_held` command, answered by each worker's main process
    within `timeout` seconds. The queues hold at most the session service's
    in-flight cap of messages, so a look stays small. `forget` revokes task
    ids (every worker then drops such a message unrun) and removes their
    messages from the queues. Own connection and thread (kombu connections
    are not thread-safe); any broker failure raises, so that the caller
    never takes a failed look for an empty broker.
    """

    # A key the tracker keeps in the broker: gone means the broker lost its data.
    EPOCH_KEY = "docimport:broker-epoch"

    def __init__(self, broker_url: str, *, timeout: float = 1.0) -> None:
        from celery import Celery

        self._epoch: bytes | None = None  # the broker's epoch at the last look
        self._app = Celery("docimport-session-tracker", broker=broker_url, set_as_current=False)
        self._app.conf.update(
            broker_connection_retry_on_startup=False,
            broker_connection_timeout=max(timeout, 2.0),
        )
        self._timeout = timeout
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="celery-tracker")
        # Two connections: the broadcasts' replies are consumed on one, and its Redis client
        # is not free for other commands meanwhile; the queues are read on the other.
        self._connections: dict[str, Any] = {}

    def _conn(self, purpose: str) -> Any:
        if purpose not in self._connections:
            connection = self._app.connection_for_read()
            connection.ensure_connection(max_retries=1, timeout=max(self._timeout, 2.0))
            self._connections[purpose] = connection
        return self._connections[purpose]

    def _reset(self) -> None:
        connections, self._connections = self._connections, {}
        for connection in connections.values():
            try:
                connection.release()
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass

    def _lists(self) -> tuple[Any, list[str]]:
        """The Redis client and the names of every stage queue's lists."""
        channel = self._conn("queues").default_channel
        client = getattr(channel, "client", None)
        if client is None or not hasattr(channel, "_q_for_pri"):
            raise RuntimeError("the lease probe reads Redis queues; this broker is not Redis")
        names = []
        for queue in QUEUES.values():
            for pri in getattr(channel, "priority_steps", [0]):
                name = channel._q_for_pri(queue, pri)
                if name not in names:
                    names.append(name)
        return client, names

    def _broker_lost(self, client: Any) -> bool:
        """True when the broker's epoch key changed or vanished since the last look (it then
        gets a new one; replicas agree on the key, each remembers what it saw)."""
        epoch = client.get(self.EPOCH_KEY)
        if epoch is None:
            client.set(self.EPOCH_KEY, uuid.uuid4().hex, nx=True)
            epoch = client.get(self.EPOCH_KEY)
        lost = self._epoch is not None and epoch != self._epoch
        self._epoch = epoch
        return lost

    def _sight_blocking(self) -> Sighting:
        try:
            client, names = self._lists()
            lost = self._broker_lost(client)
            queued = set()
            for name in names:
                for raw in client.lrange(name, 0, -1):
                    task_id = _message_id(raw)
                    if task_id:
                        queued.add(task_id)
            replies = self._app.control.broadcast(
                HELD_COMMAND, reply=True, timeout=self._timeout, connection=self._conn("control")
            ) or []
        except Exception:
            self._reset()
            raise
        held: set[str] = set()
        workers = 0
        for reply in replies:
            for answer in reply.values():
                if isinstance(answer, dict) and isinstance(answer.get("held"), list):
                    workers += 1
                    held.update(str(t) for t in answer["held"])
        return Sighting(frozenset(queued), frozenset(held), workers, lost)

    def _forget_blocking(self, task_ids: list[str]) -> None:
        wanted_gone = set(task_ids)
        try:
            self._app.control.revoke(task_ids, connection=self._conn("control"))
            client, names = self._lists()
            for name in names:
                for raw in client.lrange(name, 0, -1):
                    if _message_id(raw) in wanted_gone:
                        client.lrem(name, 1, raw)
        except Exception:
            self._reset()
            raise

    async def sight(self) -> Sighting:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._sight_blocking)

    async def forget(self, task_ids: Sequence[str]) -> None:
        if task_ids:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._thread, self._forget_blocking, list(task_ids))

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._reset)
        self._thread.shutdown(wait=True)


# A message's task id in kombu's JSON envelope: its body is base64, so the only `"id": "` is
# the headers' (the parent and root ids are "parent_id", "root_id"). A ninth of json.loads.
_ID = re.compile(rb'"id": "([^"\\]{1,200})"')


def _message_id(raw: bytes | str) -> str | None:
    """The task id in the headers of a queued message (kombu's JSON envelope), if any."""
    data = raw.encode() if isinstance(raw, str) else raw
    found = _ID.search(data)
    if found is not None:
        return found.group(1).decode(errors="replace")
    try:  # another layout of the envelope
        task_id = json.loads(data)["headers"]["id"]
    except (ValueError, TypeError, KeyError):
        return None
    return task_id if isinstance(task_id, str) else None
