"""The log redactor and OAuth 2.0 credentials: issued tokens, and token traffic in text."""

from __future__ import annotations

from proxy.observe.log import MASK, Redactor


def test_tokens_issued_while_running_are_masked_and_the_oldest_forgotten() -> None:
    redactor = Redactor(["configured-client-secret"])
    tokens = [f"issued-access-token-{i:03d}" for i in range(Redactor.REMEMBERED + 4)]
    for token in tokens:
        redactor.remember([token])
    line = " ".join(tokens[-Redactor.REMEMBERED :]) + " configured-client-secret"
    assert redactor.scrub(line) == " ".join([MASK] * (Redactor.REMEMBERED + 1))
    # Long replaced ones drop out (the list is scanned per line), configured ones never.
    assert tokens[0] in redactor.scrub(tokens[0])
    redactor.remember([f"more-{i:04d}" for i in range(50)])
    assert redactor.scrub("configured-client-secret") == MASK


def test_token_requests_and_answers_are_masked_in_any_text() -> None:
    redactor = Redactor()
    form = "grant_type=refresh_token&refresh_token=tGzv3JOkF0XG5Qx2TlKWIA&client_secret=s3"
    assert redactor.scrub(form) == (
        f"grant_type=refresh_token&refresh_token={MASK}&client_secret={MASK}"
    )
    answer = '{"access_token": "2YotnFZFEjr1zCsicMWpAA", "token_type": "Bearer"}'
    assert "2YotnFZFEjr1zCsicMWpAA" not in redactor.scrub(answer)
    escaped = '{\\"refresh_token\\":\\"tGzv3JOkF0XG5Qx2TlKWIA\\"}'
    assert "tGzv3JOkF0XG5Qx2TlKWIA" not in redactor.scrub(escaped)
    assert redactor.scrub("Authorization: Bearer 2YotnFZFEjr1zCsicMWpAA") == (
        f"Authorization: Bearer {MASK}"
    )
