"""Structured logging with a redaction guard, cheap enough for one event per request.

Every setting belongs to a `Logs` object, one per service (ProxyService makes
it from its config): level, format, the redactor with the configured secrets,
and the writer. Two services in one process log to their own streams with
their own settings, and a reload (SIGHUP) changes a Logs in place, so loggers
already cached follow it.

How an event finds its Logs:

- Loggers from `logs.logger()` wrap the Logs itself: the service, the CLI and
  the access line (`logs.access(record)`, called by the forwarder) use these.
- Module-level `structlog.get_logger(...)` loggers (limits, session, server,
  the forwarder's other events) wrap a stand-in that looks the Logs up in the
  context the event is made in. A service runs its start, reload and stop in
  `logs.context()`, and every task, transport and callback started from there
  inherits that context (asyncio and uvloop both copy it), so its components'
  events reach its Logs. The CLI runs the whole event loop in it, so even
  events made outside any task (an exception handler, a task's finaliser)
  have its secrets masked. An event outside every service's context goes to
  a plain Logs on stderr (info, json, no configured secrets).

What stays process-wide, and why:

- structlog's configuration, which is one per process by design: it is set
  once, when this module is imported, to a chain that only hands each event
  to its Logs (`_dispatch`). structlog.testing.capture_logs swaps that chain
  for its own, so tests still see every event, the access line included.
- The stdlib root handler for third-party loggers (aiohttp, asyncio), which
  the standard library keeps per process: `route_stdlib()` (called by the CLI)
  installs one that renders each record with the Logs of the context it is
  logged in, so those lines are JSON (or console) and redacted too.

Code never logs secrets on purpose; the redaction is the guard for when
someone does by accident, in two passes: values under sensitive keys are
masked on the event (a cached check per key), then the rendered line is
scrubbed once for every known secret (also in its JSON-escaped form), signature
cookies, Bearer values, anything shaped like a LuxSci auth code, and any JSON
"auth" value (bodies logged with log_bodies). A literal-led check decides
whether a line needs the pattern pass at all.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import io
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, MutableMapping
from typing import IO, Any

import structlog
from structlog.typing import EventDict, Processor

from proxy.debugflag import DebugFlag
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
    # OAuth 2.0 token requests and answers (RFC 6749 §4.4, §5.1), form-encoded or JSON.
    (
        re.compile(
            r'((?:access_token|refresh_token|client_secret)(?:\\*"\s*:\s*\\*"|=))[^"\\&\s]+'
        ),
        r"\1" + MASK,
    ),
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
        or "_token" in text
        or "client_secret" in text
        or _CODE_HINT.search(text) is not None
    )


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50, "exception": 40}
_INFO = _LEVELS["info"]
# How much of a body log_bodies writes.
BODY_LOG_LIMIT = 2048


def body_text(body: bytes) -> str:
    """A body for the log when log_bodies is on: decoded leniently, cut at BODY_LOG_LIMIT."""
    text = body[:BODY_LOG_LIMIT].decode("utf-8", "replace")
    return text + ("…" if len(body) > BODY_LOG_LIMIT else "")


class Redactor:
    """`secrets` are exact strings to mask wherever they appear."""

    # Credentials issued while running (OAuth tokens) are remembered this many at a time:
    # each refresh brings new ones, and the list is scanned for every line.
    REMEMBERED = 16

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets: list[str] = []
        self._configured: set[str] = set()
        self._remembered: collections.deque[str] = collections.deque(maxlen=self.REMEMBERED)
        self._key_cache: dict[str, bool] = {}
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Secrets of the config: masked for the life of the process."""
        self._configured.update(self._forms(secrets))
        self._rebuild()

    def remember(self, secrets: Iterable[str]) -> None:
        """Credentials issued at run time (access and refresh tokens): the newest are
        masked; the oldest are forgotten once they are long replaced."""
        for form in self._forms(secrets):
            if form not in self._remembered:
                self._remembered.append(form)
        self._rebuild()

    @staticmethod
    def _forms(secrets: Iterable[str]) -> set[str]:
        # Very short "secrets" would mask random text; real ones are long. Each is also
        # looked for as it appears inside a JSON string (escaped).
        found = set()
        for secret in secrets:
            if secret and len(secret) >= 4:
                found.add(secret)
                found.add(json.dumps(secret)[1:-1])
        return found

    def _rebuild(self) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted(self._configured | set(self._remembered), key=len, reverse=True)

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


