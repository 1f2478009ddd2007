"""Domain errors and their one mapping to gRPC status codes with details.

Owns the error vocabulary of every service: stores and servicers raise these
exceptions; `abort_for` (called by the one server interceptor,
`services.common.interceptor`) turns them into `context.abort_with_status`
with the most specific code and a `google.rpc.Status` carrying details
(BadRequest field violations, QuotaFailure, PreconditionFailure,
ResourceInfo, ErrorInfo). Anything else is a bug: INTERNAL with a generic
message, logged with its traceback; SQL text never reaches a caller.

Also owns how much of a caller's input an error may echo: `quote` shows at
most `MAX_QUOTE` characters of a value, and `to_status` clips every text of
the status and its details and drops trailing violations so that the
trailers stay far below gRPC's metadata limits (8 KiB soft, 16 KiB hard; a
bigger trailer reaches the caller as RESOURCE_EXHAUSTED instead of the
error). `peer_error` turns what a peer service answered into the domain
error of the same meaning, naming the peer.

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

# Characters of a caller's value an error message quotes.
MAX_QUOTE = 200
# UTF-8 bytes of a status message (percent-encoded in the trailer: up to 3x),
# of each text of a detail, and of the whole google.rpc.Status (base64: 4/3x).
MAX_MESSAGE_BYTES = 800
MAX_DETAIL_TEXT_BYTES = 400
MAX_STATUS_BYTES = 3000


def quote(value: object, limit: int = MAX_QUOTE) -> str:
    """`value` quoted for an error message (its repr): its first `limit` characters at most."""
    if not isinstance(value, str):
        text = repr(value)
        return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value):,} characters)"


def clip(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` UTF-8 bytes (at a character boundary), marked '...'."""
    if len(text) * 4 <= max_bytes:
        return text
    raw = text.encode("utf-8", "replace")
    if len(raw) <= max_bytes:
        return text
    return raw[: max_bytes - 3].decode("utf-8", "ignore") + "..."


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

    def __init__(
        self,
        message: str | None = None,
        *,
        violations: Sequence[FieldViolation] = (),
        omitted: int = 0,
    ):
        """`omitted`: further problems found but not listed in `violations`."""
        self.violations = list(violations)
        self.omitted = omitted
        if message is None and violations:
            message = self._listing()
        super().__init__(message)

    @classmethod
    def field(cls, name: str, description: str) -> InvalidArgument:
        return cls(violations=[FieldViolation(name, description)])

    def _fitting(self, budget: int) -> tuple[list[tuple[str, str]], int]:
        """The (field, description) pairs, clipped, that fit `budget` bytes; and how many did not."""
        listed: list[tuple[str, str]] = []
        used = 0
        for v in self.violations:
            pair = (clip(v.field, MAX_DETAIL_TEXT_BYTES), clip(v.description, MAX_DETAIL_TEXT_BYTES))
            size = len(pair[0].encode()) + len(pair[1].encode()) + 8
            if listed and used + size > budget:
                break
            listed.append(pair)
            used += size
        return listed, len(self.violations) - len(listed) + self.omitted

    # Bytes of the problems listed, in the message and in the BadRequest alike.
    _LISTED_BYTES = MAX_MESSAGE_BYTES - 40

    def _listing(self) -> str:
        listed, more = self._fitting(self._LISTED_BYTES)
        text = "; ".join(f"{name}: {description}" for name, description in listed)
        return f"{text}; ... and {more:,} more problems" if more else text

    def details(self) -> list[Any]:
        listed, more = self._fitting(self._LISTED_BYTES)
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=name, description=description)
            for name, description in listed
        ]
        if more:
            violations.append(
                error_details_pb2.BadRequest.FieldViolation(description=f"... and {more:,} more problems")
            )
        return [error_details_pb2.BadRequest(field_violations=violations), *super().details()]


class NotFound(DomainError):
    """The resource does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"

    def __init__(self, resource_type: str, name: str, message: str | None = None):
        super().__init__(message or f"{resource_type} {quote(name)} not found")
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
            raise InvalidArgument(violations=self._violations, omitted=self.omitted)

    @property
    def omitted(self) -> int:
        """Problems found but not kept (a subclass may keep only the first ones)."""
        return 0


def to_status(error: DomainError) -> grpc.Status:
    """The grpc.Status (with packed details) for a domain error, clipped to fit a trailer."""
    message = clip(error.message, MAX_MESSAGE_BYTES)
    details = error.details()
    for detail in details:
        _clip_texts(detail)
    room = MAX_STATUS_BYTES - len(message.encode())
    while sum(d.ByteSize() for d in details) > room and _drop_last_entry(details):
        pass
    packed_details = []
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        packed_details.append(packed)
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code.name), message=message, details=packed_details
    )
    return rpc_status.to_status(status)


def _clip_texts(message: Any) -> None:
    """Clips every string of a detail message (nested and repeated ones, map values) in place."""
    for field, value in message.ListFields():
        if field.type == field.TYPE_STRING:
            if field.is_repeated:
                value[:] = [clip(v, MAX_DETAIL_TEXT_BYTES) for v in value]
            else:
                setattr(message, field.name, clip(value, MAX_DETAIL_TEXT_BYTES))
        elif field.type == field.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                entries = {clip(k, MAX_DETAIL_TEXT_BYTES): v for k, v in value.items()}
                value.clear()
                for k, v in entries.items():
                    value[k] = clip(v, MAX_DETAIL_TEXT_BYTES) if isinstance(v, str) else v
            elif field.is_repeated:
                for item in value:
                    _clip_texts(item)
            else:
                _clip_texts(value)


def _drop_last_entry(details: list[Any]) -> bool:
    """Drops the last entry of the longest repeated field of the details; False if none has two."""
    longest = None
    for detail in details:
        for field, value in detail.ListFields():
            if field.is_repeated and field.type == field.TYPE_MESSAGE and len(value) > 1:
                if longest is None or len(value) > len(longest):
                    longest = value
    if longest is None:
        return False
    del longest[-1]
    return True


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


def peer_error(
    exc: grpc.aio.AioRpcError, peer: str, *, resource: str = "", name: str = ""
) -> Exception:
    """The domain error of what the service `peer` answered, naming it.

    NOT_FOUND of a named `resource` is NotFound of it; INVALID_ARGUMENT,
    FAILED_PRECONDITION, RESOURCE_EXHAUSTED, ALREADY_EXISTS and ABORTED keep
    their code; UNAVAILABLE and DEADLINE_EXCEEDED are Unavailable. Any other
    code (INTERNAL, UNKNOWN, a refused token) is returned as is: a bug or a
    misconfiguration, which the caller sees as INTERNAL.
    """
    code = exc.code()
    said = f"the {peer} answered {code.name}: {clip(exc.details() or '', MAX_DETAIL_TEXT_BYTES)}"
    if code == grpc.StatusCode.NOT_FOUND:
        if resource:
            return NotFound(resource, name, f"{resource} {quote(name)} not found ({said})")
        return NotFound(peer, "", said)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(said)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(said, subject=f"{resource}/{name}" if resource else peer)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(said)
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return AlreadyExists(said)
    if code == grpc.StatusCode.ABORTED:
        return Aborted(said)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(said)
    return exc


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
