"""CLI commands of the cost group: `docimport prices`, `prices publish`, `costs`.

Owns only the presentation of the cost service's answers: tables rendered
with rich, or the answers as JSON (`--json`, amounts as exact decimal
strings). Amounts are rounded for display only: cents for amounts of a cent
or more, eight decimals below (a $0.0015 page shows as such). The work is
the cost service's; errors go through `handle_errors`.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import grpc
import typer
from docimport.cost.v1 import cost_service_pb2 as pb
from docimport.session.v1 import session_service_pb2 as spb
from google.protobuf.json_format import MessageToDict
from rich.table import Table

from clients.cli.context import EXIT_USAGE, clients, console, fail, handle_errors, print_json
from services.common import convert

prices_app = typer.Typer(
    help="The price book: the current version as a table, or publish a new version.",
    invoke_without_command=True,
    no_args_is_help=False,
)


def usd(amount: str | Decimal) -> str:
    """For display: $1,234.57; under a cent up to 8 decimals ($0.0015)."""
    value = Decimal(amount or "0")
    if value == 0:
        return "$0.00"
    if abs(value) >= Decimal("0.01"):
        return convert.format_money(value)
    quantized = value.quantize(Decimal("1e-8"))
    if not quantized:
        return "<$0.00000001"
    return f"${format(quantized.normalize(), 'f')}"


def _number(text: str) -> str:
    if not text:
        return ""
    value = Decimal(text)
    return f"{value:,}" if value == value.to_integral_value() else format(value.normalize(), "f")


def _dict(message) -> dict:  # type: ignore[no-untyped-def]
    return MessageToDict(message, preserving_proto_field_name=True)


def _book_tables(book: pb.PriceBook, *, rules: bool) -> None:
    published = book.published_at.ToDatetime().strftime("%Y-%m-%d %H:%M UTC")
    console.print(f"[bold]Price book v{book.version}[/] — {book.name}  (published {published})")
    if book.description:
        console.print(book.description)
    table = Table()
    table.add_column("service", no_wrap=True)
    table.add_column("operation", no_wrap=True)
    table.add_column("unit", no_wrap=True)
    table.add_column("unit price", justify="right", no_wrap=True)
    table.add_column("description", ratio=1)
    for price in book.prices:
        table.add_row(price.service, price.operation, price.unit, f"${price.unit_price.amount}",
                      price.description)
    console.print(table)
    if not rules:
        console.print(f"{len(book.plan_rules)} plan rules; show them with --rules.")
        return
    rule_table = Table(title="Plan rules: units of an operation per basis unit of a file")
    for column in ("plan", "stage", "service", "operation", "per", "units"):
        rule_table.add_column(column, justify="right" if column == "units" else "left")
    for rule in book.plan_rules:
        rule_table.add_row(convert.plan_name(rule.plan), convert.stage_name(rule.stage), rule.service,
                           rule.operation, rule.basis, rule.units_per)
    console.print(rule_table)


@prices_app.callback()
@handle_errors
def prices(
    ctx: typer.Context,
    version: int = typer.Option(0, "--version", "-v", help="A published version (default: the current one)."),
    rules: bool = typer.Option(False, "--rules", help="Also list the plan rules."),
    as_json: bool = typer.Option(False, "--json", help="Print the price book as JSON."),
) -> None:
    """Show the price book in force (or a given version)."""
    if ctx.invoked_subcommand is not None:
        return
    c = clients()
    reply = c.cost.GetPriceBook(pb.GetPriceBookRequest(version=version), timeout=c.timeout)
    if as_json:
        print_json(_dict(reply.price_book))
        return
    _book_tables(reply.price_book, rules=rules)


@prices_app.command("publish")
@handle_errors
def publish(
    file: Path = typer.Argument(..., help="A price book in the TOML format of services/cost/pricebook.toml."),
    request_id: str = typer.Option("", "--request-id", help="Publish once even if run again with this id."),
    as_json: bool = typer.Option(False, "--json", help="Print the published book as JSON."),
) -> None:
    """Publish FILE as a new price book version (published versions never change)."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read {file}: {exc}", EXIT_USAGE) from None
    c = clients()
    reply = c.cost.PublishPriceBook(pb.PublishPriceBookRequest(request_id=request_id, toml=text),
                                    timeout=c.timeout)
    if as_json:
        print_json(_dict(reply.price_book))
        return
    console.print(f"published price book version [bold]{reply.price_book.version}[/]")
    _book_tables(reply.price_book, rules=False)