# One encoder for every line: json.dumps(default=...) would build a new one per call.
_ENCODE = json.JSONEncoder(default=repr).encode


def _json(logger: Any, method: str, event: EventDict) -> str:
    return _ENCODE(event)


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


def _exc_info(logger: Any, method: str, event: EventDict) -> EventDict:
    # The formatter only when there is something to format: most events carry none.
    if "exc_info" in event or "exception" in event:
        return structlog.processors.format_exc_info(logger, method, event)
    return event


class LineWriter:
    """Whole lines into a stream, flushed within FLUSH_AFTER seconds (at once for
    warnings and errors, and at shutdown), so an access line costs no system call
    of its own."""

    FLUSH_AFTER = 0.2

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._scheduled = False

    def msg(self, line: str) -> None:
        self._stream.write(line + "\n")
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._stream.flush()  # no loop to flush later: write through
            return
        self._scheduled = True
        loop.call_later(self.FLUSH_AFTER, self.flush)

    def urgent(self, line: str) -> None:
        self._stream.write(line + "\n")
        self.flush()

    def flush(self) -> None:
        self._scheduled = False
        # stderr gone (a closed pipe): nothing left to tell anyone.
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()


def _stderr_buffered() -> IO[str]:
    # sys.stderr is line-buffered (a flush per line); this is the same fd, block-buffered.
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a file
        return sys.stderr
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(io.BufferedWriter(raw, 64 * 1024), encoding="utf-8", errors="replace")


class Logs:
    """One service's logging: level, format, the secrets to mask, and the stream.

    It is also the logger structlog wraps in `logger()` (the `msg`, `info`, ...
    methods take the rendered line), which is how the process-wide processor
    chain finds these settings for each event.
    """

    def __init__(
        self,
        level: str = "info",
        fmt: str = "json",
        secrets: Iterable[str] = (),
        stream: IO[str] | None = None,
    ) -> None:
        """`stream` defaults to stderr, block-buffered (call `flush` at shutdown)."""
        self.redactor = Redactor()
        # Read by the components that explain their decisions at debug (see DebugFlag);
        # not `debug`, which is the method structlog calls with a rendered line.
        self.debug_flag = DebugFlag()
        self._writer = LineWriter(stream if stream is not None else _stderr_buffered())
        self._timestamp = _Timestamp()
        self._threshold = _LEVELS["info"]
        self._json = True
        # JSON, or structlog's console renderer (typed str | bytes, gives str).
        self._renderer: Callable[[Any, str, EventDict], Any] = _json
        # Third-party records: the same tail as our own events, after the stdlib's facts.
        self._stdlib = structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _exc_info,
                self.redactor.mask_keys,
                self._render,
                self.redactor.scrub_line,
            ],
        )
        self._access = self.logger()
        # The process's chain, the list our loggers hold too: capture_logs swaps its
        # contents in place (keeping the list, for that reason), which `access` checks.
        self._chain: list[Processor] = structlog.get_config()["processors"]
        self.configure(level, fmt, secrets)

    def configure(self, level: str, fmt: str, secrets: Iterable[str] = ()) -> None:
        """Set level and format, add secrets (old ones stay masked); a reload calls it again."""
        self.redactor.add(secrets)
        self._threshold = _LEVELS[level]
        self.debug_flag.on = self._threshold <= _LEVELS["debug"]
        self._json = fmt == "json"
        self._renderer = _json if self._json else structlog.dev.ConsoleRenderer(colors=False)

    def logger(self) -> Any:
        """A structlog logger whose events go here (whatever context they are made in)."""
        return structlog.wrap_logger(self)

    def context(self) -> contextvars.Context:
        """A copy of the current context in which module-level loggers log here: run a
        service's coroutines in it (asyncio.create_task(..., context=...)), or a whole
        event loop (context.run(asyncio.run, ...))."""
        context = contextvars.copy_context()
        context.run(_CURRENT.set, self)
        return context

    def access(self, record: AccessRecord) -> None:
        """Log the per-request line ("request", level info).

        In the json format the record writes its own line: the structlog chain (a
        dict, the generic encoder, the key check) cost several times as much, on
        every request. The line is scrubbed for secrets like any other. In the
        console format, or while another chain has replaced ours (capture_logs in
        tests), it is an ordinary event of the record's fields.
        """
        if self._threshold > _INFO:
            return
        if self._json and self._chain and self._chain[-1] is _dispatch:
            self._writer.msg(self.redactor.scrub(record.json(self._timestamp.now())))
        else:
            self._access.info("request", **record.fields())

    def flush(self) -> None:
        """Write out whatever is buffered (at shutdown)."""
        self._writer.flush()

    def render(self, method: str, event: EventDict) -> str:
        """An event of ours as its line; structlog.DropEvent when below the level."""
        if _LEVELS.get(method, _INFO) < self._threshold:
            raise structlog.DropEvent
        event = structlog.contextvars.merge_contextvars(self, method, event)
        event = structlog.processors.add_log_level(self, method, event)
        event["timestamp"] = self._timestamp.now()
        event = _exc_info(self, method, event)
        event = self.redactor.mask_keys(self, method, event)
        return self.redactor.scrub(self._render(self, method, event))

    def record(self, record: logging.LogRecord) -> None:
        """A third-party (stdlib) record, rendered and redacted like our own events."""
        if record.levelno >= self._threshold:
            self._writer.urgent(self._stdlib.format(record))

    def _render(self, logger: Any, method: str, event: EventDict) -> str:
        rendered: str = self._renderer(logger, method, event)
        return rendered

    # What structlog calls with the rendered line, by level: warnings and errors are
    # flushed at once, the rest within LineWriter.FLUSH_AFTER.
    def msg(self, line: str) -> None:
        self._writer.msg(line)

    def urgent(self, line: str) -> None:
        self._writer.urgent(line)

    debug = info = msg
    warning = warn = error = err = critical = exception = fatal = failure = urgent


