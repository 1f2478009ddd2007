"""Scopes of the cost service: who may call what."""

from __future__ import annotations

import grpc
import pytest
from docimport.cost.v1 import cost_service_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.auth import Scope
from services.cost.servicer import POLICY, SERVICE_FULL_NAME

from .conftest import CostHarness
from .helpers import event, new_id, usd

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
        "RecordCosts": pb.RecordCostsRequest(events=[event(new_id())]),
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
