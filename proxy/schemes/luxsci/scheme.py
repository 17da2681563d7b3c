"""The LuxSci REST API: a signature cookie per request, auth codes that roll."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.config import AuthConfig
from proxy.http.headers import header_line, strip_cookies
from proxy.schemes.base import AnswerWatch, Credential, Decision, Outbound
from proxy.schemes.luxsci import rules
from proxy.schemes.luxsci.harvest import CodeHarvester, code_in_body
from proxy.schemes.luxsci.session import AuthCode, LuxSciSession


class _CodeWatch:
    """Takes the fresh auth code from a success answer and offers it to the session."""

    __slots__ = ("_harvester", "_headers", "_sent_at", "_session", "_used")

    def __init__(
        self, session: LuxSciSession, used: AuthCode, sent_at: float, headers: Mapping[str, str]
    ) -> None:
        self._session = session
        self._used = used
        self._sent_at = sent_at
        self._headers = headers
        self._harvester: CodeHarvester | None = None

    def whole(self, body: bytes) -> None:
        code = code_in_body(body, self._headers.get("Content-Encoding"))
        if code:  # inline, not through _offer: this runs for nearly every request
            self._session.offer(code, self._used, self._sent_at)

    def feed(self, chunk: bytes) -> None:
        harvester = self._harvester
        if harvester is None:
            harvester = self._harvester = CodeHarvester(self._headers.get("Content-Encoding"))
        if not harvester.done:
            harvester.feed(chunk)

    def end(self) -> None:
        if self._harvester is not None:
            self._offer(self._harvester.result())

    def _offer(self, code: str | None) -> None:
        if code:
            self._session.offer(code, self._used, self._sent_at)


class LuxSciScheme:
    name = "luxsci"

    def __init__(self, session: LuxSciSession) -> None:
        self.session = session

    # The pure rule itself, not a method calling it: one call less per request.
    budget = staticmethod(rules.budget)

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

    def judge(self, status: int, headers: Mapping[str, str], now: float) -> Decision | None:
        return rules.judge(status, headers)

    def retire(self, used: Credential | None) -> None:
        if isinstance(used, AuthCode):
            self.session.invalidate(used)

    def watch(
        self, used: Credential | None, sent_at: float, headers: Mapping[str, str]
    ) -> AnswerWatch | None:
        # Every success answer carries a fresh code: keep the newest, never log in again.
        if not isinstance(used, AuthCode):
            return None
        return _CodeWatch(self.session, used, sent_at, headers)

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.session.start()

    async def stop(self) -> None:
        await self.session.revoke()

    def status(self) -> dict[str, Any]:
        return self.session.status()

    def credential_age(self) -> float | None:
        return self.session.code_age()

    def valid(self) -> bool:
        return self.session.valid()

    async def reconfigure(self, auth: AuthConfig) -> None:
        if _credentials(auth) != _credentials(self.session.cfg):
            await self.session.change_credentials(auth)
        else:
            self.session.cfg = auth


def _credentials(auth: AuthConfig) -> tuple[object, ...]:
    return (auth.token, auth.secret, auth.user, auth.password)
