"""The upstream-side conformance cases (upstream_cases.py), each through a running proxy.

One proxy per case, in front of a scripted upstream that answers the case's request with
the case's exact bytes. The bearer scheme needs no login; the cases about LuxSci's auth
code (`signed_with`) run the LuxSci scheme, whose login the scripted upstream answers.
One attempt per request: retries are a policy of their own (tests/pipeline/
test_retries.py), and here each case is one exchange with the upstream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import MakeProxy

from proxy.config import Secret

from .upstream_cases import (
    UPSTREAM_CASES,
    ScriptedUpstream,
    UpstreamCase,
    run_upstream_case,
    verdict,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    scripted = ScriptedUpstream()
    await scripted.start()
    yield scripted
    await scripted.close()


@pytest.mark.parametrize("case", UPSTREAM_CASES, ids=[c.name for c in UPSTREAM_CASES])
async def test_upstream_case(
    case: UpstreamCase, upstream: ScriptedUpstream, make_proxy: MakeProxy
) -> None:
    auth: dict[str, Any] = {} if case.signed_with else {"scheme": "bearer", "api_key": Secret("k")}
    proxy = await make_proxy(
        upstream.url, auth=auth, retry={"max_attempts": 1}, logging={"level": "warning"}
    )
    outcome = await run_upstream_case(proxy.service.port, case, upstream)
    problems = verdict(case, outcome)
    assert not problems, f"{case.name} ({case.rfc}): " + "; ".join(problems)


def test_the_case_table_is_sound() -> None:
    names = [c.name for c in UPSTREAM_CASES]
    assert len(names) == len(set(names))
    assert len(UPSTREAM_CASES) >= 30
    for case in UPSTREAM_CASES:
        assert case.rfc.startswith("RFC "), case.name
        assert case.script, case.name
        if case.proxy_error is not None:
            assert case.status >= 500 and case.body is None, case.name
