"""Run grants: what lets a worker charge a stage run, and nothing else.

Owns the grant's format and its check. The session service signs every run
it dispatches (session, document, stage, attempt, and until when the grant
holds) with a key derived from its own service token, and the run's
message carries the grant; the worker copies it onto the run's cost events;
the cost service, which accepts that token as a service token, checks it
before it records an event a worker token sends. So a worker token charges
only runs that were dispatched, only until their messages could no longer
run, and (the cost service's rule) only actual costs. No new secret to
deploy: every service that accepts a service token can check a grant, and
a rotation (old and new tokens accepted side by side) keeps grants of either
valid.

A grant is `<until, unix seconds>.<hex HMAC-SHA256>`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable

_PURPOSE = b"docimport run grant v1"


def grant_key(service_token: str) -> bytes:
    """The signing key derived from a service token (never the token itself)."""
    return hmac.new(service_token.encode(), _PURPOSE, hashlib.sha256).digest()


def _message(session_id: str, document_id: str, stage: str, attempt: int, until: int) -> bytes:
    return f"{session_id}|{document_id}|{stage}|{attempt}|{until}".encode()


def sign(
    key: bytes, session_id: str, document_id: str, stage: str, attempt: int, until: float
) -> str:
    """The grant of one run, valid until `until` (unix seconds)."""
    at = int(until)
    digest = hmac.new(key, _message(session_id, document_id, stage, attempt, at), hashlib.sha256)
    return f"{at}.{digest.hexdigest()}"


class GrantChecker:
    """Checks grants against the keys of every accepted service token."""

    def __init__(self, service_tokens: Iterable[str]) -> None:
        self._keys = [grant_key(token) for token in service_tokens if token]

    def refusal(
        self,
        grant: str,
        session_id: str,
        document_id: str,
        stage: str,
        attempt: int,
        now: float | None = None,
    ) -> str | None:
        """None when `grant` allows charging this run now; else why not."""
        if not grant:
            return "carries no grant of its run (a worker may charge only runs dispatched to it)"
        until_text, _, digest = grant.partition(".")
        try:
            until = int(until_text)
        except ValueError:
            return "carries a malformed grant"
        message = _message(session_id, document_id, stage, attempt, until)
        if not any(
            hmac.compare_digest(hmac.new(key, message, hashlib.sha256).hexdigest(), digest)
            for key in self._keys
        ):
            return "carries a grant that is not its run's"
        if (time.time() if now is None else now) > until:
            return "carries a grant that expired (its run's message could no longer run)"
        return None
