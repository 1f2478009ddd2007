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


class HeldConnection:
    """One pooled connection kept checked out for a hot, mostly serial path.

    `pool.acquire()` costs a reset round trip (`pg_advisory_unlock_all`,
    `UNLISTEN *`, `RESET ALL`) and some Python on every release; a path that
    runs one short transaction after another (the session service's report
    ingest) keeps its connection instead. Concurrent use while the held one
    is busy falls back to an ordinary pooled connection. After a failure the
    held connection goes back to the pool (which resets it) and a fresh one
    is taken on next use. Only for code that leaves no session state behind
    (no LISTEN, no session-level locks, no open transaction). `settings` are
    session settings (`SET name = value`) made on the held connection when it
    is taken (and on a fallback connection, for that use); the pool's reset
    undoes them when it goes back. `close()` returns it to the pool: call it
    before closing the pool.
    """

    def __init__(self, pool: asyncpg.Pool, settings: dict[str, str] | None = None) -> None:
        self._pool = pool
        self._settings = dict(settings or {})
        self._conn: asyncpg.Connection | None = None
        self._busy = False

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
        if self._busy:
            async with self._pool.acquire() as conn:
                await self._apply(conn)  # the pool's reset undoes them on release
                yield conn
            return
        self._busy = True
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await self._take()
            conn = self._conn
            try:
                yield conn
            except BaseException:
                self._conn = None
                await self._pool.release(conn)
                raise
            if conn.is_in_transaction():  # pragma: no cover - a caller bug; let the pool reset it
                self._conn = None
                await self._pool.release(conn)
        finally:
            self._busy = False

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pool.release(conn)
