"""services.common.db: the pool and the held connection of hot paths, on a real Postgres."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from services.common import db


async def _setting(conn: asyncpg.Connection) -> str:
    return await conn.fetchval("SELECT current_setting('synchronous_commit')")


async def test_a_held_connection_is_kept_across_uses_with_its_settings(pool: asyncpg.Pool) -> None:
    held = db.HeldConnection(pool, {"synchronous_commit": "off"})
    async with held.acquire() as first:
        pid = first.get_server_pid()
        assert await _setting(first) == "off"
    async with held.acquire() as again:
        assert again.get_server_pid() == pid  # no checkout, no reset in between
        assert await _setting(again) == "off"
    await held.close()
    # back in the pool, reset: the setting is gone for the next borrower
    async with pool.acquire() as conn:
        assert await _setting(conn) == "on"


async def test_concurrent_use_falls_back_to_a_pooled_connection(pool: asyncpg.Pool) -> None:
    held = db.HeldConnection(pool)
    async with held.acquire() as first:
        async with held.acquire() as second:
            assert first.get_server_pid() != second.get_server_pid()
        await asyncio.sleep(0)
    await held.close()


async def test_after_a_failure_the_connection_goes_back_and_a_fresh_one_is_taken(
    pool: asyncpg.Pool,
) -> None:
    held = db.HeldConnection(pool, {"synchronous_commit": "off"})
    with pytest.raises(asyncpg.exceptions.DivisionByZeroError):
        async with held.acquire() as conn:
            await conn.execute("SET application_name = 'dirty'")
            await conn.fetchval("SELECT 1 / 0")
    async with held.acquire() as fresh:
        assert await fresh.fetchval("SELECT current_setting('application_name')") != "dirty"
        assert await _setting(fresh) == "off"
    await held.close()
    await asyncio.wait_for(pool.close(), timeout=5)  # nothing left checked out
