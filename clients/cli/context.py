"""What every CLI command shares: settings, service stubs, errors, output.

Owns how the CLI finds the services (`DOCIMPORT_*_ADDR` variables, else the
addresses and operator token that `docimport dev up` wrote to
`./var/stack.json`), the blocking gRPC stubs (unary calls get a deadline,
watch streams none), and the one translation of gRPC errors into a message
a person understands and a non-zero exit code. Commands never print
tracebacks for expected failures. With tracing on (`OTEL_EXPORTER_OTLP_ENDPOINT`,
configured by `__main__`), each command is the root span of its trace and
its calls carry it to the services.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import typer
from docimport.cost.v1 import cost_service_pb2_grpc
from docimport.manifest.v1 import manifest_service_pb2_grpc
from docimport.session.v1 import session_service_pb2_grpc
from google.rpc import error_details_pb2
from rich.console import Console

from services.common.channels import sync_channel
from services.common.config import ClientSettings
from services.common import telemetry
from services.common.errors import details_of

STACK_FILE = Path("var") / "stack.json"

console = Console()
err_console = Console(stderr=True)

# Exit codes: 1 = the operation failed or a verdict was not PASS;
# 2 = bad usage or input; 3 = a service is unreachable; 4 = not found;
# 5 = refused (auth, precondition, budget).
EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_NOT_FOUND, EXIT_REFUSED = 1, 2, 3, 4, 5


def stack_file() -> Path:
    return Path(os.environ.get("DOCIMPORT_STACK_FILE", STACK_FILE))


def load_settings() -> ClientSettings:
    """Environment first; then the local stack's file fills what is unset."""
    overrides: dict[str, Any] = {}
    path = stack_file()
    if path.exists():
        stack = json.loads(path.read_text())
        for key in ("manifest_addr", "session_addr", "cost_addr"):
            if f"DOCIMPORT_{key.upper()}" not in os.environ and key in stack:
                overrides[key] = stack[key]
        if "DOCIMPORT_TOKEN" not in os.environ and "operator_token" in stack:
            overrides["token"] = stack["operator_token"]
    return ClientSettings(**overrides)


class Clients:
    """Lazily opened stubs of the three services."""

    def __init__(self, settings: ClientSettings | None = None) -> None:
        self.settings = settings or load_settings()
        self._channels: dict[str, grpc.Channel] = {}

    def _channel(self, address: str) -> grpc.Channel:
        if address not in self._channels:
            self._channels[address] = sync_channel(address, self.settings)
        return self._channels[address]

    @property
    def timeout(self) -> float:
        return self.settings.rpc_timeout

    @property
    def manifest(self) -> manifest_service_pb2_grpc.ManifestServiceStub:
        return manifest_service_pb2_grpc.ManifestServiceStub(self._channel(self.settings.manifest_addr))

    @property
    def session(self) -> session_service_pb2_grpc.SessionServiceStub:
        return session_service_pb2_grpc.SessionServiceStub(self._channel(self.settings.session_addr))

    @property
    def cost(self) -> cost_service_pb2_grpc.CostServiceStub:
        return cost_service_pb2_grpc.CostServiceStub(self._channel(self.settings.cost_addr))

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


_clients: Clients | None = None


def clients() -> Clients:
    global _clients
    if _clients is None:
        _clients = Clients()
    return _clients


def set_clients(value: Clients | None) -> None:
    """For tests: commands use these stubs."""
    global _clients
    _clients = value


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def explain(error: grpc.RpcError) -> tuple[str, int]:
    """A person's message and exit code for a gRPC error."""
    code = error.code()  # type: ignore[attr-defined]
    text = error.details() or code.name  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"cannot reach the docimport services ({text}). Is the stack up? "
            "Start it with `docimport dev up`, or set DOCIMPORT_*_ADDR.",
            EXIT_UNAVAILABLE,
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (f"not authenticated: {text}. Set DOCIMPORT_TOKEN to an operator token.", EXIT_REFUSED)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return (f"permission denied: {text}", EXIT_REFUSED)
    if code == grpc.StatusCode.NOT_FOUND:
        return (text, EXIT_NOT_FOUND)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        lines = [text]
        for bad in details_of(error, error_details_pb2.BadRequest):
            lines.extend(f"  {v.field}: {v.description}" for v in bad.field_violations)
        return ("\n".join(dict.fromkeys(lines)), EXIT_USAGE)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        lines = [text]
        for quota in details_of(error, error_details_pb2.QuotaFailure):
            lines.extend(f"  {v.subject}: {v.description}" for v in quota.violations)
        return ("\n".join(lines), EXIT_REFUSED)
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
        return (text, EXIT_REFUSED)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ("the service did not answer in time; try again", EXIT_UNAVAILABLE)
    return (f"{code.name}: {text}", EXIT_FAILED)


F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(func: F) -> F:
    """Turns gRPC errors of a command into a message and an exit code."""

    command = f"docimport {func.__name__.rstrip('_').replace('_', '-')}"

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with telemetry.command_span(command):
                return func(*args, **kwargs)
        except grpc.RpcError as error:
            message, code = explain(error)
            err_console.print(f"[bold red]error:[/] {message}")
            raise typer.Exit(code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
