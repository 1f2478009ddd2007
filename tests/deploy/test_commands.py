"""The manifests' commands are proven: each component starts from exactly the
command, args and environment its Deployment (or Job) gives it, and answers
its probe.

Per overlay: the migration Job's command migrates a fresh, empty database;
then the three services, the three queue workers and Flower start on that
database and the test Redis, and each answers its readiness and liveness
probes as the kubelet would ask them (gRPC health SERVING, the worker's
/readyz and /livez, Flower's /healthcheck). Only what cannot be the same
outside a cluster is substituted, and only by `Localizer`: Secret values
(the test database, Redis and tokens), in-cluster addresses and ports (free
local ports, loopback instead of 0.0.0.0) and volume mount paths (temporary
directories). The console scripts come from the project's virtualenv, as
they come from /opt/docimport/bin in the image. SIGTERM, as Kubernetes
sends it, must stop every docimport process cleanly.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.localinfra import free_port
from services.common.migrate import load_migrations
from services.common.scratchdb import with_database

from .conftest import OVERLAYS

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent
START_ORDER = ["docimport-cost", "docimport-manifest", "docimport-session",
               "docimport-worker-extract", "docimport-worker-chunk", "docimport-worker-entities",
               "docimport-flower"]


class Localizer:
    """The only substitutions between a pod and a local process.

    Every pod has its own network namespace, so all may listen on 9090;
    local processes share one. A port therefore maps to a free local port
    per component, except the services' gRPC ports, which other components
    dial through DOCIMPORT_*_ADDR and which map the same for everyone.
    """

    def __init__(self, secrets: dict[str, str], tmp: Path) -> None:
        self.secrets = secrets
        self.ports: dict[tuple[str, int], int] = {}
        self.grpc_ports: set[int] = set()
        self.component = ""
        self.paths = {"/data/sources": tmp / "sources", "/data/artifacts": tmp / "artifacts"}
        for path in self.paths.values():
            path.mkdir(parents=True, exist_ok=True)

    def port(self, port: int) -> int:
        key = ("", port) if port in self.grpc_ports else (self.component, port)
        if key not in self.ports:
            self.ports[key] = free_port()
        return self.ports[key]

    def value(self, name: str, value: str) -> str:
        if name.endswith("_ADDR"):  # dns:///docimport-session:50062 -> 127.0.0.1:<port>
            port = int(value.rsplit(":", 1)[1])
            self.grpc_ports.add(port)
            return f"127.0.0.1:{self.port(port)}"
        if name == "DOCIMPORT_PORT":
            self.grpc_ports.add(int(value))
        if name.endswith("_PORT"):
            return str(self.port(int(value)))
        if value == "0.0.0.0":
            return "127.0.0.1"
        for mount, local in self.paths.items():
            value = value.replace(mount, str(local))
        return value

    def arg(self, arg: str) -> str:
        arg = re.sub(r"^--port=(\d+)$", lambda m: f"--port={self.port(int(m.group(1)))}", arg)
        return arg.replace("--address=0.0.0.0", "--address=127.0.0.1")


def container_env(rendered, container: dict[str, Any], local: Localizer) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(rendered.config_map(source["configMapRef"]["name"]))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = local.secrets[ref["key"]]
    return {name: local.value(name, value) for name, value in env.items()}


def launch(container: dict[str, Any], env: dict[str, str], local: Localizer, log: Path) -> subprocess.Popen:
    argv = [*container["command"], *(local.arg(a) for a in container.get("args", []))]
    executable = VENV_BIN / argv[0]
    assert executable.exists(), f"{argv[0]} is not a console script of this project"
    base = {k: v for k, v in os.environ.items() if not k.startswith("DOCIMPORT_")}
    base["PATH"] = f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}"
    return subprocess.Popen(
        [str(executable), *argv[1:]], env={**base, **env}, stdin=subprocess.DEVNULL,
        stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def probe_ok(container: dict[str, Any], probe: dict[str, Any], local: Localizer) -> bool:
    if "grpc" in probe:
        port = local.port(probe["grpc"]["port"])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")), timeout=2)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    if "httpGet" in probe:
        port = probe["httpGet"]["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
        url = f"http://127.0.0.1:{local.port(port)}{probe['httpGet']['path']}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return 200 <= response.status < 400
        except (urllib.error.URLError, OSError):
            return False
    raise AssertionError(f"unexpected probe {probe}")


def stop(proc: subprocess.Popen, timeout: float = 30) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


async def _sql(url: str, statement: str) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(statement)
    finally:
        await conn.close()


@pytest.fixture
def empty_database(pg_admin_url: str):
    name = f"di_deploy_{uuid.uuid4().hex[:10]}"
    asyncio.run(_sql(pg_admin_url, f'CREATE DATABASE "{name}"'))
    yield with_database(pg_admin_url, name)
    asyncio.run(_sql(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_component_starts_from_its_manifest_and_answers_its_probe(
    render, overlay, empty_database, redis_url, token_env, tmp_path
):
    rendered = render(overlay)
    local = Localizer({
        "database-url": empty_database, "broker-url": redis_url,
        "operator-tokens": token_env["operator_tokens"], "worker-tokens": token_env["worker_tokens"],
        "service-tokens": token_env["service_tokens"], "worker-token": token_env["worker_tokens"],
        "service-token": token_env["service_tokens"], "flower-basic-auth": "operator:test-only",
    }, tmp_path)

    # The migration Job first, on an empty database, exactly as the Job runs it.
    (job_container,) = rendered.get("Job", "docimport-migrate")["spec"]["template"]["spec"]["containers"]
    local.component = "docimport-migrate"
    job = launch(job_container, container_env(rendered, job_container, local), local, tmp_path / "migrate.log")
    assert job.wait(timeout=120) == 0, (tmp_path / "migrate.log").read_text()
    applied = asyncio.run(_sql(empty_database, "SELECT version FROM public.docimport_schema_migrations"))
    assert sorted(r["version"] for r in applied) == [m.version for m in load_migrations()]
    schemas = asyncio.run(_sql(empty_database, "SELECT nspname FROM pg_namespace"))
    assert {"manifest", "session", "cost"} <= {r["nspname"] for r in schemas}

    names = [d["metadata"]["name"] for d in rendered.of_kind("Deployment")
             if d["metadata"]["name"].startswith("docimport-")]
    assert sorted(names) == sorted(START_ORDER)
    running: dict[str, tuple[subprocess.Popen, dict[str, Any]]] = {}
    try:
        for name in START_ORDER:
            (container,) = rendered.get("Deployment", name)["spec"]["template"]["spec"]["containers"]
            local.component = name
            log = tmp_path / f"{name}.log"
            proc = launch(container, container_env(rendered, container, local), local, log)
            running[name] = (proc, container)
            deadline = time.monotonic() + 90
            for kind in ("readinessProbe", "livenessProbe"):
                while not probe_ok(container, container[kind], local):
                    assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
                    assert time.monotonic() < deadline, f"{name}: {kind} never passed:\n{log.read_text()[-3000:]}"
                    time.sleep(0.25)
        # Still all up together (a late crash, e.g. a port clash, shows here).
        for name, (proc, container) in running.items():
            local.component = name
            assert proc.poll() is None, f"{name} exited {proc.returncode}"
            assert probe_ok(container, container["readinessProbe"], local), name
    finally:
        codes = {name: stop(proc) for name, (proc, _c) in reversed(running.items())}
    for name, code in codes.items():
        if name != "docimport-flower":  # Tornado's default SIGTERM ends it by the signal
            assert code == 0, f"{name} exited {code} on SIGTERM:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}"
