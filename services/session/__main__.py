"""docimport-session: runs the session service from environment variables."""

from __future__ import annotations

import sys

from services.common.grpc_server import run_main
from services.session import server
from services.session.config import SessionSettings


def main() -> int:
    return run_main("session", SessionSettings, server.serve)


if __name__ == "__main__":
    sys.exit(main())
