"""Malformed requests get precise answers from every service (issue 19), by example.

Garbage bodies (auth first, then INVALID_ARGUMENT), NUL characters, over-long
strings, out-of-range times and unknown enum numbers, errors that quote huge
values, and values inside page tokens, TOML price books and manifest JSON:
each against the real servers of `rpc_stack` over raw calls.
test_rpc_property.py generates such requests for every method; these are
the cases that were measured (or found by it) to fail.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import grpc
import pytest
from docimport.cost.v1 import cost_service_pb2 as cpb
from docimport.manifest.v1 import manifest_service_pb2 as mpb
from docimport.session.v1 import session_service_pb2 as spb
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from rpc_stack import METHODS, SCOPE_TOKENS, Method, Stack, stack  # noqa: F401 - the fixture

from services.common.errors import details_of

# Claims a 127-byte field 1 and ends after two bytes: no message decodes from it.
GARBAGE = b"\x0a\x7f\xff\xfe"
BY_NAME = {str(m): m for m in METHODS}


def token_for(method: Method) -> str:
    return SCOPE_TOKENS[min(method.scopes)]


def field_violations(error: grpc.aio.AioRpcError | None) -> set[str]:
    assert error is not None
    return {v.field for bad in details_of(error, error_details_pb2.BadRequest) for v in bad.field_violations}


async def ask(stack: Stack, method: str, request: Any, timeout: float = 10) -> Any:
    m = BY_NAME[method]
    return await stack.call(m, request.SerializeToString(), token_for(m), timeout)


def test_every_method_of_every_service_is_listed() -> None:
    assert len(METHODS) == len({m.path for m in METHODS}) >= 36
    assert {"SessionService.ReportStageResults", "CostService.WatchCosts",
            "ManifestService.ImportManifest"} <= set(BY_NAME)


@pytest.mark.parametrize("method", METHODS, ids=str)
async def test_garbage_is_refused_before_it_is_decoded_then_invalid(stack: Stack, method: Method) -> None:
    for token in (None, "not-a-token"):
        outcome = await stack.call(method, GARBAGE, token, 5)
        assert outcome.code == grpc.StatusCode.UNAUTHENTICATED, outcome
    wrong = [t for s, t in SCOPE_TOKENS.items() if s not in method.scopes]
    if wrong:
        outcome = await stack.call(method, GARBAGE, wrong[0], 5)
        assert outcome.code == grpc.StatusCode.PERMISSION_DENIED, outcome
    outcome = await stack.call(method, GARBAGE, token_for(method), 5)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert method.request_type.DESCRIPTOR.name in outcome.details


NUL = "a\x00b"
NUL_CASES = [
    ("SessionService.CreateSession", spb.CreateSessionRequest(
        manifest_id="00000000-0000-0000-0000-000000000001", project_name=NUL), "project_name"),
    ("SessionService.ListSessions", spb.ListSessionsRequest(project_name=NUL), "project_name"),
    ("SessionService.ListSessionDocuments", spb.ListSessionDocumentsRequest(
        session_id="00000000-0000-0000-0000-000000000001", category=NUL), "category"),
    ("SessionService.ReportStageStarted", spb.ReportStageStartedRequest(
        document_id="00000000-0000-0000-0000-000000000001", stage=1, attempt=1, task_id=NUL), "task_id"),
    ("CostService.ListCostEvents", cpb.ListCostEventsRequest(
        session_id="00000000-0000-0000-0000-000000000001", service=NUL), "service"),
    ("CostService.RecordCosts", cpb.RecordCostsRequest(events=[cpb.CostEvent(
        session_id="00000000-0000-0000-0000-000000000001", stage=1, attempt=1, service="local",
        operation="compute_second", units="1", kind=cpb.COST_KIND_ACTUAL, category=NUL)]),
     "events[0].category"),
    ("CostService.PublishPriceBook", cpb.PublishPriceBookRequest(price_book=cpb.PriceBook(
        name="b", description=NUL)), "price_book.description"),
    ("ManifestService.ListManifests", mpb.ListManifestsRequest(case_name=NUL), "case_name"),
    ("ManifestService.ListManifestFiles", mpb.ListManifestFilesRequest(
        manifest_id="00000000-0000-0000-0000-000000000001", category=NUL), "category"),
]


@pytest.mark.parametrize(("method", "request_", "field"), NUL_CASES, ids=[c[0] for c in NUL_CASES])
async def test_a_nul_character_is_refused_naming_its_field(stack: Stack, method: str, request_: Any,
                                                            field: str) -> None:
    outcome = await ask(stack, method, request_)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert field in field_violations(outcome.error)


def timestamp(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def duration(seconds: int, nanos: int = 0) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


DOC = "00000000-0000-0000-0000-000000000001"
RANGE_CASES = [
    ("SessionService.ListSessions", spb.ListSessionsRequest(created_after=timestamp(10**12)), "created_after"),
    ("SessionService.ListSessions", spb.ListSessionsRequest(created_after=timestamp(0, -5)), "created_after"),
    ("SessionService.ListSessions", spb.ListSessionsRequest(state=-3), "state"),
    ("SessionService.ListSessionDocuments", spb.ListSessionDocumentsRequest(session_id=DOC, stage=-3), "stage"),
    ("SessionService.ReportStageStarted", spb.ReportStageStartedRequest(
        document_id=DOC, stage=1, attempt=1, started_at=timestamp(-10**12)), "started_at"),
    ("SessionService.ReportStageResult", spb.ReportStageResultRequest(
        document_id=DOC, stage=1, attempt=1, succeeded=True, duration=duration(10**12)), "duration"),
    ("SessionService.ReportStageResult", spb.ReportStageResultRequest(
        document_id=DOC, stage=1, attempt=1, succeeded=True, duration=duration(-1)), "duration"),
    ("SessionService.GetPipelineOverview", spb.GetPipelineOverviewRequest(
        stall_after=duration(10**12)), "stall_after"),
    ("SessionService.WatchSession", spb.WatchSessionRequest(
        session_id=DOC, heartbeat_interval=duration(1, 2 * 10**9)), "heartbeat_interval"),
    ("CostService.RecordCosts", cpb.RecordCostsRequest(events=[cpb.CostEvent(
        session_id=DOC, stage=1, attempt=1, service="local", operation="compute_second", units="1",
        kind=cpb.COST_KIND_ACTUAL, occurred_at=timestamp(10**12))]), "events[0].occurred_at"),
    ("CostService.ListCostEvents", cpb.ListCostEventsRequest(session_id=DOC, kind=-3), "kind"),
    ("CostService.ReserveBudget", cpb.ReserveBudgetRequest(
        session_id=DOC, ttl=duration(10**12)), "ttl"),
    ("ManifestService.ListManifestFiles", mpb.ListManifestFilesRequest(manifest_id=DOC, problem=-3), "problem"),
]


@pytest.mark.parametrize(("method", "request_", "field"), RANGE_CASES,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(RANGE_CASES)])
async def test_out_of_range_times_and_unknown_enums_are_refused_naming_the_field(
        stack: Stack, method: str, request_: Any, field: str) -> None:
    outcome = await ask(stack, method, request_)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert field in field_violations(outcome.error)


async def test_huge_values_are_refused_with_a_short_answer(stack: Stack) -> None:
    huge = "x" * 1_000_000
    for method, request_, field in [
        ("SessionService.GetSession", spb.GetSessionRequest(session_id=huge), "session_id"),
        ("ManifestService.GetManifest", mpb.GetManifestRequest(manifest_id=huge), "manifest_id"),
        ("CostService.GetBudget", cpb.GetBudgetRequest(session_id=huge), "session_id"),
    ]:
        outcome = await ask(stack, method, request_)
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
        assert field in field_violations(outcome.error) and len(outcome.details) < 300


async def test_an_error_quotes_at_most_two_hundred_characters_of_a_value(stack: Stack) -> None:
    # Under the length cap, so the servicer's own check quotes it.
    outcome = await ask(stack, "ManifestService.GetManifest", mpb.GetManifestRequest(manifest_id="y" * 4000))
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert "y" * 200 in outcome.details and "y" * 201 not in outcome.details
    # A value allowed to be long (a price book's TOML) that the servicer cannot parse.
    toml = 'name = "x"\n' + "[[prices]]\n" + "z" * 1_000_000
    outcome = await ask(stack, "CostService.PublishPriceBook", cpb.PublishPriceBookRequest(toml=toml))
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert len(outcome.details.encode()) <= 800


def token(cursor: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(cursor).encode()).decode().rstrip("=")


CURSOR_CASES = [
    ("SessionService.ListSessions", "c", "9999-12-31T23:59:59-14:00"),
    ("SessionService.ListSessions", "c", "2026-01-01T00:00:00"),  # no offset: not one we issued
    ("SessionService.ListSessionDocuments", "o", 2**31),
    ("SessionService.ListSessionDocuments", "o", True),
    ("ManifestService.ListManifests", "c", "0001-01-01T00:00:00+14:00"),
    ("ManifestService.ListManifestFiles", "o", 2**70),
    ("CostService.ListCostEvents", "t", "0001-01-01T00:00:00+14:00"),
    ("CostService.ListCostEvents", "id", [[1]]),
    ("CostService.ListPriceBooks", "v", 2**31),
]


@pytest.mark.parametrize(("method", "key", "value"), CURSOR_CASES,
                         ids=[f"{m}-{k}-{i}" for i, (m, k, _) in enumerate(CURSOR_CASES)])
async def test_a_page_token_with_a_value_we_never_issue_is_refused(
        stack: Stack, method: str, key: str, value: Any) -> None:
    """An issued token with one value replaced: once INTERNAL (out of the column's range)."""
    m = BY_NAME[method]
    request = m.request_type()
    for name, given in stack.known["by_field"].items():
        if name in request.DESCRIPTOR.fields_by_name:
            setattr(request, name, given)
    request.page_token = token({**stack.known["cursors"][method], key: value})
    outcome = await ask(stack, method, request)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert field_violations(outcome.error) == {"page_token"}


async def test_text_inside_toml_and_manifest_json_follows_the_rules_of_every_request(stack: Stack) -> None:
    book = 'name = "a\\u0000b"\ndescription = "ok"\n[[prices]]\nservice = "local"\noperation = "op"\n' \
           'unit = "u"\nunit_price = "1"\ndescription = "' + "d" * 5000 + '"\n'
    outcome = await ask(stack, "CostService.PublishPriceBook", cpb.PublishPriceBookRequest(toml=book))
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert field_violations(outcome.error) == {"toml.name", "toml.prices[0].description"}
    document = json.loads(stack.manifest_json)
    document["case_name"] = "Seed\x00"
    document["files"][0]["category"] = "c\x00"
    outcome = await ask(stack, "ManifestService.ImportManifest", mpb.ImportManifestRequest(
        request_id="nul-import", manifest_json=json.dumps(document).encode()))
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert field_violations(outcome.error) == {"manifest_json.case_name", "manifest_json.files[0].category"}


async def test_deeply_nested_toml_json_and_tokens_are_refused(stack: Stack) -> None:
    deep = "[" * 5000 + "]" * 5000
    for method, request_, field in [
        ("CostService.PublishPriceBook", cpb.PublishPriceBookRequest(toml=f"a = {deep}"), "toml"),
        ("ManifestService.ImportManifest", mpb.ImportManifestRequest(
            request_id="deep-import", manifest_json=deep.encode()), "manifest_json"),
        ("SessionService.ListSessions", spb.ListSessionsRequest(
            page_token=base64.urlsafe_b64encode(deep[3000:7000].encode()).decode()), "page_token"),
    ]:
        outcome = await ask(stack, method, request_)
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
        assert field_violations(outcome.error) == {field}
