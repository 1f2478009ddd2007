"""The checks every request passes, whatever its method, driven by its message descriptor.

Owns the rules that no field of any request may break, so that no malformed
value reaches a servicer, a store or Postgres:

- a string holds no NUL character (Postgres text cannot) and at most
  `DEFAULT_MAX_CHARS` characters (a service allows more for fields it names
  in its `Rules`);
- an enum holds a number its enum defines (proto3 keeps unknown numbers);
- a google.protobuf.Timestamp lies in 0001-01-01T00:00:00Z to
  9999-12-31T23:59:59Z (its documented range) with nanos in 0 to 999,999,999;
  a google.protobuf.Duration is not negative (no request of ours has a
  signed duration) and at most 10,000 years, the type's range.

Each violation names its field path (`reports[3].artifacts[0].uri`) in an
INVALID_ARGUMENT's BadRequest. Run by the one server interceptor
(`services.common.interceptor`) on every request; what a method's fields
mean (required ids, ranges of numbers) stays with its servicer.

The hot path is planned once per message type (cached by descriptor): only
string, enum, time and message fields that lead to one are visited, and a
type with none of them anywhere below it is not walked at all. Repeated
message fields a service names as `per_entry` are skipped here; its servicer
checks each entry with `RequestValidator.check`, so that one bad entry of a
batch fails only itself. Text that comes inside another format (a TOML price
book, a manifest's JSON) is held to the same rules with `text_problem`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from services.common.errors import FieldViolation, InvalidArgument, quote

DEFAULT_MAX_CHARS = 4096
# google.protobuf.Timestamp: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
TIMESTAMP_MIN_SECONDS = -62_135_596_800
TIMESTAMP_MAX_SECONDS = 253_402_300_799
# google.protobuf.Duration: +-10,000 years.
DURATION_MAX_SECONDS = 315_576_000_000
MAX_NANOS = 999_999_999
# Violations one error lists (the rest are counted).
MAX_VIOLATIONS = 20

_TIMESTAMP = "google.protobuf.Timestamp"
_DURATION = "google.protobuf.Duration"
_BAD_TIME = "must be a time from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z (nanos 0 to 999,999,999)"
_BAD_DURATION = (
    f"must be a duration from 0 to 10,000 years "
    f"(seconds 0 to {DURATION_MAX_SECONDS:,}, nanos 0 to {MAX_NANOS:,})"
)

# Kinds of plan steps.
_STR, _ENUM, _MSG, _TS, _DUR, _MAP = range(6)


def field_name(message_type: Any, name: str) -> str:
    """The full name of a field of a generated message class (KeyError for a typo)."""
    return message_type.DESCRIPTOR.fields_by_name[name].full_name


@dataclass(frozen=True)
class Rules:
    """A service's exceptions to the generic rules, by full field name (see `field_name`)."""

    # Longest strings some fields may hold instead of DEFAULT_MAX_CHARS.
    max_chars: Mapping[str, int] = field(default_factory=dict)
    # Repeated message fields whose entries the servicer checks one by one.
    per_entry: frozenset[str] = frozenset()


class _Plan:
    """What to visit in one message type.

    Singular strings and enums are read with one `attrgetter` call each and
    the strings checked together (one join, one scan) before any of them is
    looked at alone; `rest` holds the other (kind, field name, repeated,
    argument) steps.
    """

    __slots__ = ("strings", "string_fields", "string_cap", "enums", "enum_fields", "rest")

    def __init__(self) -> None:
        self.strings: Callable[[Any], tuple[str, ...]] | None = None
        self.string_fields: tuple[tuple[str, int], ...] = ()
        self.string_cap = 0
        self.enums: Callable[[Any], tuple[int, ...]] | None = None
        self.enum_fields: tuple[tuple[str, Any], ...] = ()
        self.rest: list[tuple[int, str, bool, Any]] = []

    def add(self, step: tuple[int, str, bool, Any]) -> None:
        kind, name, repeated, arg = step
        if kind == _STR and not repeated:
            self.string_fields += ((name, arg),)
            self.strings = _getter(name for name, _ in self.string_fields)
            self.string_cap = min(cap for _, cap in self.string_fields)
        elif kind == _ENUM and not repeated:
            self.enum_fields += ((name, arg),)
            self.enums = _getter(name for name, _ in self.enum_fields)
        else:
            self.rest.append(step)

    def __bool__(self) -> bool:
        return bool(self.string_fields or self.enum_fields or self.rest)


