"""Shared set-up of the session service benchmarks (bench/session_*.py).

Owns the private resources of one benchmark run: a database it creates,
migrates and drops (on the server of DOCIMPORT_BENCH_DATABASE_URL, else a
private Postgres from services.common.localinfra), a Redis database of its
own that it flushes before and after (DOCIMPORT_BENCH_REDIS_URL, default db
12 of that server, else a private Redis), and the three services started
in-process on ephemeral ports: the real cost service, the real manifest
service and the session service under test (background loops off unless
asked; the benchmark drives them).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "protos"))

import asyncpg  # noqa: E402
import grpc  # noqa: E402
from docimport.cost.v1 import cost_service_pb2_grpc  # noqa: E402
from docimport.manifest.v1 import manifest_service_pb2_grpc  # noqa: E402
from docimport.session.v1 import session_service_pb2_grpc  # noqa: E402

from services.common import db, localinfra, scratchdb  # noqa: E402
from services.common.channels import wait_serving  # noqa: E402
from services.common.channels import aio_channel  # noqa: E402
from services.common.config import ClientSettings  # noqa: E402

TOKENS = {"operator": "bench-op", "worker": "bench-wk", "service": "bench-sv"}


@contextlib.asynccontextmanager
async def private_database() -> AsyncIterator[str]:
    """A fresh, migrated database; dropped afterwards (a private server when none is named)."""
    admin = os.environ.get("DOCIMPORT_BENCH_DATABASE_URL") or os.environ.get(
        "DOCIMPORT_TEST_DATABASE_URL"
    )
    async with scratchdb.scratch_database(admin, prefix="di_bench") as url:
        yield url


@contextlib.contextmanager
def private_redis(db_number: int = 12) -> Any:
    """A Redis URL on a database of this benchmark's own, flushed before and after."""
    import redis

    configured = os.environ.get("DOCIMPORT_BENCH_REDIS_URL")
    instance = None
    if configured:
        url = configured
    elif os.environ.get("DOCIMPORT_TEST_REDIS_URL"):
        base = os.environ["DOCIMPORT_TEST_REDIS_URL"].rsplit("/", 1)[0]
        url = f"{base}/{db_number}"
    else:
        instance = localinfra.start_redis(Path(tempfile.mkdtemp(prefix="di-bench-")) / "redis")
        url = instance.url_for(db_number)
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url, client
    finally:
        client.flushdb()
        client.close()
        if instance is not None:
            localinfra.stop(instance)


@dataclass
class Stack:
    db_url: str
    pool: asyncpg.Pool
    session_server: Any
    session_port: int
    cost_port: int
    manifest_port: int
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def session_stub(self, scope: str = "operator") -> session_service_pb2_grpc.SessionServiceStub:
        channel = aio_channel(
            f"127.0.0.1:{self.session_port}", ClientSettings(), token=TOKENS[scope]
        )
        self.channels.append(channel)
        return session_service_pb2_grpc.SessionServiceStub(channel)


def token_env() -> dict[str, Any]:
    return {
        "operator_tokens": TOKENS["operator"],
        "worker_tokens": TOKENS["worker"],
        "service_tokens": TOKENS["service"],
        "token": TOKENS["service"],
        "host": "127.0.0.1",
        "port": 0,
        "shutdown_grace": 1.0,
        "log_level": "WARNING",
    }


