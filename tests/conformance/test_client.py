"""The client-side conformance cases (client_cases.py), each against a running proxy.

One proxy per case (they start in milliseconds), configured with the case's limits,
in front of a recording upstream: the case's bytes go over a raw socket, and the
verdict compares the answers, the connection's fate and what reached the upstream.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
from conftest import MakeProxy

from proxy.config import Secret
from proxy.http import server as listener_module

from .cases import Case, RecordingUpstream, run_case, verdict
from .client_cases import CLIENT_CASES

pytestmark = pytest.mark.timeout(60)

# The listener's linger after an answer that leaves a body unread, shortened (as in
# tests/http/test_server.py) so that a close is told from an idle timeout (2 s) quickly.
LINGER = 0.3


@pytest.fixture(autouse=True)
def short_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listener_module, "LINGER_SECONDS", LINGER)


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    recorder = RecordingUpstream()
    await recorder.start()
    yield recorder
    await recorder.close()


@pytest.mark.parametrize("case", CLIENT_CASES, ids=[c.name for c in CLIENT_CASES])
async def test_client_case(case: Case, upstream: RecordingUpstream, make_proxy: MakeProxy) -> None:
    limits = case.limits
    proxy = await make_proxy(
        upstream.url,
        auth={"scheme": "bearer", "api_key": Secret("conformance-key")},
        listen={
            "client_timeout": limits.client_timeout,
            "max_body_bytes": limits.max_body_bytes,
            "max_header_bytes": limits.max_header_bytes,
        },
        logging={"level": "warning"},
    )
    outcome = await run_case(proxy.service.port, case, upstream)
    problems = verdict(case, outcome, close_within=LINGER + 1.0)
    assert not problems, f"{case.name} ({case.rfc}): " + "; ".join(problems)


def test_the_case_table_is_sound() -> None:
    names = [c.name for c in CLIENT_CASES]
    assert len(names) == len(set(names)), "case names are unique"
    assert len(CLIENT_CASES) >= 90
    for c in CLIENT_CASES:
        assert re.fullmatch(r"RFC \d{4} [0-9A-Z.]+", c.rfc), c.name
        assert c.send or c.closed, c.name  # a case that sends nothing must end closed
