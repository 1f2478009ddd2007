"""`docimport demo`: the whole flow on the bundled sample case, end to end.

Owns nothing but the script of the tour: start the local stack, analyze
examples/sample-case, import it with live progress, verify it, print its
costs and one frame of the pipeline dashboard (`top --once`), stop the stack. Each step runs the real CLI command in a child
process, printed first so a reader can repeat it by hand.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import typer
from docimport.session.v1 import session_service_pb2

from clients.cli.context import Clients, console, err_console, load_settings

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "examples" / "sample-case"
CASE = "Smith v. Jones"


def _run(*args: str, check: bool = True) -> int:
    console.rule(f"[bold]$ docimport {' '.join(shlex.quote(a) for a in args)}", align="left")
    code = subprocess.call([sys.executable, "-m", "clients.cli", *args])
    if check and code != 0:
        err_console.print(f"[bold red]demo stopped:[/] `docimport {args[0]}` exited with {code}")
        raise typer.Exit(code)
    return code


def _latest_session() -> str:
    clients = Clients(load_settings())
    try:
        reply = clients.session.ListSessions(
            session_service_pb2.ListSessionsRequest(project_name=CASE, page_size=1),
            timeout=clients.timeout,
        )
    finally:
        clients.close()
    if not reply.sessions:
        raise typer.Exit(1)
    return reply.sessions[0].session_id


def demo(
    keep: bool = typer.Option(False, "--keep", help="Leave the local stack running afterwards."),
    var: Path = typer.Option(Path("var"), "--var", help="Where the local stack keeps its state."),
) -> None:
    """Run the whole flow on the bundled sample case: analyze, import, verify, costs, top."""
    if not SAMPLE.is_dir():
        err_console.print(f"[bold red]error:[/] the sample case is missing: {SAMPLE}")
        raise typer.Exit(2)
    manifest = var / "demo-manifest.json"
    verdict = 1
    _run("dev", "up", "--var", str(var), "--source-root", str(SAMPLE.parent))
    try:
        _run("analyze", str(SAMPLE), "--case", CASE, "-o", str(manifest))
        _run("import", str(manifest), "--case", CASE, "--budget", "25", "--watch")
        session = _latest_session()
        verdict = _run("verify", session, check=False)
        _run("costs", session)
        _run("top", "--once", check=False)
    finally:
        if not keep:
            _run("dev", "down", "--var", str(var), check=False)
    if verdict != 0:
        err_console.print("[bold red]the verification did not PASS[/] (see its findings above)")
        raise typer.Exit(verdict)
    console.print("\n[bold green]demo complete:[/] the sample case was imported, verified and costed.")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
