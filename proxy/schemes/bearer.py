"""Bearer-key APIs: `Authorization: Bearer <api_key>` on every request."""

from __future__ import annotations

from proxy.http.headers import header_line
from proxy.schemes.base import Outbound
from proxy.schemes.luxsci.session import AuthCode
from proxy.target import Target


class BearerScheme:
    refreshes_on_401 = False  # a 401 means the key is wrong; a retry would not change that
    harvests = False

    def __init__(self, api_key: str) -> None:
        self.set_key(api_key)

    def set_key(self, api_key: str) -> None:
        self._line = header_line("Authorization", f"Bearer {api_key}")

    def budget(self, target: Target) -> str:
        return "account"  # one budget for the whole API

    async def apply(self, out: Outbound) -> None:
        cookies = out.cookie_header()
        out.credentials = self._line + header_line("Cookie", cookies) if cookies else self._line

    def invalidate(self, used: AuthCode | None) -> None:
        pass

    def harvested(self, used: AuthCode | None, sent_at: float, code: str | None) -> None:
        pass
