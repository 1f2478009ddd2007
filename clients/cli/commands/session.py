"""CLI commands of the session group: import, watch, status, sessions, documents, retry...

Owns how a person runs and follows an import: `import` (a manifest JSON
file is first handed to ManifestService.ImportManifest, unless it names a
manifest the service already has), `watch` (a live view from the
WatchSession stream that reconnects by itself with the last message's
`resume_token`, or NDJSON with `--json`), `sessions`, `status`, `documents`, `document`,
`retry`, `pause`, `resume`, `cancel` and `verify` (exit 0 only on PASS).

Interrupting `watch` (Ctrl-C) only closes the stream: the session goes on
server-side, nothing is left half-done (all state is in Postgres), and
`docimport watch SESSION` reattaches. The watch view keeps exact counts from
the snapshot plus each event's previous state; a new snapshot (after a
reconnect from far behind, when the client was too slow, or when the
server's events went back in time) replaces them.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import typer
from docimport.common.v1 import common_pb2
from docimport.manifest.v1 import manifest_service_pb2 as mpb
from docimport.session.v1 import session_service_pb2 as pb
from google.protobuf import json_format
from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from clients.cli.context import (
    EXIT_FAILED,
    EXIT_USAGE,
    clients,
    console,
    err_console,
    explain,
    fail,
    handle_errors,
    print_json,
)
from services.common.convert import format_money

STAGES = ("extract", "chunk", "entities")
TERMINAL = {
    pb.SESSION_STATE_COMPLETED,
    pb.SESSION_STATE_COMPLETED_WITH_ERRORS,
    pb.SESSION_STATE_CANCELLED,
}
RECONNECT_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
}


def _name(enum: Any, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower() if value else "-"


def session_state(value: int) -> str:
    return _name(pb.SessionState, value, "SESSION_STATE_")


def doc_state(value: int) -> str:
    return _name(pb.DocumentState, value, "DOCUMENT_STATE_")


def stage_name(value: int) -> str:
    return _name(common_pb2.Stage, value, "STAGE_")


def _money(m: Any) -> Decimal:
    return Decimal(m.amount or "0")


def _to_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _enum_option(enum: Any, prefix: str, value: str | None, option: str) -> int:
    if not value:
        return 0
    try:
        return enum.Value(prefix + value.upper().replace("-", "_"))
    except ValueError:
        names = ", ".join(
            n.removeprefix(prefix).lower() for n in enum.keys() if not n.endswith("UNSPECIFIED")
        )
        raise fail(f"{option} must be one of: {names}", EXIT_USAGE) from None


# ---------------------------------------------------------------- watch state


class WatchState:
    """What the live view shows, kept exact from a snapshot plus events."""

    def __init__(self) -> None:
        self.session: pb.Session | None = None
        self.seq = 0
        # Names the message at `seq` too: a server that lost it answers a
        # resume with a fresh snapshot instead of events under reused seqs.
        self.resume_token = ""
        self.state = 0
        self.reason = ""
        self.counts: collections.Counter[int] = collections.Counter()
        self.stage_done: collections.Counter[str] = collections.Counter()
        self.cost = Decimal(0)
        self.failures: collections.deque[tuple[str, str]] = collections.deque(maxlen=5)
        self.finished_at: collections.deque[float] = collections.deque(maxlen=100_000)
        self.snapshot_rate = 0.0

    def apply(self, response: pb.WatchSessionResponse, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        kind = response.WhichOneof("event")
        if kind == "snapshot":
            s = response.snapshot
            self.session = s
            self.state, self.reason = s.state, s.state_reason
            c = s.counts
            self.counts = collections.Counter(
                {
                    pb.DOCUMENT_STATE_PENDING: c.pending,
                    pb.DOCUMENT_STATE_QUEUED: c.queued,
                    pb.DOCUMENT_STATE_RUNNING: c.running,
                    pb.DOCUMENT_STATE_COMPLETED: c.completed,
                    pb.DOCUMENT_STATE_FAILED: c.failed,
                    pb.DOCUMENT_STATE_SKIPPED: c.skipped,
                    pb.DOCUMENT_STATE_CANCELLED: c.cancelled,
                }
            )
            self.stage_done = collections.Counter(
                {stage_name(x.stage): x.succeeded for x in s.stages}
            )
            self.cost = _money(s.cost_so_far)
            self.snapshot_rate = s.documents_per_second
            self.finished_at.clear()
        elif kind == "document":
            d = response.document
            if d.previous_state:
                self.counts[d.previous_state] -= 1
            self.counts[d.state] += 1
            if (
                d.previous_state == pb.DOCUMENT_STATE_RUNNING
                or d.previous_state == pb.DOCUMENT_STATE_QUEUED
            ):
                if d.state == pb.DOCUMENT_STATE_COMPLETED or (
                    d.state == pb.DOCUMENT_STATE_PENDING and d.stage != d.previous_stage
                ):
                    self.stage_done[stage_name(d.previous_stage)] += 1
            if d.HasField("cost"):
                self.cost += _money(d.cost)
            if d.state in (pb.DOCUMENT_STATE_COMPLETED, pb.DOCUMENT_STATE_FAILED):
                self.finished_at.append(now)
            if d.state == pb.DOCUMENT_STATE_FAILED or (
                d.error_message and d.state == pb.DOCUMENT_STATE_PENDING
            ):
                label = "failed" if d.state == pb.DOCUMENT_STATE_FAILED else "retrying"
                self.failures.append(
                    (d.relative_path or d.document_id, f"{label}: {d.error_message}")
                )
        elif kind == "state_change":
            self.state, self.reason = response.state_change.state, response.state_change.reason
        # Every message carries the seq of the last event it covers: resume after it.
        self.seq = response.seq
        self.resume_token = response.resume_token  # empty from a server without tokens

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        return sum(
            self.counts[s]
            for s in (
                pb.DOCUMENT_STATE_COMPLETED,
                pb.DOCUMENT_STATE_FAILED,
                pb.DOCUMENT_STATE_SKIPPED,
                pb.DOCUMENT_STATE_CANCELLED,
            )
        )

    @property
    def active(self) -> int:
        return sum(
            self.counts[s]
            for s in (
                pb.DOCUMENT_STATE_PENDING,
                pb.DOCUMENT_STATE_QUEUED,
                pb.DOCUMENT_STATE_RUNNING,
            )
        )

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self.finished_at and now - self.finished_at[0] > 60:
            self.finished_at.popleft()
        if len(self.finished_at) >= 2:
            span = max(now - self.finished_at[0], 1.0)
            return len(self.finished_at) / span
        return self.snapshot_rate

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def render(self) -> Group:
        s = self.session
        title = Text()
        if s is not None:
            title.append(f"{s.project.name}  ", style="bold")
            title.append(f"session {s.session_id}", style="cyan")
        state_text = Text(f"state: {session_state(self.state)}", style="bold")
        if self.reason:
            state_text.append(f"  ({self.reason})", style="dim")
        total = max(self.total, 1)
        to_process = max(self.total - self.counts[pb.DOCUMENT_STATE_SKIPPED], 1)
        grid = Table.grid(padding=(0, 1))
        grid.add_column(width=9)
        grid.add_column(width=40)
        grid.add_column()
        grid.add_row(
            "overall",
            ProgressBar(total=total, completed=self.done, width=40),
            f"{self.done:,}/{self.total:,}",
        )
        for stage in STAGES:
            done = self.stage_done[stage]
            grid.add_row(
                stage,
                ProgressBar(total=to_process, completed=min(done, to_process), width=40),
                f"{done:,}/{to_process:,}",
            )
        counts = "  ".join(f"{doc_state(k)} {v:,}" for k, v in sorted(self.counts.items()) if v)
        rate = self.rate()
        eta = "-"
        if rate > 0 and self.active:
            eta = str(dt.timedelta(seconds=int(self.active / rate)))
        estimate = ""
        if s is not None and s.HasField("estimated_cost"):
            estimate = f" of {format_money(_money(s.estimated_cost))} estimated"
        stats = Text(
            f"{rate:,.1f} documents/s   ETA {eta}   cost {format_money(self.cost)}{estimate}"
        )
        parts: list[Any] = [title, state_text, grid, Text(counts, style="dim"), stats]
        if self.failures:
            failures = Table(
                title="recent failures", title_justify="left", show_edge=False, show_header=False
            )
            failures.add_column(style="red", overflow="fold")
            failures.add_column(overflow="fold")
            for path, message in self.failures:
                failures.add_row(path, message)
            parts.append(failures)
        return Group(*parts)


def _stream(session_id: str, after: int, token: str) -> Any:
    # Both: a server that predates resume tokens goes by the seq.
    request = pb.WatchSessionRequest(
        session_id=session_id, resume_after_seq=after, resume_token=token
    )
    return clients().session.WatchSession(request)  # no deadline on a watch stream


def follow(session_id: str, *, as_json: bool, max_reconnects: int = 1000) -> WatchState:
    """Streams a session until it is terminal, reconnecting with its resume token."""
    state = WatchState()
    attempts = 0
    live: Live | None = None
    if not as_json:
        live = Live(state.render(), console=console, refresh_per_second=4, transient=False)
        live.start()
    call = None
    try:
        while True:
            call = _stream(session_id, state.seq, state.resume_token)
            try:
                for response in call:
                    attempts = 0
                    state.apply(response)
                    if as_json:
                        line = _to_dict(response)
                        line.setdefault("seq", str(response.seq))
                        print(json.dumps(line), flush=True)
                    elif live is not None:
                        live.update(state.render())
                if state.terminal:
                    return state
                # the server closed the stream without a terminal state: reconnect
            except grpc.RpcError as error:
                code = error.code()  # type: ignore[attr-defined]
                if code not in RECONNECT_CODES or attempts >= max_reconnects:
                    raise
                attempts += 1
                delay = min(0.5 * 2 ** min(attempts, 5), 10.0)
                err_console.print(
                    f"[yellow]stream interrupted ({code.name}); reconnecting from event "
                    f"{state.seq} in {delay:.1f}s[/]"
                )
                time.sleep(delay)
    finally:
        if call is not None:
            # Traced, the stream is a generator (the gRPC instrumentation's): closing it
            # drops the call, which cancels it.
            (getattr(call, "cancel", None) or call.close)()
        if live is not None:
            live.update(state.render())
            live.stop()
            if not console.is_terminal:
                console.print()  # a redirected Live leaves its last line open


def _watch(session_id: str, as_json: bool) -> None:
    try:
        state = follow(session_id, as_json=as_json)
    except KeyboardInterrupt:
        err_console.print(
            f"\nstopped watching. The import goes on on the server; reattach with\n"
            f"  docimport watch {session_id}\n"
            f"or stop it with: docimport pause {session_id}  /  docimport cancel {session_id}"
        )
        raise typer.Exit(130) from None
    if not as_json:
        console.print(
            f"session {session_id} is [bold]{session_state(state.state)}[/]"
            + (f" ({state.reason})" if state.reason else "")
        )
        if state.state == pb.SESSION_STATE_COMPLETED_WITH_ERRORS:
            console.print(f"see the failures with: docimport documents {session_id} --state failed")


# ---------------------------------------------------------------- import


def _manifest_from_file(path: Path, source_path: str) -> tuple[str, str]:
    """The manifest id for a manifest JSON file, importing it when the service lacks it."""
    try:
        raw = path.read_bytes()
        document = json.loads(raw)
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}", EXIT_USAGE) from None
    except ValueError as exc:
        raise fail(f"{path} is not JSON: {exc}", EXIT_USAGE) from None
    if not isinstance(document, dict):
        raise fail(f"{path} is not a docimport manifest", EXIT_USAGE)
    c = clients()
    known = document.get("manifest_id")
    if known and not source_path:
        try:
            found = c.manifest.GetManifest(
                mpb.GetManifestRequest(manifest_id=str(known)), timeout=c.timeout
            )
            if found.manifest.state == mpb.MANIFEST_STATE_READY:
                return found.manifest.manifest_id, found.manifest.case_name
        except grpc.RpcError as error:
            if error.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):  # type: ignore[attr-defined]
                raise
    digest = hashlib.sha256(raw + source_path.encode()).hexdigest()
    response = c.manifest.ImportManifest(
        mpb.ImportManifestRequest(
            request_id=f"import-{digest[:40]}", manifest_json=raw, source_path=source_path
        ),
        timeout=max(c.timeout, 600),
    )
    for d in response.discrepancies[:20]:
        err_console.print(f"[yellow]manifest:[/] {d.relative_path}: {d.message}")
    if len(response.discrepancies) > 20:
        err_console.print(
            f"[yellow]... and {len(response.discrepancies) - 20} more discrepancies[/]"
        )
    return response.manifest.manifest_id, response.manifest.case_name


def _print_plan(plan: pb.DryRunPlan, budget: str | None) -> None:
    console.print("[bold]dry run[/]: nothing was written")
    console.print(
        f"documents to process: [bold]{plan.documents:,}[/]   skipped (duplicates, excluded, "
        f"attachments): {plan.skipped:,}   problem files (will fail): {plan.problem_files:,}"
    )
    console.print(
        f"estimated cost: [bold]{format_money(_money(plan.estimated_cost))}[/]"
        + (
            f" against a budget of {format_money(Decimal(budget))}: "
            + ("[green]within budget[/]" if plan.within_budget else "[red]over budget[/]")
            if budget
            else ""
        )
    )
    table = Table(title="dispatch order", title_justify="left", show_edge=False)
    table.add_column("#", justify="right")
    table.add_column("category")
    table.add_column("documents", justify="right")
    for i, c in enumerate(plan.categories, 1):
        table.add_row(str(i), c.category, f"{c.documents:,}")
    console.print(table)


def _print_session(s: pb.Session) -> None:
    c = s.counts
    console.print(
        f"[bold]{s.project.name}[/]  session [cyan]{s.session_id}[/]  [bold]{session_state(s.state)}[/]"
        + (f"  ({s.state_reason})" if s.state_reason else "")
    )
    console.print(
        f"manifest {s.manifest_id}   created {s.created_at.ToDatetime():%Y-%m-%d %H:%M:%S} UTC"
    )
    console.print(
        f"documents {c.total:,}: pending {c.pending:,}, queued {c.queued:,}, running {c.running:,}, "
        f"completed [green]{c.completed:,}[/], failed [red]{c.failed:,}[/], skipped {c.skipped:,}, "
        f"cancelled {c.cancelled:,}" + (f", [yellow]stalled {c.stalled:,}[/]" if c.stalled else "")
    )
    if s.stages:
        table = Table(show_edge=False)
        for column in ("stage", "queued", "running", "succeeded", "failed", "cache hits"):
            table.add_column(column, justify="left" if column == "stage" else "right")
        for x in s.stages:
            table.add_row(
                stage_name(x.stage),
                f"{x.queued:,}",
                f"{x.running:,}",
                f"{x.succeeded:,}",
                f"{x.failed:,}",
                f"{x.cache_hits:,}",
            )
        console.print(table)
    eta = (
        str(dt.timedelta(seconds=int(s.eta.ToTimedelta().total_seconds())))
        if s.HasField("eta")
        else "-"
    )
    budget = (
        f"   budget {format_money(_money(s.options.budget))}"
        if s.options.HasField("budget")
        else ""
    )
    estimate = (
        f" of {format_money(_money(s.estimated_cost))} estimated"
        if s.HasField("estimated_cost")
        else ""
    )
    console.print(
        f"{s.documents_per_second:,.1f} documents/s   ETA {eta}   cost "
        f"{format_money(_money(s.cost_so_far))}{estimate}{budget}"
    )


@handle_errors
def import_(
    manifest_file: Path | None = typer.Argument(
        None, help="A manifest JSON file (from `docimport analyze -o`)."
    ),
    manifest: str = typer.Option(
        "", "--manifest", help="The id of a manifest the service already has."
    ),
    case: str = typer.Option(
        "",
        "--case",
        help="The case (project) to import into, by name; an existing "
        "one is reused. Default: the manifest's case.",
    ),
    project_id: str = typer.Option("", "--project-id", help="The project to import into, by id."),
    budget: str | None = typer.Option(
        None, "--budget", help="Spending limit in USD, e.g. 250 or 12.50."
    ),
    max_in_flight: int = typer.Option(
        0, "--max-in-flight", help="Most stage runs queued or running at once for this session "
        "(default: the session service's DOCIMPORT_DEFAULT_MAX_IN_FLIGHT, 256).",
    ),
    priority: list[str] = typer.Option(
        [], "--priority", help="A category to process first; repeat for an order."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and price only; write nothing."),
    watch: bool = typer.Option(False, "--watch", help="Follow the import live until it finishes."),
    no_start: bool = typer.Option(
        False, "--no-start", help="Create the session without starting it."
    ),
    source_path: str = typer.Option(
        "", "--source-path", help="Where the manifest's files are now, if moved."
    ),
    request_id: str = typer.Option(
        "", "--request-id", help="Idempotency key (default: a new UUID)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the response (or NDJSON events) as JSON."
    ),
) -> None:
    """Create an import session from a manifest and start it."""
    if bool(manifest_file) == bool(manifest):
        raise fail("give a manifest JSON file or --manifest ID (one of them)", EXIT_USAGE)
    if case and project_id:
        raise fail("give --case or --project-id, not both", EXIT_USAGE)
    if budget is not None:
        try:
            if Decimal(budget) < 0:
                raise ValueError
        except (ArithmeticError, ValueError):
            raise fail(
                f"--budget must be a non-negative amount in USD, not {budget!r}", EXIT_USAGE
            ) from None
    c = clients()
    if manifest_file is not None:
        manifest_id, case_name = _manifest_from_file(manifest_file, source_path)
    else:
        found = c.manifest.GetManifest(
            mpb.GetManifestRequest(manifest_id=manifest), timeout=c.timeout
        )
        manifest_id, case_name = found.manifest.manifest_id, found.manifest.case_name
    options = pb.SessionOptions(
        max_in_flight=max_in_flight, category_priority=priority, dry_run=dry_run
    )
    if budget is not None:
        options.budget.amount, options.budget.currency_code = str(Decimal(budget)), "USD"
    request = pb.CreateSessionRequest(
        request_id=request_id or str(uuid.uuid4()),
        manifest_id=manifest_id,
        options=options,
        start=not no_start,
    )
    if project_id:
        request.project_id = project_id
    else:
        request.project_name = case or case_name
    try:
        response = c.session.CreateSession(request, timeout=max(c.timeout, 600))
    except KeyboardInterrupt:
        # The create is one transaction: it happened entirely or not at all.
        err_console.print(
            "\ninterrupted. The session was created entirely or not at all; run the same command "
            f"with --request-id {request.request_id} to finish safely (it is idempotent)."
        )
        raise typer.Exit(130) from None
    if as_json and not watch:
        print_json(_to_dict(response))
        return
    if dry_run:
        _print_plan(response.plan, budget)
        return
    s = response.session
    if not as_json:
        _print_session(s)
    if watch:
        _watch(s.session_id, as_json)
    elif not as_json:
        console.print(f"follow it with: docimport watch {s.session_id}")


@handle_errors
def watch(
    session_id: str = typer.Argument(..., help="The session id."),
    as_json: bool = typer.Option(False, "--json", help="Print each event as a JSON line (NDJSON)."),
) -> None:
    """Follow a session live until it finishes (Ctrl-C stops watching, not the import)."""
    _watch(session_id, as_json)


@handle_errors
def status(
    session_id: str = typer.Argument(..., help="The session id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """A session's state, counts per state and stage, throughput, ETA and cost."""
    c = clients()
    s = c.session.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=c.timeout).session
    if as_json:
        print_json(_to_dict(s))
    else:
        _print_session(s)


