"""Structured logging (structlog over stdlib logging) with a redaction guard.

Code never logs secrets on purpose; `redact` is the guard for when someone does
by accident: it masks values under sensitive keys, every known secret string
wherever it appears (tracebacks included), signature cookies, Bearer values
and anything shaped like a LuxSci auth code. aiohttp's own loggers go through
the same chain, so every line on stderr is JSON (or console) and redacted.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

MASK = "[REDACTED]"
_SENSITIVE_KEY = re.compile(
    r"secret|password|passwd|^pass$|api_?key|authorization|cookie|signature|auth_?code|^auth$|token",
    re.IGNORECASE,
)
_PATTERNS = (
    # signature=<auth_code>:<hmac> as it appears in Cookie headers
    (re.compile(r"(signature=)[^;\s\"']+"), r"\1" + MASK),
    (re.compile(r"(Bearer\s+)[^\s\"',;]+", re.IGNORECASE), r"\1" + MASK),
    # LuxSci auth codes: <session>-<epoch>-<long hex> (see PROTOCOL.md examples)
    (re.compile(r"\b\d+-\d{9,11}-[0-9a-fA-F]{32,}\b"), MASK),
    # Whatever shape a code takes, it travels as the JSON key "auth" (logged bodies).
    (re.compile(r'("auth"\s*:\s*")(?:[^"\\]|\\.)*"'), r"\1" + MASK + '"'),
)


class Redactor:
    """A structlog processor; `secrets` are exact strings to mask wherever they appear."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        # Very short "secrets" would mask random text; real ones are long.
        merged = set(self.secrets) | {s for s in secrets if s and len(s) >= 4}
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted(merged, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        return text

    def _value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {
                k: MASK if _SENSITIVE_KEY.search(str(k)) else self._value(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self._value(v) for v in value]
        if isinstance(value, int | float | bool) or value is None:
            return value
        return self.scrub(repr(value))

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in list(event.items()):
            if _SENSITIVE_KEY.search(key):
                event[key] = MASK
            else:
                event[key] = self._value(value)
        return event


_USER_SEGMENT = re.compile(r"^(/perl/api/v2/user/)[^/]+")
# How much of a body log_bodies writes.
BODY_LOG_LIMIT = 2048


def mask_user(path: str) -> str:
    """/perl/api/v2/user/joe@example.com/profile -> /perl/api/v2/user/[user]/profile"""
    return _USER_SEGMENT.sub(r"\1[user]", path)


def body_text(body: bytes) -> str:
    """A body for the log when log_bodies is on: decoded leniently, cut at BODY_LOG_LIMIT."""
    text = body[:BODY_LOG_LIMIT].decode("utf-8", "replace")
    return text + ("…" if len(body) > BODY_LOG_LIMIT else "")


# One redactor for the process; `configure` loads the secrets into it.
REDACTOR = Redactor()


def configure(level: str = "info", fmt: str = "json", secrets: Iterable[str] = ()) -> None:
    REDACTOR.add(secrets)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    pre_chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        timestamper,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            REDACTOR,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    structlog.configure(
        processors=[*pre_chain, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
