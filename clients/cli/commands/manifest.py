"""CLI commands of the manifest group (placeholder until built)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds this group's commands to the app."""
