"""Throw-away databases for tests, benchmarks and tools: DSNs and migrated scratch copies.

Owns only what it creates: `scratch_database` creates a database (and, without
an admin URL, a private non-durable PostgreSQL through
`services.common.localinfra`), migrates it, and drops and stops both on exit.
Never for data anyone keeps: the private server runs with `durable=False`.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import asyncpg

from services.common import localinfra
from services.common.migrate import migrate

__all__ = ["scratch_database", "with_database"]


def with_database(dsn: str, name: str) -> str:
    """`dsn` pointing at database `name` (its path; a dbname query is dropped)."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k not in ("dbname", "database")]
    path = "/" + quote(name, safe="")
    return urlunsplit((parts.scheme, parts.netloc, path, urlencode(query), parts.fragment))


@contextlib.asynccontextmanager
async def scratch_database(admin_url: str | None = None, *, prefix: str = "di_scratch"
                           ) -> AsyncIterator[str]:
    """Yields the URL of a new, migrated database; drops it afterwards.

    On `admin_url`'s server when given (a user that may create databases),
    else on a private server started in a temporary directory and stopped
    after. For benchmarks and tools that need a database of their own.
    """
    instance, tmp = None, None
    if not admin_url:
        tmp = tempfile.mkdtemp(prefix="di-scratch-")
        instance = await asyncio.to_thread(localinfra.start_postgres, Path(tmp) / "pg", durable=False)
        admin_url = instance.dsn
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        url = with_database(admin_url, name)
        await migrate(url)
        yield url
    finally:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        if instance is not None:
            await asyncio.to_thread(localinfra.stop, instance)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
