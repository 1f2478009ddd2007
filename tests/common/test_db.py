"""services.common.db: the pool and the held connection of hot paths, on a real Postgres."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from services.common import db


async def _name(conn: asyncpg.Connection) -> str:
    return await conn.fetchval("SELECT current_setting('application_name')")


async def test_a_held_connection_is_kept_across_uses_with_its_settings(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        default = await conn.fetchval(
            "SELECT boot_val FROM pg_settings WHERE name = 'application_name'"
        )
    held = db.HeldConnection(pool, {"application_name": "held"})
    async with held.acquire() as first:
        pid = first.get_server_pid()
        assert await _name(first) == "held"
    async with held.acquire() as again:
        assert again.get_server_pid() == pid  # no checkout, no reset in between
        assert await _name(again) == "held"
    await held.close()
    # back in the pool, reset: the setting is gone for the next borrower
    async with pool.acquire() as conn:
        assert await _name(conn) == default


async def test_concurrent_use_falls_back_to_a_pooled_connection(pool: asyncpg.Pool) -> None:
    held = db.HeldConnection(pool)
    async with held.acquire() as first:
        async with held.acquire() as second:
            assert first.get_server_pid() != second.get_server_pid()
        await asyncio.sleep(0)
    await held.close()


async def test_the_fallback_connection_has_the_settings_for_its_use_only(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        default = await _name(conn)
    held = db.HeldConnection(pool, {"application_name": "held"})
    async with held.acquire() as first:
        async with held.acquire() as second:
            fallback = second.get_server_pid()
            assert await _name(second) == "held"
        assert await _name(first) == "held"
    await held.close()
    # both went back reset: whoever borrows either one next has the default
    borrowed = [await pool.acquire() for _ in range(pool.get_size())]
    try:
        by_pid = {c.get_server_pid(): c for c in borrowed}
        assert fallback in by_pid
        assert await _name(by_pid[fallback]) == default
    finally:
        for conn in borrowed:
            await pool.release(conn)


async def test_after_a_failure_the_connection_goes_back_and_a_fresh_one_is_taken(
    pool: asyncpg.Pool,
) -> None:
    held = db.HeldConnection(pool, {"application_name": "held"})
    with pytest.raises(asyncpg.exceptions.DivisionByZeroError):
        async with held.acquire() as conn:
            await conn.execute("SET search_path = 'dirty'")
            await conn.fetchval("SELECT 1 / 0")
    async with held.acquire() as fresh:
        assert await fresh.fetchval("SELECT current_setting('search_path')") != "dirty"
        assert await _name(fresh) == "held"
    await held.close()
    await asyncio.wait_for(pool.close(), timeout=5)  # nothing left checked out


async def test_up_to_keep_connections_are_held_and_the_rest_fall_back(
    pool: asyncpg.Pool,
) -> None:
    held = db.HeldConnection(pool, {"application_name": "held"}, keep=2)
    async with held.acquire() as a, held.acquire() as b, held.acquire() as c:
        kept = {a.get_server_pid(), b.get_server_pid()}
        extra = c.get_server_pid()
        assert len(kept | {extra}) == 3
        assert [await _name(x) for x in (a, b, c)] == ["held"] * 3
    # the two kept ones come back without a checkout; the third went back to the pool, reset
    async with held.acquire() as a, held.acquire() as b:
        assert {a.get_server_pid(), b.get_server_pid()} == kept
        assert await _name(a) == await _name(b) == "held"
    borrowed = [await pool.acquire() for _ in range(pool.get_max_size() - 2)]
    try:
        pids = {conn.get_server_pid() for conn in borrowed}
        assert extra in pids and not pids & kept  # the kept ones are still checked out
    finally:
        for conn in borrowed:
            await pool.release(conn)
    await held.close()
    await asyncio.wait_for(pool.close(), timeout=5)  # nothing left checked out


async def test_a_held_connection_that_died_is_replaced(pool: asyncpg.Pool) -> None:
    held = db.HeldConnection(pool)
    async with held.acquire() as first:
        pid = first.get_server_pid()
    async with pool.acquire() as other:
        await other.execute("SELECT pg_terminate_backend($1)", pid)
    await asyncio.sleep(0.2)  # asyncpg sees the socket close and takes the connection back
    async with held.acquire() as fresh:
        assert fresh.get_server_pid() != pid and await fresh.fetchval("SELECT 1") == 1
    await held.close()
    await asyncio.wait_for(pool.close(), timeout=5)  # nothing left checked out
