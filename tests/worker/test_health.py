"""The worker's /livez and /readyz probe (services.worker.health).

A real `docimport-worker` process (prefork, one child) on the test Redis:
ready once it consumes, and live but not ready while its broker is
unreachable. The staleness rule is checked on HealthState with real time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from services.common.localinfra import free_port
from services.worker.health import HealthState

pytestmark = pytest.mark.integration


def _status(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _wait_status(port: int, path: str, want: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"worker exited with {proc.returncode}"
        last = _status(port, path)
        if last == want:
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} answered {last}, not {want}, within {timeout}s")


def _start_worker(broker_url: str, tmp_path: Path, health_port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCIMPORT_")}
    env.update({
        "DOCIMPORT_BROKER_URL": broker_url,
        "DOCIMPORT_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "DOCIMPORT_CONCURRENCY": "1",
        "DOCIMPORT_OCR_ENGINE": "none",
        "DOCIMPORT_HEALTH_PORT": str(health_port),
    })
    return subprocess.Popen(
        [sys.executable, "-m", "services.worker"], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "worker.log", "ab"),  # noqa: SIM115
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_ready_once_consuming(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    proc = _start_worker(redis_url, tmp_path, port)
    try:
        _wait_status(port, "/readyz", 200, proc, timeout=60)
        assert _status(port, "/livez") == 200
        assert _status(port, "/nothing") == 404
    finally:
        _stop(proc)
    assert proc.returncode == 0, (tmp_path / "worker.log").read_text()[-2000:]


def test_live_but_not_ready_without_broker(tmp_path: Path) -> None:
    port = free_port()
    # Nothing listens on this port: the consumer keeps retrying its connection.
    proc = _start_worker(f"redis://127.0.0.1:{free_port()}/0", tmp_path, port)
    try:
        _wait_status(port, "/livez", 200, proc, timeout=60)
        assert _status(port, "/readyz") == 503
    finally:
        _stop(proc)


def test_stale_tick_is_not_live() -> None:
    state = HealthState(stale_after=0.3)
    assert state.live() and not state.ready()  # starting: live, not ready
    state.set_consuming(True)
    assert state.live() and state.ready()
    time.sleep(0.45)
    assert not state.live() and not state.ready()
    state.tick()
    assert state.live() and state.ready()
    state.set_consuming(False)  # reconnecting after a broker loss
    assert state.live() and not state.ready()
