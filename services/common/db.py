"""The asyncpg connection pool of a service.

Owns pool creation (`create_pool`): JSON/JSONB codecs on every connection,
a bounded wait for the database at start-up, and the DSN passed through
unchanged (never parsed or rebuilt here), and `HeldConnection` for a hot
path that should not pay a pool checkout per transaction. The caller owns the pool and
closes it (`server.serve` does, after the gRPC server has drained).
NUMERIC comes back as `Decimal` (asyncpg's default): money stays exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

import asyncpg

logger = logging.getLogger(__name__)


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, wait: float = 30.0
) -> asyncpg.Pool:
    """A pool on `dsn`, retrying while the database starts (up to `wait` seconds)."""
    deadline = time.monotonic() + wait
    delay = 0.1
    while True:
        try:
            return await asyncpg.create_pool(
                dsn, min_size=min_size, max_size=max_size, init=_init_connection,
                command_timeout=60,
            )
        except (OSError, asyncpg.CannotConnectNowError) as exc:
            if time.monotonic() > deadline:
                raise
            logger.warning("database not ready (%s); retrying", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def connect(dsn: str) -> asyncpg.Connection:
    """One connection with the same codecs as the pool's."""
    conn = await asyncpg.connect(dsn)
    await _init_connection(conn)
    return conn


def _gone(conn: asyncpg.Connection) -> bool:
    """Closed, or taken back by the pool (asyncpg detaches a pooled connection that closed)."""
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        return True


class HeldConnection:
    """Up to `keep` pooled connections kept checked out for a hot path.

    `pool.acquire()` costs a reset round trip (`pg_advisory_unlock_all`,
    `UNLISTEN *`, `RESET ALL`) and some Python on every release; a path that
    runs one short transaction after another (the session service's report
    ingest, the cost ledger) keeps its connections instead: a use takes an
    idle held one, or checks one out while fewer than `keep` are held, and
    puts it back without a reset. Use beyond `keep` at once falls back to an
    ordinary pooled connection (reset on release). After a failure the
    connection goes back to the pool (which resets it) and a fresh one is
    taken on a later use. Only for code that leaves no session state behind
    (no LISTEN, no session-level locks, no open transaction). `settings` are
    session settings (`SET name = value`) made on a connection when it is
    taken (and on a fallback connection, for that use); the pool's reset
    undoes them when it goes back. `close()` returns the held ones to the
    pool: call it before closing the pool.
    """

    def __init__(
        self, pool: asyncpg.Pool, settings: dict[str, str] | None = None, *, keep: int = 1
    ) -> None:
        self._pool = pool
        self._settings = dict(settings or {})
        self._keep = max(1, keep)
        self._idle: list[asyncpg.Connection] = []
        self._held = 0  # checked out and kept: idle ones plus those in use

    async def _apply(self, conn: asyncpg.Connection) -> None:
        for name, value in self._settings.items():
            await conn.execute("SELECT set_config($1, $2, false)", name, value)

    async def _take(self) -> asyncpg.Connection:
        conn = await self._pool.acquire()
        try:
            await self._apply(conn)
        except BaseException:
            await self._pool.release(conn)
            raise
        return conn

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        while self._idle and _gone(self._idle[-1]):
            self._held -= 1
            await self._pool.release(self._idle.pop())  # a no-op if asyncpg took it back
        if not self._idle and self._held >= self._keep:
            async with self._pool.acquire() as conn:
                await self._apply(conn)  # the pool's reset undoes them on release
                yield conn
            return
        if self._idle:
            conn = self._idle.pop()
        else:
            self._held += 1
            try:
                conn = await self._take()
            except BaseException:
                self._held -= 1
                raise
        try:
            yield conn
        except BaseException:
            self._held -= 1
            await self._pool.release(conn)
            raise
        if conn.is_in_transaction():  # pragma: no cover - a caller bug; let the pool reset it
            self._held -= 1
            await self._pool.release(conn)
        else:
            self._idle.append(conn)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        self._held -= len(idle)
        for conn in idle:
            await self._pool.release(conn)
