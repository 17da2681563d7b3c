"""What an answer's rate-limit headers say, in one normalised view: pure, no I/O.

APIs announce their limits in three dialects (PROTOCOL.md, "Rate-limit headers other
APIs send"), all read here so the limiter consumes one shape:

- `X-RateLimit-Limit`, `-Remaining`, `-Reset`: the de-facto one (LuxSci's). The reset
  is epoch seconds at some APIs and seconds from now at others; they are told apart by
  size: no window lasts 31 years, so a value of 10^9 or more is a date (epoch seconds,
  or epoch milliseconds from 10^12 on), anything smaller a delay.
- The IETF httpapi draft: `RateLimit-Policy: 100;w=60` (a quota per window of w
  seconds; several may be listed) with `RateLimit: limit=100, remaining=50, reset=30`;
  its later revisions name policies, `RateLimit-Policy: "burst";q=100;w=60` with
  `RateLimit: "burst";r=50;t=30`. Resets are always seconds from now.
- The draft's first revisions: separate `RateLimit-Limit` (possibly followed by its
  policies, `100, 100;w=60`), `RateLimit-Remaining`, `RateLimit-Reset` (seconds).

The IETF fields win when an answer carries both (they are the standard, and an API that
took the trouble to send them means them); a field that cannot be read is ignored, never
an error: the limiter then simply learns nothing from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

# Resets at or above this are dates (epoch seconds: September 2001 on), below it delays.
EPOCH_FLOOR = 1e9
# ... and at or above this, epoch milliseconds.
EPOCH_MS_FLOOR = 1e12
# Header values longer than this are not read (a bound on the work an answer can cause).
_MAX_FIELD = 1024


@dataclass(frozen=True, slots=True)
class RateView:
    """One answer's word on a rate limit; None where it said nothing (readably)."""

    limit: int | None = None
    remaining: int | None = None
    # Server time (epoch seconds) at which `remaining` renews.
    reset_at: float | None = None
    # Seconds per window, when the API names it (a policy's w=).
    window: float | None = None

    @property
    def complete(self) -> bool:
        """Says the limit, what is left of it and when it renews."""
        return self.limit is not None and self.remaining is not None and self.reset_at is not None

    def cap_per(self, window: float) -> int | None:
        """The most requests any `window`-second span can hold by this limit: the limit
        itself when the API's window is as long or longer (or unnamed), else as many of
        the API's windows as overlap one span."""
        if self.limit is None:
            return None
        if self.window is None or self.window >= window:
            return self.limit
        return self.limit * math.ceil(window / self.window)


_NOTHING = RateView()


def read(headers: Mapping[str, str], now: float) -> RateView | None:
    """The view an answer's headers give at server time `now`, or None when they give none."""
    for dialect in (_ietf, _draft_split, _x_ratelimit):
        view = dialect(headers, now)
        if view is not None and view != _NOTHING:
            return view
    return None


# -- the dialects ---------------------------------------------------------------------------


def _x_ratelimit(headers: Mapping[str, str], now: float) -> RateView | None:
    limit_field = _field(headers, "X-RateLimit-Limit")
    remaining = _count(_field(headers, "X-RateLimit-Remaining"))
    reset = _number(_field(headers, "X-RateLimit-Reset"))
    if limit_field is None and remaining is None and reset is None:
        return None
    limit, window = _limit_and_window(limit_field)
    return RateView(limit, remaining, None if reset is None else reset_time(reset, now), window)


def _draft_split(headers: Mapping[str, str], now: float) -> RateView | None:
    limit_field = _field(headers, "RateLimit-Limit")
    remaining = _count(_field(headers, "RateLimit-Remaining"))
    reset = _number(_field(headers, "RateLimit-Reset"))
    if limit_field is None and remaining is None and reset is None:
        return None
    limit, window = _limit_and_window(limit_field)
    policy_window = _policy_window(headers, limit)
    return RateView(
        limit,
        remaining,
        None if reset is None else now + reset,
        window if window is not None else policy_window,
    )


