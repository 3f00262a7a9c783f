"""Record validation and ``find`` filtering for the REST API emulator (pure logic).

Validation is strict on purpose: a field the real API would not know, or a value
of the wrong type, is a 400 here, so a client bug surfaces in tests instead of
being stored silently.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.sandbox.errors import ApiError
from proxy.sandbox.state import StoredRecord

KEY_FIELDS = tuple(f"key{i}" for i in range(1, 21))
SERVICE_KEY_FIELDS = tuple(f"service_key{i}" for i in range(1, 6))
RANGE_KEY_FIELDS = tuple(f"range_key{i}" for i in range(1, 11))
# Fields holding an optional string, in the order records are rendered.
STRING_FIELDS = (
    "profile_key",
    "parent_key",
    *KEY_FIELDS,
    *SERVICE_KEY_FIELDS,
    "body",
    "precommit_body",
)
WRITABLE_FIELDS = frozenset({"record_key", "country", *STRING_FIELDS, *RANGE_KEY_FIELDS})

# Which fields ``find`` can filter on, and whether they are numeric.
FILTERABLE_TEXT = frozenset({"record_key", "profile_key", "parent_key", *KEY_FIELDS, *SERVICE_KEY_FIELDS})
FILTERABLE_NUMBERS = frozenset({*RANGE_KEY_FIELDS, "version"})

MAX_LIMIT = 100
_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "$gt": operator.gt,
    "$gte": operator.ge,
    "$lt": operator.lt,
    "$lte": operator.le,
}

Predicate = Callable[[StoredRecord], bool]


def _is_int(value: object) -> bool:
    # bool is an int subclass; JSON true is not a range key.
    return isinstance(value, int) and not isinstance(value, bool)


def validate_record(payload: object, country: str) -> dict[str, Any]:
    """The fields to store for a create/overwrite request body, or :class:`ApiError` (400).

    ``record_key`` is a required non-empty string; ``country``, when given, must
    be the country the request was sent to, in lower case; the other fields are
    optional strings (or null) and ``range_key1..10`` optional integers (or null).
    The result always holds ``record_key`` and ``country`` first.
    """
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object", "body")
    unknown = sorted(set(payload) - WRITABLE_FIELDS)
    if unknown:
        raise ApiError(400, f"unknown record field(s): {', '.join(unknown)}", f"body.{unknown[0]}")

    record_key = payload.get("record_key")
    if not isinstance(record_key, str) or not record_key:
        raise ApiError(400, "record_key is required and must be a non-empty string", "body.record_key")
    if "country" in payload and payload["country"] != country:
        raise ApiError(
            400,
            f"country must be {country!r} (lower case) for this endpoint, got {payload['country']!r}",
            "body.country",
        )

    fields: dict[str, Any] = {"record_key": record_key, "country": country}
    for name in STRING_FIELDS:
        if name in payload:
            value = payload[name]
            if value is not None and not isinstance(value, str):
                raise ApiError(400, f"{name} must be a string or null", f"body.{name}")
            fields[name] = value
    for name in RANGE_KEY_FIELDS:
        if name in payload:
            value = payload[name]
            if value is not None and not _is_int(value):
                raise ApiError(400, f"{name} must be an integer or null", f"body.{name}")
            fields[name] = value
    return fields


@dataclass(frozen=True)
class FindQuery:
    """A validated ``find`` request."""

    predicates: tuple[Predicate, ...]
    limit: int
    offset: int

    def run(self, records: Iterable[StoredRecord]) -> tuple[list[StoredRecord], int]:
        """The requested page of matching records (in store order) and the total match count."""
        matches = [r for r in records if all(p(r) for p in self.predicates)]
        return matches[self.offset : self.offset + self.limit], len(matches)


def parse_find(payload: object, country: str) -> FindQuery:
    """Validate a ``find`` body, or raise :class:`ApiError` (400).

    ``filter`` maps a field to a scalar (equality), a list (any of), ``{"$not":
    scalar-or-list}`` or, for numeric fields, ``{"$gt"|"$gte"|"$lt"|"$lte": n}``
    (several operators combine with AND). ``options.limit`` defaults to 100 and
    must be 1..100; ``options.offset`` defaults to 0 and must not be negative.
    """
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object", "body")
    unknown = sorted(set(payload) - {"country", "filter", "options"})
    if unknown:
        raise ApiError(400, f"unknown find parameter(s): {', '.join(unknown)}", "body")
    if "country" in payload and payload["country"] != country:
        raise ApiError(
            400,
            f"country must be {country!r} (lower case) for this endpoint, got {payload['country']!r}",
            "body.country",
        )

    raw_filter = payload.get("filter", {})
    if raw_filter is None:
        raw_filter = {}
    if not isinstance(raw_filter, dict):
        raise ApiError(400, "filter must be an object", "body.filter")
    predicates = tuple(_predicate(name, cond) for name, cond in raw_filter.items())

    options = payload.get("options", {})
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ApiError(400, "options must be an object", "body.options")
    unsupported = sorted(set(options) - {"limit", "offset"})
    if unsupported:
        raise ApiError(
            400,
            f"unsupported option(s): {', '.join(unsupported)} (the sandbox knows limit and offset)",
            "body.options",
        )
    limit = options.get("limit", MAX_LIMIT)
    if not _is_int(limit) or not 1 <= limit <= MAX_LIMIT:
        raise ApiError(400, f"options.limit must be an integer from 1 to {MAX_LIMIT}", "body.options.limit")
    offset = options.get("offset", 0)
    if not _is_int(offset) or offset < 0:
        raise ApiError(400, "options.offset must be a non-negative integer", "body.options.offset")
    return FindQuery(predicates=predicates, limit=limit, offset=offset)


def _field_value(record: StoredRecord, name: str) -> Any:
    if name == "version":
        return record.version
    return record.fields.get(name)


def _predicate(name: str, condition: object) -> Predicate:
    source = f"body.filter.{name}"
    if name in FILTERABLE_TEXT:
        numeric = False
    elif name in FILTERABLE_NUMBERS:
        numeric = True
    else:
        raise ApiError(400, f"cannot filter on {name!r}", source)

    def check_scalar(value: object) -> Any:
        ok = value is None or (_is_int(value) if numeric else isinstance(value, str))
        if not ok:
            kind = "an integer" if numeric else "a string"
            raise ApiError(400, f"filter values for {name} must be {kind} or null", source)
        return value

    def check_choices(value: object) -> list[Any]:
        if isinstance(value, list):
            return [check_scalar(v) for v in value]
        return [check_scalar(value)]

    if isinstance(condition, Mapping):
        if not condition:
            raise ApiError(400, f"empty operator object for {name}", source)
        if "$not" in condition:
            if len(condition) != 1:
                raise ApiError(400, f"$not cannot be combined with other operators ({name})", source)
            excluded = check_choices(condition["$not"])
            return lambda r: _field_value(r, name) not in excluded
        if not numeric:
            raise ApiError(400, f"{name} only supports equality, lists and $not", source)
        bad = sorted(set(condition) - set(_COMPARISONS))
        if bad:
            raise ApiError(400, f"unknown operator(s) for {name}: {', '.join(bad)}", source)
        bounds: list[tuple[Callable[[Any, Any], bool], int]] = []
        for op, bound in condition.items():
            if not _is_int(bound):
                raise ApiError(400, f"{op} on {name} needs an integer", source)
            bounds.append((_COMPARISONS[op], bound))

        def in_range(record: StoredRecord) -> bool:
            value = _field_value(record, name)
            return value is not None and all(cmp(value, b) for cmp, b in bounds)

        return in_range

    choices = check_choices(condition)
    return lambda r: _field_value(r, name) in choices