# The Logs that module-level loggers write to, per context (see the module docstring).
_CURRENT: contextvars.ContextVar[Logs] = contextvars.ContextVar("proxy_logs")


def _current() -> Logs:
    logs = _CURRENT.get(None)
    # Outside every service: a plain Logs, made for the event, writing through to stderr.
    return logs if logs is not None else Logs(stream=sys.stderr)


class _ContextLogs:
    """What structlog.get_logger() wraps: the Logs of the context of each event."""

    def __init__(self, *names: Any) -> None:
        pass

    def msg(self, line: str) -> None:
        _current().msg(line)

    def urgent(self, line: str) -> None:
        _current().urgent(line)

    debug = info = msg
    warning = warn = error = err = critical = exception = fatal = failure = urgent


def _dispatch(logger: Any, method: str, event: EventDict) -> str:
    """The whole process-wide chain: the event to the Logs bound to its logger."""
    logs = logger if isinstance(logger, Logs) else _current()
    return logs.render(method, event)


class _StdlibHandler(logging.Handler):
    """Third-party records to the Logs of the context they are logged in."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _current().record(record)
        except Exception:
            self.handleError(record)


def route_stdlib() -> logging.Handler:
    """Send the stdlib's records (aiohttp, asyncio) through the Logs of their context.

    Process-wide (the root logger's handlers, replaced): the CLI calls it once. Every
    level reaches the handler, which filters by the level of the Logs it writes to.
    Returns the handler (tests remove it again).
    """
    handler = _StdlibHandler()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG)
    return handler


# Set once, at import; the chain reads every setting from the Logs of each event.
structlog.configure(
    processors=[_dispatch],
    # Every level reaches the chain: the Logs filters by its current level, so a reload
    # changes it for cached loggers too.
    wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    logger_factory=_ContextLogs,
    cache_logger_on_first_use=True,
)
