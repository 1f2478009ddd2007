"""Bearer-token authentication and scope checks for every gRPC server.

Owns the `Authenticator` (applied by the one server interceptor,
`services.common.interceptor`): a call must carry `authorization: Bearer TOKEN`
metadata; the token's scope (operator / worker / service) must be one the
method allows. No token or an unknown one is UNAUTHENTICATED; a known token
of the wrong scope is PERMISSION_DENIED. Health checks and reflection are
open so that probes and tooling need no secret.

Each servicer declares its policy as `{method name: scopes}`; methods it
does not list are for operators only. Tokens are compared in constant time.
"""

from __future__ import annotations

import contextvars
import enum
import hmac
from collections.abc import Iterable, Mapping
from typing import Any

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

class Scope(str, enum.Enum):
    """Who is calling: a person (CLI), a Celery worker, or another service."""

    OPERATOR = "operator"
    WORKER = "worker"
    SERVICE = "service"


OPERATOR_ONLY = frozenset({Scope.OPERATOR})

current_scope: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "current_scope", default=None
)


class Authenticator:
    """Decides whether a call may run: its token's scope against the method's policy."""

    def __init__(
        self,
        tokens: Mapping[str, Scope],
        policy: Mapping[str, Iterable[Scope]],
    ) -> None:
        self._tokens = [(t.encode(), s) for t, s in tokens.items() if t]
        # policy keys are full method names, /pkg.Service/Method.
        self._policy = {method: frozenset(scopes) for method, scopes in policy.items()}

    def _scope_of(self, token: str) -> Scope | None:
        raw = token.encode()
        found = None
        for candidate, scope in self._tokens:
            if hmac.compare_digest(candidate, raw):
                found = scope
        return found

    def refusal(
        self, method: str, metadata: Iterable[tuple[str, Any]] | None
    ) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may run (and `current_scope` is set); else (code, message)."""
        if method.startswith(OPEN_SERVICES):
            return None
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value
                break
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        scope = self._scope_of(token) if token else None
        if scope is None:
            why = "missing bearer token" if not token else "unknown bearer token"
            return grpc.StatusCode.UNAUTHENTICATED, why
        allowed = self._policy.get(method, OPERATOR_ONLY)
        if scope not in allowed:
            names = ", ".join(sorted(s.value for s in allowed))
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"a {scope.value} token may not call {method}; it needs scope {names}",
            )
        current_scope.set(scope)
        return None


def refused(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with `code`.

    It never decodes the request (no deserializer): a refused caller learns
    nothing about its body, and garbage is refused like any other body.
    """

    async def unary_response(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def stream_response(request: object, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await context.abort(code, message)
        yield  # pragma: no cover

    deserializer = None
    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_response, deserializer, serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_response, deserializer, serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_response, deserializer, serializer)
    return grpc.stream_stream_rpc_method_handler(stream_response, deserializer, serializer)


def policy_for(service_full_name: str, methods: Mapping[str, Iterable[Scope]]) -> dict[str, frozenset[Scope]]:
    """Expands `{"ReportStageResult": {WORKER}}` to full method names."""
    return {f"/{service_full_name}/{name}": frozenset(scopes) for name, scopes in methods.items()}
