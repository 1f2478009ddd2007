"""Artifact URIs and the check that an artifact exists and matches its hash.

Owns the two URI forms a stage artifact can have - `file:///abs/path` (the
local store) and `s3://bucket/key` (an S3-compatible store, via boto3) - and
`verify_artifact`, which the session service's verification calls for every
artifact a completed stage reported. The worker writes artifacts
(`services.worker.artifacts`); nothing here writes.

A shallow check proves the object exists with the reported size (and, on S3,
that the sha256 the writer stored as object metadata is the reported one); a
deep check re-reads and re-hashes it. Both are blocking: async callers run
them with `asyncio.to_thread`. boto3 is optional (the `aws` extra) and only
imported for s3:// URIs; its endpoint, region and credentials come from its
own configuration chain (`AWS_ENDPOINT_URL_S3`, `AWS_*`, instance roles).
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK = 1024 * 1024
# Object metadata key (x-amz-meta-sha256) under which the writer stores the hash.
S3_SHA256_METADATA = "sha256"


@dataclass(frozen=True)
class ArtifactCheck:
    """The outcome of checking one artifact; `code` is stable for findings."""

    ok: bool
    # ok | missing | size_mismatch | hash_mismatch | unreadable | unsupported_uri
    code: str
    message: str = ""


def file_uri(path: Path) -> str:
    """The file:// URI of an absolute path (percent-encoded)."""
    return path.resolve().as_uri()


def path_of(uri: str) -> Path:
    """The local path of a file:// URI; ValueError for any other scheme."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme != "file":
        raise ValueError(f"not a file:// URI: {uri!r}")
    return Path(urllib.request.url2pathname(parts.path))


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// URI; ValueError when malformed."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3://bucket/key URI: {uri!r}")
    return parts.netloc, parts.path.lstrip("/")


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify_artifact(
    uri: str,
    sha256: str,
    size_bytes: int | None = None,
    *,
    deep: bool = False,
    s3_client: Any = None,
) -> ArtifactCheck:
    """Checks that the artifact at `uri` exists (size) and, when deep, its SHA-256."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme == "file":
        return _verify_file(path_of(uri), sha256, size_bytes, deep)
    if scheme == "s3":
        return _verify_s3(uri, sha256, size_bytes, deep, s3_client)
    return ArtifactCheck(False, "unsupported_uri", f"cannot check {uri!r}: unknown scheme")


def _verify_file(path: Path, sha256: str, size_bytes: int | None, deep: bool) -> ArtifactCheck:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return ArtifactCheck(False, "missing", f"{path} does not exist")
    except OSError as exc:
        return ArtifactCheck(False, "unreadable", f"{path}: {os.strerror(exc.errno or 0) or exc}")
    if size_bytes is not None and size != size_bytes:
        return ArtifactCheck(
            False, "size_mismatch", f"{path} has {size} bytes, {size_bytes} reported"
        )
    if deep:
        try:
            actual = sha256_of_file(path)
        except OSError as exc:
            return ArtifactCheck(False, "unreadable", f"{path}: {exc}")
        if actual != sha256:
            return ArtifactCheck(
                False, "hash_mismatch", f"{path} hashes to {actual}, {sha256} reported"
            )
    return ArtifactCheck(True, "ok")


def _s3(client: Any) -> Any:
    if client is not None:
        return client
    import boto3  # optional: the `aws` extra

    return boto3.client("s3")


def _verify_s3(
    uri: str, sha256: str, size_bytes: int | None, deep: bool, client: Any
) -> ArtifactCheck:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        bucket, key = split_s3(uri)
    except ValueError as exc:
        return ArtifactCheck(False, "unsupported_uri", str(exc))
    s3 = _s3(client)
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return ArtifactCheck(False, "missing", f"{uri} does not exist")
        return ArtifactCheck(False, "unreadable", f"{uri}: {code or exc}")
    except BotoCoreError as exc:
        return ArtifactCheck(False, "unreadable", f"{uri}: {exc}")
    size = int(head.get("ContentLength", -1))
    if size_bytes is not None and size != size_bytes:
        return ArtifactCheck(
            False, "size_mismatch", f"{uri} has {size} bytes, {size_bytes} reported"
        )
    stored = head.get("Metadata", {}).get(S3_SHA256_METADATA)
    if stored is not None and stored != sha256:
        return ArtifactCheck(
            False, "hash_mismatch", f"{uri} was written with sha256 {stored}, {sha256} reported"
        )
    if deep:
        try:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"]
            digest = hashlib.sha256()
            for block in body.iter_chunks(CHUNK):
                digest.update(block)
        except (ClientError, BotoCoreError) as exc:
            return ArtifactCheck(False, "unreadable", f"{uri}: {exc}")
        if digest.hexdigest() != sha256:
            return ArtifactCheck(
                False, "hash_mismatch", f"{uri} hashes to {digest.hexdigest()}, {sha256} reported"
            )
    return ArtifactCheck(True, "ok")
