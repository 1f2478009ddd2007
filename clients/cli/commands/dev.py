"""CLI commands of the local stack: `docimport dev up | down | status | env`.

Owns only the presentation; clients/devstack.py does the work.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from clients import devstack
from clients.cli.context import EXIT_FAILED, console, err_console

dev_app = typer.Typer(
    help="Run docimport locally: a private Postgres and Redis, the three services and a worker, "
    "all under ./var/. Nothing to install by hand.",
    no_args_is_help=True,
)

VarDir = typer.Option(Path("var"), "--var", help="Where the stack keeps its data, logs and state.")


@dev_app.command("up")
def up(
    var: Path = VarDir,
    source_root: list[Path] = typer.Option(
        None, "--source-root", help="A folder the manifest service may scan (repeatable). "
        "Default: the current directory."
    ),
    flower: bool = typer.Option(False, "--flower", help="Also start Flower, Celery's web monitor."),
    concurrency: int = typer.Option(2, help="Worker processes."),
) -> None:
    """Start the local stack (or whatever part of it is not running)."""
    roots = source_root or [Path.cwd()]
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        err_console.print(f"[bold red]error:[/] not a directory: {', '.join(missing)}")
        raise typer.Exit(2)
    try:
        stack = devstack.up(var, source_roots=roots, flower=flower, worker_concurrency=concurrency,
                            say=console.print)
    except (devstack.StackError, devstack.localinfra.LocalInfraError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        err_console.print("Stop what did start with `docimport dev down`.")
        raise typer.Exit(EXIT_FAILED) from None
    _show(stack)
    console.print("\nThe CLI finds this stack through var/stack.json when run from this folder. "
                  "Stop it with [bold]docimport dev down[/].")


@dev_app.command("down")
def down(var: Path = VarDir) -> None:
    """Stop the local stack; data under --var stays for the next `dev up`."""
    devstack.down(var, say=console.print)
    console.print("local stack is down")


@dev_app.command("status")
def status(var: Path = VarDir) -> None:
    """Show what of the local stack is running."""
    stack = devstack.Stack.load(var.resolve())
    if not stack.processes:
        console.print("the local stack is not running (start it with `docimport dev up`)")
        raise typer.Exit(1)
    _show(stack)


@dev_app.command("env")
def env(var: Path = VarDir) -> None:
    """Print shell `export` lines that point any shell at the local stack."""
    stack = devstack.Stack.load(var.resolve())
    if not stack.addresses:
        err_console.print("the local stack has never been started here")
        raise typer.Exit(1)
    for name, address in stack.addresses.items():
        print(f"export DOCIMPORT_{name.upper()}_ADDR={address}")
    print(f"export DOCIMPORT_TOKEN={stack.operator_token}")


def _show(stack: devstack.Stack) -> None:
    alive = devstack.running_components(stack)
    table = Table(title="docimport local stack", show_lines=False)
    table.add_column("component")
    table.add_column("address")
    table.add_column("pid")
    table.add_column("log")
    for name in devstack.COMPONENTS:
        info = stack.processes.get(name)
        if not info:
            continue
        address = stack.addresses.get(name, stack.flower_url if name == "flower" else "")
        pid = str(info["pid"]) if name in alive else "[red]stopped[/]"
        table.add_row(name, address, pid, info["log"])
    table.add_row("postgres", stack.database_url, "", "")
    table.add_row("redis", stack.broker_url, "", "")
    console.print(table)
    metrics = [(name, devstack.metrics_url(stack, name)) for name in devstack.COMPONENTS]
    if any(url for _, url in metrics):
        console.print("Prometheus /metrics (loopback only):")
        for name, url in metrics:
            if url:
                console.print(f"  {name:<9} {url}", soft_wrap=True)
    console.print(f"operator token (CLI): [bold]{stack.operator_token}[/]")
    console.print(f"worker token:         {stack.worker_token}")
    console.print(f"service token:        {stack.service_token}")


def register(app: typer.Typer) -> None:
    app.add_typer(dev_app, name="dev")