def _totals_table(title: str, totals, *, key: str, units: bool = False) -> Table:  # type: ignore[no-untyped-def]
    table = Table(title=title, title_justify="left")
    table.add_column(key)
    if units:
        table.add_column("units", justify="right")
    table.add_column("amount", justify="right")
    table.add_column("events", justify="right")
    for total in totals:
        label = total.key or "(none)"
        if key == "stage":
            label = convert.stage_name(total.stage) or "(no stage)"
        row = [label]
        if units:
            row.append(_number(total.units))
        row += [usd(total.amount.amount), f"{total.event_count:,}"]
        table.add_row(*row)
    return table


@handle_errors
def costs(
    session: str = typer.Argument(..., help="The session id."),
    top: int = typer.Option(10, "--top", help="How many of the most expensive documents to list."),
    as_json: bool = typer.Option(False, "--json", help="Print the costs (and budget) as JSON."),
) -> None:
    """What a session cost: by service, operation and stage, against the estimate, with cache
    savings, what was spent on lost or cancelled attempts, and its budget."""
    c = clients()
    # The session service knows the session (an unknown id is an error, not "no costs") and
    # what of its cost went to attempts that were lost or cancelled.
    wasted = c.session.GetSession(
        spb.GetSessionRequest(session_id=session), timeout=c.timeout
    ).session.wasted_cost.amount
    reply = c.cost.GetSessionCosts(pb.GetSessionCostsRequest(session_id=session, top_documents=top),
                                   timeout=c.timeout)
    budget = None
    try:
        budget = c.cost.GetBudget(pb.GetBudgetRequest(session_id=session), timeout=c.timeout).budget
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
            raise
    if as_json:
        print_json({"costs": _dict(reply), "wasted": wasted or "0",
                    "budget": _dict(budget) if budget is not None else None})
        return
    _show_costs(reply, budget, Decimal(wasted or "0"))


def register(app: typer.Typer) -> None:
    """Adds this group's commands to the app."""
    app.add_typer(prices_app, name="prices")
    app.command("costs")(costs)


def _show_costs(reply: pb.GetSessionCostsResponse, budget: pb.Budget | None,
                wasted: Decimal = Decimal(0)) -> None:
    actual, estimate = Decimal(reply.actual_total.amount), Decimal(reply.estimate_total.amount)
    console.print(f"[bold]Costs of session {reply.session_id}[/]")
    line = f"actual [bold]{usd(actual)}[/]   estimate {usd(estimate)}"
    if estimate:
        line += f" ({actual / estimate:.0%} of the estimate)"
    console.print(line)
    if wasted:
        console.print(f"of it spent on lost or cancelled attempts: [yellow]{usd(wasted)}[/] "
                      "(runs whose worker died, or whose session was cancelled while they ran)")
    versions = ", ".join(f"v{v}" for v in reply.price_book_versions) or "none"
    console.print(f"{reply.event_count:,} cost events; price books {versions}; cache hits "
                  f"{reply.cache_hits:,} saved {usd(reply.cache_savings.amount)}")
    if not reply.event_count and not estimate:
        console.print("No costs recorded yet.")
    if reply.by_operation:
        console.print(_totals_table("By service and operation", reply.by_operation, key="service/operation",
                                    units=True))
    if reply.by_stage:
        console.print(_totals_table("By stage", reply.by_stage, key="stage"))
    if reply.by_category:
        console.print(_totals_table("By category", reply.by_category, key="category"))
    if reply.estimate_by_service or reply.by_service:
        table = Table(title="Estimate against actual, by service", title_justify="left")
        for column in ("service", "estimate", "actual", "difference"):
            table.add_column(column, justify="left" if column == "service" else "right")
        estimated = {t.key: Decimal(t.amount.amount) for t in reply.estimate_by_service}
        spent = {t.key: Decimal(t.amount.amount) for t in reply.by_service}
        for service in sorted(set(estimated) | set(spent)):
            e, a = estimated.get(service, Decimal(0)), spent.get(service, Decimal(0))
            sign = "+" if a - e > 0 else "-" if a - e < 0 else ""
            table.add_row(service, usd(e), usd(a), f"{sign}{usd(abs(a - e))}")
        table.add_row("[bold]total[/]", usd(estimate), usd(actual),
                      f"{'+' if actual > estimate else '-' if actual < estimate else ''}{usd(abs(actual - estimate))}")
        console.print(table)
    if reply.top_documents:
        table = Table(title="Most expensive documents", title_justify="left")
        table.add_column("document")
        table.add_column("category")
        table.add_column("amount", justify="right")
        for doc in reply.top_documents:
            table.add_row(doc.document_id, doc.category, usd(doc.amount.amount))
        console.print(table)
    if budget is not None:
        table = Table(title="Budget", title_justify="left")
        for column in ("limit", "reserved", "spent", "remaining", "overrun"):
            table.add_column(column, justify="right")
        table.add_row(usd(budget.limit.amount), usd(budget.reserved.amount), usd(budget.spent.amount),
                      usd(budget.remaining.amount), usd(budget.overrun.amount))
        console.print(table)
