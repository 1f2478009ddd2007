"""The test harness: real Postgres, real Redis, services on ephemeral ports.

Postgres comes from `DOCIMPORT_TEST_DATABASE_URL` (a server URL whose user
may create databases) or a private instance started for the run under a
temporary directory; Redis from `DOCIMPORT_TEST_REDIS_URL` or a private
instance. Never a shared database: the run creates a template database,
migrates it once, clones it for each test that writes (`db_url`), and drops
everything it made.

`DOCIMPORT_*` variables of the developer's shell are cleared so settings come
only from what a test passes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.common import localinfra
from services.common.scratchdb import with_database
from services.common.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_CASE = ROOT / "examples" / "sample-case"

TOKENS = {"operator": "op-test-token", "worker": "wk-test-token", "service": "sv-test-token"}

_KEEP = ("DOCIMPORT_TEST_", "DOCIMPORT_LOCALINFRA")
for _name in [n for n in os.environ if n.startswith("DOCIMPORT_") and not n.startswith(_KEEP)]:
    del os.environ[_name]


@pytest.fixture(scope="session")
def infra_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="di-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_admin_url(infra_dir: Path) -> Iterator[str]:
    """A Postgres server URL for creating and dropping databases."""
    configured = os.environ.get("DOCIMPORT_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    # Throw-away data: fsync and friends off, for speed (the dev stack keeps them on).
    instance = localinfra.start_postgres(infra_dir / "postgres", durable=False)
    try:
        yield instance.dsn
    finally:
        localinfra.stop(instance)


@pytest.fixture(scope="session")
def redis_server_url(infra_dir: Path) -> Iterator[localinfra.RedisInstance | str]:
    configured = os.environ.get("DOCIMPORT_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    instance = localinfra.start_redis(infra_dir / "redis")
    try:
        yield instance
    finally:
        localinfra.stop(instance)


@pytest.fixture
def redis_url(redis_server_url: localinfra.RedisInstance | str) -> Iterator[str]:
    """A Redis URL (redis-py and Celery accept it) on an emptied database."""
    import redis

    url = redis_server_url if isinstance(redis_server_url, str) else redis_server_url.celery_url
    client_url = redis_server_url if isinstance(redis_server_url, str) else redis_server_url.url
    client = redis.Redis.from_url(client_url)
    client.flushdb()
    client.close()
    yield url


async def _admin(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url)


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    """Name of a migrated template database for this run."""
    name = f"di_tpl_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await _admin(pg_admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        await migrate(with_database(pg_admin_url, name))

    async def drop() -> None:
        conn = await _admin(pg_admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(create())
    yield name
    asyncio.run(drop())


@pytest.fixture
async def db_url(pg_admin_url: str, template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own."""
    name = f"di_t_{uuid.uuid4().hex[:12]}"
    conn = await _admin(pg_admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await conn.close()
    yield with_database(pg_admin_url, name)
    conn = await _admin(pg_admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    from services.common import db

    pool = await db.create_pool(db_url, min_size=1, max_size=8)
    yield pool
    await pool.close()


@pytest.fixture
def token_env() -> dict[str, str]:
    """Settings values every test service shares: tokens and an ephemeral port."""
    return {
        "operator_tokens": TOKENS["operator"],
        "worker_tokens": TOKENS["worker"],
        "service_tokens": TOKENS["service"],
        "token": TOKENS["service"],
        "host": "127.0.0.1",
        "port": 0,
        "shutdown_grace": 2.0,
    }


async def racing(work: Awaitable[Any], action: Callable[[], Awaitable[Any]]) -> int:
    """Awaits `work` while `action` runs twice at once, again and again; returns how many pairs ran."""
    done = asyncio.Event()

    async def again_and_again() -> int:
        pairs = 0
        while not done.is_set():
            pairs += 1
            await asyncio.gather(action(), action())
        return pairs

    racer = asyncio.create_task(again_and_again())
    try:
        await work
    finally:
        done.set()
    return await racer
