"""RFC 7240 `Prefer`: does a request ask for `respond-async`? Pure.

    Prefer     = 1#preference
    preference = token [ BWS "=" BWS word ] *( OWS ";" [ OWS parameter ] )
    word       = token / quoted-string

A field may hold several preferences (`Prefer: wait=10, respond-async`), a request
may carry several Prefer fields, names compare without regard to case, and a
quoted string may hold commas and semicolons, so the value is split by a small
scanner rather than by `str.split`. Unknown preferences are ignored (RFC 7240 2).
"""

from __future__ import annotations

from collections.abc import Iterable

RESPOND_ASYNC = "respond-async"


def elements(value: str) -> list[str]:
    """The comma-separated elements of a field value, quoted strings respected; empty
    elements (RFC 9110 5.6.1 allows them) dropped."""
    found: list[str] = []
    start = 0
    quoted = False
    i = 0
    while i < len(value):
        ch = value[i]
        if quoted:
            if ch == "\\":
                i += 1  # a quoted-pair: the next character is taken as it is
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == ",":
            found.append(value[start:i])
            start = i + 1
        i += 1
    found.append(value[start:])
    return [e.strip() for e in found if e.strip()]


def name_of(preference: str) -> str:
    """The preference's token, lower-cased (`Respond-Async; x=1` -> `respond-async`)."""
    end = len(preference)
    for stop in ("=", ";"):
        at = preference.find(stop)
        if at != -1:
            end = min(end, at)
    return preference[:end].strip().lower()


def wants_async(values: Iterable[str]) -> bool:
    """Whether any of the request's Prefer field values asks for respond-async."""
    return any(name_of(p) == RESPOND_ASYNC for v in values for p in elements(v))


def without_async(lines: bytes) -> bytes:
    """Header lines with `respond-async` taken out of every Prefer field (a field left
    empty is dropped): the proxy applied that preference itself, so the API must not
    see it and answer 202 on its own. Other preferences pass on unchanged."""
    if b"prefer" not in lines.lower():
        return lines
    out = []
    for line in lines.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"prefer":
            text = value.decode("utf-8", "surrogateescape")
            kept = [p for p in elements(text) if name_of(p) != RESPOND_ASYNC]
            if not kept:
                continue
            line = name + b": " + ", ".join(kept).encode("utf-8", "surrogateescape")
        out.append(line)
    return b"\r\n".join(out)
