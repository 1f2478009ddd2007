"""services.common.errors: status numbers to codes, and errors that fit a trailer however big the input."""

from __future__ import annotations

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2

from services.common.errors import (
    MAX_MESSAGE_BYTES,
    MAX_STATUS_BYTES,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
    quote,
    status_code,
    to_status,
)


def test_every_google_rpc_code_maps_to_its_grpc_status_code() -> None:
    for code in grpc.StatusCode:
        assert status_code(getattr(code_pb2, code.name)) is code


def test_a_number_grpc_does_not_define_is_unknown() -> None:
    assert status_code(999) is grpc.StatusCode.UNKNOWN


def _trailer_bytes(error: DomainError) -> tuple[int, int]:
    """UTF-8 bytes of the status message and of the whole google.rpc.Status sent for `error`."""
    status = to_status(error)
    [(_, packed)] = [(k, v) for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    return len(status.details.encode()), len(status_pb2.Status.FromString(packed).SerializeToString())


def test_a_value_is_quoted_with_at_most_two_hundred_characters() -> None:
    assert quote("abc") == "'abc'"
    quoted = quote("x" * 1_000_000)
    assert "x" * 200 in quoted and "x" * 201 not in quoted and "1,000,000 characters" in quoted
    assert len(quote(list(range(10_000)))) < 250


def test_a_huge_error_still_fits_a_trailer() -> None:
    huge = "\U0001f4a9" * 1_000_000  # 4 UTF-8 bytes each
    for error in (
        InvalidArgument.field(huge, huge),
        InvalidArgument(violations=[FieldViolation(f"f{i}" + huge[:300], huge[:1000]) for i in range(500)]),
        NotFound("session", huge),
        FailedPrecondition(huge, subject=huge),
        ResourceExhausted(huge, violations=[QuotaViolation(huge, huge)] * 100),
    ):
        message, status = _trailer_bytes(error)
        assert message <= MAX_MESSAGE_BYTES and status <= MAX_STATUS_BYTES, type(error)


def test_problems_beyond_what_fits_are_counted() -> None:
    error = InvalidArgument(violations=[FieldViolation(f"items[{i}].key", "is required") for i in range(300)],
                            omitted=700)
    [bad] = [d for d in error.details() if isinstance(d, error_details_pb2.BadRequest)]
    listed = [v for v in bad.field_violations if v.field]
    more = f"... and {1000 - len(listed):,} more problems"
    assert 10 < len(listed) < 300 and bad.field_violations[-1].description == more
    assert error.message.endswith(more)
