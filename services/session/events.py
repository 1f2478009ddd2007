"""Live session events: one LISTEN connection, bounded tails, the watch loop.

Owns the `EventHub`: a single dedicated asyncpg connection (not from the
pool; `stop()` closes it) LISTENing on `docimport_session`, and, for each
session someone watches, a `Tail`: the session's latest events in a bounded
buffer, fetched once per wake-up and shared by all its watchers (50
watchers cost one query, not 50). The connection is re-opened when it
drops; every tail then re-reads from its last seq, so nothing is missed.
Also wakes this process's dispatcher when another replica changed a session.

`watch()` is the loop behind WatchSession, in domain terms (the servicer
turns its items into protos): a snapshot first (unless resuming), then
every event in seq order, no gap and no duplicate. Events always come from
Postgres (the store assigns seqs in the writing transaction), so resuming
after seq N is `seq > N`. Every item carries a resume token: its seq and
the digest of the event at that seq (`store.Event.digest`). Where the
stream meets the database anyway (a resume, an idle poll, the listener's
reconnect) the digest is compared with the event stored at that seq now:
a database that lost committed events hands their seqs out again, and a
watcher trusting a reused seq would count wrong for good, so a mismatch (or
a seq past the session's last) gets a fresh snapshot. Checking costs no
query per event. A watcher more than `coalesce_after` events behind
(a slow client, or a resume from long ago) gets one fresh snapshot instead
of the backlog; no per-watcher buffer exists, so memory is bounded by the
tails. When idle it sends heartbeats; once the session is finished and its
last event sent, the stream ends. No SQL here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from services.common import db
from services.session import states as st
from services.session.store import NOTIFY_CHANNEL, ORIGIN, Event, SessionStore, Snapshot

logger = logging.getLogger(__name__)

FETCH_PAGE = 1000


class Tail:
    """The recent events of one watched session, shared by its watchers."""

    def __init__(self, session_id: str, store: SessionStore, base_seq: int, capacity: int) -> None:
        self.session_id = session_id
        self._store = store
        self.events: collections.deque[Event] = collections.deque(maxlen=capacity)
        # Seq of the last event fetched (the buffer holds the latest ones).
        self.last_seq = base_seq
        self.known_seq = base_seq
        self.watchers = 0
        # Bumped when the database went back in time under the buffer.
        self.generation = 0
        self._cond = asyncio.Condition()
        self._fetching: asyncio.Task[None] | None = None

    def notify(self, seq: int) -> None:
        self.known_seq = max(self.known_seq, seq)
        if self.known_seq > self.last_seq and (self._fetching is None or self._fetching.done()):
            self._fetching = asyncio.get_running_loop().create_task(self._fetch())

    async def _fetch(self) -> None:
        try:
            while self.last_seq < self.known_seq:
                generation = self.generation
                events = await self._store.events_after(self.session_id, self.last_seq, FETCH_PAGE)
                if generation != self.generation:
                    continue  # rewound meanwhile: read again from where it now stands
                if not events:
                    break
                self.events.extend(events)
                self.last_seq = events[-1].seq
                async with self._cond:
                    self._cond.notify_all()
        except Exception:  # noqa: BLE001 - watchers fall back to polling
            logger.exception("fetching events of session %s failed", self.session_id)
            async with self._cond:
                self._cond.notify_all()

    def buffered_digest(self, seq: int) -> str | None:
        """The digest of the buffered event at `seq`, None when not buffered."""
        if not self.events or not self.events[0].seq <= seq <= self.events[-1].seq:
            return None
        return self.events[seq - self.events[0].seq].digest

    async def distrust(self, seq: int, digest: str | None, last_seq: int) -> None:
        """Rewinds to `last_seq` if the buffer holds another event at `seq` than `digest`'s."""
        buffered = self.buffered_digest(seq)
        if buffered is not None and buffered != digest:
            await self.rewind(last_seq)

    async def rewind(self, last_seq: int) -> None:
        """Forgets the buffer (its seqs now name other events); watchers re-snapshot."""
        logger.warning("events of session %s went back in time (now at seq %d, had %d)",
                       self.session_id, last_seq, self.last_seq)
        self.events.clear()
        self.last_seq = self.known_seq = last_seq
        self.generation += 1
        async with self._cond:
            self._cond.notify_all()

    def read(self, after_seq: int, limit: int) -> list[Event] | None:
        """Buffered events after `after_seq`; None when they are older than the buffer."""
        if after_seq >= self.last_seq:
            return []
        if not self.events or after_seq + 1 < self.events[0].seq:
            return None
        start = after_seq + 1 - self.events[0].seq
        return [self.events[i] for i in range(start, min(len(self.events), start + limit))]

    async def wait(self, after_seq: int, timeout: float) -> bool:
        """Waits until an event after `after_seq` is buffered (or a rewind); False on timeout."""
        generation = self.generation
        async with self._cond:
            try:
                await asyncio.wait_for(
                    self._cond.wait_for(
                        lambda: self.last_seq > after_seq or self.generation != generation
                    ),
                    timeout=timeout,
                )
                return True
            except TimeoutError:
                return False


