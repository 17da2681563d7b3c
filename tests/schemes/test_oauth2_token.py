"""The token endpoint client's bytes and readings, pinned with RFC 6749's own examples."""

from __future__ import annotations

import base64
import json

import pytest

from proxy.schemes.oauth2_token import (
    ASSUMED_LIFETIME,
    ERROR_CODES,
    TokenError,
    basic_credentials,
    parse_token_response,
    safe_description,
    token_request,
)

# RFC 6749 §4.4.2 and §6: client s6BhdRkqt3 with secret gX1fBat3bV.
RFC_ID, RFC_SECRET = "s6BhdRkqt3", "gX1fBat3bV"
RFC_BASIC = "Basic czZCaGRSa3F0MzpnWDFmQmF0M2JW"


def test_client_credentials_request_is_the_rfc_example() -> None:
    request = token_request("client_credentials", RFC_ID, RFC_SECRET)
    assert request.body == b"grant_type=client_credentials"
    assert dict(request.headers) == {
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json",
        "Authorization": RFC_BASIC,
    }


def test_refresh_request_is_the_rfc_example() -> None:
    request = token_request(
        "refresh_token", RFC_ID, RFC_SECRET, refresh_token="tGzv3JOkF0XG5Qx2TlKWIA"
    )
    assert request.body == b"grant_type=refresh_token&refresh_token=tGzv3JOkF0XG5Qx2TlKWIA"
    assert dict(request.headers)["Authorization"] == RFC_BASIC


def test_basic_credentials_form_encode_id_and_secret_before_base64() -> None:
    # §2.3.1: a ":" in the id would otherwise split it; non-ASCII goes as UTF-8 %-escapes.
    value = basic_credentials("client:id+ü", "p@ss word/=")
    assert value == "Basic " + base64.b64encode(b"client%3Aid%2B%C3%BC:p%40ss+word%2F%3D").decode()
    assert basic_credentials("a", "") == "Basic " + base64.b64encode(b"a:").decode()


def test_client_secret_post_puts_the_client_in_the_body_with_scope_and_audience() -> None:
    request = token_request(
        "client_credentials",
        "id&1",
        "sec ret",
        "client_secret_post",
        scope="read write",
        audience="https://api.example.com/",
    )
    assert request.body == (
        b"grant_type=client_credentials&scope=read+write"
        b"&audience=https%3A%2F%2Fapi.example.com%2F&client_id=id%261&client_secret=sec+ret"
    )
    assert "Authorization" not in dict(request.headers)
    assert "sec" not in repr(request)  # the body holds the secret: never shown


def test_a_request_without_what_its_grant_needs_is_refused() -> None:
    with pytest.raises(ValueError, match="refresh token"):
        token_request("refresh_token", "a", "b")
    with pytest.raises(ValueError, match="grant"):
        token_request("password", "a", "b")
    with pytest.raises(ValueError, match="client authentication"):
        token_request("client_credentials", "a", "b", "private_key_jwt")


# RFC 6749 §5.1, with the token_type this proxy can use (the RFC's example says "example").
RFC_ANSWER = {
    "access_token": "2YotnFZFEjr1zCsicMWpAA",
    "token_type": "Bearer",
    "expires_in": 3600,
    "refresh_token": "tGzv3JOkF0XG5Qx2TlKWIA",
    "example_parameter": "example_value",
}


def test_a_success_answer_reads_to_a_grant() -> None:
    grant = parse_token_response(200, json.dumps(RFC_ANSWER).encode())
    assert (grant.access_token, grant.token_type, grant.expires_in, grant.refresh_token) == (
        "2YotnFZFEjr1zCsicMWpAA",
        "Bearer",
        3600.0,
        "tGzv3JOkF0XG5Qx2TlKWIA",
    )
    assert "2YotnFZFEjr1zCsicMWpAA" not in repr(grant)
    assert "tGzv3JOkF0XG5Qx2TlKWIA" not in repr(grant)


@pytest.mark.parametrize("token_type", ["bearer", "BEARER", "Bearer"])
def test_bearer_is_accepted_in_any_case(token_type: str) -> None:
    answer = {**RFC_ANSWER, "token_type": token_type}
    assert parse_token_response(200, json.dumps(answer).encode()).token_type == token_type


