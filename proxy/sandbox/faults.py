"""Fault rules: scripted misbehaviour of the API or of what stands in front of it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

# Messages a real deployment sends with these statuses, so clients see familiar text.
_DEFAULT_MESSAGES = {
    408: "The API request took too long to complete.",
    429: "Too many objects",
    475: "Incomplete request: the API did not receive the complete request payload.",
    500: "Internal error.",
    503: "Service unavailable.",
}

# An hour outlasts any client timeout worth testing; NaN and infinity are refused too.
MAX_DELAY = 3600.0

_FIELDS = {
    "status",
    "times",
    "method",
    "path_prefix",
    "json",
    "delay",
    "drop",
    "counts_against_limit",
    "error_message",
}


def _is_int(value: object) -> bool:
    # JSON true/false arrive as bool, which Python also counts as int.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class FaultRule:
    """One scripted fault; `times` counts down as it fires.

    A rule with only `delay` slows the request down and then lets it be served
    normally, which is how client timeouts are exercised.
    """

    status: int | None = None
    times: int = 1
    method: str | None = None
    path_prefix: str | None = None
    # False: a bare text/html body, like a load balancer's 502/503 with no API behind it.
    json: bool = True
    delay: float = 0.0
    drop: bool = False
    counts_against_limit: bool = True
    error_message: str | None = None

    def __post_init__(self) -> None:
        if self.status is not None and not (_is_int(self.status) and 100 <= self.status <= 599):
            raise ValueError("status must be an integer from 100 to 599")
        if not _is_int(self.times) or self.times < 1:
            raise ValueError("times must be a positive integer")
        if (
            isinstance(self.delay, bool)
            or not isinstance(self.delay, int | float)
            or not 0 <= self.delay <= MAX_DELAY
        ):
            raise ValueError(f"delay must be a number of seconds from 0 to {MAX_DELAY:g}")
        if self.status is None and not self.drop and not self.delay:
            raise ValueError("a fault needs a status, drop or a delay")
        if self.method is not None:
            self.method = self.method.upper()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaultRule:
        if not isinstance(data, Mapping):
            raise ValueError("a fault rule must be a JSON object")
        unknown = set(data) - _FIELDS
        if unknown:
            raise ValueError(f"unknown fault rule fields: {', '.join(sorted(unknown))}")
        for flag in ("json", "drop", "counts_against_limit"):
            if flag in data and not isinstance(data[flag], bool):
                raise ValueError(f"{flag} must be true or false")
        for text in ("method", "path_prefix", "error_message"):
            if data.get(text) is not None and not isinstance(data[text], str):
                raise ValueError(f"{text} must be a string")
        return cls(**data)

    def matches(self, method: str, raw_path: str) -> bool:
        if self.times < 1:
            return False
        if self.method is not None and self.method != method.upper():
            return False
        return self.path_prefix is None or raw_path.startswith(self.path_prefix)

    def message(self) -> str:
        if self.error_message is not None:
            return self.error_message
        assert self.status is not None
        return _DEFAULT_MESSAGES.get(self.status, f"Sandbox fault {self.status}.")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class FaultQueue:
    """Rules in the order they were added; the first live match fires."""

    def __init__(self) -> None:
        self._rules: list[FaultRule] = []

    def add(self, rule: FaultRule) -> None:
        self._rules.append(rule)

    def clear(self) -> None:
        self._rules.clear()

    def take(self, method: str, raw_path: str) -> FaultRule | None:
        for rule in self._rules:
            if rule.matches(method, raw_path):
                rule.times -= 1
                return rule
        return None

    @property
    def pending(self) -> list[FaultRule]:
        return [rule for rule in self._rules if rule.times > 0]
