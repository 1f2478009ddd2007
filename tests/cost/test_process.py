"""The cost service as deployed: `python -m services.cost` from environment variables."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import grpc
from conftest import TOKENS
from docimport.cost.v1 import cost_service_pb2 as pb
from docimport.cost.v1 import cost_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.localinfra import free_port
from services.common.channels import aio_channel
from services.common.config import ClientSettings

from .helpers import event, granted, new_id

ROOT = Path(__file__).resolve().parents[2]


async def test_the_process_loads_the_book_serves_and_stops_on_sigterm(db_url: str) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DOCIMPORT_")},
        "DOCIMPORT_DATABASE_URL": db_url,
        "DOCIMPORT_HOST": "127.0.0.1",
        "DOCIMPORT_PORT": str(port),
        "DOCIMPORT_OPERATOR_TOKENS": TOKENS["operator"],
        "DOCIMPORT_CPU_SECOND_RATE": "0.00004",
        "DOCIMPORT_WORKER_TOKENS": TOKENS["worker"],
        # the session service's token: its runs' grants are checked against it
        "DOCIMPORT_SERVICE_TOKENS": TOKENS["service"],
        "DOCIMPORT_EXPIRY_SWEEP_INTERVAL": "0.2",
        "DOCIMPORT_TOTALS_FOLD_INTERVAL": "0.2",
        "DOCIMPORT_SHUTDOWN_GRACE": "2",
    }
    process = subprocess.Popen([sys.executable, "-m", "services.cost"], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    channel = aio_channel(f"127.0.0.1:{port}", ClientSettings(), token=TOKENS["operator"])
    try:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 30
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        stub = cost_service_pb2_grpc.CostServiceStub(channel)
        book = (await stub.GetPriceBook(pb.GetPriceBookRequest())).price_book
        rates = {(p.service, p.operation): p.unit_price.amount for p in book.prices}
        assert book.version == 1 and rates["local", "compute_second"] == "0.00004"
        # Its fold loop moves the ledger's total deltas into the session totals.
        session = new_id()
        worker_channel = aio_channel(f"127.0.0.1:{port}", ClientSettings(), token=TOKENS["worker"])
        try:
            await cost_service_pb2_grpc.CostServiceStub(worker_channel).RecordCosts(
                pb.RecordCostsRequest(events=[granted(event(session, document_id=new_id(), units="2"))]))
        finally:
            await worker_channel.close()
        conn = await asyncpg.connect(db_url)
        try:
            deadline = time.monotonic() + 10
            while await conn.fetchval(
                    "SELECT count(*) FROM cost.session_total_deltas WHERE session_id = $1", session):
                assert time.monotonic() < deadline, "the deltas were not folded"
                await asyncio.sleep(0.1)
            assert await conn.fetchval(
                "SELECT events FROM cost.session_totals WHERE session_id = $1 AND kind = 'actual'",
                session) == 1
        finally:
            await conn.close()
        # An open stream holds the LISTEN connection; shutdown must still finish.
        watch = stub.WatchCosts(pb.WatchCostsRequest(session_id=session))
        await asyncio.wait_for(watch.read(), 5)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 15)
        assert code == 0
        assert time.monotonic() - started < 6
        output = process.stdout.read().decode()
        assert "Traceback" not in output, output
    finally:
        await channel.close()
        if process.poll() is None:
            process.kill()
            process.wait()
