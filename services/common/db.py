"""The asyncpg connection pool of a service.

Owns pool creation (`create_pool`): JSON/JSONB codecs on every connection,
a bounded wait for the database at start-up, and the DSN passed through
unchanged (never parsed or rebuilt here). The caller owns the pool and
closes it (`server.serve` does, after the gRPC server has drained).
NUMERIC comes back as `Decimal` (asyncpg's default): money stays exact.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

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
