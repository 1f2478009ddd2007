"""Worker test fixtures: the OCR engine is loaded once per session, and the
scanned deposition is OCR'd once and shared (it is the slow part)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.worker.processors.base import Deadline, Usage
from services.worker.processors.extract import Extractor
from services.worker.processors.ocr import RapidOcrEngine

from .helpers import SAMPLE_CASE


@pytest.fixture(scope="session")
def ocr_engine() -> RapidOcrEngine:
    engine = RapidOcrEngine(threads=0)
    engine.load()
    return engine


@pytest.fixture(scope="session")
def extractor(ocr_engine: RapidOcrEngine) -> Extractor:
    return Extractor(ocr_engine, dpi=200)


@pytest.fixture(scope="session")
def scanned(extractor: Extractor) -> dict[str, Any]:
    """The extract document of the scanned deposition, with usage and timing."""
    import time

    usage = Usage()
    started = time.monotonic()
    document = extractor.extract_path(
        SAMPLE_CASE / "discovery/scanned_deposition_excerpt.pdf",
        "ocr",
        extractor.context(usage, Deadline(600)),
    )
    return {"document": document, "usage": usage, "seconds": time.monotonic() - started}


@pytest.fixture
def case_copy(tmp_path: Path) -> Path:
    """A writable copy of the sample case, for tests that change files."""
    import shutil

    target = tmp_path / "case"
    shutil.copytree(SAMPLE_CASE, target)
    return target


@pytest.fixture
def fake_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake AWS credentials and region, for the moto emulators (moto never calls AWS)."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def s3(fake_aws: None) -> Iterator[Any]:
    """A moto S3 with one bucket."""
    import boto3
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="docimport-artifacts")
        yield client
