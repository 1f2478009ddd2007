"""Property: every method of every service answers any request precisely, and promptly.

For each method listed from the service descriptors (`rpc_stack.METHODS`: a
new method is covered without a change here), requests are generated from
its message descriptor: strings that are ids and names of the seeded stack,
text, text with NUL characters and huge text; integers over their type's
whole range and enum numbers the enum does not define; Timestamps and
Durations in and out of range; nested, repeated and map fields; or random
bytes as the whole body. Each is sent to the real servers (`rpc_stack`) with
no token, an unknown one, a token of a scope the method refuses or one it
allows. The call must answer within its deadline with OK or a precise code
(never UNKNOWN, INTERNAL, UNIMPLEMENTED, UNAVAILABLE...), UNAUTHENTICATED
and PERMISSION_DENIED exactly when the token says so, RESOURCE_EXHAUSTED
only from a real limit (ours, with its ErrorInfo) and an error message of
bounded size. A stream's first message (or status) must come promptly: a
watch of the seeded session may wait for its first message, nothing else.

Requests are made in four modes: values that pass the generic checks or
any values, with most fields set (ids from the seed, amounts, names a field
of that name takes) or any subset, so that they reach past the methods' own
checks to the stores too. A second property covers what a field carries in
another format: page tokens (the method's own, issued for the seed, with one
value replaced), TOML price books and manifest JSON, each in a request that
is otherwise valid.

Examples are derandomized (no example database), so CI runs the same
requests each time.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rpc_stack import METHODS, SCOPE_TOKENS, Method, Stack, stack  # noqa: F401 - the fixture

from services.common.errors import ERROR_DOMAIN, details_of
from services.common.validate import (
    DEFAULT_MAX_CHARS,
    DURATION_MAX_SECONDS,
    TIMESTAMP_MAX_SECONDS,
    TIMESTAMP_MIN_SECONDS,
)

EXAMPLES = 100
FORMAT_EXAMPLES = 200
UNARY_DEADLINE = 15.0
STREAM_DEADLINE = 5.0
PRECISE = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


# ---------------------------------------------------------------- requests from descriptors


@dataclass(frozen=True)
class Mode:
    """How requests are made: `clean` values pass the generic checks (so requests reach the
    servicers' own checks and the stores); `full` sets every field, ids from the seed."""

    clean: bool
    full: bool


# Values that mean something to a field of this name, so that full requests get past
# their methods' own checks to the stores.
_AMOUNTS = ["0", "1", "0.0015", "12.5", "-1", "NaN", "1e20", "9" * 15, "9" * 30, "0." + "0" * 16 + "1"]
_HINTS = {
    "currency_code": ["USD"], "amount": _AMOUNTS, "units": _AMOUNTS, "units_per": _AMOUNTS,
    "unit_price": _AMOUNTS, "exclude_types": ["pdf", "email"], "type_family": ["pdf", "text"],
    "basis": ["page", "file"], "service": ["local"], "operation": ["compute_second"],
    "kind": ["extract", "text"],
}
# Texts as they come inside another format (TOML, JSON, a cursor): NULs, huge ones.
_TEXTS = st.one_of(st.text(max_size=10), st.text(max_size=5).map(lambda s: f"{s}\x00"),
                   st.sampled_from([5000, 70_000]).map(lambda n: "t" * n))
_ODD_VALUES = st.one_of(
    st.sampled_from([2**63, 2**70, -1, True, None, "", [[[1]]]]),
    st.sampled_from(["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "2020-01-01T00:00:00",
                     "2020-01-01T00:00:00+00:00"]),
    st.integers(-(2**70), 2**70), st.uuids().map(str), _TEXTS,
)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _nested(n: int) -> str:
    return "[" * n + "]" * n


def _page_tokens(known: dict[str, Any]) -> st.SearchStrategy[str]:
    """The token the method issued for the seed with one value replaced; nested JSON."""
    cursor = known["cursor"] or {"o": 1}
    mutated = st.tuples(st.sampled_from(sorted(cursor)), _ODD_VALUES).map(
        lambda kv: _b64(json.dumps({**cursor, kv[0]: kv[1]}).encode()))
    return st.one_of(mutated, st.integers(1, 2000).map(lambda n: _b64(_nested(n).encode())))


_BOOK = {"name": "Property", "description": "made by the property test", "service": "local",
         "unit_price": "0.5", "price_description": "a price"}


def _tomls() -> st.SearchStrategy[str]:
    """A valid TOML price book with one value replaced; nested arrays."""
    def book(kv: tuple[str, Any]) -> str:
        v = {**_BOOK, kv[0]: kv[1]}
        return (f"name = {json.dumps(v['name'])}\ndescription = {json.dumps(v['description'])}\n"
                f"[[prices]]\nservice = {json.dumps(v['service'])}\noperation = \"op\"\nunit = \"u\"\n"
                f"unit_price = {json.dumps(v['unit_price'])}\ndescription = {json.dumps(v['price_description'])}\n")

    changed = st.tuples(st.sampled_from(sorted(_BOOK)), st.one_of(_TEXTS, st.sampled_from(_AMOUNTS)))
    return st.one_of(changed.map(book), st.integers(1, 5000).map(lambda n: "a = " + _nested(n)))


def _manifest_jsons(known: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """The seed's exported manifest with one value replaced (texts, numbers, nesting)."""
    seed = json.loads(known["manifest_json"])

    def replaced(pair: tuple[str, Any]) -> bytes:
        document = json.loads(json.dumps(seed))
        where, value = pair
        if where.startswith("files."):
            document["files"][0][where[6:]] = value
        else:
            document[where] = value
        return json.dumps(document).encode()

    spots = st.sampled_from(["case_name", "source_path", "files.path", "files.category",
                             "files.size_bytes", "files.sha256", "options", "summary"])
    values = st.one_of(_TEXTS, st.text(max_size=3).map(lambda s: f"\x00{s}"), st.integers(-(2**70), 2**70),
                       st.integers(1, 900).map(lambda n: json.loads(_nested(n))))
    return st.one_of(st.tuples(spots, values).map(replaced),
                     st.integers(1, 5000).map(lambda n: _nested(n).encode()))


def _strings(field: FieldDescriptor, known: dict[str, Any], mode: Mode) -> st.SearchStrategy[str]:
    if field.name == "page_token":
        return st.one_of(_page_tokens(known), st.just(""), _generic_strings(known, mode))
    if field.name == "toml":
        return st.one_of(_tomls(), _generic_strings(known, mode))
    if mode.full and field.name.endswith(("_id", "_ids")):
        return st.sampled_from(known["ids"])
    if mode.full and field.name in _HINTS:
        return st.sampled_from(_HINTS[field.name])
    if mode.full and field.name.endswith("_path"):
        return st.sampled_from(known["paths"])
    return _generic_strings(known, mode)


def _generic_strings(known: dict[str, Any], mode: Mode) -> st.SearchStrategy[str]:
    every = st.sampled_from(known["ids"] + known["names"])
    if mode.clean:
        return st.one_of(
            every,
            st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20),
            st.sampled_from(["x", "\u00e9", "\U0001f4a9"]).map(lambda c: c * DEFAULT_MAX_CHARS),
        )
    return st.one_of(
        every,
        st.text(max_size=20),
        st.text(max_size=8).map(lambda s: f"{s}\x00{s}"),
        st.sampled_from([DEFAULT_MAX_CHARS + 1, 70_000, 1_100_000]).map(lambda n: "x" * n),
        st.uuids().map(str),
    )


def _ints(low: int, high: int, mode: Mode) -> st.SearchStrategy[int]:
    small = st.integers(max(low, 0 if mode.full else -5), min(high, 5 if mode.full else 2000))
    edges = [v for v in (low, high, 0, 1, -1, 1000, 10**9) if low <= v <= high]
    return st.one_of(small, st.sampled_from(edges), st.integers(low, high))


def _times(minimum: int, maximum: int, mode: Mode) -> st.SearchStrategy[tuple[int, int]]:
    if mode.clean:
        seconds = st.one_of(st.sampled_from([minimum, maximum, 0, 1]), st.integers(minimum, maximum))
        return st.tuples(seconds, st.sampled_from([0, 1, 999_999_999]))
    seconds = st.one_of(st.integers(minimum - 5, minimum + 5), st.integers(maximum - 5, maximum + 5),
                        st.integers(-(2**63), 2**63 - 1), st.integers(-100, 10**6))
    nanos = st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-1, 10**9), st.just(0))
    return st.tuples(seconds, nanos)