@pytest.mark.parametrize("token_type", ["example", "mac", "DPoP", "", None, 7])
def test_a_token_type_other_than_bearer_is_refused(token_type: object) -> None:
    answer = {**RFC_ANSWER, "token_type": token_type}
    with pytest.raises(TokenError, match="not Bearer: refused") as caught:
        parse_token_response(200, json.dumps(answer).encode())
    assert "2YotnFZFEjr1zCsicMWpAA" not in caught.value.message


@pytest.mark.parametrize(
    ("expires_in", "expected"),
    [
        (3600, 3600.0),
        ("120", 120.0),
        (0.5, 0.5),
        (None, None),
        (0, None),
        (-5, None),
        ("x", None),
        (True, None),
    ],
)
def test_expires_in_is_read_leniently_and_absent_means_assumed(
    expires_in: object, expected: float | None
) -> None:
    answer = {k: v for k, v in RFC_ANSWER.items() if k != "expires_in"}
    if expires_in is not None:
        answer["expires_in"] = expires_in
    grant = parse_token_response(200, json.dumps(answer).encode())
    assert grant.expires_in == expected
    assert grant.lifetime == (ASSUMED_LIFETIME if expected is None else expected)


@pytest.mark.parametrize(
    "answer",
    [
        {"token_type": "Bearer"},
        {"access_token": "", "token_type": "Bearer"},
        {"access_token": "a b", "token_type": "Bearer"},  # would split the header value
        {"access_token": "a\r\nX-Evil: 1", "token_type": "Bearer"},
        {"access_token": "ok", "token_type": "Bearer", "refresh_token": "a\nb"},
    ],
)
def test_an_unusable_token_is_refused(answer: dict[str, object]) -> None:
    with pytest.raises(TokenError, match=r"(un)?usable"):
        parse_token_response(200, json.dumps(answer).encode())


def test_a_success_status_without_json_is_an_error() -> None:
    with pytest.raises(TokenError, match="HTTP 200 without a JSON token"):
        parse_token_response(200, b"<html>login</html>")


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_every_rfc_error_is_named_with_its_description(code: str) -> None:
    body = json.dumps({"error": code, "error_description": "Try again later."}).encode()
    with pytest.raises(TokenError) as caught:
        parse_token_response(401 if code == "invalid_client" else 400, body)
    assert caught.value.code == code
    assert f"refused: {code} (Try again later.)" in caught.value.message


def test_the_rfc_error_example_without_description() -> None:
    with pytest.raises(TokenError) as caught:
        parse_token_response(400, b'{"error":"invalid_request"}')
    assert caught.value.message == "the token endpoint refused: invalid_request (HTTP 400)"


def test_a_description_that_could_carry_a_secret_is_left_out() -> None:
    secret = "the-client-secret-0042"
    for description in (
        f"bad secret {secret}",  # a known secret echoed back
        "refresh token tGzv3JOkF0XG5Qx2TlKWIA is revoked",  # shaped like a token
        "x" * 300,  # too long
        'quote " and backslash \\ are outside the RFC set',
        "line\nbreak",
    ):
        body = json.dumps({"error": "invalid_grant", "error_description": description}).encode()
        with pytest.raises(TokenError) as caught:
            parse_token_response(400, body, [secret])
        assert caught.value.message == "the token endpoint refused: invalid_grant (HTTP 400)"
    assert safe_description("Refresh token expired.") == "Refresh token expired."


def test_unknown_and_unreadable_error_codes() -> None:
    with pytest.raises(TokenError, match="refused: temporarily_unavailable"):
        parse_token_response(400, b'{"error":"temporarily_unavailable"}')
    with pytest.raises(TokenError, match="refused: an unrecognised error"):
        parse_token_response(400, json.dumps({"error": "no such <thing>"}).encode())


@pytest.mark.parametrize("status", [500, 503, 429, 302])
def test_other_statuses_are_errors_without_an_rfc_code(status: int) -> None:
    with pytest.raises(TokenError) as caught:
        parse_token_response(status, b"busy")
    assert caught.value.code is None
    assert caught.value.message == f"the token endpoint answered HTTP {status}"


def test_long_words_stay_in_a_description_random_strings_do_not() -> None:
    assert safe_description("authorization_code_expired, ask again") is not None
    assert safe_description("key sk_live_51HxQ2eKz9Ab3 leaked") is None


def test_an_answer_nested_too_deep_is_unreadable_not_a_crash() -> None:
    with pytest.raises(TokenError, match="without a JSON token"):
        parse_token_response(200, b"[" * 60000)
    with pytest.raises(TokenError, match="answered HTTP 400"):
        parse_token_response(400, b'{"error": ' + b"[" * 60000)
