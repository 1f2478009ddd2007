"""Settings of the manifest service (environment variables `DOCIMPORT_*`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import field_validator
from pydantic_settings import NoDecode
from typing_extensions import Annotated

from services.common.config import ServiceSettings


class ManifestSettings(ServiceSettings):
    """`DOCIMPORT_PORT` defaults to 50061 for this service."""

    port: int = 50061
    # Directories a scan may read, separated by ':' (like PATH). Nothing
    # outside them is ever read.
    source_roots: Annotated[tuple[Path, ...], NoDecode] = ()
    # Processes hashing and counting pages; 0 = one per core.
    scan_workers: int = 0
    # Files larger than this are listed with problem too_large.
    max_file_bytes: int = 20 * 1024**3
    # Scans running at once in this process; more wait their turn.
    max_concurrent_scans: int = 2
    # When the service runs as root: the reading processes drop to this
    # user and group, so file permissions apply to scans.
    scan_uid: int | None = None
    scan_gid: int | None = None
    # Category table, JSON: {"pleadings": ["complaints", "motions"], ...}
    # (folder-name aliases); unset = the built-in table of classify.py.
    categories: dict[str, list[str]] | None = None
    # Processing priority per category, JSON: {"pleadings": 10, ...}; lower runs first.
    category_priorities: dict[str, int] = {}

    @field_validator("source_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(Path(p) for p in value.split(":") if p)
        return value