def _getter(names: Iterable[str]) -> Callable[[Any], tuple[Any, ...]]:
    """A function of a message giving the named fields' values as a tuple (even for one name)."""
    names = tuple(names)
    if len(names) == 1:
        get = operator.attrgetter(names[0])
        return lambda message: (get(message),)
    return operator.attrgetter(*names)


class RequestValidator:
    """Checks messages against the generic rules, with plans cached by message type."""

    def __init__(self, rules: Rules | None = None) -> None:
        self._rules = rules or Rules()
        # (descriptor, strings too?) -> plan; None: nothing to check.
        self._plans: dict[tuple[Descriptor, bool], _Plan | None] = {}
        self._checkers: dict[Descriptor, Callable[[Any, bytes], None] | None] = {}
        # No string of a body this long or shorter can break a length cap.
        self._short_body = min([DEFAULT_MAX_CHARS, *self._rules.max_chars.values()])

    def checker(self, descriptor: Descriptor) -> Callable[[Any, bytes], None] | None:
        """The check of one message type given the body it was decoded from (raises
        InvalidArgument); None when the type has nothing to check.

        A string's UTF-8 bytes are in the body as they are: a short body
        without a 0 byte holds no over-long string and no NUL, so only its
        enums and times are visited (a worker's report usually).
        """
        full, lean = self._plan(descriptor, True), self._plan(descriptor, False)
        if full is None:
            return None
        short = self._short_body

        def check(message: Any, body: bytes) -> None:
            plan = lean if len(body) <= short and b"\x00" not in body else full
            if plan is not None:
                found: list[FieldViolation] = []
                _walk(message, plan, "", found)
                if found:
                    raise _error(found)

        return check

    def violations(self, message: Any, prefix: str = "") -> list[FieldViolation]:
        """Every violation in `message`, field paths prefixed with `prefix`."""
        plan = self._plan(message.DESCRIPTOR, True)
        found: list[FieldViolation] = []
        if plan is not None:
            _walk(message, plan, prefix, found)
        return found

    def check(self, message: Any) -> None:
        """Raises InvalidArgument listing the violations in `message` (a decoded one: its
        serialized form, cheap to make, lets the check skip its strings as `checker` does)."""
        descriptor = message.DESCRIPTOR
        if descriptor not in self._checkers:
            self._checkers[descriptor] = self.checker(descriptor)
        check = self._checkers[descriptor]
        if check is not None:
            check(message, message.SerializeToString())

    # ------------------------------------------------------------ planning

    def _plan(self, descriptor: Descriptor, strings: bool) -> _Plan | None:
        key = (descriptor, strings)
        if key in self._plans:
            return self._plans[key]
        return self._build(descriptor, strings, {})

    def _build(
        self, descriptor: Descriptor, strings: bool, building: dict[Descriptor, _Plan]
    ) -> _Plan | None:
        key = (descriptor, strings)
        if key in self._plans:
            return self._plans[key]
        if descriptor in building:  # a recursive type: visited, to be safe
            return building[descriptor]
        plan = building[descriptor] = _Plan()
        for fd in descriptor.fields:
            step = self._step(fd, strings, building)
            if step is not None:
                plan.add(step)
        del building[descriptor]
        self._plans[key] = plan if plan else None
        return self._plans[key]

    def _step(
        self, fd: FieldDescriptor, strings: bool, building: dict[Descriptor, _Plan]
    ) -> tuple[int, str, bool, Any] | None:
        repeated = fd.is_repeated
        if fd.full_name in self._rules.per_entry:
            return None
        if fd.type == FieldDescriptor.TYPE_STRING:
            if not strings:
                return None
            return (_STR, fd.name, repeated, self._rules.max_chars.get(fd.full_name, DEFAULT_MAX_CHARS))
        if fd.type == FieldDescriptor.TYPE_ENUM:
            return (_ENUM, fd.name, repeated, (frozenset(fd.enum_type.values_by_number), fd.enum_type.name))
        if fd.type != FieldDescriptor.TYPE_MESSAGE:
            return None
        kind = fd.message_type
        if kind.GetOptions().map_entry:
            key = self._step(kind.fields_by_name["key"], strings, building)
            value = self._step(kind.fields_by_name["value"], strings, building)
            return (_MAP, fd.name, False, (key, value)) if key or value else None
        if kind.full_name == _TIMESTAMP:
            return (_TS, fd.name, repeated, None)
        if kind.full_name == _DURATION:
            return (_DUR, fd.name, repeated, None)
        sub = self._build(kind, strings, building)
        return (_MSG, fd.name, repeated, sub) if sub is not None else None


