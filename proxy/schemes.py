"""How credentials are put on an outbound request: LuxSci signature cookie or Bearer key."""

from __future__ import annotations

from typing import Protocol

from proxy import signing
from proxy.inbound import Outbound
from proxy.session import AuthCode, LuxSciSession
from proxy.wire import header_line


class AuthScheme(Protocol):
    # Whether a 401 is worth one fresh login and one retry.
    refreshes_on_401: bool
    # Whether success answers carry a fresh auth code (to be harvested from the body).
    harvests: bool

    async def apply(self, out: Outbound) -> AuthCode | None:
        """Set `out.credentials`; returns what was used (for invalidate/harvest)."""
        ...

    def invalidate(self, used: AuthCode | None) -> None: ...

    def harvested(self, used: AuthCode | None, sent_at: float, code: str | None) -> None:
        """A success answer to a request sent at `sent_at` with `used` carried `code`."""
        ...


class LuxSciScheme:
    refreshes_on_401 = True
    harvests = True

    def __init__(self, session: LuxSciSession) -> None:
        self.session = session

    async def apply(self, out: Outbound) -> AuthCode:
        code = await self.session.code()
        # Read per request: a reload may have changed the credentials.
        cookie = "signature=" + signing.signature_cookie(
            self.session.secret(), code.value, out.method, out.path, out.query, out.body_digest
        )
        # Replaced on every attempt: a retry is signed afresh with the newest code.
        out.credentials = header_line("Cookie", out.cookie_header(cookie) or cookie)
        return code

    def invalidate(self, used: AuthCode | None) -> None:
        if used is not None:
            self.session.invalidate(used)

    def harvested(self, used: AuthCode | None, sent_at: float, code: str | None) -> None:
        if code and used is not None:
            self.session.offer(code, used, sent_at)


class BearerScheme:
    refreshes_on_401 = False  # a 401 means the key is wrong; a retry would not change that
    harvests = False

    def __init__(self, api_key: str) -> None:
        self.set_key(api_key)

    def set_key(self, api_key: str) -> None:
        self._line = header_line("Authorization", f"Bearer {api_key}")

    async def apply(self, out: Outbound) -> None:
        cookies = out.cookie_header()
        out.credentials = self._line + header_line("Cookie", cookies) if cookies else self._line

    def invalidate(self, used: AuthCode | None) -> None:
        pass

    def harvested(self, used: AuthCode | None, sent_at: float, code: str | None) -> None:
        pass