@contextlib.contextmanager
def peer_processes(db_url: str, manifest_env: dict[str, str] | None = None) -> Any:
    """The real cost and manifest services, each in its own process (as deployed)."""
    import subprocess

    cost_port, manifest_port = localinfra.free_port(), localinfra.free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("DOCIMPORT_")}
    base.update(
        {
            "DOCIMPORT_DATABASE_URL": db_url,
            "DOCIMPORT_HOST": "127.0.0.1",
            "DOCIMPORT_OPERATOR_TOKENS": TOKENS["operator"],
            "DOCIMPORT_WORKER_TOKENS": TOKENS["worker"],
            "DOCIMPORT_SERVICE_TOKENS": TOKENS["service"],
            "DOCIMPORT_TOKEN": TOKENS["service"],
            "DOCIMPORT_LOG_LEVEL": "WARNING",
            "PYTHONPATH": f"{ROOT}:{ROOT / 'protos'}",
        }
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "services.cost"],
            cwd=ROOT,
            env={**base, "DOCIMPORT_PORT": str(cost_port)},
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "services.manifest"],
            cwd=ROOT,
            env={
                **base,
                "DOCIMPORT_PORT": str(manifest_port),
                "DOCIMPORT_COST_ADDR": f"127.0.0.1:{cost_port}",
                "DOCIMPORT_SOURCE_ROOTS": tempfile.gettempdir(),
                **(manifest_env or {}),
            },
            stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        yield cost_port, manifest_port
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.asynccontextmanager
async def services(
    db_url: str,
    broker_url: str,
    *,
    enqueuer: Any,
    background: bool = False,
    pool_size: int = 10,
    **session_settings: Any,
) -> AsyncIterator[Stack]:
    """The session service in this process; the cost and manifest services in their own."""
    from services.cost.store import CostStore
    from services.session.config import SessionSettings
    from services.session.server import build_server as build_session
    from services.session.store import SessionStore

    pool = await db.create_pool(db_url, min_size=2, max_size=pool_size)
    env = token_env()
    from services.cost.config import CostSettings

    cost_settings = CostSettings(database_url=db_url, **env)
    await CostStore(pool).ensure_default_price_book(
        cost_settings.price_book_file, cost_settings.cpu_second_rate
    )
    with peer_processes(db_url) as (cost_port, manifest_port):
        await wait_serving(f"127.0.0.1:{cost_port}")
        await wait_serving(f"127.0.0.1:{manifest_port}")
        client = ClientSettings()
        cost_channel = aio_channel(f"127.0.0.1:{cost_port}", client, token=TOKENS["service"])
        manifest_channel = aio_channel(
            f"127.0.0.1:{manifest_port}", client, token=TOKENS["service"]
        )
        settings = SessionSettings(
            database_url=db_url, broker_url=broker_url, **{**env, **session_settings}
        )
        session = await build_session(
            settings,
            store=SessionStore(pool),
            enqueuer=enqueuer,
            manifest_stub=manifest_service_pb2_grpc.ManifestServiceStub(manifest_channel),
            cost_stub=cost_service_pb2_grpc.CostServiceStub(cost_channel),
            background=background,
        )
        stack = Stack(
            db_url,
            pool,
            session,
            session.port,
            cost_port,
            manifest_port,
            channels=[cost_channel, manifest_channel],
        )
        try:
            yield stack
        finally:
            await session.stop(0.5)
            for channel in stack.channels:
                await channel.close()
            await pool.close()


async def insert_manifest(pool: asyncpg.Pool, n: int, *, source: str = "/data/bench-case") -> str:
    """A ready, priced manifest of `n` importable text-layer PDFs, written straight into its tables."""
    import hashlib

    manifest_id = uuid.uuid4()
    categories = [
        ("pleadings", 10),
        ("discovery", 30),
        ("correspondence", 40),
        ("medical_records", 20),
    ]
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO manifest.manifests (manifest_id, case_name, source_path, state, summary, "
            "estimated_total, finished_at) VALUES ($1, 'Bench v. Mark', $2, 'ready', $3, $4, now())",
            manifest_id,
            source,
            {"file_count": n},
            Decimal("0.00012501") * n,
        )
        records = []
        for i in range(n):
            category, priority = categories[i % len(categories)]
            path = f"{category}/doc_{i:06d}.pdf"
            records.append(
                (
                    uuid.uuid4(),
                    manifest_id,
                    i + 1,
                    path,
                    path.encode(),
                    250_000 + i,
                    hashlib.sha256(path.encode()).hexdigest(),
                    "application/pdf",
                    "pdf",
                    category,
                    priority,
                    "text_layer",
                    3,
                    0,
                    Decimal("0.00012501"),
                )
            )
        await conn.copy_records_to_table(
            "manifest_files",
            schema_name="manifest",
            columns=(
                "file_id",
                "manifest_id",
                "ordinal",
                "relative_path",
                "raw_path",
                "size_bytes",
                "sha256",
                "mime_type",
                "type_family",
                "category",
                "priority",
                "plan",
                "page_count",
                "ocr_page_count",
                "estimated_cost",
            ),
            records=records,
        )
    return str(manifest_id)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def stage_payloads(n: int) -> list[dict[str, Any]]:
    """`n` extract payloads shaped like the session service's (the bare baselines' messages)."""
    from services.common.tasks import StagePayload

    return [
        StagePayload(
            session_id=str(uuid.uuid4()),
            document_id=str(uuid.uuid4()),
            stage="extract",
            attempt=1,
            source_path="/data/bench-case",
            relative_path=f"pleadings/doc_{i:06d}.pdf",
            raw_path_b64="cGxlYWRpbmdzL2RvY18wMDAwMDAucGRm",
            sha256="0" * 64,
            size_bytes=250_000 + i,
            plan="text_layer",
            category="pleadings",
            page_count=3,
            lease_seconds=360.0,
            options={"task_id": "", "mime_type": "application/pdf"},
        ).to_json()
        for i in range(n)
    ]
