"""A scheme that exists only in the tests: an API key in `X-Api-Key`.

It proves that adding a scheme is one module plus its registry entry: nothing in
the proxy names it. Its API differs from both built-in ones on purpose:
- requests under /users/ spend the "user" budget, the rest "account";
- 420 is its rate limit, with the pause in `X-Calm-For` (seconds);
- 401 means the key was rotated: take the one the answer names in `X-Next-Key`,
  then send again once;
- success answers may announce the next key in `X-Next-Key` too (a watched answer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.config import AuthConfig
from proxy.http.headers import header_line
from proxy.schemes.base import Action, AnswerWatch, Credential, Decision, Outbound
from proxy.schemes.registry import SchemeDeps, SchemeKind, check_header_value
from proxy.target import Target


class KeyGeneration(Credential):
    __slots__ = ("number",)

    def __init__(self, number: int) -> None:
        self.number = number


class _NextKey:
    def __init__(self, scheme: HeaderScheme, headers: Mapping[str, str]) -> None:
        self._scheme, self._headers = scheme, headers

    def whole(self, body: bytes) -> None:
        self.end()

    def feed(self, chunk: bytes) -> None:
        pass

    def end(self) -> None:
        if "X-Next-Key" in self._headers:
            self._scheme.rotate(self._headers["X-Next-Key"])


class HeaderScheme:
    name = "header"

    def __init__(self, key: str) -> None:
        self.key = key
        self.generation = KeyGeneration(1)
        self.next_key: str | None = None
        self.retired: list[int] = []

    def rotate(self, key: str) -> None:
        self.key = key
        self.generation = KeyGeneration(self.generation.number + 1)

    def budget(self, target: Target) -> str:
        return "user" if target.path.startswith("/users/") else "account"

    async def apply(self, out: Outbound) -> Credential:
        out.credentials = header_line("X-Api-Key", self.key)
        return self.generation

    def judge(self, status: int, headers: Mapping[str, str], now: float) -> Decision | None:
        if status == 420:
            return Decision(Action.RATE_WAIT, "calm_down", float(headers.get("X-Calm-For", "0")))
        if status == 401:
            self.next_key = headers.get("X-Next-Key")
            return Decision(Action.REAUTH, "key_rotated")
        return None

    def retire(self, used: Credential | None) -> None:
        assert isinstance(used, KeyGeneration)
        self.retired.append(used.number)
        if self.next_key is not None:
            self.rotate(self.next_key)

    def watch(
        self, used: Credential | None, sent_at: float, headers: Mapping[str, str]
    ) -> AnswerWatch | None:
        return _NextKey(self, headers)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"ok": True, "scheme": self.name, "generation": self.generation.number}

    def credential_age(self) -> float | None:
        return None

    def valid(self) -> bool:
        return True

    async def reconfigure(self, auth: AuthConfig) -> None:
        if auth.api_key is not None:
            self.key = auth.api_key.get()


def _check(auth: AuthConfig) -> None:
    check_header_value(auth, "api_key")


def _build(deps: SchemeDeps) -> HeaderScheme:
    return HeaderScheme(check_header_value(deps.auth, "api_key"))


KIND = SchemeKind("header", _check, _build)
