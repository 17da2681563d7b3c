"""Pure helpers that read the parts of a request the API cares about."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import parse_qsl

from proxy.sandbox.ratelimit import Bucket

API_PREFIX = "/perl/api/v2/"
AUTH_PATH = "/perl/api/v2/auth"


@dataclass(frozen=True)
class Route:
    """Where a raw path points. `scope` is "auth", "user", "account" or "unknown"."""

    scope: str
    target: str = ""
    endpoint: tuple[str, ...] = ()

    @property
    def bucket(self) -> Bucket:
        # Auth calls count against the account limit, like every non-user request.
        return "user" if self.scope == "user" else "account"


def classify(raw_path: str) -> Route | None:
    """The API route of a raw path, or None when it is not under /perl/api/v2/."""
    if raw_path == AUTH_PATH:
        return Route("auth")
    if not raw_path.startswith(API_PREFIX):
        return None
    scope, _, rest = raw_path[len(API_PREFIX) :].partition("/")
    target, _, endpoint = rest.partition("/")
    if scope in ("user", "account") and target:
        return Route(scope, target, tuple(endpoint.split("/")) if endpoint else ())
    return Route("unknown")


def origin_form(raw_target: str) -> str:
    """The origin-form target, also when a client sent the absolute form (http://h/p)."""
    match = re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*", raw_target)
    if match is None:
        return raw_target
    rest = raw_target[match.end() :]
    return rest if rest.startswith("/") else "/" + rest


def signature_cookie(cookie_headers: list[str]) -> str | None:
    """The raw value of the `signature` cookie, parsed by hand (other cookies may be present)."""
    for header in cookie_headers:
        for pair in header.split(";"):
            name, sep, value = pair.strip().partition("=")
            if sep and name.strip() == "signature":
                return value.strip()
    return None


def split_cookie(value: str) -> tuple[str, str] | None:
    """`<auth_code>:<signature_code>` -> (auth_code, signature_code)."""
    code, sep, signature = value.rpartition(":")
    if not sep or not code or not signature:
        return None
    return code, signature


def host_name(host_header: str | None) -> str | None:
    """The hostname of a Host header, port stripped, lower case."""
    if not host_header:
        return None
    host = host_header.strip()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end].lower() if end > 0 else None
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit():
        host = name
    return host.lower()


def parse_auth_date(value: object) -> float | None:
    """Epoch seconds from the auth request's `date` (epoch or one of the documented formats)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if re.fullmatch(r"\d{1,12}", text):
        return float(text)
    parsed: datetime | None = None
    try:
        parsed = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        for fmt in ("%Y-%m-%d %H:%M:%S %z", "%Y-%m-%d %H:%M:%S"):
            try:
                parsed = datetime.strptime(text, fmt)
                break
            except ValueError:
                continue
        if parsed is None:
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                return None
    if parsed.tzinfo is None:
        # No zone given (or "-0000"): read it as UTC, the only unambiguous choice.
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


@dataclass(frozen=True)
class ResponseShape:
    """Query options that shape a success response: size and where "auth" goes."""

    filler_bytes: int = 0
    auth_last: bool = False


MAX_FILLER = 64 * 1024 * 1024


def response_shape(raw_query: str) -> ResponseShape:
    """Read `_bytes` and `_auth_position`; raises ValueError with a client-facing message."""
    options = dict(parse_qsl(raw_query, keep_blank_values=True))
    filler_bytes = 0
    if "_bytes" in options:
        raw = options["_bytes"]
        if not raw.isdigit() or int(raw) > MAX_FILLER:
            raise ValueError(f"_bytes must be an integer from 0 to {MAX_FILLER}")
        filler_bytes = int(raw)
    # A big response puts "auth" last by default: the worst case for a streaming client.
    auth_last = filler_bytes > 0
    position = options.get("_auth_position")
    if position is not None:
        if position not in ("first", "last"):
            raise ValueError("_auth_position must be 'first' or 'last'")
        auth_last = position == "last"
    return ResponseShape(filler_bytes, auth_last)
