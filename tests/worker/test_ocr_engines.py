"""OCR engines: the Textract adapter against moto, tesseract when installed, engine selection."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image, ImageDraw, ImageFont

from services.worker.processors.base import Deadline, PermanentError, RetryableError, Usage
from services.worker.processors.extract import Extractor
from services.worker.processors.ocr import (
    RapidOcrEngine,
    TesseractEngine,
    TextractEngine,
    _boxes_to_text,
    select_engine,
)

from .helpers import SAMPLE_CASE


@pytest.fixture
def textract(fake_aws: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A moto Textract whose DetectDocumentText answers two lines per page."""
    import boto3
    from moto import mock_aws
    from moto.textract.models import TextractBackend

    monkeypatch.setattr(
        TextractBackend,
        "BLOCKS",
        [
            {"BlockType": "PAGE", "Id": "p"},
            {"BlockType": "LINE", "Id": "l1", "Text": "Q. Was she in the crosswalk?"},
            {"BlockType": "WORD", "Id": "w1", "Text": "Q."},
            {"BlockType": "LINE", "Id": "l2", "Text": "A. I think so."},
        ],
    )
    with mock_aws():
        yield boto3.client("textract", region_name="us-east-1")


def test_textract_adapter_reads_lines_and_bills_pages(textract: Any) -> None:
    engine = select_engine("textract", textract_client=textract)
    assert isinstance(engine, TextractEngine) and engine.service == "aws_textract"
    extractor = Extractor(engine, dpi=100)
    usage = Usage()
    document = extractor.extract_path(
        SAMPLE_CASE / "discovery/scanned_deposition_excerpt.pdf",
        "ocr",
        extractor.context(usage, Deadline(60)),
    )
    assert usage.ocr_pages == {"aws_textract": 2}
    assert [p["source"] for p in document["pages"]] == ["ocr", "ocr"]
    assert document["text"].count("Q. Was she in the crosswalk?\nA. I think so.") == 2
    assert "+textract-1" in extractor.version("ocr")


class _Refusing:
    def __init__(self, code: str) -> None:
        self.code = code

    def detect_document_text(self, **kwargs: Any) -> Any:
        from botocore.exceptions import ClientError

        raise ClientError({"Error": {"Code": self.code, "Message": "no"}}, "DetectDocumentText")


@pytest.mark.parametrize(
    ("code", "error", "error_code"),
    [
        ("ThrottlingException", RetryableError, "ocr_failed"),
        ("ProvisionedThroughputExceededException", RetryableError, "ocr_failed"),
        ("UnsupportedDocumentException", PermanentError, "ocr_rejected"),
        ("BadDocumentException", PermanentError, "ocr_rejected"),
    ],
)
def test_textract_errors_are_classified(code: str, error: type, error_code: str) -> None:
    engine = TextractEngine(client=_Refusing(code))
    with pytest.raises(error) as caught:
        engine.recognize(Image.new("L", (50, 50), 255))
    assert caught.value.code == error_code


@pytest.mark.skipif(not TesseractEngine.available(), reason="tesseract is not installed")
def test_tesseract_engine_reads_a_page() -> None:
    engine = select_engine("tesseract")
    assert isinstance(engine, TesseractEngine) and engine.version != "unknown"
    image = Image.new("L", (1200, 300), 255)
    ImageDraw.Draw(image).text(
        (40, 100), "Officer Delgado testified", font=ImageFont.load_default(size=60), fill=0
    )
    assert "Officer Delgado" in engine.recognize(image)


def test_engine_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_engine("none") is None
    assert isinstance(select_engine("auto"), RapidOcrEngine)
    monkeypatch.setattr(RapidOcrEngine, "available", staticmethod(lambda: False))
    monkeypatch.setattr(
        TesseractEngine, "available", staticmethod(lambda command="tesseract": False)
    )
    assert select_engine("auto") is None
    with pytest.raises(RuntimeError):
        select_engine("rapidocr")
    with pytest.raises(RuntimeError):
        select_engine("tesseract")


def test_versions_name_the_engine_only_where_ocr_can_happen(ocr_engine: RapidOcrEngine) -> None:
    with_ocr, without = Extractor(ocr_engine), Extractor(None)
    assert with_ocr.version("docx") == without.version("docx")
    assert with_ocr.version("text") == without.version("text")
    assert with_ocr.version("ocr") != without.version("ocr")
    assert f"rapidocr-{ocr_engine.version}" in with_ocr.version("text_layer")


def test_boxes_become_lines_in_reading_order() -> None:
    boxes = [
        (100.0, 130.0, 300.0, "world"),
        (12.0, 40.0, 10.0, "Title"),
        (102.0, 128.0, 20.0, "1"),
        (101.0, 131.0, 60.0, "hello"),
        (160.0, 190.0, 20.0, "2"),
    ]
    assert _boxes_to_text(boxes) == "Title\n1 hello world\n2"