# ---------------------------------------------------------------- walking


def _error(found: list[FieldViolation]) -> InvalidArgument:
    return InvalidArgument(
        violations=found[:MAX_VIOLATIONS], omitted=max(0, len(found) - MAX_VIOLATIONS)
    )


def _walk(message: Any, plan: _Plan, path: str, found: list[FieldViolation]) -> None:
    if plan.strings is not None:
        values = plan.strings(message)
        joined = "".join(values)
        if len(joined) > plan.string_cap or "\x00" in joined:
            for (name, cap), value in zip(plan.string_fields, values, strict=True):
                _value(_STR, value, cap, path + name, found)
    if plan.enums is not None:
        for (name, arg), value in zip(plan.enum_fields, plan.enums(message), strict=True):
            if value not in arg[0]:
                _value(_ENUM, value, arg, path + name, found)
    for kind, name, repeated, arg in plan.rest:
        if kind == _MSG and not repeated:
            if message.HasField(name):
                _walk(getattr(message, name), arg, f"{path}{name}.", found)
        elif kind == _MAP:
            _walk_map(getattr(message, name), f"{path}{name}", arg, found)
        elif repeated:
            for i, value in enumerate(getattr(message, name)):
                _value(kind, value, arg, f"{path}{name}[{i}]", found)
        elif message.HasField(name):
            _value(kind, getattr(message, name), arg, path + name, found)


def _value(kind: int, value: Any, arg: Any, where: str, found: list[FieldViolation]) -> None:
    """Checks one value of a field (a singular field's, or an entry of a repeated one)."""
    if kind == _STR:
        if value and (len(value) > arg or "\x00" in value):
            found.append(FieldViolation(where, _string_problem(value, arg)))
    elif kind == _ENUM:
        if value not in arg[0]:
            found.append(FieldViolation(where, f"{value} is not a value of enum {arg[1]}"))
    elif kind == _MSG:
        _walk(value, arg, where + ".", found)
    elif kind == _TS:
        if not (
            TIMESTAMP_MIN_SECONDS <= value.seconds <= TIMESTAMP_MAX_SECONDS
            and 0 <= value.nanos <= MAX_NANOS
        ):
            found.append(FieldViolation(where, _BAD_TIME))
    elif kind == _DUR:
        if not (0 <= value.seconds <= DURATION_MAX_SECONDS and 0 <= value.nanos <= MAX_NANOS):
            found.append(FieldViolation(where, _BAD_DURATION))


def text_problem(value: str, cap: int = DEFAULT_MAX_CHARS) -> str | None:
    """What is wrong with a text by the rules above (None: nothing), for text that comes
    in inside another format (a TOML price book, a manifest's JSON)."""
    if len(value) > cap or "\x00" in value:
        return _string_problem(value, cap)
    return None


def _string_problem(value: str, cap: int) -> str:
    if len(value) > cap:
        return f"is {len(value):,} characters long; at most {cap:,} are accepted"
    return f"must not contain NUL characters (one is at character {value.index(chr(0)):,})"


def _walk_map(
    entries: Any, where: str, steps: tuple[Any, Any], found: list[FieldViolation]
) -> None:
    key_step, value_step = steps
    for key in entries:
        at = f"{where}[{quote(key, 50) if isinstance(key, str) else key}]"
        if key_step is not None:
            _value(key_step[0], key, key_step[3], f"{at}.key", found)
        if value_step is not None:
            _value(value_step[0], entries[key], value_step[3], f"{at}.value", found)
