"""The artifact store: content-addressed outputs of stages, shared by every session.

Owns the artifacts the worker writes (extracted text, chunks, entities): one
JSON object per (source SHA-256, stage, processor version), at
`<root>/<sha256[:2]>/<sha256>/<stage>-<processor_version>.json`. Because the
key is the *input's* hash and the processor version, an identical file in
any session finds the output already there: a cache hit.

Writes never clobber: when two workers process identical files at once, the
first complete object wins and the second gets the winner's reference, so
every report names bytes that really are at its URI with its hash. Local
writes go to a temporary file in the target directory, are fsynced, and are
published with `os.link` (atomic, fails if the name exists); S3 writes are
conditional (`If-None-Match: *`) and carry the sha256 as object metadata so
a shallow verification can compare it without reading the body. The one
exception is `replace=True`, used by the runner when a cached artifact is
damaged (not JSON): the redone output overwrites it.

Durability: a put returns once its artifact would survive a crash, unless
it is given `durable=False`; then `sync()` makes every such put durable at
once, and nothing may name the artifact to anyone before it. The worker's
delivery thread stores a batch of runs' artifacts that way and calls
`sync()` once before it reports them: locally, one `syncfs(2)` of the
store's filesystem (Linux; the way PostgreSQL syncs its data directory at
recovery) instead of two fsyncs per file; elsewhere an fsync of each file
and its folder. S3 writes are durable when they return.

Two implementations: `LocalArtifactStore` (the default, a directory) and
`S3ArtifactStore` (boto3, optional). `open_store(url)` picks one. Checking an
artifact later is `services.common.artifacts.verify_artifact`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from services.common.artifacts import S3_SHA256_METADATA, file_uri, path_of, split_s3

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SAFE = re.compile(r"^[A-Za-z0-9._+-]+$")


@dataclass(frozen=True)
class ArtifactRef:
    """Where an artifact is and what it is: reported to the session service."""

    uri: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class StoredArtifact:
    ref: ArtifactRef
    data: bytes


class ArtifactStore(Protocol):
    url: str
    # True when reads and writes are billed requests (counted by `take_requests`).
    bills_requests: bool

    def take_requests(self) -> dict[tuple[str, str], int]:
        """Billable requests this thread made since the last call, by (service, operation)."""
        ...

    def get(self, sha256: str, stage: str, version: str) -> StoredArtifact | None: ...

    def put(
        self,
        sha256: str,
        stage: str,
        version: str,
        data: bytes,
        *,
        replace: bool = False,
        durable: bool = True,
    ) -> ArtifactRef: ...

    def sync(self, *, everything: bool = False) -> None:
        """Makes every earlier `put(durable=False)` of this process durable; `everything`:
        also those of other processes (another process's runs, adopted from the outbox)."""
        ...

    def versions(self, sha256: str, stage: str) -> list[str]: ...


def artifact_key(sha256: str, stage: str, version: str) -> str:
    """`ab/abcd.../extract-<version>.json`; ValueError on unsafe parts."""
    if not _SHA256.match(sha256):
        raise ValueError(f"not a lower-case hex SHA-256: {sha256!r}")
    for part in (stage, version):
        if not _SAFE.match(part):
            raise ValueError(f"unsafe artifact key part: {part!r}")
    return f"{sha256[:2]}/{sha256}/{stage}-{version}.json"


def _ref(uri: str, data: bytes) -> ArtifactRef:
    return ArtifactRef(uri=uri, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


class LocalArtifactStore:
    """Artifacts as files under a root directory."""

    bills_requests = False

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = file_uri(self.root)
        self._unsynced = _Unsynced()

    def take_requests(self) -> dict[tuple[str, str], int]:
        return {}

    def path(self, sha256: str, stage: str, version: str) -> Path:
        return self.root / artifact_key(sha256, stage, version)

    def get(self, sha256: str, stage: str, version: str) -> StoredArtifact | None:
        path = self.path(sha256, stage, version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return StoredArtifact(_ref(file_uri(path), data), data)

    def put(
        self,
        sha256: str,
        stage: str,
        version: str,
        data: bytes,
        *,
        replace: bool = False,
        durable: bool = True,
    ) -> ArtifactRef:
        """Publishes `data` unless a complete artifact is there (or `replace`: a damaged one);
        `durable=False` leaves the fsyncs to `sync()`."""
        path = self.path(sha256, stage, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
            os.chmod(temp, 0o644)
            if replace:
                os.replace(temp, path)
                temp = ""
            else:
                try:
                    os.link(temp, path)
                except FileExistsError:
                    existing = self.get(sha256, stage, version)
                    if existing is not None:
                        return existing.ref
                    os.replace(temp, path)  # vanished meanwhile: publish ours
                    temp = ""
        finally:
            if temp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
        if durable:
            _fsync_dir(path.parent)
        else:
            self._unsynced.add(path)
        return _ref(file_uri(path), data)

    def sync(self, *, everything: bool = False) -> None:
        """One syncfs of the store's filesystem for every put(durable=False) of this process
        since the last call (where the OS has it), else an fsync of each file and its folder
        (with `everything`, where syncfs is missing: a sync of every filesystem)."""
        paths = self._unsynced.take()
        if not paths and not everything:
            return
        if not _syncfs(self.root):
            if everything:
                os.sync()
            for path in paths:
                _fsync(path)
            for folder in {path.parent for path in paths}:
                _fsync_dir(folder)

    def versions(self, sha256: str, stage: str) -> list[str]:
        """Processor versions stored for (sha256, stage), newest file first."""
        folder = self.root / sha256[:2] / sha256
        prefix = f"{stage}-"
        try:
            entries = [
                e
                for e in os.scandir(folder)
                if e.name.startswith(prefix) and e.name.endswith(".json")
            ]
        except FileNotFoundError:
            return []
        entries.sort(key=lambda e: e.stat().st_mtime_ns, reverse=True)
        return [e.name[len(prefix) : -len(".json")] for e in entries]


def _syncfs(path: Path) -> bool:
    """syncfs(2) of the filesystem holding `path`; False where it is not available.

    Raises OSError when the sync itself fails (the data may not be on disk)."""
    syncfs = _libc_syncfs()
    if syncfs is None:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}", str(path))
    finally:
        os.close(fd)
    return True


@functools.cache
def _libc_syncfs() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        return None


class _Unsynced:
    """Paths put with durable=False and not yet synced, in this process (a task puts, its
    process's delivery thread syncs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: list[Path] = []

    def add(self, path: Path) -> None:
        with self._lock:
            self._paths.append(path)

    def take(self) -> list[Path]:
        with self._lock:
            paths, self._paths = self._paths, []
        return paths


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse to fsync a directory
        _fsync(path)


class S3ArtifactStore:
    """Artifacts as objects under s3://bucket/prefix (any S3-compatible store)."""

    bills_requests = True

    def __init__(self, url: str, client: Any = None) -> None:
        bucket, prefix = split_s3(url)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        if client is None:
            import boto3  # optional: the `aws` extra

            client = boto3.client("s3")
        self.client = client
        self._local = threading.local()

    def _count(self, operation: str) -> None:
        counts = self._local.__dict__.setdefault("counts", {})
        counts[("s3", operation)] = counts.get(("s3", operation), 0) + 1

    def take_requests(self) -> dict[tuple[str, str], int]:
        """GETs as get_request; PUTs and LISTs as put_request (S3 bills LIST at the PUT rate)."""
        counts = self._local.__dict__.pop("counts", {})
        return dict(counts)

    def _key(self, sha256: str, stage: str, version: str) -> str:
        key = artifact_key(sha256, stage, version)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def get(self, sha256: str, stage: str, version: str) -> StoredArtifact | None:
        from botocore.exceptions import ClientError

        key = self._key(sha256, stage, version)
        self._count("get_request")
        try:
            data = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return StoredArtifact(_ref(self._uri(key), data), data)

    def put(
        self,
        sha256: str,
        stage: str,
        version: str,
        data: bytes,
        *,
        replace: bool = False,
        durable: bool = True,
    ) -> ArtifactRef:
        """A conditional PUT (If-None-Match: *): the first complete object wins. It is durable
        when it returns, whatever `durable` says."""
        from botocore.exceptions import ClientError

        key = self._key(sha256, stage, version)
        ref = _ref(self._uri(key), data)
        self._count("put_request")
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType="application/json",
                Metadata={S3_SHA256_METADATA: ref.sha256},
                **({} if replace else {"IfNoneMatch": "*"}),
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if code not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise
            existing = self.get(sha256, stage, version)
            if existing is None:
                raise
            return existing.ref
        return ref

    def sync(self, *, everything: bool = False) -> None:
        """Nothing to do: S3 PUTs are durable when they return."""

    def versions(self, sha256: str, stage: str) -> list[str]:
        folder = self._key(sha256, stage, "x").rsplit("/", 1)[0] + "/"
        prefix = f"{folder}{stage}-"
        found: list[tuple[Any, str]] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            self._count("put_request")
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix) :]
                if name.endswith(".json") and "/" not in name:
                    found.append((item["LastModified"], name[: -len(".json")]))
        found.sort(reverse=True)
        return [version for _, version in found]


def open_store(url: str, *, s3_client: Any = None) -> ArtifactStore:
    """The store for `url`: file:///dir (or a plain path) or s3://bucket/prefix."""
    if url.startswith("s3://"):
        return S3ArtifactStore(url, client=s3_client)
    if url.startswith("file://"):
        return LocalArtifactStore(path_of(url))
    if "://" in url:
        raise ValueError(f"unsupported artifact store URL {url!r}: use file:// or s3://")
    return LocalArtifactStore(Path(url))
