"""`docimport top`: a live terminal dashboard of the whole pipeline.

Owns the dashboard's rendering and its refresh loop. Every number comes from
one RPC, SessionService.GetPipelineOverview: the CLI never reads Postgres or
Redis itself, so it shows what an operator anywhere can see with a token.

The live view refreshes every `--interval` seconds. When the session service
is briefly unavailable (a restart, a network blip) the last frame stays on
screen under a banner and the next refresh tries again: gRPC reconnects the
channel by itself, so `top` never has to be restarted. Errors a retry cannot
fix (no permission, a bad option) end it with the usual message and exit
code. `--once` prints one frame and `--json` the overview itself, for
scripts and logs; both fail fast instead of retrying.
"""

from __future__ import annotations

import os

import datetime as dt
import re
import time
from decimal import Decimal
from typing import Any

import grpc
import typer
from docimport.session.v1 import session_service_pb2 as pb
from google.protobuf import duration_pb2, json_format
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from clients.cli.commands.session import session_state, stage_name
from clients.cli.context import (
    EXIT_USAGE,
    clients,
    console,
    explain,
    fail,
    handle_errors,
    print_json,
)
from services.common.convert import format_money

# Errors worth waiting out in the live view: the service is restarting or
# unreachable for a moment.
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
HOUR, DAY = 3600, 86400
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# Columns of a `--once` frame written to a pipe or a file (COLUMNS overrides).
LOG_WIDTH = 200

