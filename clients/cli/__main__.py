"""docimport: the command-line client (see `docimport --help`)."""

from __future__ import annotations

from clients.cli.app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
