"""Domain errors of the manifest service that services.common does not define.

Owns `PermissionDenied`: a well-formed request for something this service
may not touch (a path outside its source roots). The server interceptor
(`errors.abort_for`) maps it like every `DomainError`, by its `code`.
"""

from __future__ import annotations

import grpc

from services.common.errors import DomainError


class PermissionDenied(DomainError):
    """This service may not read that location."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"
