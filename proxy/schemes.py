"""How credentials are put on an outbound request: LuxSci signature cookie or Bearer key."""

from __future__ import annotations

from typing import Protocol

from proxy import signing
from proxy.harvest import CodeHarvester
from proxy.inbound import Outbound
from proxy.session import AuthCode, LuxSciSession


class AuthScheme(Protocol):
    # Whether a 401 is worth one fresh login and one retry.
    refreshes_on_401: bool

    async def apply(self, out: Outbound) -> AuthCode | None:
        """Add credentials to `out.headers`; returns what was used (for invalidate/harvest)."""
        ...

    def invalidate(self, used: AuthCode | None) -> None: ...

    def harvester(
        self, used: AuthCode | None, content_encoding: str | None
    ) -> CodeHarvester | None:
        """A harvester for the fresh code in a success response, or None if there is none."""
        ...

    def harvested(
        self, used: AuthCode | None, sent_at: float, harvester: CodeHarvester
    ) -> None: ...


class LuxSciScheme:
    refreshes_on_401 = True

    def __init__(self, session: LuxSciSession) -> None:
        self.session = session

    async def apply(self, out: Outbound) -> AuthCode:
        code = await self.session.code()
        # Read per request: a reload may have changed the credentials.
        cookie = "signature=" + signing.signature_cookie(
            self.session.secret(), code.value, out.method, out.path, out.query, out.body_digest
        )
        # Set (not added) on every attempt: a retry is signed afresh with the newest code.
        out.headers["Cookie"] = out.cookie_header(cookie) or cookie
        return code

    def invalidate(self, used: AuthCode | None) -> None:
        if used is not None:
            self.session.invalidate(used)

    def harvester(self, used: AuthCode | None, content_encoding: str | None) -> CodeHarvester:
        return CodeHarvester(content_encoding)

    def harvested(self, used: AuthCode | None, sent_at: float, harvester: CodeHarvester) -> None:
        value = harvester.result()
        if value and used is not None:
            self.session.offer(value, used, sent_at)


class BearerScheme:
    refreshes_on_401 = False  # a 401 means the key is wrong; a retry would not change that

    def __init__(self, api_key: str) -> None:
        self.set_key(api_key)

    def set_key(self, api_key: str) -> None:
        self._header = f"Bearer {api_key}"

    async def apply(self, out: Outbound) -> None:
        out.headers["Authorization"] = self._header
        cookies = out.cookie_header()
        if cookies:
            out.headers["Cookie"] = cookies

    def invalidate(self, used: AuthCode | None) -> None:
        pass

    def harvester(self, used: AuthCode | None, content_encoding: str | None) -> None:
        return None

    def harvested(self, used: AuthCode | None, sent_at: float, harvester: CodeHarvester) -> None:
        pass