def _ietf(headers: Mapping[str, str], now: float) -> RateView | None:
    field = _field(headers, "RateLimit")
    if field is None:
        return None
    members = _members(field)
    if not members:
        return None
    if any(value is not None for _, value, _ in members):
        # The dictionary form: limit=100, remaining=50, reset=30.
        entries = {name: value for name, value, _ in members if value is not None}
        limit = _count(entries.get("limit"))
        remaining = _count(entries.get("remaining"))
        reset = _number(entries.get("reset"))
        return RateView(
            limit,
            remaining,
            None if reset is None else now + reset,
            _policy_window(headers, limit),
        )
    # The named form: "burst";r=50;t=30, one item per policy. The one with the fewest
    # requests left is the one that binds.
    best: RateView | None = None
    policies = _named_policies(headers)
    for name, _, params in members:
        remaining = _count(params.get("r"))
        reset = _number(params.get("t"))
        quota, window = policies.get(name, (None, None))
        view = RateView(quota, remaining, None if reset is None else now + reset, window)
        if best is None or _binds_before(view, best):
            best = view
    return best


def _binds_before(view: RateView, other: RateView) -> bool:
    if view.remaining is None:
        return False
    return other.remaining is None or view.remaining < other.remaining


def _policy_window(headers: Mapping[str, str], limit: int | None) -> float | None:
    """The window of the RateLimit-Policy whose quota is `limit` (the first, if none is)."""
    field = _field(headers, "RateLimit-Policy")
    if field is None:
        return None
    windows = []
    for head, value, params in _members(field):
        window = _number(params.get("w"))
        if value is not None or window is None or window <= 0:
            continue
        quota = _count(head)
        if quota is not None and quota == limit:
            return window
        windows.append(window)
    return windows[0] if windows else None


def _named_policies(headers: Mapping[str, str]) -> dict[str, tuple[int | None, float | None]]:
    field = _field(headers, "RateLimit-Policy")
    if field is None:
        return {}
    found: dict[str, tuple[int | None, float | None]] = {}
    for name, value, params in _members(field):
        if value is None:
            window = _number(params.get("w"))
            found.setdefault(name, (_count(params.get("q")), window if window else None))
    return found


def _limit_and_window(field: str | None) -> tuple[int | None, float | None]:
    """`100` or `100, 100;w=60` (a limit followed by its policies): the limit, and the
    window of the policy with that quota, when one is listed."""
    if field is None:
        return None, None
    members = _members(field)
    if not members or members[0][1] is not None:
        return None, None
    head, _, params = members[0]
    limit = _count(head)
    window = _number(params.get("w"))
    if window is None:
        for other, value, more in members[1:]:
            w = _number(more.get("w"))
            if value is None and w is not None and _count(other) == limit:
                window = w
                break
    return limit, window if window else None


def reset_time(value: float, now: float) -> float:
    """An X-RateLimit-Reset value as server time: a date by size, else a delay from `now`."""
    if value >= EPOCH_MS_FLOOR:
        return value / 1000
    if value >= EPOCH_FLOOR:
        return value
    return now + value


# -- reading values -----------------------------------------------------------------------------


def _field(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None or len(value) > _MAX_FIELD:
        return None
    value = value.strip()
    return value or None


def _number(text: str | None) -> float | None:
    """A non-negative finite number (an integer or decimal), else None."""
    if text is None:
        return None
    text = text.strip()
    if not text or text[0] in "+-":
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _count(text: str | None) -> int | None:
    """A non-negative whole number, else None."""
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def _members(field: str) -> list[tuple[str, str | None, dict[str, str]]]:
    """A structured-field list or dictionary (RFC 8941), leniently: each member as
    (item or key, value when it is `key=value`, parameters). Quoted strings are unquoted;
    a member that cannot be read is left out."""
    members = []
    for part in _split(field, ","):
        pieces = _split(part, ";")
        if not pieces:
            continue
        first = pieces[0]
        # An item (a quoted name, a number) or a dictionary entry `key=value`.
        head, eq, value = ("", "", "") if first.startswith('"') else first.partition("=")
        item = _unquote(first) if not eq else head.strip().lower()
        if not item:
            continue
        params: dict[str, str] = {}
        for piece in pieces[1:]:
            key, _, param = piece.partition("=")
            params.setdefault(key.strip().lower(), _unquote(param.strip()))
        members.append((item, _unquote(value.strip()) if eq else None, params))
    return members


def _split(text: str, sep: str) -> list[str]:
    """`text` cut at `sep` outside double quotes; empty pieces dropped."""
    pieces: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == sep and not quoted:
            pieces.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    pieces.append("".join(current).strip())
    return [p for p in pieces if p]


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return text
