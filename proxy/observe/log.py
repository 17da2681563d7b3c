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

import asyncio
import atexit
import contextlib
import io
import json
import logging
import re
import sys
import time
from collections.abc import Iterable, MutableMapping
from typing import IO, Any

import structlog
from structlog.typing import Processor

from proxy.observe.access_record import AccessRecord

MASK = "[REDACTED]"
_SENSITIVE_KEY = re.compile(
    r"secret|password|passwd|^pass$|api_?key|authorization|cookie|signature|auth_?code|^auth$|token",
    re.IGNORECASE,
)
_PATTERNS = (
    # signature=<auth_code>:<hmac> as it appears in Cookie headers
    (re.compile(r"(signature=)[^;\s\"'\\]+"), r"\1" + MASK),
    # auth=<auth_code>, the second cookie of auth.auth_cookie (not oauth=, x_auth=...)
    (re.compile(r"(?<![\w-])(auth=)[^;\s\"'\\&]+"), r"\1" + MASK),
    (re.compile(r"(Bearer\s+)[^\s\"',;\\]+", re.IGNORECASE), r"\1" + MASK),
    # LuxSci auth codes: <session>-<epoch>-<long hex> (see PROTOCOL.md examples)
    (re.compile(r"\b\d+-\d{9,11}-[0-9a-fA-F]{32,}\b"), MASK),
    # Whatever shape a code takes, it travels as the JSON key "auth" (logged bodies),
    # possibly JSON-escaped inside the rendered line.
    (re.compile(r'(\\*"auth\\*"\s*:\s*\\*")[^"\\]*'), r"\1" + MASK),
)
# Does a line need the pattern pass at all? Most access events do not, and this check is
# literal-led (about 1 µs on an access line, where one combined case-insensitive regex
# took 20 µs): plain substring tests, and a code-shape regex that starts with a literal.
_CODE_HINT = re.compile(r"-\d{9,11}-[0-9a-fA-F]{32}")


def _needs_patterns(text: str) -> bool:
    return (
        "signature=" in text
        or "auth=" in text
        or "earer" in text
        or "EARER" in text
        or '"auth' in text
        or _CODE_HINT.search(text) is not None
    )


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
        if _needs_patterns(text):
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


# One redactor for the process; `configure` loads the secrets into it.
REDACTOR = Redactor()


# One encoder for every line: json.dumps(default=...) would build a new one per call.
_ENCODE = json.JSONEncoder(default=repr).encode


def _json(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
    return _ENCODE(event)


class _State:
    threshold = 20
    renderer: Any = _json


class _Timestamp:
    """ISO-8601 UTC with microseconds; the date-time part is formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1e6):06d}Z"

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event["timestamp"] = self.now()
        return event


def _exc_info(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    # The formatter only when there is something to format: most events carry none.
    if "exc_info" in event or "exception" in event:
        return structlog.processors.format_exc_info(logger, method, event)
    return event


class LineWriter:
    """The logger structlog writes to: whole lines into a buffer, flushed within
    FLUSH_AFTER seconds (at once for warnings and errors, and at shutdown), so
    an access line costs no system call of its own."""

    FLUSH_AFTER = 0.2

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._scheduled = False

    def msg(self, message: str) -> None:
        self._stream.write(message + "\n")
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._stream.flush()  # no loop to flush later: write through
            return
        self._scheduled = True
        loop.call_later(self.FLUSH_AFTER, self.flush)

    def urgent(self, message: str) -> None:
        self._stream.write(message + "\n")
        self.flush()

    def flush(self) -> None:
        self._scheduled = False
        # stderr gone (a closed pipe): nothing left to tell anyone.
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    debug = info = msg
    warning = warn = error = err = critical = exception = fatal = failure = urgent


_WRITER: LineWriter | None = None
_TIMESTAMP = _Timestamp()
_ACCESS = structlog.get_logger("proxy.access")


def access(record: AccessRecord) -> None:
    """Log the per-request line ("request", level info).

    The record writes its own JSON: the structlog chain (a dict, the generic
    encoder, the key check) cost several times as much, on every request. The
    line is scrubbed for secrets like any other.
    """
    if _State.threshold > 20:
        return
    writer = _WRITER
    if writer is None or _State.renderer is not _json:
        _ACCESS.info("request", **record.fields())  # console format, or not configured
        return
    writer.msg(REDACTOR.scrub(record.json(_TIMESTAMP.now())))


def reset() -> None:
    """Undo configure(): structlog's defaults, no writer (for tests that configure)."""
    global _WRITER
    flush()
    _WRITER = None
    _State.threshold = 20
    _State.renderer = _json
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def flush() -> None:
    """Write out whatever is buffered (at shutdown)."""
    if _WRITER is not None:
        _WRITER.flush()


def _stderr_buffered() -> IO[str]:
    # sys.stderr is line-buffered (a flush per line); this is the same fd, block-buffered.
    raw = io.FileIO(sys.stderr.fileno(), "w", closefd=False)
    return io.TextIOWrapper(io.BufferedWriter(raw, 64 * 1024), encoding="utf-8", errors="replace")


def _drop_below_level(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    if _LEVELS.get(method, 20) < _State.threshold:
        raise structlog.DropEvent
    return event


def _render(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
    rendered: str = _State.renderer(logger, method, event)
    return rendered


_TAIL: list[Processor] = [
    _exc_info,
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
    global _WRITER
    REDACTOR.add(secrets)
    _State.threshold = _LEVELS[level]
    _State.renderer = _json if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    logging.getLogger().setLevel(level.upper())
    if _WRITER is not None and stream is None:
        return  # a reload: level, format and secrets are all it can change here
    out = stream if stream is not None else _stderr_buffered()
    _WRITER = LineWriter(out)
    atexit.register(flush)
    structlog.configure(
        processors=[
            _drop_below_level,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _TIMESTAMP,
            *_TAIL,
        ],
        # Every level reaches the processors: _drop_below_level filters by the current
        # threshold, so a reload changes it for cached loggers too.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=lambda *args: _WRITER,
        cache_logger_on_first_use=True,
    )
    # Third-party loggers (aiohttp): the same rendering and redaction via the stdlib.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *_TAIL],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    logging.getLogger().handlers[:] = [handler]
