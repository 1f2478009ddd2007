"""CLI commands of the manifest group: `analyze`, `manifests`, `manifest show`.

Owns how a person scans a folder and reads manifests: `analyze` sends the
folder's absolute path (the service reads it, under its configured source
roots), shows a live progress bar from the AnalyzeSource stream (counted
in files, with the bytes hashed beside it: the scan learns each file's size
only when it reads it, so the time left is estimated from files), then the
summary (files, size, by type, by category, duplicates, problems, pages,
OCR pages, estimated cost by service), and with `-o` writes the
ExportManifest JSON. A retry after a dropped connection re-sends the same
request id, so the scan is not done twice.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import typer
from docimport.manifest.v1 import manifest_service_pb2 as pb
from google.protobuf import json_format
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from clients.cli.context import EXIT_FAILED, clients, console, fail, handle_errors, print_json
from services.common.convert import format_money

manifest_app = typer.Typer(help="Read manifests made by `docimport analyze`.", no_args_is_help=True)

_STATE = {v: k.removeprefix("MANIFEST_STATE_").lower() for k, v in pb.ManifestState.items()}
_PHASE = {v: k.removeprefix("SCAN_PHASE_").lower() for k, v in pb.ScanPhase.items()}


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _counts_table(title: str, counts: Any) -> Table:
    table = Table(title=title, title_justify="left", show_edge=False)
    table.add_column(title.split(" ")[-1])
    table.add_column("files", justify="right")
    table.add_column("size", justify="right")
    table.add_column("pages", justify="right")
    for c in counts:
        table.add_row(c.key or "-", f"{c.files:,}", _size(c.bytes), f"{c.pages:,}")
    return table


def render_summary(m: pb.Manifest) -> None:
    s = m.summary
    console.print(f"[bold]{m.case_name}[/]  manifest [cyan]{m.manifest_id}[/]  ({_STATE[m.state]})")
    console.print(f"source: {m.source_path}")
    if m.error:
        console.print(f"[red]error:[/] {m.error}")
    console.print(
        f"files: [bold]{s.file_count:,}[/] ({_size(s.total_bytes)}), importable {s.importable_count:,}, "
        f"duplicates {s.duplicate_count:,}, problems {s.problem_count:,}, excluded {s.excluded_count:,}, "
        f"e-mail attachments {s.attachment_count:,}")
    console.print(f"pages to process: [bold]{s.page_count:,}[/], of which need OCR: [bold]{s.ocr_page_count:,}[/]")
    console.print(_counts_table("by type", s.by_type))
    console.print(_counts_table("by category", s.by_category))
    if s.by_problem:
        console.print(_counts_table("problems by problem", s.by_problem))
    if s.HasField("estimated_total"):
        table = Table(title=f"estimated cost (price book v{s.price_book_version})", title_justify="left",
                      show_edge=False)
        table.add_column("service")
        table.add_column("amount", justify="right")
        for line in s.estimated_by_service:
            table.add_row(line.service, format_money(Decimal(line.amount.amount)))
        table.add_row("[bold]total[/]", f"[bold]{format_money(Decimal(s.estimated_total.amount))}[/]")
        console.print(table)
    else:
        console.print(f"[yellow]{s.pricing_note or 'not priced'}[/]")


def _export(manifest_id: str, output: Path) -> None:
    stub = clients().manifest
    with output.open("wb") as out:
        for chunk in stub.ExportManifest(pb.ExportManifestRequest(manifest_id=manifest_id)):
            out.write(chunk.data)
    console.print(f"manifest written to {output}")


@handle_errors
def analyze(
    path: Path = typer.Argument(..., help="The folder to scan (must be under the service's source roots)."),
    case: str = typer.Option(..., "--case", help="The case (matter) name."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Write the manifest JSON here."),
    exclude_type: list[str] = typer.Option(
        [], "--exclude-type", help="Type families to leave out, e.g. video,audio (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Glob of paths to leave out, e.g. '**/drafts/**'."),
    request_id: str = typer.Option("", "--request-id", help="Idempotency key (default: a new UUID)."),
) -> None:
    """Scan a folder into a priced manifest."""
    types = [t.strip() for value in exclude_type for t in value.split(",") if t.strip()]
    request = pb.AnalyzeSourceRequest(
        request_id=request_id or str(uuid.uuid4()), source_path=str(path.expanduser().absolute()),
        case_name=case, exclude_types=types, exclude_globs=exclude)
    manifest = None
    columns = (TextColumn("[bold]{task.fields[phase]:<8}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[files]}"), TextColumn("{task.fields[hashed]}"),
               TimeRemainingColumn(), TextColumn("[dim]{task.fields[current]}"))
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("scan", total=None, phase="starting", files="", hashed="", current="")
        for event in clients().manifest.AnalyzeSource(request):
            if event.HasField("manifest"):
                manifest = event.manifest
                break
            p = event.progress
            walking = p.phase == pb.SCAN_PHASE_WALKING  # files_seen still growing: no total yet
            bar.update(task, total=None if walking else p.files_seen, completed=p.files_done,
                       phase=_PHASE[p.phase], files=f"{p.files_done:,}/{p.files_seen:,} files",
                       hashed=f"{p.bytes_hashed / 2**20:,.1f} MiB hashed", current=p.current_path[-50:])
    if manifest is None:
        raise fail("the scan ended without a manifest", EXIT_FAILED)
    render_summary(manifest)
    if manifest.state == pb.MANIFEST_STATE_FAILED:
        raise typer.Exit(EXIT_FAILED)
    if output is not None:
        _export(manifest.manifest_id, output)


@handle_errors
def manifests(
    case: str = typer.Option("", "--case", help="Only this case."),
    limit: int = typer.Option(50, help="How many, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List manifests, newest first."""
    stub = clients().manifest
    found: list[pb.Manifest] = []
    token = ""
    while len(found) < limit:
        page = stub.ListManifests(pb.ListManifestsRequest(case_name=case, page_size=min(limit, 1000),
                                                          page_token=token), timeout=clients().timeout)
        found.extend(page.manifests)
        token = page.next_page_token
        if not token:
            break
    found = found[:limit]
    if as_json:
        print_json([json_format.MessageToDict(m) for m in found])
        return
    table = Table(show_edge=False)
    for column in ("manifest", "case", "state", "created", "files", "size", "importable", "estimate"):
        table.add_column(column)
    for m in found:
        s = m.summary
        estimate = format_money(Decimal(s.estimated_total.amount)) if s.HasField("estimated_total") else "unpriced"
        table.add_row(m.manifest_id, m.case_name, _STATE[m.state],
                      m.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M"), f"{s.file_count:,}",
                      _size(s.total_bytes), f"{s.importable_count:,}", estimate)
    console.print(table)


