"""Scopes of the cost service: who may call what."""

from __future__ import annotations

import grpc
import pytest
from docimport.cost.v1 import cost_service_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.auth import Scope
from services.cost.servicer import POLICY, SERVICE_FULL_NAME

from .conftest import CostHarness
from .helpers import event, granted, new_id, usd

OP, SVC, WK = Scope.OPERATOR, Scope.SERVICE, Scope.WORKER


def test_policy_lists_scopes_per_method() -> None:
    expected = {
        "GetPriceBook": {OP, SVC}, "ListPriceBooks": {OP, SVC}, "EstimateCost": {OP, SVC},
        "RecordCosts": {WK, SVC}, "GetSessionCosts": {OP, SVC}, "ListCostEvents": {OP, SVC},
        "WatchCosts": {OP, SVC}, "SetBudget": {OP, SVC}, "GetBudget": {OP, SVC},
        "ReserveBudget": {SVC}, "SettleReservation": {SVC}, "ReleaseReservation": {SVC},
    }
    assert POLICY == {f"/{SERVICE_FULL_NAME}/{m}": frozenset(s) for m, s in expected.items()}
    methods = pb.DESCRIPTOR.services_by_name["CostService"].methods_by_name
    assert set(expected) | {"PublishPriceBook"} == set(methods)  # PublishPriceBook: operators only


@pytest.mark.parametrize(
    ("scope", "call", "allowed"),
    [
        ("worker", "RecordCosts", True),
        ("operator", "RecordCosts", False),
        ("worker", "SetBudget", False),
        ("operator", "ReserveBudget", False),
        ("worker", "GetSessionCosts", False),
        ("service", "PublishPriceBook", False),
        ("operator", "PublishPriceBook", True),
    ],
)
async def test_scopes_are_enforced(cost: CostHarness, scope: str, call: str, allowed: bool) -> None:
    requests = {
        "RecordCosts": pb.RecordCostsRequest(events=[granted(event(new_id(), document_id=new_id()))]),
        "SetBudget": pb.SetBudgetRequest(session_id=new_id(), limit=usd("1")),
        "ReserveBudget": pb.ReserveBudgetRequest(session_id=new_id()),
        "GetSessionCosts": pb.GetSessionCostsRequest(session_id=new_id()),
        "PublishPriceBook": pb.PublishPriceBookRequest(toml="x"),
    }
    stub = cost.stubs[scope]
    try:
        await getattr(stub, call)(requests[call])
    except grpc.aio.AioRpcError as error:
        if allowed:
            assert error.code() != grpc.StatusCode.PERMISSION_DENIED
        else:
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    else:
        assert allowed


async def test_no_token_is_unauthenticated_but_health_is_open(cost: CostHarness) -> None:
    stub = cost.stub("")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetPriceBook(pb.GetPriceBookRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.stub("forged").WatchCosts(pb.WatchCostsRequest(session_id=new_id())).read()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel = cost.channels[-1]
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_FULL_NAME))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    "case",
    ["no grant", "another run's grant", "expired grant", "forged key", "estimate", "no document"],
)
async def test_a_worker_records_only_actual_costs_of_runs_granted_to_it(
    cost: CostHarness, case: str
) -> None:
    """Least privilege: a worker token charges only runs the session service dispatched."""
    session, document = new_id(), new_id()
    good = granted(event(session, document_id=document, attempt=2))
    bad = {
        "no grant": event(session, document_id=document, attempt=2),
        "another run's grant": pb.CostEvent(
            **{**{f.name: getattr(good, f.name) for f, _ in good.ListFields()}, "attempt": 3}),
        "expired grant": granted(event(session, document_id=document, attempt=2), until=1.0),
        "forged key": granted(event(session, document_id=document, attempt=2), token="forged"),
        "estimate": granted(event(session, document_id=document, attempt=2,
                                  kind=pb.COST_KIND_ESTIMATE)),
        "no document": granted(event(session, attempt=2)),
    }[case]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cost.worker.RecordCosts(pb.RecordCostsRequest(events=[good, bad]))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "events[1]" in caught.value.details()
    assert await cost.pool.fetchval("SELECT count(*) FROM cost.cost_events") == 0
    recorded = await cost.worker.RecordCosts(pb.RecordCostsRequest(events=[good]))
    assert recorded.total.amount == "0.0015"
    # the service scope (the session service, the manifest service) needs no grant
    await cost.service.RecordCosts(pb.RecordCostsRequest(events=[bad]))
