"""The artifact store (local and S3 via moto) and the shared artifact check."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest

from services.common.artifacts import path_of, verify_artifact
from services.worker.artifacts import LocalArtifactStore, S3ArtifactStore, artifact_key, open_store

SHA = hashlib.sha256(b"source").hexdigest()


def test_key_is_content_addressed_and_refuses_unsafe_parts() -> None:
    assert (
        artifact_key(SHA, "extract", "1.pdf1+rapidocr-1.4.4")
        == f"{SHA[:2]}/{SHA}/extract-1.pdf1+rapidocr-1.4.4.json"
    )
    for sha, stage, version in (("ABC", "extract", "1"), (SHA, "../x", "1"), (SHA, "chunk", "a/b")):
        with pytest.raises(ValueError):
            artifact_key(sha, stage, version)


def test_local_put_get_is_a_cache_hit_with_the_same_reference(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    assert store.get(SHA, "extract", "1") is None
    ref = store.put(SHA, "extract", "1", b'{"text":"hello"}')
    path = tmp_path / "artifacts" / SHA[:2] / SHA / "extract-1.json"
    assert path_of(ref.uri) == path and path.read_bytes() == b'{"text":"hello"}'
    assert ref.sha256 == hashlib.sha256(b'{"text":"hello"}').hexdigest() and ref.size_bytes == 16
    hit = store.get(SHA, "extract", "1")
    assert hit is not None and hit.ref == ref and hit.data == b'{"text":"hello"}'
    assert [p.name for p in path.parent.iterdir()] == ["extract-1.json"], (
        "no temporary file left behind"
    )
    assert store.take_requests() == {}


def test_local_put_never_clobbers_a_complete_artifact(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    first = store.put(SHA, "extract", "1", b"first")
    second = store.put(SHA, "extract", "1", b"second")
    assert second == first
    assert path_of(first.uri).read_bytes() == b"first"


def test_local_concurrent_writers_agree_on_one_artifact(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    refs: list[Any] = []
    barrier = threading.Barrier(8)

    def write(n: int) -> None:
        barrier.wait()
        refs.append(store.put(SHA, "chunk", "1", f"writer {n}".encode() * 1000))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({r.sha256 for r in refs}) == 1
    assert verify_artifact(refs[0].uri, refs[0].sha256, refs[0].size_bytes, deep=True).ok


def test_local_versions_newest_first(tmp_path: Path) -> None:
    import os

    store = LocalArtifactStore(tmp_path)
    assert store.versions(SHA, "extract") == []
    old = store.put(SHA, "extract", "old", b"1")
    store.put(SHA, "extract", "new", b"2")
    store.put(SHA, "chunk", "c+new", b"3")
    os.utime(path_of(old.uri), (1, 1))
    assert store.versions(SHA, "extract") == ["new", "old"]


def test_open_store_by_url(tmp_path: Path) -> None:
    assert isinstance(open_store(tmp_path.as_uri()), LocalArtifactStore)
    assert isinstance(open_store(str(tmp_path)), LocalArtifactStore)
    with pytest.raises(ValueError):
        open_store("ftp://example/x")


def test_verify_local_artifact(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    ref = store.put(SHA, "entities", "1", b"entities")
    assert verify_artifact(ref.uri, ref.sha256, ref.size_bytes).code == "ok"
    assert verify_artifact(ref.uri, ref.sha256, ref.size_bytes, deep=True).code == "ok"
    assert verify_artifact(ref.uri, ref.sha256, 3).code == "size_mismatch"
    path_of(ref.uri).write_bytes(b"ENTITIES")  # same size, other bytes
    assert verify_artifact(ref.uri, ref.sha256, ref.size_bytes).ok  # a shallow check cannot tell
    assert verify_artifact(ref.uri, ref.sha256, ref.size_bytes, deep=True).code == "hash_mismatch"
    path_of(ref.uri).unlink()
    assert verify_artifact(ref.uri, ref.sha256).code == "missing"
    assert verify_artifact("gopher://x/y", ref.sha256).code == "unsupported_uri"


def test_s3_store_put_get_versions_and_no_clobber(s3: Any) -> None:
    store = S3ArtifactStore("s3://docimport-artifacts/run1", client=s3)
    assert store.get(SHA, "extract", "1") is None
    ref = store.put(SHA, "extract", "1", b'{"text":"x"}')
    assert ref.uri == f"s3://docimport-artifacts/run1/{SHA[:2]}/{SHA}/extract-1.json"
    head = s3.head_object(Bucket="docimport-artifacts", Key=f"run1/{SHA[:2]}/{SHA}/extract-1.json")
    assert head["Metadata"]["sha256"] == ref.sha256
    hit = store.get(SHA, "extract", "1")
    assert hit is not None and hit.ref == ref
    assert store.put(SHA, "extract", "1", b"other bytes") == ref  # If-None-Match: the first wins
    store.put(SHA, "chunk", "c+1", b"chunks")
    assert store.versions(SHA, "extract") == ["1"]
    counts = store.take_requests()
    assert counts == {("s3", "get_request"): 3, ("s3", "put_request"): 4}
    assert store.take_requests() == {}


def test_verify_s3_artifact(s3: Any) -> None:
    store = S3ArtifactStore("s3://docimport-artifacts", client=s3)
    ref = store.put(SHA, "extract", "1", b"text")
    assert verify_artifact(ref.uri, ref.sha256, ref.size_bytes, s3_client=s3).ok
    assert verify_artifact(ref.uri, ref.sha256, ref.size_bytes, deep=True, s3_client=s3).ok
    assert verify_artifact(ref.uri, "0" * 64, ref.size_bytes, s3_client=s3).code == "hash_mismatch"
    assert verify_artifact(ref.uri, ref.sha256, 99, s3_client=s3).code == "size_mismatch"
    missing = ref.uri.replace("extract-1", "extract-2")
    assert verify_artifact(missing, ref.sha256, s3_client=s3).code == "missing"
    # Bytes replaced behind the store's back (no metadata): only a deep check sees it.
    key = ref.uri.removeprefix("s3://docimport-artifacts/")
    s3.put_object(Bucket="docimport-artifacts", Key=key, Body=b"TEXT")
    assert verify_artifact(ref.uri, ref.sha256, ref.size_bytes, s3_client=s3).ok
    assert (
        verify_artifact(ref.uri, ref.sha256, ref.size_bytes, deep=True, s3_client=s3).code
        == "hash_mismatch"
    )
