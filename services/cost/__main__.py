"""docimport-cost: runs the cost service from environment variables."""

from __future__ import annotations

import sys

from services.common.grpc_server import run_main
from services.cost import server
from services.cost.config import CostSettings


def main() -> int:
    return run_main("cost", CostSettings, server.serve)


if __name__ == "__main__":
    sys.exit(main())
