"""docimport-manifest: runs the manifest service from environment variables."""

from __future__ import annotations

import sys

from services.common.grpc_server import run_main
from services.manifest import server
from services.manifest.config import ManifestSettings


def main() -> int:
    return run_main("manifest", ManifestSettings, server.serve)


if __name__ == "__main__":
    sys.exit(main())
