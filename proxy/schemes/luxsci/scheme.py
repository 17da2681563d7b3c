"""The LuxSci REST API: a signature cookie per request, auth codes that roll."""

from __future__ import annotations

from proxy.http.headers import header_line
from proxy.schemes.base import Outbound
from proxy.schemes.luxsci import signing
from proxy.schemes.luxsci.session import AuthCode, LuxSciSession
from proxy.target import Kind, Target


class LuxSciScheme:
    refreshes_on_401 = True
    harvests = True

    def __init__(self, session: LuxSciSession) -> None:
        self.session = session

    def budget(self, target: Target) -> str:
        """The API counts user-level and account-level requests against separate limits."""
        return "user" if target.kind is Kind.USER else "account"

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
