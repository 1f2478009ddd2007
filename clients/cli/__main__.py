"""docimport: the command-line client (see `docimport --help`)."""

from __future__ import annotations

from clients.cli.app import app
from services.common import telemetry


def main() -> None:
    telemetry.configure("docimport-cli")  # only when OTEL_EXPORTER_OTLP_ENDPOINT is set
    app()


if __name__ == "__main__":
    main()