def _scalar(field: FieldDescriptor, known: dict[str, Any], mode: Mode) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return _strings(field, known, mode)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.one_of(_manifest_jsons(known), st.binary(max_size=64), st.just(known["manifest_json"]))
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        defined = sorted(field.enum_type.values_by_number)
        if mode.clean:
            return st.sampled_from(defined)
        return st.one_of(st.sampled_from(defined), st.integers(-5, max(defined) + 5),
                         st.sampled_from([-(2**31), 2**31 - 1]))
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if field.type == FieldDescriptor.TYPE_FLOAT else 64)
    return _ints(*_INT_RANGES[field.type], mode)


def messages(descriptor: Descriptor, known: dict[str, Any], mode: Mode, depth: int = 0
             ) -> st.SearchStrategy[Any]:
    """Messages of `descriptor` (all fields set when `mode.full`, else any subset)."""
    cls = message_factory.GetMessageClass(descriptor)
    if descriptor.full_name == "google.protobuf.Timestamp":
        times = _times(TIMESTAMP_MIN_SECONDS, TIMESTAMP_MAX_SECONDS, mode)
        return times.map(lambda sn: cls(seconds=sn[0], nanos=sn[1]))
    if descriptor.full_name == "google.protobuf.Duration":
        return _times(0, DURATION_MAX_SECONDS, mode).map(lambda sn: cls(seconds=sn[0], nanos=sn[1]))
    if depth > 4:
        return st.just(cls())
    values = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            key, value = (field.message_type.fields_by_name[n] for n in ("key", "value"))
            values[field.name] = st.dictionaries(
                _value(key, known, mode, depth), _value(value, known, mode, depth), max_size=3)
        elif field.is_repeated:
            values[field.name] = st.lists(_value(field, known, mode, depth), min_size=int(mode.full), max_size=3)
        else:
            values[field.name] = _value(field, known, mode, depth)
    if mode.full:  # most fields set (each 3 times in 4)
        likely = {name: st.tuples(st.sampled_from([True, True, True, False]), v) for name, v in values.items()}
        return st.fixed_dictionaries(likely).map(
            lambda chosen: _build(cls, {name: v for name, (keep, v) in chosen.items() if keep}))
    return st.fixed_dictionaries({}, optional=values).map(lambda chosen: _build(cls, chosen))