@handle_errors
def sessions(
    state: str = typer.Option("", "--state", help="Only sessions in this state (e.g. running)."),
    case: str = typer.Option("", "--case", help="Only sessions of this case (project name)."),
    since: str = typer.Option(
        "", "--since", help="Only sessions created after this ISO date/time."
    ),
    limit: int = typer.Option(50, "--limit", help="At most this many."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List import sessions, newest first."""
    c = clients()
    request = pb.ListSessionsRequest(
        state=_enum_option(pb.SessionState, "SESSION_STATE_", state, "--state"),
        project_name=case,
        page_size=min(limit, 1000),
    )
    if since:
        try:
            when = dt.datetime.fromisoformat(since)
        except ValueError:
            raise fail(
                f"--since must be an ISO date or date-time, not {since!r}", EXIT_USAGE
            ) from None
        request.created_after.FromDatetime(when if when.tzinfo else when.replace(tzinfo=dt.UTC))
    found: list[pb.Session] = []
    while len(found) < limit:
        response = c.session.ListSessions(request, timeout=c.timeout)
        found.extend(response.sessions)
        if not response.next_page_token:
            break
        request.page_token = response.next_page_token
    found = found[:limit]
    if as_json:
        print_json([_to_dict(s) for s in found])
        return
    table = Table(show_edge=False)
    for column in ("session", "case", "state", "documents", "done", "failed", "cost", "created"):
        table.add_column(
            column,
            justify="right" if column in ("documents", "done", "failed", "cost") else "left",
            no_wrap=column == "session",
        )
    for s in found:
        done = s.counts.completed + s.counts.failed + s.counts.skipped + s.counts.cancelled
        table.add_row(
            s.session_id,
            s.project.name,
            session_state(s.state),
            f"{s.counts.total:,}",
            f"{done:,}",
            f"{s.counts.failed:,}",
            format_money(_money(s.cost_so_far)),
            f"{s.created_at.ToDatetime():%Y-%m-%d %H:%M}",
        )
    console.print(table)


@handle_errors
def documents(
    session_id: str = typer.Argument(..., help="The session id."),
    state: str = typer.Option("", "--state", help="Only documents in this state (e.g. failed)."),
    stage: str = typer.Option("", "--stage", help="Only documents at this stage."),
    error_class: str = typer.Option("", "--error-class", help="retryable or permanent."),
    category: str = typer.Option("", "--category", help="Only this category."),
    stalled: bool = typer.Option(False, "--stalled", help="Only stalled documents."),
    limit: int = typer.Option(100, "--limit", help="At most this many."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List a session's documents."""
    c = clients()
    request = pb.ListSessionDocumentsRequest(
        session_id=session_id,
        state=_enum_option(pb.DocumentState, "DOCUMENT_STATE_", state, "--state"),
        stage=_enum_option(common_pb2.Stage, "STAGE_", stage, "--stage"),
        error_class=_enum_option(pb.ErrorClass, "ERROR_CLASS_", error_class, "--error-class"),
        category=category,
        page_size=min(limit, 1000),
    )
    if stalled:
        request.stalled = True
    found: list[pb.Document] = []
    while len(found) < limit:
        response = c.session.ListSessionDocuments(request, timeout=c.timeout)
        found.extend(response.documents)
        if not response.next_page_token:
            break
        request.page_token = response.next_page_token
    found = found[:limit]
    if as_json:
        print_json([_to_dict(d) for d in found])
        return
    table = Table(show_edge=False)
    for column in ("document", "path", "state", "stage", "attempts", "cost", "reason"):
        table.add_column(column, overflow="fold", no_wrap=column == "document")
    for d in found:
        reason = d.error_message or d.skip_reason
        state_text = doc_state(d.state) + (" (stalled)" if d.stalled else "")
        table.add_row(
            d.document_id,
            d.relative_path,
            state_text,
            stage_name(d.stage),
            str(d.attempts),
            format_money(_money(d.cost)),
            reason,
        )
    console.print(table)
    if len(found) == limit:
        console.print(f"[dim]showing the first {limit}; use --limit to see more[/]")


@handle_errors
def document(
    document_id: str = typer.Argument(..., help="The document id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """One document with every stage run: attempts, durations, errors, worker, artifacts."""
    c = clients()
    d = c.session.GetDocument(
        pb.GetDocumentRequest(document_id=document_id), timeout=c.timeout
    ).document
    if as_json:
        print_json(_to_dict(d))
        return
    console.print(f"[bold]{d.relative_path}[/]  document [cyan]{d.document_id}[/]")
    console.print(
        f"session {d.session_id}   state [bold]{doc_state(d.state)}[/]"
        + (" [yellow](stalled)[/]" if d.stalled else "")
        + f"   stage {stage_name(d.stage)}"
    )
    console.print(
        f"sha256 {d.sha256 or '-'}   {d.size_bytes:,} bytes   {d.page_count} pages   "
        f"category {d.category}   cost {format_money(_money(d.cost))}"
    )
    if d.error_message:
        console.print(
            f"[red]{_name(pb.ErrorClass, d.error_class, 'ERROR_CLASS_')} error:[/] {d.error_message}"
        )
    if d.skip_reason:
        console.print(f"skipped: {d.skip_reason}")
    table = Table(show_edge=False)
    for column in ("stage", "attempt", "state", "worker", "duration", "cost", "error / artifacts"):
        table.add_column(column, overflow="fold")
    for r in d.stage_runs:
        detail = r.error_message or ", ".join(a.uri for a in r.artifacts)
        if r.cache_hit:
            detail = "cache hit; " + detail
        duration = (
            f"{r.duration.ToTimedelta().total_seconds():.2f}s" if r.HasField("duration") else "-"
        )
        table.add_row(
            stage_name(r.stage),
            str(r.attempt),
            _name(pb.StageRunState, r.state, "STAGE_RUN_STATE_"),
            r.worker or "-",
            duration,
            format_money(_money(r.cost)) if r.HasField("cost") else "-",
            detail,
        )
    console.print(table)


@handle_errors
def retry(
    session_id: str = typer.Argument(..., help="The session id."),
    failed: bool = typer.Option(False, "--failed", help="Retry failed documents (retryable ones)."),
    stalled: bool = typer.Option(False, "--stalled", help="Retry stalled documents."),
    document_ids: list[str] = typer.Option(
        [], "--document", help="Retry this document; repeat for more."
    ),
    force: bool = typer.Option(False, "--force", help="Retry permanent failures too."),
) -> None:
    """Send failed or stalled documents through the pipeline again."""
    if not (failed or stalled or document_ids):
        raise fail("say what to retry: --failed, --stalled or --document ID", EXIT_USAGE)
    c = clients()
    response = c.session.RetryDocuments(
        pb.RetryDocumentsRequest(
            session_id=session_id,
            failed=failed,
            stalled=stalled,
            document_ids=document_ids,
            force=force,
        ),
        timeout=c.timeout,
    )
    console.print(
        f"retrying {response.retried:,} documents; session is "
        f"{session_state(response.session.state)}"
    )


def _lifecycle(method: str, request_type: Any, session_id: str) -> None:
    c = clients()
    response = getattr(c.session, method)(request_type(session_id=session_id), timeout=c.timeout)
    s = response.session
    console.print(
        f"session {s.session_id} is [bold]{session_state(s.state)}[/]"
        + (f" ({s.state_reason})" if s.state_reason else "")
    )


@handle_errors
def pause(session_id: str = typer.Argument(..., help="The session id.")) -> None:
    """Stop dispatching new work; running stages finish."""
    _lifecycle("PauseSession", pb.PauseSessionRequest, session_id)


@handle_errors
def resume(session_id: str = typer.Argument(..., help="The session id.")) -> None:
    """Resume a paused (or budget-exhausted) session."""
    _lifecycle("ResumeSession", pb.ResumeSessionRequest, session_id)


@handle_errors
def cancel(session_id: str = typer.Argument(..., help="The session id.")) -> None:
    """Cancel a session: nothing more is dispatched; its open documents are cancelled."""
    _lifecycle("CancelSession", pb.CancelSessionRequest, session_id)


_SEVERITY_STYLE = {pb.SEVERITY_ERROR: "red", pb.SEVERITY_WARNING: "yellow", pb.SEVERITY_INFO: "dim"}
_VERDICT_STYLE = {
    pb.VERDICT_PASS: "bold green",
    pb.VERDICT_WARN: "bold yellow",
    pb.VERDICT_FAIL: "bold red",
}


@handle_errors
def verify(
    session_id: str = typer.Argument(..., help="The session id."),
    shallow: bool = typer.Option(
        False, "--shallow", help="Check artifacts by size only (no re-hashing)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Verify a session: every file accounted for, artifacts, counters, costs. Exit 0 only on PASS."""
    c = clients()
    report = c.session.VerifySession(
        pb.VerifySessionRequest(session_id=session_id, deep=not shallow),
        timeout=max(c.timeout, 600),
    )
    if as_json:
        print_json(_to_dict(report))
    else:
        verdict = _name(pb.Verdict, report.verdict, "VERDICT_").upper()
        n = report.counts
        console.print(
            f"verification of session {session_id}: [{_VERDICT_STYLE.get(report.verdict, 'bold')}]"
            f"{verdict}[/]"
        )
        console.print(
            f"manifest files {n.manifest_files:,}: completed {n.completed:,}, skipped {n.skipped:,}, "
            f"failed {n.failed:,}, in progress {n.in_progress:,}, unaccounted {n.unaccounted:,}; "
            f"completeness {report.completeness_percent:.1f}%"
        )
        if report.HasField("actual_cost"):
            estimate = (
                f" (estimated {format_money(_money(report.estimated_cost))})"
                if report.HasField("estimated_cost")
                else ""
            )
            console.print(f"cost {format_money(_money(report.actual_cost))}{estimate}")
        for f in report.findings:
            label = _name(pb.Severity, f.severity, "SEVERITY_")
            console.print(
                f"[{_SEVERITY_STYLE.get(f.severity, '')}]{label:7}[/] {f.code}: {f.message}"
            )
        for r in report.recommendations:
            console.print(f"  -> {r}")
    if report.verdict != pb.VERDICT_PASS:
        raise typer.Exit(EXIT_FAILED)


def register(app: typer.Typer) -> None:
    """Adds this group's commands to the app."""
    app.command("import")(import_)
    app.command("watch")(watch)
    app.command("sessions")(sessions)
    app.command("status")(status)
    app.command("documents")(documents)
    app.command("document")(document)
    app.command("retry")(retry)
    app.command("pause")(pause)
    app.command("resume")(resume)
    app.command("cancel")(cancel)
    app.command("verify")(verify)


__all__ = ["WatchState", "explain", "follow", "register"]
