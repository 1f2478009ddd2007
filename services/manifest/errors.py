"""Domain errors of the manifest service that services.common does not define.

Owns `PermissionDenied`: a well-formed request for something this service
may not touch (a path outside its source roots); and `ReaderFailed`: a
reader process died during a scan (UNAVAILABLE). The server interceptor
(`errors.abort_for`) maps them like every `DomainError`, by its `code`.
"""

from __future__ import annotations

import grpc

from services.common.errors import DomainError, Unavailable


class PermissionDenied(DomainError):
    """This service may not read that location."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class ReaderFailed(Unavailable):
    """A reader process ended while it held files of the scan; the scan can be run again."""

    reason = "READER_FAILED"
