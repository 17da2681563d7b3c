"""The LuxSci REST API: a signature cookie per request, auth codes that roll."""

from __future__ import annotations

from proxy.http.headers import header_line, strip_cookies
from proxy.schemes.base import Outbound
from proxy.schemes.luxsci.session import AuthCode, LuxSciSession


class LuxSciScheme:
    refreshes_on_401 = True
    harvests = True

    def __init__(self, session: LuxSciSession) -> None:
        self.session = session

    async def apply(self, out: Outbound) -> AuthCode:
        code = await self.session.code()
        # Made per request: a reload may have changed the credentials or auth.auth_cookie.
        cookie = self.session.cookie(code.value, out.method, out.path, out.query, out.body_digest)
        if out.cookies and self.session.cfg.auth_cookie:
            # Ours is the only `auth` cookie, as ours is the only `signature` one (the
            # client's was dropped in outbound.py): the API must not read the client's.
            out.cookies = strip_cookies([out.cookies], ("auth",))
        # Replaced on every attempt: a retry is signed afresh with the newest code.
        out.credentials = header_line("Cookie", out.cookie_header(cookie) or cookie)
        return code

    def invalidate(self, used: AuthCode | None) -> None:
        if used is not None:
            self.session.invalidate(used)

    def harvested(self, used: AuthCode | None, sent_at: float, code: str | None) -> None:
        if code and used is not None:
            self.session.offer(code, used, sent_at)
