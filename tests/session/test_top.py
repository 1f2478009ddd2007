"""`docimport top` against the real stack: one frame, JSON, and the live view in tmux.

The sample case goes through the whole stack (tests/session/stack.py); then
`top --once` and `top --json` must show its session with its real counts and
state, the three stage queues drained and consumed by the running worker,
and the corrupt and the encrypted PDF among the failures with the scan's
own text. The live view runs as a real process in a real terminal (a tmux
pane, skipped with the reason when tmux is absent) and must draw the same
session, then survive the session service going away and coming back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal

import pytest
from conftest import ROOT, TOKENS
from docimport.session.v1 import session_service_pb2 as pb
from typer.testing import CliRunner

from clients.cli import context
from clients.cli.app import app
from clients.cli.commands.top import parse_duration, rate_style
from clients.cli.context import Clients, set_clients
from services.common.config import ClientSettings
from services.common.convert import format_money
from services.session.server import build_server

from .helpers import mfile
from .stack import sample_stack

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def cli_for(session_port: int) -> Iterator[object]:
    clients = Clients(
        ClientSettings(
            session_addr=f"127.0.0.1:{session_port}", token=TOKENS["operator"], rpc_timeout=10
        )
    )
    set_clients(clients)
    width = context.console.width
    context.console.width = 250  # one line per table row
    runner = CliRunner()

    async def run(*args: str) -> tuple[int, str]:
        result = await asyncio.to_thread(runner.invoke, app, list(args), catch_exceptions=False)
        return result.exit_code, result.output

    try:
        yield run
    finally:
        context.console.width = width
        set_clients(None)
        clients.close()


class Pane:
    """A command running in a detached tmux session, read with capture-pane."""

    def __init__(self, command: list[str], env: dict[str, str], *, width=220, height=70):
        self.name = f"di-top-{uuid.uuid4().hex[:8]}"
        shell = " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(command)
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height),
             f"cd {ROOT} && env -u COLUMNS -u LINES {shell}; sleep 30"],
            check=True,
        )

    def capture(self) -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", self.name],
            capture_output=True, text=True, check=True,
        ).stdout

    async def wait_for(self, predicate, timeout: float = 30.0) -> str:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            screen = await asyncio.to_thread(self.capture)
            if predicate(screen):
                return screen
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"the pane never showed what was expected:\n{screen}")
            await asyncio.sleep(0.2)

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def live_top(session_port: int, *args: str) -> Pane:
    if shutil.which("tmux") is None:
        pytest.skip(
            "tmux is not installed: the live view needs a real terminal (apt-get install tmux)"
        )
    env = {
        "DOCIMPORT_SESSION_ADDR": f"127.0.0.1:{session_port}",
        "DOCIMPORT_TOKEN": TOKENS["operator"],
        "DOCIMPORT_STACK_FILE": "/nonexistent/stack.json",
        "TERM": "xterm-256color",
    }
    return Pane([sys.executable, "-m", "clients.cli", "top", *args], env)


def cells_of(row: str) -> list[str]:
    return [cell.strip() for cell in row.split("│")]


def row_of(output: str, needle: str) -> str:
    rows = [line for line in output.splitlines() if needle in line]
    assert rows, f"no line with {needle!r} in:\n{output}"
    return rows[0]


@pytest.mark.timeout(300)
async def test_top_shows_the_sample_case(db_url, pool, redis_url, token_env, case_copy, tmp_path):
    async with sample_stack(db_url, pool, redis_url, token_env, case_copy, tmp_path) as stack:
        session_id = await stack.import_sample()
        truth = (
            await stack.sessions.GetSession(pb.GetSessionRequest(session_id=session_id))
        ).session
        failed = (
            await stack.sessions.ListSessionDocuments(
                pb.ListSessionDocumentsRequest(
                    session_id=session_id, state=pb.DOCUMENT_STATE_FAILED
                )
            )
        ).documents
        c = truth.counts
        # the sample case: 12 documents; the duplicate and the e-mail's attachment
        # skipped, the corrupt and the encrypted PDF failed, the other 8 completed
        assert (c.total, c.completed, c.failed, c.skipped) == (12, 8, 2, 2)
        reasons = {d.relative_path.rsplit("/", 1)[-1]: d.error_message for d in failed}
        assert set(reasons) == {"corrupt_scan.pdf", "sealed_records.pdf"}

        with cli_for(stack.session_port) as cli:
            code, out = await cli("top", "--once")
            assert code == 0, out
            cells = cells_of(row_of(out, session_id))
            # session, case, state, done, completed, failed, skipped, in flight,
            # stalled, docs/s, ETA, cost
            assert cells[:9] == [
                session_id, "Smith v. Jones", "completed_with_errors", "12/12 100%",
                "8", "2", "2", "0", "0",
            ], cells
            assert cells[10] == "done"
            assert cells[11].endswith("/ $25.00 (0%)")  # cost against the budget
            assert cells[11].startswith(format_money(Decimal(truth.cost_so_far.amount)))
            assert "workers online: 1" in out and "broker ok" in out
            for queue in ("extract", "chunk", "entities"):
                assert [queue, "0", stack.worker_hostname] in [
                    cells_of(line) for line in out.splitlines()
                ], out
            for name, reason in reasons.items():
                failure = row_of(out, name)
                assert "permanent" in failure and reason[:40] in failure, failure
            assert "password-protected PDF" in row_of(out, "sealed_records.pdf")
            assert "found by the manifest scan" in row_of(out, "corrupt_scan.pdf")
            assert "stalled documents: 0" in out

            code, out = await cli("top", "--json")
            assert code == 0, out
            o = json.loads(out)
            (s,) = [x for x in o["sessions"] if x["session_id"] == session_id]
            assert s["state"] == "SESSION_STATE_COMPLETED_WITH_ERRORS"
            assert s["counts"]["completed"] == "8" and s["counts"]["failed"] == "2"
            assert s["cost_so_far"] == {
                "amount": truth.cost_so_far.amount,
                "currency_code": truth.cost_so_far.currency_code,
            }
            assert {q["queue"]: q.get("messages", "0") for q in o["queues"]} == {
                "extract": "0", "chunk": "0", "entities": "0"
            }
            assert [w["hostname"] for w in o["workers"]] == [stack.worker_hostname]
            assert {f["relative_path"].rsplit("/", 1)[-1] for f in o["recent_failures"]} == set(
                reasons
            )
            hour = {
                x["stage"]: x for x in o["stage_stats"] if x["window"] == "3600s"
            }
            succeeded = {x["stage"]: x.get("succeeded", "0") for x in s["stages"]}
            for stage in ("STAGE_EXTRACT", "STAGE_CHUNK", "STAGE_ENTITIES"):
                assert hour[stage].get("succeeded", "0") == succeeded[stage]
                assert int(hour[stage]["finished"]) >= 8 and "p95_duration" in hour[stage]

        pane = live_top(stack.session_port, "--interval", "0.5")
        try:
            screen = await pane.wait_for(lambda s: session_id in s and "sealed_records.pdf" in s)
            assert "completed_with_errors" in row_of(screen, session_id)
            assert "workers online: 1" in screen
            assert "refresh every 500ms" in screen
        finally:
            pane.close()


async def test_live_view_rides_out_a_session_service_restart(harness, token_env):
    h = harness
    session = (await h.create([mfile("a.pdf"), mfile("b.pdf", problem="encrypted")])).session
    pane = live_top(h.port, "--interval", "0.3")
    try:
        await pane.wait_for(lambda s: session.session_id in s and "b.pdf" in s)
        await h.server.stop(0.2)
        screen = await pane.wait_for(lambda s: "session service unavailable" in s)
        assert session.session_id in screen, "the last frame stays on screen"
        # the same port again, a new process-equivalent server
        settings = h.settings.model_copy(update={"port": h.port})
        restarted = await build_server(
            settings, store=h.store, enqueuer=h.enqueuer, background=False
        )
        try:
            screen = await pane.wait_for(
                lambda s: "session service unavailable" not in s and session.session_id in s
            )
            assert "b.pdf" in screen and "running" in row_of(screen, session.session_id)
        finally:
            await restarted.stop(0.2)
    finally:
        pane.close()


def test_durations_and_error_colours():
    assert parse_duration("90", "--x") == 90
    assert parse_duration("1h30m", "--x") == 5400
    assert parse_duration("2d", "--x") == 172800
    for bad in ("", "soon", "10 m", "5mm"):
        with pytest.raises(Exception):
            parse_duration(bad, "--x")
    assert rate_style(0.0, 0.01, 0.05) == "green"
    assert rate_style(0.02, 0.01, 0.05) == "yellow"
    assert rate_style(0.05, 0.01, 0.05) == "bold red"
