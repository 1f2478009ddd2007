"""`docimport dev up` / `dev down`: the whole local stack as a user starts it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
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


def _import_completes(work_dir: Path, source: Path, case: str) -> None:
    """analyze + import + watch + verify through the CLI: every component's part works."""
    manifest = work_dir / f"{case}.json"
    analyzed = _docimport("analyze", str(source), "--case", case, "-o", str(manifest), cwd=work_dir)
    assert analyzed.returncode == 0, analyzed.stdout + analyzed.stderr
    created = _docimport("import", str(manifest), "--case", case, "--json", cwd=work_dir)
    assert created.returncode == 0, created.stdout + created.stderr
    session_id = json.loads(created.stdout)["session"]["session_id"]
    watched = _docimport("watch", session_id, "--json", cwd=work_dir)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    verified = _docimport("verify", session_id, cwd=work_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _kill(pid: int) -> None:
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while localinfra.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not localinfra.pid_alive(pid)


def _squat(port: int) -> socket.socket:
    """Listens on `port`; waits while another process's connection briefly holds it."""
    deadline = time.monotonic() + 20
    while True:
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
        try:
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
            return squatter
        except OSError:
            squatter.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.timeout(600)
def test_dev_up_brings_a_dead_component_back_where_the_others_expect_it(work_dir: Path):
    source = work_dir / "case"
    source.mkdir()
    for i in range(2):
        (source / f"letter-{i}.txt").write_text(f"Letter {i}: Smith v. Jones, No. 1:24-cv-0{i}.\n")
    up = _docimport("dev", "up", "--var", "var", "--source-root", str(source), cwd=work_dir)
    assert up.returncode == 0, up.stdout + up.stderr
    stack = devstack.Stack.load(work_dir / "var")
    # Every component serves /metrics on a loopback port of its own, and says where.
    for name in (*devstack.SERVICES, "worker"):
        url = devstack.metrics_url(stack, name)
        assert url.startswith("http://127.0.0.1:"), name
        assert str(stack.processes[name]["metrics_port"]) in up.stdout, name
        assert "process_cpu_seconds_total" in _scrape(url) or "docimport_" in _scrape(url), name
    before = {name: info["pid"] for name, info in stack.processes.items()}

    # The session service dies; the worker keeps its address.
    _kill(before["session"])
    again = _docimport("dev", "up", "--var", "var", "--source-root", str(source), cwd=work_dir)
    assert again.returncode == 0, again.stdout + again.stderr
    after = devstack.Stack.load(work_dir / "var")
    assert after.addresses == stack.addresses, "a restarted service must come back where it was"
    assert after.processes["session"]["pid"] != before["session"]
    assert {n: after.processes[n]["pid"] for n in ("cost", "manifest", "worker")} == {
        n: before[n] for n in ("cost", "manifest", "worker")}
    _import_completes(work_dir, source, "Back in place")

    # The cost service dies and something else takes its port: it moves, and
    # whatever dialled the old address is restarted with the new one.
    _kill(after.processes["cost"]["pid"])
    old_port = int(after.addresses["cost"].rsplit(":", 1)[1])
    squatter = _squat(old_port)
    try:
        moved = _docimport("dev", "up", "--var", "var", "--source-root", str(source), cwd=work_dir)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        final = devstack.Stack.load(work_dir / "var")
        assert final.addresses["cost"] != after.addresses["cost"]
        for name in ("manifest", "session", "worker"):
            assert final.processes[name]["pid"] != after.processes[name]["pid"], name
            assert final.processes[name]["wiring"]["cost_addr"] == final.addresses["cost"]
        _import_completes(work_dir, source, "Moved")
    finally:
        squatter.close()
