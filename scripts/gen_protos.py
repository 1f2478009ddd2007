"""Generates the Python gRPC code of every proto under protos/, in place.

The proto package equals the Python import path (`docimport.session.v1`), so
protoc's absolute imports resolve unchanged and nothing is rewritten. The
output is committed; CI runs this script and fails on any diff
(`make check-protos`). Run with the pinned grpcio-tools of the lock file:
stubs made by a newer generator refuse to import on an older grpcio.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def main() -> int:
    package_root = PROTOS / "docimport"
    for old in package_root.rglob("*"):
        if old.is_file() and old.name.endswith(GENERATED_SUFFIXES):
            old.unlink()
    for cache in package_root.rglob("__pycache__"):
        shutil.rmtree(cache)
    sources = sorted(str(p.relative_to(PROTOS)) for p in package_root.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={PROTOS}",
            f"--pyi_out={PROTOS}",
            f"--grpc_python_out={PROTOS}",
            *sources,
        ]
    )
    if code != 0:
        print("protoc failed", file=sys.stderr)
        return code
    for directory in {package_root, *(p for p in package_root.rglob("*") if p.is_dir())}:
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text("")
    print(f"generated {len(sources)} proto files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
