"""services.common.errors: raw status numbers (as a batch answer carries them) to status codes."""

from __future__ import annotations

import grpc
from google.rpc import code_pb2

from services.common.errors import status_code


def test_every_google_rpc_code_maps_to_its_grpc_status_code() -> None:
    for code in grpc.StatusCode:
        assert status_code(getattr(code_pb2, code.name)) is code


def test_a_number_grpc_does_not_define_is_unknown() -> None:
    assert status_code(999) is grpc.StatusCode.UNKNOWN
