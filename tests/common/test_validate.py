"""services.common.validate: the generic checks of every request, on messages alone."""

from __future__ import annotations

import pytest
from docimport.cost.v1 import cost_service_pb2 as cpb
from docimport.session.v1 import session_service_pb2 as spb
from google.protobuf import duration_pb2, timestamp_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.common.validate import (
    DEFAULT_MAX_CHARS,
    DURATION_MAX_SECONDS,
    TIMESTAMP_MAX_SECONDS,
    TIMESTAMP_MIN_SECONDS,
    RequestValidator,
    Rules,
    field_name,
)

ID = "00000000-0000-0000-0000-000000000001"


def fields(validator: RequestValidator, message: object) -> dict[str, str]:
    return {v.field: v.description for v in validator.violations(message)}


def test_a_nul_anywhere_is_named_by_its_path() -> None:
    request = cpb.RecordCostsRequest(events=[
        cpb.CostEvent(session_id=ID, category="fine"),
        cpb.CostEvent(session_id=ID, category="a\x00b", unit_price={"amount": "1\x00"}),
    ])
    found = fields(RequestValidator(), request)
    assert set(found) == {"events[1].category", "events[1].unit_price.amount"}
    assert "NUL" in found["events[1].category"]
    retry = spb.RetryDocumentsRequest(session_id=ID, document_ids=[ID, "\x00"])
    assert set(fields(RequestValidator(), retry)) == {"document_ids[1]"}


def test_strings_are_capped_unless_a_service_allows_more() -> None:
    request = spb.ReportStageResultRequest(
        document_id="x" * (DEFAULT_MAX_CHARS + 1), error_message="y" * 10_000, worker="z" * DEFAULT_MAX_CHARS)
    assert set(fields(RequestValidator(), request)) == {"document_id", "error_message"}
    rules = Rules(max_chars={field_name(spb.ReportStageResultRequest, "error_message"): 10_000})
    assert set(fields(RequestValidator(rules), request)) == {"document_id"}
    with pytest.raises(KeyError):
        field_name(spb.ReportStageResultRequest, "no_such_field")


def test_enum_numbers_the_enum_does_not_define_are_refused() -> None:
    validator = RequestValidator()
    assert set(fields(validator, spb.ListSessionDocumentsRequest(stage=-3, state=99))) == {"stage", "state"}
    assert fields(validator, spb.ListSessionDocumentsRequest(stage=3, state=0)) == {}
    book = cpb.PriceBook(plan_rules=[cpb.PlanRule(plan=1), cpb.PlanRule(plan=1, stage=7)])
    assert set(fields(validator, cpb.PublishPriceBookRequest(price_book=book))) == {
        "price_book.plan_rules[1].stage"}


@pytest.mark.parametrize(("seconds", "nanos", "ok"), [
    (TIMESTAMP_MIN_SECONDS, 0, True), (TIMESTAMP_MAX_SECONDS, 999_999_999, True),
    (TIMESTAMP_MIN_SECONDS - 1, 0, False), (TIMESTAMP_MAX_SECONDS + 1, 0, False),
    (0, -1, False), (0, 10**9, False),
])
def test_timestamps_stay_in_the_range_protobuf_defines(seconds: int, nanos: int, ok: bool) -> None:
    request = spb.ListSessionsRequest(created_after=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))
    assert (fields(RequestValidator(), request) == {}) is ok


@pytest.mark.parametrize(("seconds", "nanos", "ok"), [
    (0, 0, True), (DURATION_MAX_SECONDS, 999_999_999, True), (DURATION_MAX_SECONDS + 1, 0, False),
    (-1, 0, False), (0, -1, False), (1, 10**9, False),
])
def test_durations_are_not_negative_nor_beyond_ten_thousand_years(seconds: int, nanos: int, ok: bool) -> None:
    request = spb.WatchSessionRequest(heartbeat_interval=duration_pb2.Duration(seconds=seconds, nanos=nanos))
    assert (fields(RequestValidator(), request) == {}) is ok


def test_entries_left_to_the_servicer_are_skipped_and_checkable_alone() -> None:
    rules = Rules(per_entry=frozenset({field_name(spb.ReportStageResultsRequest, "reports")}))
    validator = RequestValidator(rules)
    bad = spb.ReportStageResultRequest(document_id=ID, stage=-1, worker="w\x00")
    batch = spb.ReportStageResultsRequest(reports=[spb.ReportStageResultRequest(), bad])
    assert validator.checker(spb.ReportStageResultsRequest.DESCRIPTOR) is None
    assert fields(validator, batch) == {}
    assert {v.field for v in validator.violations(bad, "reports[1].")} == {
        "reports[1].stage", "reports[1].worker"}
    assert set(fields(RequestValidator(), batch)) == {"reports[1].stage", "reports[1].worker"}


def test_a_type_with_nothing_to_check_is_not_walked() -> None:
    validator = RequestValidator()
    assert validator.checker(spb.StageStats.DESCRIPTOR) is None
    assert validator.checker(cpb.GetPriceBookRequest.DESCRIPTOR) is None
    assert validator.checker(spb.GetSessionRequest.DESCRIPTOR) is not None


def test_a_check_raises_one_error_listing_a_bounded_number_of_problems() -> None:
    check = RequestValidator().checker(spb.RetryDocumentsRequest.DESCRIPTOR)
    assert check is not None
    request = spb.RetryDocumentsRequest(document_ids=["\x00"] * 100)
    with pytest.raises(InvalidArgument) as caught:
        check(request, request.SerializeToString())
    assert caught.value.omitted + len(caught.value.violations) == 100
    assert "more problems" in caught.value.message


reports = st.builds(
    spb.ReportStageResultRequest,
    document_id=st.text(max_size=40),
    stage=st.integers(-3, 6),
    worker=st.one_of(st.text(max_size=20), st.integers(4000, 4200).map(lambda n: "w" * n)),
    error_message=st.text(max_size=30),
    error_class=st.integers(-1, 4),
    attempt=st.integers(0, 2**31 - 1),
    duration=st.builds(duration_pb2.Duration, seconds=st.integers(-2, 2), nanos=st.integers(-2, 2)),
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(reports)
def test_the_body_shortcut_finds_exactly_what_a_full_walk_finds(report: spb.ReportStageResultRequest) -> None:
    """A short body without a 0 byte skips the strings: never a problem missed."""
    validator = RequestValidator()
    check = validator.checker(spb.ReportStageResultRequest.DESCRIPTOR)
    assert check is not None
    expected = {v.field for v in validator.violations(report)}
    try:
        check(report, report.SerializeToString())
        found: set[str] = set()
    except InvalidArgument as exc:
        found = {v.field for v in exc.violations}
    assert found == expected
