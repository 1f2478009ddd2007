"""The `docimport` command: one typer app that gathers every command group.

Owns the top-level help and the order commands are listed in. Each module of
`clients/cli/commands/` defines `register(app)` and owns its commands.
"""

from __future__ import annotations

import typer

from clients.cli.commands import cost, demo, dev, manifest, session, top

app = typer.Typer(
    name="docimport",
    help=(
        "Import a legal case's client files into the document pipeline, and know "
        "at every moment what happened to each file and what it cost.\n\n"
        "Typical flow:\n\n"
        "  docimport dev up                       # a local stack (or point DOCIMPORT_*_ADDR at yours)\n\n"
        "  docimport analyze ./client-files --case 'Smith v. Jones' -o manifest.json\n\n"
        "  docimport import manifest.json --budget 250 --watch\n\n"
        "  docimport verify SESSION"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

for module in (manifest, session, cost, top, dev, demo):
    module.register(app)
