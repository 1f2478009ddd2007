"""The migration runner: ordered, checksummed, idempotent, safe in parallel."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import pytest

from conftest import with_database
from services.common.migrate import MigrationError, load_migrations, migrate


@pytest.fixture
async def empty_db(pg_admin_url: str):
    name = f"di_m_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_admin_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    yield with_database(pg_admin_url, name)
    conn = await asyncpg.connect(pg_admin_url)
    await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await conn.close()


async def _schema(dsn: str) -> list[tuple]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """
            SELECT table_schema, table_name, column_name, data_type
            FROM information_schema.columns
            WHERE table_schema IN ('manifest', 'session', 'cost')
            ORDER BY 1, 2, 3
            """
        )
        constraints = await conn.fetch(
            "SELECT conname FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE n.nspname IN ('manifest', 'session', 'cost') ORDER BY 1"
        )
        return [tuple(r) for r in rows] + [tuple(r) for r in constraints]
    finally:
        await conn.close()


async def test_two_runs_at_once_leave_one_correct_schema(empty_db: str):
    first, second = await asyncio.gather(migrate(empty_db), migrate(empty_db))
    everything = load_migrations()
    # Exactly one of the two applied each migration; the other found nothing to do.
    assert sorted(m.version for m in first + second) == [m.version for m in everything]
    conn = await asyncpg.connect(empty_db)
    try:
        recorded = await conn.fetch("SELECT version, checksum FROM public.docimport_schema_migrations ORDER BY 1")
    finally:
        await conn.close()
    assert [(r["version"], r["checksum"]) for r in recorded] == [(m.version, m.checksum) for m in everything]
    tables = {(t[0], t[1]) for t in await _schema(empty_db) if len(t) == 4}
    for table in [("manifest", "manifests"), ("manifest", "manifest_files"), ("cost", "price_books"),
                  ("cost", "cost_events"), ("cost", "budgets"), ("session", "projects"),
                  ("session", "import_sessions"), ("session", "session_documents"),
                  ("session", "stage_runs"), ("session", "session_events")]:
        assert table in tables


async def test_rerunning_is_a_no_op(empty_db: str):
    await migrate(empty_db)
    before = await _schema(empty_db)
    assert await migrate(empty_db) == []
    assert await _schema(empty_db) == before


async def test_a_changed_migration_is_refused(empty_db: str, tmp_path: Path):
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE public.t1 (id int);")
    await migrate(empty_db, tmp_path)
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE public.t1 (id bigint);")
    with pytest.raises(MigrationError, match="checksum"):
        await migrate(empty_db, tmp_path)


async def test_a_failed_migration_leaves_nothing_half_done(empty_db: str, tmp_path: Path):
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE public.ok (id int);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE public.half (id int); SELECT 1/0;")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate(empty_db, tmp_path)
    conn = await asyncpg.connect(empty_db)
    try:
        assert await conn.fetchval("SELECT to_regclass('public.half')") is None
        assert await conn.fetchval("SELECT count(*) FROM public.docimport_schema_migrations") == 1
    finally:
        await conn.close()
