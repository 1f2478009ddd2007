"""Settings shared by every docimport process, read from environment variables.

Each service has its own settings class in its `config.py` that extends
`ServiceSettings`; nothing else in the code base reads `os.environ`. Every
variable is prefixed `DOCIMPORT_` (e.g. `DOCIMPORT_DATABASE_URL`), so one
ConfigMap can feed every component. A missing required variable fails at
start-up with pydantic's message naming it.

Tokens: a server accepts the tokens listed per scope
(`DOCIMPORT_OPERATOR_TOKENS`, `DOCIMPORT_WORKER_TOKENS`,
`DOCIMPORT_SERVICE_TOKENS`, comma-separated); a caller presents its own
(`DOCIMPORT_TOKEN`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from services.common.auth import Scope

CommaList = Annotated[tuple[str, ...], NoDecode]


def _split(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class TLSSettings(BaseSettings):
    """Optional TLS: a server presents cert+key; a client trusts ca_file."""

    model_config = SettingsConfigDict(env_prefix="DOCIMPORT_TLS_", frozen=True, extra="ignore")

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None or self.ca_file is not None


class ClientSettings(BaseSettings):
    """What a caller needs: where the services are and its own token."""

    model_config = SettingsConfigDict(env_prefix="DOCIMPORT_", frozen=True, extra="ignore")

    manifest_addr: str = "127.0.0.1:50061"
    session_addr: str = "127.0.0.1:50062"
    cost_addr: str = "127.0.0.1:50063"
    token: SecretStr = SecretStr("")
    # Deadline of unary calls, seconds.
    rpc_timeout: float = 30.0
    tls: TLSSettings = Field(default_factory=TLSSettings)


class MetricsSettings(BaseSettings):
    """Where a process serves Prometheus `/metrics` (services and workers)."""

    model_config = SettingsConfigDict(env_prefix="DOCIMPORT_", frozen=True, extra="ignore")

    # 0 = no /metrics port.
    metrics_port: int = 0
    # Its own address, not `host`'s: /metrics is unauthenticated and shows
    # per-session budget figures, so it stays on loopback unless a deployment
    # opens it (Kubernetes: 0.0.0.0 behind the NetworkPolicy).
    metrics_host: str = "127.0.0.1"


class ServiceSettings(ClientSettings, MetricsSettings):
    """Settings of a gRPC service process; each service extends this."""

    database_url: SecretStr
    host: str = "0.0.0.0"
    port: int = 0
    db_pool_min: int = 1
    db_pool_max: int = 10
    shutdown_grace: float = 10.0
    log_level: str = "INFO"
    operator_tokens: CommaList = ()
    worker_tokens: CommaList = ()
    service_tokens: CommaList = ()

    _split_tokens = field_validator(
        "operator_tokens", "worker_tokens", "service_tokens", mode="before"
    )(_split)

    def token_scopes(self) -> dict[str, Scope]:
        """Every accepted token with its scope."""
        scopes: dict[str, Scope] = {}
        for scope, tokens in (
            (Scope.OPERATOR, self.operator_tokens),
            (Scope.WORKER, self.worker_tokens),
            (Scope.SERVICE, self.service_tokens),
        ):
            for token in tokens:
                scopes[token] = scope
        return scopes


def describe_invalid(exc: ValidationError) -> str:
    """One line naming each bad or missing variable, e.g. `DOCIMPORT_DATABASE_URL: Field required`."""
    return "; ".join(
        f"DOCIMPORT_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
    )
