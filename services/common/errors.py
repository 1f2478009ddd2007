"""Domain errors and their one mapping to gRPC status codes with details.

Owns the error vocabulary of every service: stores and servicers raise these
exceptions; `abort_for` (called by the one server interceptor,
`services.common.interceptor`) turns them into `context.abort_with_status`
with the most specific code and a `google.rpc.Status` carrying details
(BadRequest field violations, QuotaFailure, PreconditionFailure,
ResourceInfo, ErrorInfo). Anything else is a bug: INTERNAL with a generic
message, logged with its traceback; SQL text never reaches a caller.

Each exception's docstring is its default message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

logger = logging.getLogger(__name__)

ERROR_DOMAIN = "docimport.dev"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """A request cannot be served."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = "ERROR"

    def __init__(self, message: str | None = None, *, metadata: dict[str, str] | None = None):
        self.message = message or (self.__doc__ or self.__class__.__name__).strip()
        self.metadata = metadata or {}
        super().__init__(self.message)

    def details(self) -> list[Any]:
        """google.rpc detail messages to attach; ErrorInfo by default."""
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        return [info]


class InvalidArgument(DomainError):
    """The request is malformed."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str | None = None, *, violations: Sequence[FieldViolation] = ()):
        if message is None and violations:
            message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(message)
        self.violations = list(violations)

    @classmethod
    def field(cls, name: str, description: str) -> InvalidArgument:
        return cls(violations=[FieldViolation(name, description)])

    def details(self) -> list[Any]:
        request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        return [request, *super().details()]


class NotFound(DomainError):
    """The resource does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"

    def __init__(self, resource_type: str, name: str, message: str | None = None):
        super().__init__(message or f"{resource_type} {name!r} not found")
        self.resource_type = resource_type
        self.name = name

    def details(self) -> list[Any]:
        info = error_details_pb2.ResourceInfo(resource_type=self.resource_type, resource_name=self.name)
        return [info, *super().details()]


class AlreadyExists(DomainError):
    """The resource already exists."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    """The resource is not in a state that allows this."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"

    def __init__(self, message: str | None = None, *, subject: str = "", type_: str = "STATE"):
        super().__init__(message)
        self.subject = subject
        self.type_ = type_

    def details(self) -> list[Any]:
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=self.type_, subject=self.subject, description=self.message
                )
            ]
        )
        return [failure, *super().details()]


class PermissionDenied(DomainError):
    """The caller may not do this (its token's scope allows the method, not this use of it)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Aborted(DomainError):
    """A concurrent change got there first; try again."""

    code = grpc.StatusCode.ABORTED
    reason = "ABORTED"


@dataclass(frozen=True)
class QuotaViolation:
    subject: str
    description: str


class ResourceExhausted(DomainError):
    """A limit was reached."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str | None = None,
        *,
        violations: Sequence[QuotaViolation] = (),
        metadata: dict[str, str] | None = None,
    ):
        super().__init__(message, metadata=metadata)
        self.violations = list(violations)

    def details(self) -> list[Any]:
        failure = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.description)
                for v in self.violations
            ]
        )
        return [failure, *super().details()]


class Unavailable(DomainError):
    """A dependency is unavailable; try again later."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class Validator:
    """Collects field violations and raises them together.

    >>> v = Validator(); v.require(req.session_id, "session_id"); v.check()
    """

    def __init__(self) -> None:
        self._violations: list[FieldViolation] = []

    def add(self, field_name: str, description: str) -> None:
        self._violations.append(FieldViolation(field_name, description))

    def require(self, value: object, field_name: str, description: str = "is required") -> None:
        if not value:
            self.add(field_name, description)

    def check(self) -> None:
        if self._violations:
            raise InvalidArgument(violations=self._violations)


def to_status(error: DomainError) -> grpc.Status:
    """The grpc.Status (with packed details) for a domain error."""
    details = []
    for message in error.details():
        packed = any_pb2.Any()
        packed.Pack(message)
        details.append(packed)
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code.name), message=error.message, details=details
    )
    return rpc_status.to_status(status)


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The status code of a raw google.rpc.Code number (UNKNOWN for one gRPC does not define)."""
    return _STATUS_CODES.get(value, grpc.StatusCode.UNKNOWN)


def details_of(error: grpc.RpcError, kind: type) -> list[Any]:
    """Detail messages of type `kind` carried by a received error (for clients and tests)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    found = []
    if status is None:
        return found
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            found.append(message)
    return found


def _translate(exc: BaseException) -> DomainError | None:
    if isinstance(exc, DomainError):
        return exc
    if isinstance(exc, (asyncpg.exceptions.CannotConnectNowError, asyncpg.exceptions.TooManyConnectionsError,
                        asyncpg.exceptions.ConnectionDoesNotExistError, ConnectionError, OSError)):
        return Unavailable("the database is unavailable; try again")
    if isinstance(exc, asyncpg.exceptions.SerializationError | asyncpg.exceptions.DeadlockDetectedError):
        return Aborted("a concurrent change conflicted with this request; try again")
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ):
        return Unavailable(f"a dependency is unavailable: {exc.details()}")
    return None


async def abort_for(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    """Ends the call with the status `exc` maps to (raises grpc.aio.AbortError)."""
    error = _translate(exc)
    if error is None:
        logger.exception("internal error in %s", method, extra={"rpc_method": method})
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")
    else:
        if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED):
            logger.warning("%s: %s", method, error.message, extra={"rpc_method": method})
        await context.abort_with_status(to_status(error))
