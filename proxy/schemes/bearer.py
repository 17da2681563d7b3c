"""Bearer-key APIs: `Authorization: Bearer <api_key>` on every request.

Here 429 *is* the rate limit: honour Retry-After (seconds or an HTTP-date), else
the reset the answer's rate-limit headers name, else back off. A 401 means the key
is wrong; a retry would not change that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.clock import retry_after
from proxy.config import AuthConfig
from proxy.http.headers import header_line
from proxy.limits import headers as rate_headers
from proxy.schemes.base import Action, AnswerWatch, Credential, Decision, Outbound
from proxy.target import Target


def judge_rate_limit(status: int, headers: Mapping[str, str], now: float) -> Decision | None:
    """A Bearer-style API's 429: wait as long as it says (`now`: the server's clock)."""
    if status != 429:
        return None
    delay = retry_after(headers.get("Retry-After"), now)
    if delay is None:
        # No Retry-After: the rate-limit headers may still say when the window renews.
        view = rate_headers.read(headers, now)
        if view is not None and view.reset_at is not None and not view.remaining:
            delay = max(0.0, view.reset_at - now)
    return Decision(Action.RATE_WAIT, "rate_limited", delay)


class BearerScheme:
    name = "bearer"

    def __init__(self, api_key: str) -> None:
        self.set_key(api_key)

    def set_key(self, api_key: str) -> None:
        self._line = header_line("Authorization", f"Bearer {api_key}")

    def budget(self, target: Target) -> str:
        return "account"  # one budget for the whole API

    async def apply(self, out: Outbound) -> None:
        cookies = out.cookie_header()
        out.credentials = self._line + header_line("Cookie", cookies) if cookies else self._line

    def judge(self, status: int, headers: Mapping[str, str], now: float) -> Decision | None:
        return judge_rate_limit(status, headers, now)

    def retire(self, used: Credential | None) -> None:
        pass

    def watch(
        self, used: Credential | None, sent_at: float, headers: Mapping[str, str]
    ) -> AnswerWatch | None:
        return None

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"ok": True, "scheme": self.name}

    def credential_age(self) -> float | None:
        return None

    def valid(self) -> bool:
        return True

    async def reconfigure(self, auth: AuthConfig) -> None:
        if auth.api_key is not None:
            self.set_key(auth.api_key.get())
