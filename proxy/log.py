"""Structured logging with a redaction guard, cheap enough for one event per request.

The proxy's own events go through structlog straight to stderr (no stdlib
LogRecord, no handler chain); third-party loggers (aiohttp) go through the
stdlib and are rendered by the same processors, so every line is JSON (or
console) and redacted.

Code never logs secrets on purpose; the redaction is the guard for when
someone does by accident, in two passes: values under sensitive keys are
masked on the event (a cached check per key), then the rendered line is
scrubbed once for every known secret (also in its JSON-escaped form), signature
cookies, Bearer values, anything shaped like a LuxSci auth code, and any JSON
"auth" value (bodies logged with log_bodies). One combined regex decides
whether a line needs the pattern pass at all.

Level and format are module state read per event, so a reload (SIGHUP) changes
them for loggers that were already cached.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import IO, Any, TextIO, cast

import structlog
from structlog.typing import Processor

MASK = "[REDACTED]"
_SENSITIVE_KEY = re.compile(
    r"secret|password|passwd|^pass$|api_?key|authorization|cookie|signature|auth_?code|^auth$|token",
    re.IGNORECASE,
)
_PATTERNS = (
    # signature=<auth_code>:<hmac> as it appears in Cookie headers
    (re.compile(r"(signature=)[^;\s\"'\\]+"), r"\1" + MASK),
    (re.compile(r"(Bearer\s+)[^\s\"',;\\]+", re.IGNORECASE), r"\1" + MASK),
    # LuxSci auth codes: <session>-<epoch>-<long hex> (see PROTOCOL.md examples)
    (re.compile(r"\b\d+-\d{9,11}-[0-9a-fA-F]{32,}\b"), MASK),
    # Whatever shape a code takes, it travels as the JSON key "auth" (logged bodies),
    # possibly JSON-escaped inside the rendered line.
    (re.compile(r'(\\*"auth\\*"\s*:\s*\\*")[^"\\]*'), r"\1" + MASK),
)
# Does a line need the pattern pass at all? (Most access events do not.)
_ANY_PATTERN = re.compile(r"signature=|bearer\s|\d-\d{9,11}-[0-9a-fA-F]{32}|\"auth", re.IGNORECASE)

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50, "exception": 40}
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


class Redactor:
    """`secrets` are exact strings to mask wherever they appear."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets: list[str] = []
        self._key_cache: dict[str, bool] = {}
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        # Very short "secrets" would mask random text; real ones are long. Each is also
        # looked for as it appears inside a JSON string (escaped).
        found = set(self.secrets)
        for secret in secrets:
            if secret and len(secret) >= 4:
                found.add(secret)
                found.add(json.dumps(secret)[1:-1])
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted(found, key=len, reverse=True)

    def sensitive(self, key: str) -> bool:
        known = self._key_cache.get(key)
        if known is None:
            known = self._key_cache[key] = bool(_SENSITIVE_KEY.search(key))
        return known

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        if _ANY_PATTERN.search(text):
            for pattern, repl in _PATTERNS:
                text = pattern.sub(repl, text)
        return text

    def mask_keys(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event.items():
            if self.sensitive(key):
                event[key] = MASK
            elif isinstance(value, dict):
                event[key] = self._mask_nested(value)
        return event

    def _mask_nested(self, value: dict[Any, Any]) -> dict[Any, Any]:
        return {
            k: MASK
            if self.sensitive(str(k))
            else self._mask_nested(v)
            if isinstance(v, dict)
            else v
            for k, v in value.items()
        }

    def scrub_line(self, logger: Any, method: str, line: Any) -> str:
        """After the renderer: `line` is the rendered string (typed Any: structlog's
        processor type only knows event dicts)."""
        return self.scrub(line)

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """Both passes on an event dict (for callers that render elsewhere)."""
        self.mask_keys(logger, method, event)
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = self.scrub(value)
            elif not isinstance(value, int | float | bool | dict) and value is not None:
                event[key] = self.scrub(repr(value))
        return event


# One redactor for the process; `configure` loads the secrets into it.
REDACTOR = Redactor()


class _State:
    threshold = 20
    renderer: Any = structlog.processors.JSONRenderer()


def _drop_below_level(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    if _LEVELS.get(method, 20) < _State.threshold:
        raise structlog.DropEvent
    return event


def _render(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
    rendered: str = _State.renderer(logger, method, event)
    return rendered


_TAIL: list[Processor] = [
    structlog.processors.format_exc_info,
    REDACTOR.mask_keys,
    _render,
    REDACTOR.scrub_line,
]


def configure(
    level: str = "info",
    fmt: str = "json",
    secrets: Iterable[str] = (),
    stream: IO[str] | None = None,
) -> None:
    """Set level, format and secrets; may be called again (reload) at any time."""
    REDACTOR.add(secrets)
    _State.threshold = _LEVELS[level]
    _State.renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    out = stream if stream is not None else sys.stderr
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            _drop_below_level,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            *_TAIL,
        ],
        # Every level reaches the processors: _drop_below_level filters by the current
        # threshold, so a reload changes it for cached loggers too.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.WriteLoggerFactory(file=cast(TextIO, out)),
        cache_logger_on_first_use=True,
    )
    # Third-party loggers (aiohttp): the same rendering and redaction via the stdlib.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *_TAIL],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
