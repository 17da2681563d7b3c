"""How the LuxSci API answers, as pure rules (PROTOCOL.md's table): no I/O.

- 401: the auth code is dead (revoked, expired, bad signature): log in again, once.
- 403 with X-RateLimit-Remaining 0: the rate limit; wait for X-RateLimit-Reset.
- 475: the request reached the back end incomplete: retry, any method.
- 429 means "too many objects of that type exist", NOT a rate limit: never retried.
Everything else falls to the generic rules (pipeline/retry.py).
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.schemes.base import Action, Decision
from proxy.target import Kind, Target

REAUTH = Decision(Action.REAUTH, "auth_401")
RATE_WAIT = Decision(Action.RATE_WAIT, "rate_limited", until_reset=True)
INCOMPLETE = Decision(Action.RETRY, "incomplete_475")


def budget(target: Target) -> str:
    """The API counts user-level and account-level requests against separate limits."""
    return "user" if target.kind is Kind.USER else "account"


def rate_limited(status: int, headers: Mapping[str, str]) -> bool:
    """A 403 that is the API's rate limit (remaining 0), not a refusal for another reason."""
    if status != 403:
        return False
    remaining = headers.get("X-RateLimit-Remaining")
    try:
        return remaining is not None and int(remaining.strip()) == 0
    except ValueError:
        return False


def judge(status: int, headers: Mapping[str, str]) -> Decision | None:
    if status == 401:
        return REAUTH
    if rate_limited(status, headers):
        return RATE_WAIT
    if status == 475:
        return INCOMPLETE
    return None
