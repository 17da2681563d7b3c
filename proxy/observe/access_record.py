"""The access line: one record per client request, filled in as the request is served.

One declaration drives both forms of the line: each field of `AccessRecord` says
in its metadata how it is written (`TEXT`, `COUNT`, or `MILLIS` under another
key), and `COLUMNS`, built from those fields in their order, makes both the JSON
line (`json()`, whose code is generated from COLUMNS at import) and the dict the
console format gets (`fields()`). A field added to the record is in both, in the
same place; fields left None are in neither.

The JSON is written directly, not by a generic encoder: the dict and the
encoder cost ~18 µs per request in the running proxy, more than a tenth of all
its CPU (bench/ANALYSIS.md). msgspec was tried as the one encoder and does not
fit: it writes raw UTF-8 (it has no ASCII-escaping option), compact separators
and shortest floats, so the line's bytes would change (`"total_ms": 1.50` would
become `"total_ms":1.5`), and the line's readers and tests pin them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from operator import attrgetter
from typing import Any


@dataclass(frozen=True, slots=True)
class Kind:
    """How a value `v` is written: as an f-string replacement field in the JSON line,
    and as a value in the dict form."""

    template: str
    value: Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value


def _millis(seconds: float) -> float:
    # The number the JSON text holds: both round the exact binary value to 2 places.
    return round(seconds * 1000, 2)


# Strings escaped ASCII-only, as json.dumps writes them.
TEXT = Kind("{_string(v)}", _same)
COUNT = Kind("{v:d}", _same)
# Seconds, written as milliseconds with two decimals.
MILLIS = Kind("{v * 1000:.2f}", _millis)


def _as(kind: Kind, key: str | None = None) -> Mapping[str, Any]:
    """A field's metadata: how it is written, and under which key (default: its name)."""
    return {"kind": kind, "key": key}


@dataclass(slots=True)
class AccessRecord:
    # The line's order is this order; event, level and timestamp follow.
    request_id: str = field(metadata=_as(TEXT))
    method: str = field(metadata=_as(TEXT))
    # Which of the config's `integrations:` served it (None without the list).
    integration: str | None = field(default=None, metadata=_as(TEXT))
    path: str | None = field(default=None, metadata=_as(TEXT))
    scope: str | None = field(default=None, metadata=_as(TEXT))
    lane: str | None = field(default=None, metadata=_as(TEXT))
    client: str | None = field(default=None, metadata=_as(TEXT))
    bytes_in: int | None = field(default=None, metadata=_as(COUNT))
    request_body: str | None = field(default=None, metadata=_as(TEXT))
    attempts: int | None = field(default=None, metadata=_as(COUNT))
    queue_wait: float | None = field(default=None, metadata=_as(MILLIS, "queue_wait_ms"))
    upstream_time: float | None = field(default=None, metadata=_as(MILLIS, "upstream_ms"))
    upstream_status: int | None = field(default=None, metadata=_as(COUNT))
    response_body: str | None = field(default=None, metadata=_as(TEXT))
    error: str | None = field(default=None, metadata=_as(TEXT))
    error_message: str | None = field(default=None, metadata=_as(TEXT))
    status: int | None = field(default=None, metadata=_as(COUNT))
    bytes_out: int | None = field(default=None, metadata=_as(COUNT))
    total_time: float | None = field(default=None, metadata=_as(MILLIS, "total_ms"))

    def fields(self) -> dict[str, Any]:
        """The line's fields as a dict (for the console format), in the line's order."""
        return {
            column.key: column.kind.value(value)
            for column, value in zip(COLUMNS, _values(self), strict=True)
            if value is not None
        }

    def json(self, timestamp: str) -> str:
        """The JSON line (no newline), with event, level and timestamp last."""
        return _json(self, timestamp)


@dataclass(frozen=True, slots=True)
class Column:
    attribute: str
    key: str
    kind: Kind


COLUMNS = tuple(
    Column(f.name, f.metadata["key"] or f.name, f.metadata["kind"])
    for f in dataclasses.fields(AccessRecord)
)
# All the values in one call, in the columns' order.
_values = attrgetter(*(column.attribute for column in COLUMNS))


def _write_json() -> Callable[[AccessRecord, str], str]:
    """json(), written out field by field from COLUMNS, as it used to be written by
    hand: a loop over the columns took ~50 % longer (2.6-2.9 µs a line against 1.8).
    The source holds only the field names and the kinds' templates, never data."""
    lines = ["def json(self, timestamp):", "    parts = []"]
    for column in COLUMNS:
        key = encode_basestring_ascii(column.key)
        lines += [
            f"    v = self.{column.attribute}",
            "    if v is not None:",
            f"        parts.append(f'{key}: {column.kind.template}')",
        ]
    lines.append(
        "    return '{' + ', '.join(parts) + "
        """f', "event": "request", "level": "info", "timestamp": "{timestamp}"}}'"""
    )
    namespace: dict[str, Any] = {"_string": encode_basestring_ascii}
    exec("\n".join(lines), namespace)
    json: Callable[[AccessRecord, str], str] = namespace["json"]
    return json


_json = _write_json()
