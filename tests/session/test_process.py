"""The session service as a process: starts from environment variables, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid

import grpc
from docimport.session.v1 import session_service_pb2 as pb
from docimport.session.v1 import session_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ROOT, TOKENS

from services.common.localinfra import free_port


async def test_serves_then_stops_cleanly_on_sigterm(db_url, redis_url):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCIMPORT_")}
    env.update({
        "DOCIMPORT_DATABASE_URL": db_url, "DOCIMPORT_BROKER_URL": redis_url,
        "DOCIMPORT_HOST": "127.0.0.1", "DOCIMPORT_PORT": str(port),
        "DOCIMPORT_OPERATOR_TOKENS": TOKENS["operator"], "DOCIMPORT_WORKER_TOKENS": TOKENS["worker"],
        "DOCIMPORT_SERVICE_TOKENS": TOKENS["service"], "DOCIMPORT_TOKEN": TOKENS["service"],
        "DOCIMPORT_MANIFEST_ADDR": f"127.0.0.1:{free_port()}",
        "DOCIMPORT_COST_ADDR": f"127.0.0.1:{free_port()}",
        "DOCIMPORT_SHUTDOWN_GRACE": "3", "DOCIMPORT_LOG_LEVEL": "WARNING",
    })
    proc = subprocess.Popen([sys.executable, "-m", "services.session"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(100):
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=
                                               "docimport.session.v1.SessionService"), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(proc.stderr.read().decode() if proc.poll() is not None else "no start")
            stub = session_service_pb2_grpc.SessionServiceStub(channel)
            auth = (("authorization", f"Bearer {TOKENS['operator']}"),)
            try:
                await stub.GetSession(pb.GetSessionRequest(session_id=str(uuid.uuid4())), metadata=auth)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 15)
            assert code == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