@manifest_app.command("show")
@handle_errors
def show(
    manifest_id: str = typer.Argument(..., help="The manifest id."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    files: bool = typer.Option(False, "--files", help="Also list the files with a problem or duplicate."),
) -> None:
    """Show a manifest's summary."""
    stub = clients().manifest
    manifest = stub.GetManifest(pb.GetManifestRequest(manifest_id=manifest_id), timeout=clients().timeout).manifest
    if as_json:
        print_json(json_format.MessageToDict(manifest, preserving_proto_field_name=True))
        return
    render_summary(manifest)
    if files:
        table = Table(title="files not imported", title_justify="left", show_edge=False)
        for column in ("path", "why"):
            table.add_column(column)
        token = ""
        while True:
            page = stub.ListManifestFiles(pb.ListManifestFilesRequest(
                manifest_id=manifest_id, importable=False, page_size=1000, page_token=token),
                timeout=clients().timeout)
            for f in page.files:
                why = (f.problem.message or f.exclusion_reason
                       or (f"duplicate of {f.duplicate_of_path}" if f.duplicate_of_path else "")
                       or ("attachment of its e-mail" if f.family_parent_file_id else ""))
                table.add_row(f.relative_path, why)
            token = page.next_page_token
            if not token:
                break
        console.print(table)


@manifest_app.command("export")
@handle_errors
def export(
    manifest_id: str = typer.Argument(..., help="The manifest id."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the JSON."),
) -> None:
    """Write a manifest as JSON (schema docimport-manifest/v1)."""
    _export(manifest_id, output)


def register(app: typer.Typer) -> None:
    """Adds this group's commands to the app."""
    app.command("analyze")(analyze)
    app.command("manifests")(manifests)
    app.add_typer(manifest_app, name="manifest")