def _value(field: FieldDescriptor, known: dict[str, Any], mode: Mode, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return st.deferred(lambda: messages(field.message_type, known, mode, depth + 1))
    return _scalar(field, known, mode)


def _build(cls: Any, values: dict[str, Any]) -> Any:
    message = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            for key, item in value.items():
                if field.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif field.is_repeated:
            target.extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


# ---------------------------------------------------------------- the property


def _callers(method: Method) -> st.SearchStrategy[str]:
    allowed = [t for s, t in SCOPE_TOKENS.items() if s in method.scopes]
    refused = [t for s, t in SCOPE_TOKENS.items() if s not in method.scopes]
    return st.sampled_from(allowed * 6 + refused + ["", "bogus-token"])


def _expected_refusal(method: Method, token: str) -> grpc.StatusCode | None:
    if token not in SCOPE_TOKENS.values():
        return grpc.StatusCode.UNAUTHENTICATED
    scope = next(s for s, t in SCOPE_TOKENS.items() if t == token)
    return None if scope in method.scopes else grpc.StatusCode.PERMISSION_DENIED


async def check_one(stack: Stack, method: Method, body: bytes, token: str, names_seeded: bool) -> None:
    deadline = STREAM_DEADLINE if method.server_streaming else UNARY_DEADLINE
    outcome = await stack.call(method, body, token or None, deadline)
    refusal = _expected_refusal(method, token)
    if refusal is not None:
        assert outcome.code == refusal, outcome
        return
    if outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        # Only a watch of a session that exists may legitimately wait for its first message.
        assert method.server_streaming and method.name.startswith("Watch") and names_seeded, outcome
        return
    assert outcome.code in PRECISE, outcome
    assert len(outcome.details.encode()) <= 1000, (outcome.code, len(outcome.details))
    if outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # ours, not a transport limit
        infos = details_of(outcome.error, error_details_pb2.ErrorInfo) if outcome.error else []
        assert any(info.domain == ERROR_DOMAIN for info in infos), outcome


_BODIES: dict[str, st.SearchStrategy[bytes]] = {}


def _bodies(method: Method, stack: Stack) -> st.SearchStrategy[bytes]:
    """Serialized requests of `method` made in every mode (or, now and then, random bytes)."""
    if method.path not in _BODIES:
        known = {**stack.known, "manifest_json": stack.manifest_json,
                 "cursor": stack.known["cursors"].get(str(method))}
        descriptor = method.request_type.DESCRIPTOR
        made = [messages(descriptor, known, Mode(clean, full)).map(lambda m: m.SerializeToString())
                for clean in (True, False) for full in (True, False)]
        _BODIES[method.path] = st.one_of(*made, st.binary(max_size=200))
    return _BODIES[method.path]


@pytest.mark.parametrize("method", METHODS, ids=str)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
async def test_every_method_answers_any_request_precisely(stack: Stack, method: Method, data: Any) -> None:
    body = data.draw(_bodies(method, stack), label="body")
    token = data.draw(_callers(method), label="token")
    seeded = any(value.encode() in body for value in stack.known["session"])
    await check_one(stack, method, body, token, seeded)


# Fields that carry another format inside, and what makes their values.
_FORMATS = {
    "page_token": lambda known: _page_tokens(known),
    "toml": lambda known: _tomls(),
    "manifest_json": lambda known: _manifest_jsons(known),
}
FORMATTED = [(m, f.name) for m in METHODS for f in m.request_type.DESCRIPTOR.fields if f.name in _FORMATS]


@pytest.mark.parametrize(("method", "field"), FORMATTED, ids=[f"{m}.{f}" for m, f in FORMATTED])
@settings(max_examples=FORMAT_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
async def test_values_inside_tokens_toml_and_json_are_checked_precisely(
        stack: Stack, method: Method, field: str, data: Any) -> None:
    """A request valid but for one value inside its page token, TOML or manifest JSON."""
    request = method.request_type()
    for fd in request.DESCRIPTOR.fields:
        if fd.name in stack.known["by_field"]:
            setattr(request, fd.name, stack.known["by_field"][fd.name])
        elif fd.name == "request_id":
            request.request_id = str(data.draw(st.uuids(), label="request_id"))
    known = {**stack.known, "manifest_json": stack.manifest_json, "cursor": stack.known["cursors"].get(str(method))}
    setattr(request, field, data.draw(_FORMATS[field](known), label=field))
    await check_one(stack, method, request.SerializeToString(), SCOPE_TOKENS[min(method.scopes)], True)
