"""`docimport dev up` / `dev down`: the whole local stack as a user starts it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import asyncpg
import pytest

from clients import devstack
from services.common import localinfra

ROOT = Path(__file__).resolve().parents[2]


def _docimport(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCIMPORT_")}
    return subprocess.run(
        [sys.executable, "-m", "clients.cli", *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=180,
    )


def _answers(url: str, timeout: float = 30.0) -> bool:
    """True once `url` answers 200 (Flower takes a moment to start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def _durability(dsn: str) -> dict[str, str]:
    async def read() -> dict[str, str]:
        conn = await asyncpg.connect(dsn)
        try:
            return {k: await conn.fetchval(f"SHOW {k}")
                    for k in ("fsync", "synchronous_commit", "full_page_writes")}
        finally:
            await conn.close()

    return asyncio.run(read())


@pytest.fixture
def work_dir():
    # Not under pytest's tmp_path: as root, the unprivileged Postgres account must reach it.
    path = Path(tempfile.mkdtemp(prefix="di-dev-"))
    os.chmod(path, 0o755)
    yield path
    _docimport("dev", "down", "--var", str(path / "var"), cwd=path)
    shutil.rmtree(path, ignore_errors=True)


def test_dev_up_starts_everything_and_dev_down_stops_it(work_dir: Path, pg_admin_url: str):
    up = _docimport(
        "dev", "up", "--var", "var", "--source-root", str(ROOT / "examples"), "--flower", cwd=work_dir
    )
    assert up.returncode == 0, up.stdout + up.stderr
    stack = json.loads((work_dir / "var" / "stack.json").read_text())
    assert stack["operator_token"] and stack["operator_token"] in up.stdout
    for name in devstack.SERVICES:
        assert devstack._healthy(stack[f"{name}_addr"]), f"{name} is not SERVING"
    pids = {name: info["pid"] for name, info in stack["processes"].items()}
    assert set(pids) == {"cost", "manifest", "session", "worker", "flower"}
    assert _answers(stack["flower_url"]), "Flower does not answer HTTP"
    # The stack's Postgres keeps what it confirmed; the suite's own may run without.
    assert set(_durability(stack["database_url"]).values()) == {"on"}
    if not os.environ.get("DOCIMPORT_TEST_DATABASE_URL"):
        assert set(_durability(pg_admin_url).values()) == {"off"}

    # A second `up` reuses what runs; the CLI in that folder finds the stack by itself.
    again = _docimport("dev", "up", "--var", "var", "--source-root", str(ROOT / "examples"), cwd=work_dir)
    assert again.returncode == 0, again.stderr
    assert json.loads((work_dir / "var" / "stack.json").read_text())["processes"]["session"]["pid"] == pids["session"]
    listed = _docimport("sessions", cwd=work_dir)
    assert listed.returncode == 0, listed.stderr

    down = _docimport("dev", "down", "--var", "var", cwd=work_dir)
    assert down.returncode == 0, down.stderr
    for name, pid in pids.items():
        assert not localinfra.pid_alive(pid), f"{name} (pid {pid}) still runs after dev down"
    after = _docimport("sessions", cwd=work_dir)
    assert after.returncode == 3, "an unreachable stack exits 3 with a message"
    assert "dev up" in after.stderr