class EventHub:
    """LISTEN/NOTIFY on one connection, fanned out to tails and the dispatcher."""

    def __init__(
        self,
        dsn: str,
        store: SessionStore,
        *,
        capacity: int = 8192,
        on_foreign_change: Callable[[str], None] | None = None,
    ) -> None:
        self._dsn = dsn
        self._store = store
        self._capacity = capacity
        self._on_foreign_change = on_foreign_change
        self._tails: dict[str, Tail] = {}
        self._conn: asyncpg.Connection | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        await self._connect()
        self._supervisor = asyncio.create_task(self._supervise(), name="event-hub")

    async def _connect(self) -> None:
        conn = await db.connect(self._dsn)
        conn.add_termination_listener(lambda _conn: self._lost.set())
        await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        self._conn = conn
        self._lost.clear()

    async def _supervise(self) -> None:
        delay = 0.2
        while not self._stopping:
            await self._lost.wait()
            if self._stopping:
                return
            logger.warning("event listener connection lost; reconnecting")
            while not self._stopping:
                try:
                    await self._connect()
                    delay = 0.2
                    break
                except (OSError, asyncpg.PostgresError) as exc:
                    logger.warning("cannot reconnect the event listener: %s", exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            await self.refresh_all()

    async def refresh_all(self) -> None:
        """Re-reads every tail's last seq (after a reconnect: NOTIFYs may be lost).

        A database back from a crash may also have lost what the tail holds:
        then its last event's digest differs, or the session ends before it.
        """
        for tail in list(self._tails.values()):
            try:
                found = await self._store.resume_point(tail.session_id, tail.last_seq)
            except Exception:  # noqa: BLE001 - the next heartbeat polls again
                continue
            if not found:
                continue
            if found[0] < tail.last_seq:
                await tail.rewind(found[0])
            else:
                await tail.distrust(tail.last_seq, found[2], found[0])
                tail.notify(found[0])

    async def stop(self) -> None:
        self._stopping = True
        self._lost.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except asyncio.CancelledError:
                pass
        if self._conn is not None and not self._conn.is_closed():
            try:
                await self._conn.close(timeout=2)
            except Exception:  # noqa: BLE001 - closing anyway
                self._conn.terminate()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        session_id, _, rest = payload.partition(":")
        seq_text, _, origin = rest.partition(":")
        tail = self._tails.get(session_id)
        if tail is not None:
            try:
                tail.notify(int(seq_text))
            except ValueError:
                pass
        if origin != ORIGIN and self._on_foreign_change is not None:
            self._on_foreign_change(session_id)

    def subscribe(self, session_id: str, base_seq: int) -> Tail:
        tail = self._tails.get(session_id)
        if tail is None:
            tail = Tail(session_id, self._store, base_seq, self._capacity)
            self._tails[session_id] = tail
        tail.watchers += 1
        return tail

    def unsubscribe(self, tail: Tail) -> None:
        tail.watchers -= 1
        if tail.watchers <= 0 and self._tails.get(tail.session_id) is tail:
            del self._tails[tail.session_id]


def resume_token(seq: int, digest: str | None) -> str:
    """The opaque token of a message at `seq` whose event has `digest`."""
    return f"{seq}.{digest or ''}"


def parse_resume_token(token: str) -> tuple[int, str | None] | None:
    """(seq, digest) of a token `resume_token` made; None when it is not one."""
    seq_text, dot, digest = token.partition(".")
    if not dot or not seq_text.isdigit() or len(seq_text) > 18 or len(digest) > 32:
        return None
    if any(c not in "0123456789abcdef" for c in digest):
        return None
    return int(seq_text), digest or None


@dataclass(frozen=True)
class WatchItem:
    """One thing to send: a snapshot, an event or a heartbeat (at `seq`)."""

    kind: str  # "snapshot" | "event" | "heartbeat"
    seq: int
    token: str
    snapshot: Snapshot | None = None
    event: Event | None = None


async def _snapshot(
    store: SessionStore, tail: Tail, session_id: str, stall_after: float
) -> tuple[WatchItem, str | None, str]:
    """A snapshot item with the digest and state at its seq; rewinds a stale tail."""
    snap = await store.snapshot(session_id, stall_after=stall_after)
    seq, digest = snap.session.last_seq, snap.last_event_digest
    await tail.distrust(seq, digest, seq)
    item = WatchItem("snapshot", seq, resume_token(seq, digest), snapshot=snap)
    return item, digest, snap.session.state


async def watch(
    hub: EventHub,
    store: SessionStore,
    session_id: str,
    *,
    resume_after_seq: int,
    resume_digest: str | None,
    heartbeat: float,
    coalesce_after: int,
    stall_after: float,
) -> AsyncIterator[WatchItem]:
    """The WatchSession stream of one watcher.

    `resume_digest` comes from the watcher's resume token; None (a bare
    `resume_after_seq`) trusts the seq as long as it is not past the end.
    """
    found = await store.resume_point(session_id, resume_after_seq)
    if found is None:
        from services.common.errors import NotFound

        raise NotFound("session", session_id)
    last_seq, state, digest = found
    rewound = resume_after_seq > last_seq or (
        resume_digest is not None and resume_digest != digest
    )
    tail = hub.subscribe(session_id, last_seq)
    try:
        if resume_after_seq == 0 or rewound or last_seq - resume_after_seq > coalesce_after:
            item, digest, state = await _snapshot(store, tail, session_id, stall_after)
            position = item.seq
            yield item
        else:
            position = resume_after_seq
            await tail.distrust(position, digest, last_seq)
        generation = tail.generation
        tail.notify(max(last_seq, tail.known_seq))
        while True:
            events = tail.read(position, FETCH_PAGE)
            if events is None:
                events = await store.events_after(session_id, position, FETCH_PAGE)
                pruned = (events[0].seq != position + 1) if events else position < tail.known_seq
                if pruned:  # deleted after the retention period: the present state is what is left
                    events = None
            behind = max(tail.known_seq, tail.last_seq) - position
            rewound = tail.generation != generation
            if events is None or (events and behind > coalesce_after) or rewound:
                item, digest, state = await _snapshot(store, tail, session_id, stall_after)
                position, generation = item.seq, tail.generation
                yield item
                continue
            if events:
                for event in events:
                    if event.seq != position + 1:
                        raise AssertionError(f"event gap: {position} -> {event.seq}")
                    position, digest = event.seq, event.digest
                    if event.kind == "state_change":
                        state = event.payload.get("state", state)
                    yield WatchItem("event", position, resume_token(position, digest), event=event)
                continue
            if state in st.SESSION_TERMINAL and position >= tail.known_seq:
                return
            if not await tail.wait(position, heartbeat):
                yield WatchItem("heartbeat", position, resume_token(position, digest))
                # A lost NOTIFY must not stall a watcher for good, nor lost
                # events (the database went back in time) mislead it.
                latest = await store.resume_point(session_id, position)
                if latest is not None and (latest[0] < position or latest[2] != digest):
                    await tail.rewind(latest[0])
                elif latest is not None:
                    tail.notify(latest[0])
    finally:
        hub.unsubscribe(tail)
