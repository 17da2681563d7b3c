"""One model of a request target: parsed once, read by every rule that looks at a path.

The raw target travels upstream byte for byte (it is what gets signed); the
decoded segments exist only to classify it. Access rules, protected users, the
budget a request spends, log masking and the session all read the same
`Target`, so they cannot disagree about what a request is: before this module,
`/perl/api/v2/%75ser/joe@example.com/profile` was a user request to the access
policy but an account request to the limiter, and its address went unmasked.

Segments are split at literal `/` only, then percent-decoded. An encoded slash
or backslash (`%2F`, `%5C`) is part of its segment, as Envoy keeps it by
default; so that one cannot side-step a protection, a target holding one also
names every user it would name if the API decoded it first (`users`).
Dot-segments are refused in any spelling, and so are empty segments, control
characters, malformed escapes and paths that are not UTF-8: nothing that could
mean one thing here and another at the API.

Pure: no I/O, no clock, no config object (the one option is a parameter).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from proxy.errors import BadRequest

# /perl/api/v2/... (PROTOCOL.md). Matched without regard to case: a server that routes
# case-insensitively must not find a user path the proxy took for something else.
API_ROOT = ("perl", "api", "v2")
_ROOT_LEN = len(API_ROOT)
# Where the session logs in and out.
AUTH_PATH = "/perl/api/v2/auth"

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Anything that needs a closer look: escapes, dots, backslashes, empty segments, controls.
_SUSPECT = re.compile(r"[%\\\x00-\x1f\x7f]|/\.|//")
_ENCODED_SLASH = re.compile(r"%(2[fF]|5[cC])")
_SLASHES = re.compile(r"[/\\]")


class Kind(enum.Enum):
    """What part of the API a target addresses."""

    AUTH = "auth"  # /perl/api/v2/auth: log in, log out
    USER = "user"  # /perl/api/v2/user/<login>/...
    ACCOUNT = "account"  # /perl/api/v2/account/<id>/...
    OTHER = "other"  # anything else (and every path of a non-LuxSci API)


# Not frozen: a frozen dataclass pays object.__setattr__ per field, and a target is built
# for every request. Nothing mutates one after parse().
@dataclass(slots=True)
class Target:
    path: str  # raw, up to the first '?', exactly as sent
    query: str  # raw, after the first '?'; "" when there is none
    has_query: bool  # a '?' was sent, even with nothing after it
    segments: tuple[str, ...]  # decoded, for classification only
    kind: Kind
    # The user login or account id the path names (decoded), when it names one.
    subject: str | None
    # Every user the target could name, lower-cased: the subject of a user path, and
    # where an encoded slash is present, the user the API would see if it decoded first.
    users: frozenset[str]

    @property
    def raw(self) -> str:
        """The target as it goes upstream."""
        return f"{self.path}?{self.query}" if self.has_query else self.path

    def masked_path(self) -> str:
        """The raw path with a user's login replaced by `[user]` (logging.redact_paths)."""
        if self.kind is not Kind.USER:
            return self.path
        # Index of the login among the raw pieces: "", perl, api, v2, user, <login>.
        pieces = self.path.split("/")
        pieces[_ROOT_LEN + 2] = "[user]"
        return "/".join(pieces)


_NO_USERS: frozenset[str] = frozenset()


def _classify(segments: tuple[str, ...]) -> tuple[Kind, str | None]:
    if len(segments) <= _ROOT_LEN:
        return Kind.OTHER, None
    root = segments[:_ROOT_LEN]
    # The exact spelling first: the common case, one tuple comparison.
    if root != API_ROOT and (
        segments[0].lower() != "perl" or segments[1].lower() != "api" or segments[2].lower() != "v2"
    ):
        return Kind.OTHER, None
    area = segments[_ROOT_LEN].lower()
    if area == "auth" and len(segments) == _ROOT_LEN + 1:
        return Kind.AUTH, None
    if len(segments) > _ROOT_LEN + 1:
        if area == "user":
            return Kind.USER, segments[_ROOT_LEN + 1]
        if area == "account":
            return Kind.ACCOUNT, segments[_ROOT_LEN + 1]
    return Kind.OTHER, None


def _decode(raw: str, last: bool) -> str:
    """One raw segment, decoded, or BadRequest for anything that could mislead."""
    if "\\" in raw:
        raise BadRequest("backslashes are not allowed in the path")
    data = unquote_to_bytes(raw) if "%" in raw else raw.encode()
    try:
        segment = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the path does not decode to UTF-8") from None
    # A dot-segment in any spelling, also one hidden behind an encoded slash
    # (a%2F..%2Fb): a server that decodes before it normalises would climb out.
    if any(part in (".", "..") for part in _SLASHES.split(segment)):
        raise BadRequest("dot-segments (., .., %2e%2e) are not allowed in the path")
    if _CONTROL.search(segment):
        raise BadRequest("control characters are not allowed in the path")
    if segment == "" and not last:
        raise BadRequest("empty segments (//) are not allowed in the path")
    return segment


def _segments(path: str, encoded_slashes: str) -> tuple[str, ...]:
    if not _SUSPECT.search(path):
        # The common case: plain segments, nothing to decode or refuse.
        pieces = path.split("/")[1:]
        if pieces and pieces[-1] == "":
            pieces.pop()
        return tuple(pieces)
    if _BAD_ESCAPE.search(path):
        raise BadRequest("malformed percent-encoding in the path")
    if encoded_slashes == "reject" and _ENCODED_SLASH.search(path):
        raise BadRequest(
            "encoded slashes (%2F, %5C) are not allowed in the path (listen.encoded_slashes)"
        )
    pieces = path.split("/")[1:]
    last = len(pieces) - 1
    segments = [_decode(raw, i == last) for i, raw in enumerate(pieces)]
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash matches like its path without
    return tuple(segments)


def parse(raw_target: str, encoded_slashes: str = "keep") -> Target:
    """The target of a request line, or BadRequest saying what is wrong with it.

    Only origin-form targets (`/path?query`) are accepted: nothing may redirect the
    proxy elsewhere. `encoded_slashes`: "keep" forwards %2F and %5C inside a segment;
    "reject" refuses them (400).
    """
    if not raw_target.startswith("/") or raw_target.startswith("//"):
        raise BadRequest(
            "the request target must be a path such as /perl/api/v2/...; absolute URLs, "
            "authority-form (CONNECT) and '*' targets are not accepted"
        )
    path, mark, query = raw_target.partition("?")
    segments = _segments(path, encoded_slashes)
    if "%" in query and _BAD_ESCAPE.search(query):
        raise BadRequest("malformed percent-encoding in the query")
    kind, subject = _classify(segments)
    users = frozenset((subject.lower(),)) if kind is Kind.USER and subject else _NO_USERS
    if "%" in path and _ENCODED_SLASH.search(path):
        # What the API would see if it decoded before routing.
        split = tuple(p for s in segments for p in _SLASHES.split(s))
        other_kind, other_subject = _classify(split)
        if other_kind is Kind.USER and other_subject is not None:
            users = users | {other_subject.lower()}
    return Target(path, query, bool(mark), segments, kind, subject, users)
