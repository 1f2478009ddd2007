"""The local stack: private Postgres and Redis, the three services, a worker.

Owns `./var/` (or the directory given): `var/postgres`, `var/redis` (via
services.common.localinfra), `var/log/<component>.log`, `var/artifacts/`,
`var/metrics/worker/`, and `var/stack.json`: every process with its
address, its /metrics port (loopback only) and the peer addresses it was
started with, and the tokens (random per stack, kept across restarts).
`docimport dev down` (another process) stops what it lists; `dev up` starts
what is not running, on its old address while that port is free, and
restarts whatever points at an address that moved. Processes run in their
own sessions: they outlive `dev up`; `dev down` stops them (SIGTERM, then
SIGKILL after a grace).

This is developer tooling: in production each component runs on its own
from environment variables (see deploy/).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import localinfra
from services.common.migrate import migrate

DATABASE = "docimport"
SERVICES = ("cost", "manifest", "session")  # start order: dependencies first
COMPONENTS = (*SERVICES, "worker", "flower")


class StackError(RuntimeError):
    """The local stack could not be started or stopped."""


@dataclass
class Stack:
    """What `var/stack.json` holds."""

    var_dir: Path
    database_url: str = ""
    broker_url: str = ""
    operator_token: str = ""
    worker_token: str = ""
    service_token: str = ""
    addresses: dict[str, str] = field(default_factory=dict)
    processes: dict[str, dict[str, Any]] = field(default_factory=dict)
    source_roots: list[str] = field(default_factory=list)
    flower_url: str = ""

    @property
    def file(self) -> Path:
        return self.var_dir / "stack.json"

    def save(self) -> None:
        data = {
            "database_url": self.database_url,
            "broker_url": self.broker_url,
            "operator_token": self.operator_token,
            "worker_token": self.worker_token,
            "service_token": self.service_token,
            "processes": self.processes,
            "source_roots": self.source_roots,
            "flower_url": self.flower_url,
            **{f"{name}_addr": addr for name, addr in self.addresses.items()},
        }
        self.var_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(self.file)

    @classmethod
    def load(cls, var_dir: Path) -> Stack:
        stack = cls(var_dir=var_dir)
        if stack.file.exists():
            data = json.loads(stack.file.read_text())
            for key in ("database_url", "broker_url", "operator_token", "worker_token",
                        "service_token", "processes", "source_roots", "flower_url"):
                if key in data:
                    setattr(stack, key, data[key])
            stack.addresses = {name: data[f"{name}_addr"] for name in SERVICES if f"{name}_addr" in data}
        return stack


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _healthy(address: str, timeout: float = 1.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def _prepare_database(admin_url: str, url: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()
    await migrate(url)


def metrics_url(stack: Stack, name: str) -> str:
    """Where component `name` serves /metrics (loopback only), or ""."""
    port = stack.processes.get(name, {}).get("metrics_port")
    return f"http://{localinfra.LOOPBACK}:{port}/metrics" if port else ""


def running_components(stack: Stack) -> dict[str, int]:
    return {name: info["pid"] for name, info in stack.processes.items() if localinfra.pid_alive(info.get("pid"))}


def _address(name: str, old: str | None, say: Callable[[str], None]) -> str:
    """The address to start `name` on: its old one while that port is free."""
    if old:
        port = int(old.rsplit(":", 1)[1])
        if localinfra.free_port(port) == port:
            return old
    new = f"{localinfra.LOOPBACK}:{localinfra.free_port()}"
    if old:
        say(f"  {name}: its address {old} is taken; it moves to {new}")
    return new


def _wiring(stack: Stack, name: str) -> dict[str, str]:
    """The addresses of others that component `name` is started with."""
    if name == "flower":
        return {"broker_url": stack.broker_url}
    return {"database_url": stack.database_url, "broker_url": stack.broker_url,
            **{f"{peer}_addr": addr for peer, addr in sorted(stack.addresses.items())}}


def _stop_stale(stack: Stack, alive: dict[str, int], before: Stack,
                say: Callable[[str], None]) -> None:
    """Stops what runs with addresses that changed, so that it starts on the new ones.

    A component recorded without its wiring (an older stack.json) started
    with what the stack file said before this `up` (`before`).
    """
    for name in reversed(COMPONENTS):
        if name not in alive:
            continue
        started_with = stack.processes[name].get("wiring") or _wiring(before, name)
        if started_with != _wiring(stack, name):
            say(f"  {name} points at addresses that changed: stopping it")
            _terminate(alive.pop(name), grace=15.0)


def up(
    var_dir: Path,
    *,
    source_roots: list[Path],
    flower: bool = False,
    worker_concurrency: int = 2,
    say: Callable[[str], None] = print,
) -> Stack:
    """Starts whatever part of the stack is not running; returns its description.

    A component that died comes back on its old address when that port is
    free; when it is not, whatever runs with the old address (a worker, a
    peer service) is restarted too, so every component points at live ones.
    """
    var_dir = var_dir.resolve()
    stack, before = Stack.load(var_dir), Stack.load(var_dir)
    log_dir = var_dir / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    _start_datastores(stack, var_dir, say)
    for name in ("operator_token", "worker_token", "service_token"):
        if not getattr(stack, name):
            setattr(stack, name, secrets.token_urlsafe(24))
    stack.source_roots = [str(p.resolve()) for p in source_roots]
    artifacts = var_dir / "artifacts"
    artifacts.mkdir(exist_ok=True)

    alive = running_components(stack)
    for name in SERVICES:
        if name not in alive or name not in stack.addresses:
            stack.addresses[name] = _address(name, stack.addresses.get(name), say)
    _stop_stale(stack, alive, before, say)
    common = _common_env(stack, artifacts)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("DOCIMPORT_")}

    def launch(name: str, argv: list[str], extra: dict[str, str], metrics: bool = True) -> bool:
        """Starts `name` unless it runs; True when it was started now."""
        if name in alive:
            say(f"  {name} already running (pid {alive[name]})")
            return False
        info: dict[str, Any] = {"wiring": _wiring(stack, name)}
        if metrics:  # a /metrics port of its own, on loopback
            old = stack.processes.get(name, {}).get("metrics_port")
            info["metrics_port"] = localinfra.free_port(old)
            extra = {**extra, "DOCIMPORT_METRICS_PORT": str(info["metrics_port"])}
        log = log_dir / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**base_env, **common, **extra}, start_new_session=True, cwd=var_dir.parent,
            )
        stack.processes[name] = {"pid": proc.pid, "log": str(log), "started_at": time.time(), **info}
        stack.save()
        return True

    for name in SERVICES:
        port = stack.addresses[name].rsplit(":", 1)[1]
        if launch(name, [sys.executable, "-m", f"services.{name}"], {"DOCIMPORT_PORT": port}):
            _wait_healthy(stack, name, say)
    worker_env = {"DOCIMPORT_TOKEN": stack.worker_token,
                  "DOCIMPORT_CONCURRENCY": str(worker_concurrency),
                  "DOCIMPORT_METRICS_DIR": str(var_dir / "metrics" / "worker")}
    if launch("worker", [sys.executable, "-m", "services.worker"], worker_env):
        _wait_worker(stack, say)
    if flower:
        port = localinfra.free_port()
        if launch("flower", [sys.executable, "-m", "celery", "-b", stack.broker_url, "flower",
                             f"--port={port}", "--address=127.0.0.1"], {}, metrics=False):
            stack.flower_url = f"http://127.0.0.1:{port}"
    stack.save()
    return stack


def _common_env(stack: Stack, artifacts: Path) -> dict[str, str]:
    """The settings every component of the stack gets."""
    return {
        "DOCIMPORT_DATABASE_URL": stack.database_url,
        "DOCIMPORT_OPERATOR_TOKENS": stack.operator_token,
        "DOCIMPORT_WORKER_TOKENS": stack.worker_token,
        "DOCIMPORT_SERVICE_TOKENS": stack.service_token,
        "DOCIMPORT_TOKEN": stack.service_token,
        "DOCIMPORT_MANIFEST_ADDR": stack.addresses["manifest"],
        "DOCIMPORT_SESSION_ADDR": stack.addresses["session"],
        "DOCIMPORT_COST_ADDR": stack.addresses["cost"],
        "DOCIMPORT_BROKER_URL": stack.broker_url,
        "DOCIMPORT_SOURCE_ROOTS": ":".join(stack.source_roots),
        "DOCIMPORT_ARTIFACT_DIR": str(artifacts),
        "DOCIMPORT_HOST": localinfra.LOOPBACK,
        "DOCIMPORT_METRICS_HOST": localinfra.LOOPBACK,
    }


def _start_datastores(stack: Stack, var_dir: Path, say: Callable[[str], None]) -> None:
    say("starting Postgres ...")
    # Durable: what the stack confirmed (a result to a worker, an event to a
    # watcher) must survive a crash; only the test suite's Postgres runs without.
    pg = localinfra.start_postgres(var_dir / "postgres", durable=True)
    stack.database_url = pg.url_for(DATABASE)
    asyncio.run(_prepare_database(pg.dsn, stack.database_url))
    say(f"  Postgres {pg.version} ({pg.strategy}) on {pg.host}:{pg.port}, schema migrated")
    say("starting Redis ...")
    redis = localinfra.start_redis(var_dir / "redis")
    stack.broker_url = redis.celery_url
    say(f"  Redis {redis.version} ({redis.strategy}) on {redis.host}:{redis.port}")


def _wait_healthy(stack: Stack, name: str, say: Callable[[str], None], timeout: float = 30.0) -> None:
    address = stack.addresses[name]
    info = stack.processes[name]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _healthy(address):
            say(f"  {name} service SERVING on {address}")
            return
        if not localinfra.pid_alive(info["pid"]):
            raise StackError(f"the {name} service exited at start-up; its log says:\n{_tail(Path(info['log']))}")
        time.sleep(0.2)
    raise StackError(f"the {name} service did not become healthy in {timeout:.0f}s; "
                     f"its log says:\n{_tail(Path(info['log']))}")


def _wait_worker(stack: Stack, say: Callable[[str], None], timeout: float = 60.0) -> None:
    info = stack.processes["worker"]
    log = Path(info["log"])
    start = log.stat().st_size if log.exists() else 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not localinfra.pid_alive(info["pid"]):
            raise StackError(f"the worker exited at start-up; its log says:\n{_tail(log)}")
        try:
            with open(log, "rb") as handle:
                handle.seek(start if log.stat().st_size >= start else 0)
                if b" ready." in handle.read():
                    say(f"  worker ready (pid {info['pid']}, queues extract, chunk, entities)")
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise StackError(f"the worker did not get ready in {timeout:.0f}s; its log says:\n{_tail(log)}")


def _terminate(pid: int, grace: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not localinfra.pid_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def down(var_dir: Path, *, say: Callable[[str], None] = print) -> None:
    """Stops every process of the stack, then Redis and Postgres. Keeps data."""
    var_dir = var_dir.resolve()
    stack = Stack.load(var_dir)
    for name in reversed(COMPONENTS):
        info = stack.processes.get(name)
        if info and localinfra.pid_alive(info.get("pid")):
            _terminate(info["pid"], grace=15.0)
            say(f"stopped {name}")
        stack.processes.pop(name, None)
    if localinfra.stop_redis(var_dir / "redis"):
        say("stopped Redis")
    if localinfra.stop_postgres(var_dir / "postgres"):
        say("stopped Postgres")
    if stack.file.exists():
        stack.save()