def parse_duration(text: str, option: str) -> float:
    """Seconds from `90`, `90s`, `10m`, `1h30m` or `2d`."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise fail(f"{option} must be a duration like 90s, 10m, 1h or 2d, not {text!r}", EXIT_USAGE)
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _proto_duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(dt.timedelta(seconds=seconds))
    return d


def human_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _seconds(d: duration_pb2.Duration) -> float:
    return d.ToTimedelta().total_seconds()


def _money(m: Any) -> Decimal:
    return Decimal(m.amount or "0")


def rate_style(rate: float, warn: float, critical: float) -> str:
    if rate >= critical:
        return "bold red"
    if rate >= warn:
        return "yellow"
    return "green"


def _percent(value: float) -> str:
    return f"{value * 100:.1f}%"


# ---------------------------------------------------------------- rendering


def _header(o: pb.GetPipelineOverviewResponse, interval: float | None) -> Text:
    now = o.generated_at.ToDatetime()
    text = Text()
    text.append("docimport top", style="bold")
    text.append(f"   {now:%Y-%m-%d %H:%M:%S} UTC")
    if interval:
        text.append(f"   refresh every {human_seconds(interval)} (Ctrl-C quits)", style="dim")
    text.append("\n")
    b = o.broker
    if b.reachable:
        text.append("broker ok", style="green")
    else:
        text.append(f"broker unavailable: {b.error}", style="bold red")
    text.append("   workers online: ")
    if b.reachable:
        text.append(str(len(o.workers)), style="bold" if o.workers else "bold red")
    else:
        text.append("unknown", style="dim")
    text.append("   stalled documents: ")
    text.append(f"{o.stalled_total:,}", style="bold yellow" if o.stalled_total else "green")
    text.append(f" (no progress for {human_seconds(_seconds(o.stall_after))})", style="dim")
    return text


_STATE_STYLE = {
    "running": "green",
    "completed": "green",
    "completed_with_errors": "yellow",
    "budget_exhausted": "bold red",
    "paused": "yellow",
    "cancelled": "dim",
}


def _spend(s: pb.Session, wide: bool) -> Text:
    """Cost so far against the budget: yellow from 75% of it, red from 90%."""
    cost = _money(s.cost_so_far)
    if not s.options.HasField("budget"):
        return Text(format_money(cost))
    budget = _money(s.options.budget)
    used = cost / budget if budget else Decimal(1)
    style = "bold red" if used >= Decimal("0.9") else "yellow" if used >= Decimal("0.75") else ""
    if not wide:
        return Text(f"{format_money(cost)}/{format_money(budget)}", style=style)
    return Text(f"{format_money(cost)} / {format_money(budget)} ({used * 100:.0f}%)", style=style)


def _sessions(o: pb.GetPipelineOverviewResponse, width: int) -> RenderableType:
    if not o.sessions:
        return Text("no active or recently finished sessions", style="dim")
    # Narrow terminals get the first 8 characters of ids and fewer columns.
    wide = width >= 150
    columns = ["session", "case", "state", "done"]
    columns += ["completed", "failed", "skipped"] if wide else ["failed"]
    columns += ["in flight", "stalled", "docs/s", "ETA", "cost / budget"]
    short = {
        "failed": "fail",
        "in flight": "active",
        "stalled": "stall",
        "cost / budget": "cost/budget",
    }
    table = Table(title="sessions", title_justify="left", show_edge=False, pad_edge=False)
    for name in columns:
        header = name if wide else short.get(name, name)
        if name == "case":
            table.add_column(header, min_width=8, overflow="ellipsis", no_wrap=True)
        else:
            left = name in ("session", "state")
            table.add_column(header, justify="left" if left else "right", no_wrap=True)
    for s in o.sessions:
        c = s.counts
        done = c.completed + c.failed + c.skipped + c.cancelled
        percent = f"{done / c.total * 100:.0f}%" if c.total else "-"
        in_flight = c.pending + c.queued + c.running
        eta = "done" if not in_flight else "-"
        if in_flight and s.HasField("eta"):
            eta = human_seconds(_seconds(s.eta))
        state = session_state(s.state)
        cells: dict[str, Any] = {
            "session": s.session_id if wide else s.session_id[:8],
            "case": s.project.name,
            "state": Text(state, style=_STATE_STYLE.get(state, "")),
            "done": f"{done:,}/{c.total:,} {percent}",
            "completed": f"{c.completed:,}",
            "failed": Text(f"{c.failed:,}", style="red" if c.failed else ""),
            "skipped": f"{c.skipped:,}",
            "in flight": f"{in_flight:,}",
            "stalled": Text(f"{c.stalled:,}", style="bold yellow" if c.stalled else ""),
            "docs/s": f"{s.documents_per_second:,.1f}",
            "ETA": eta,
            "cost / budget": _spend(s, wide),
        }
        table.add_row(*(cells[name] for name in columns))
    return table


def _queues(o: pb.GetPipelineOverviewResponse) -> RenderableType:
    table = Table(title="queues and workers", title_justify="left", show_edge=False)
    table.add_column("queue")
    table.add_column("waiting", justify="right")
    table.add_column("workers consuming", overflow="fold")
    if not o.broker.reachable:
        table.add_row("-", "?", Text(o.broker.error or "unknown", style="red"))
        return table
    for q in o.queues:
        consumers = [w.hostname for w in o.workers if q.queue in w.queues]
        table.add_row(
            q.queue,
            f"{q.messages:,}",
            Text(", ".join(consumers), style="")
            if consumers
            else Text("none online", style="bold red"),
        )
    return table


def _stages(o: pb.GetPipelineOverviewResponse, warn: float, critical: float) -> RenderableType:
    table = Table(title="stages", title_justify="left", show_edge=False)
    table.add_column("stage", no_wrap=True)
    for window in ("1h", "1d"):
        table.add_column(f"runs {window} (/min)", justify="right", no_wrap=True)
        table.add_column(f"p50 / p95 {window}", justify="right", no_wrap=True)
        table.add_column(f"errors {window}", justify="right", no_wrap=True)
    by_stage: dict[int, dict[int, pb.StageWindowStats]] = {}
    for x in o.stage_stats:
        by_stage.setdefault(x.stage, {})[round(_seconds(x.window))] = x
    for stage, windows in by_stage.items():
        cells: list[Any] = [stage_name(stage)]
        for seconds in (HOUR, DAY):
            x = windows.get(seconds)
            if x is None:
                cells.extend(["-"] * 3)
                continue
            p50 = human_seconds(_seconds(x.p50_duration)) if x.HasField("p50_duration") else "-"
            p95 = human_seconds(_seconds(x.p95_duration)) if x.HasField("p95_duration") else "-"
            cells.extend(
                [
                    f"{x.finished:,} ({x.runs_per_second * 60:,.1f})",
                    f"{p50} / {p95}",
                    Text(
                        f"{_percent(x.error_rate)} ({x.failed + x.expired:,})",
                        style=rate_style(x.error_rate, warn, critical) if x.finished else "dim",
                    ),
                ]
            )
        table.add_row(*cells)
    return table


def _age(o: pb.GetPipelineOverviewResponse, d: pb.Document) -> str:
    age = o.generated_at.ToDatetime() - d.updated_at.ToDatetime()
    return human_seconds(max(0.0, age.total_seconds()))


def _stalled(o: pb.GetPipelineOverviewResponse) -> RenderableType | None:
    if not o.stalled_documents:
        return None
    table = Table(
        title=f"stalled documents ({o.stalled_total:,})", title_justify="left", show_edge=False
    )
    for name in ("document", "path", "state", "stage", "no progress for"):
        table.add_column(name, overflow="fold", no_wrap=name == "document")
    for d in o.stalled_documents:
        table.add_row(
            d.document_id,
            d.relative_path,
            _doc_state(d.state),
            stage_name(d.stage),
            Text(_age(o, d), style="yellow"),
        )
    return table


def _doc_state(value: int) -> str:
    return pb.DocumentState.Name(value).removeprefix("DOCUMENT_STATE_").lower()


def _failures(o: pb.GetPipelineOverviewResponse) -> RenderableType | None:
    if not o.recent_failures:
        return None
    table = Table(title="recent failures", title_justify="left", show_edge=False)
    table.add_column("ago", justify="right", no_wrap=True)
    table.add_column("path", style="red", overflow="fold")
    table.add_column("stage", no_wrap=True)
    table.add_column("class", no_wrap=True)
    table.add_column("error", overflow="fold")
    for d in o.recent_failures:
        table.add_row(
            _age(o, d),
            d.relative_path,
            stage_name(d.stage),
            pb.ErrorClass.Name(d.error_class).removeprefix("ERROR_CLASS_").lower()
            if d.error_class
            else "-",
            d.error_message,
        )
    return table


def render(
    o: pb.GetPipelineOverviewResponse,
    *,
    warn: float = 0.01,
    critical: float = 0.05,
    interval: float | None = None,
    banner: str = "",
) -> Group:
    """One frame of the dashboard."""
    parts: list[RenderableType] = []
    if banner:
        parts.append(Text(banner, style="bold yellow"))
    parts.extend(
        [_header(o, interval), _sessions(o, console.width), _queues(o), _stages(o, warn, critical)]
    )
    for extra in (_stalled(o), _failures(o)):
        if extra is not None:
            parts.append(extra)
    return Group(*parts)


# ---------------------------------------------------------------- the command


def fetch(request: pb.GetPipelineOverviewRequest) -> pb.GetPipelineOverviewResponse:
    c = clients()
    return c.session.GetPipelineOverview(request, timeout=c.timeout)


def _live(
    request: pb.GetPipelineOverviewRequest, interval: float, warn: float, critical: float
) -> None:
    last: pb.GetPipelineOverviewResponse | None = None
    failures = 0
    with Live(
        Text("connecting to the session service..."),
        console=console,
        screen=console.is_terminal,
        auto_refresh=False,
        transient=False,
    ) as live:
        while True:
            banner = ""
            try:
                last = fetch(request)
                failures = 0
            except grpc.RpcError as error:
                code = error.code()  # type: ignore[attr-defined]
                if code not in TRANSIENT:
                    raise
                failures += 1
                message, _ = explain(error)
                banner = (
                    f"session service unavailable ({code.name}, {failures} tries); "
                    f"retrying every {human_seconds(interval)}; last frame shown"
                )
                if last is None:
                    live.update(Text(f"{banner}\n{message}", style="bold yellow"), refresh=True)
                    time.sleep(interval)
                    continue
            assert last is not None
            live.update(
                render(last, warn=warn, critical=critical, interval=interval, banner=banner),
                refresh=True,
            )
            time.sleep(interval)


@handle_errors
def top(
    interval: float = typer.Option(
        2.0, "--interval", "-n", min=0.2, help="Seconds between refreshes of the live view."
    ),
    once: bool = typer.Option(
        False, "--once", help="Print one frame and exit (for scripts and logs)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the overview as JSON and exit (implies --once)."
    ),
    stall_after: str = typer.Option(
        "",
        "--stall-after",
        help="A queued or running document with no progress for this long is stalled, "
        "e.g. 90s, 10m, 1h (default: the service's threshold, 10m unless configured).",
    ),
    finished_within: str = typer.Option(
        "1h", "--finished-within", help="Keep finished sessions on screen this long after they end."
    ),
    failures: int = typer.Option(
        10, "--failures", min=1, max=100, help="How many of the latest failures to list."
    ),
    stalled_limit: int = typer.Option(
        10, "--stalled", min=1, max=100, help="How many stalled documents to list."
    ),
    warn: float = typer.Option(
        0.01, "--warn", min=0.0, max=1.0, help="Error rate shown yellow from here (0.01 = 1%)."
    ),
    critical: float = typer.Option(
        0.05, "--critical", min=0.0, max=1.0, help="Error rate shown red from here (0.05 = 5%)."
    ),
) -> None:
    """Live dashboard of the whole pipeline, like `top` for imports.

    Panels, top to bottom:

    [bold]header[/]: broker reachable, workers online, stalled documents in all sessions.

    [bold]sessions[/]: every unfinished session and those finished within
    --finished-within: state, documents done of total, failed, in flight,
    stalled, documents per second over the last minute, ETA, and cost so far
    (from the cost ledger) against the budget (yellow from 75%, red from 90%).

    [bold]queues and workers[/]: messages waiting in each stage's Celery queue,
    and the workers consuming it ("none online" in red means nothing drains it).

    [bold]stages[/]: stage runs finished in the last hour and day, runs per
    minute, p50 and p95 durations (cache hits left out), and the error rate
    (failed or lease-expired runs over finished runs): green below --warn,
    yellow from --warn, red from --critical.

    [bold]stalled documents[/] and [bold]recent failures[/] (with their error text),
    when there are any.

    Examples:

      docimport top                      # live, every 2 s; Ctrl-C quits

      docimport top -n 10 --stall-after 5m

      docimport top --once > top.log     # one frame, for logs

      docimport top --json | jq '.queues'

    All data comes from the session service's GetPipelineOverview RPC; if the
    service is briefly unavailable the live view keeps the last frame and
    retries on its own.
    """
    if warn > critical:
        raise fail("--warn must not be above --critical", EXIT_USAGE)
    request = pb.GetPipelineOverviewRequest(
        finished_within=_proto_duration(parse_duration(finished_within, "--finished-within")),
        failure_limit=failures,
        stalled_limit=stalled_limit,
    )
    if stall_after:
        request.stall_after.CopyFrom(_proto_duration(parse_duration(stall_after, "--stall-after")))
    if as_json:
        print_json(json_format.MessageToDict(fetch(request), preserving_proto_field_name=True))
        return
    if once:
        if not console.is_terminal and "COLUMNS" not in os.environ:
            # A frame for a log or a file: wide enough for every column, not the 80 of a pipe.
            console.width = max(console.width, LOG_WIDTH)
        console.print(render(fetch(request), warn=warn, critical=critical))
        return
    try:
        _live(request, interval, warn, critical)
    except KeyboardInterrupt:
        return  # quitting is the normal way out of a live view


def register(app: typer.Typer) -> None:
    """Adds `top` to the app."""
    app.command("top")(top)


__all__ = ["parse_duration", "register", "render"]
