"""Fixed vectors for every part of the canonical text.

The expected digests were computed outside Python, with
`printf '%b' TEXT | openssl dgst -sha256 -hmac test-secret-key`, so these tests
pin the bytes against an independent implementation, not against themselves.
"""

import pytest

from proxy.schemes.luxsci import signing

KEY = "test-secret-key"
BODY = b'{"a": 1}'
BODY_SHA = "f9d86028c6e0d64e225186f96acb69338b2c59764df79162107f5c4bb34d1310"


def test_auth_signature_without_user_matches_vector() -> None:
    sig = signing.auth_signature(KEY, "pJsvioyq8LvtIthmqn8k1u4z0wbpnKwqotupx5DB1aM", "1426087957")
    assert sig == "606c84f7287a4770b80ed018975acf21b98e8d65fc2983490bb2d4d53ecbf6a0"


def test_auth_signature_with_user_and_password_matches_vector() -> None:
    sig = signing.auth_signature(KEY, "tok", "1426087957", "joe@example.com", "pa:ss word")
    assert sig == "80480f3b54221b67b6af5812a9623e9ac3b823b74cbc069949f8f5c78dfbfc69"


def test_auth_text_layout() -> None:
    assert signing.auth_text("t", "1") == "t\n1\n"
    assert signing.auth_text("t", "1", "u", "p") == "t\n1\nu\np\n"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", ""),
        (BODY, BODY_SHA),
        # Leading/trailing space, tab, CR and LF are not part of what is hashed.
        (b' \t\r\n{"a": 1}\r\n\t ', BODY_SHA),
        (b'{"a": 1}\n', BODY_SHA),
        # Inner whitespace is.
        (b'{"a":1}', "015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862"),
    ],
)
def test_body_hash_trims_only_the_ends(body: bytes, expected: str) -> None:
    assert signing.body_hash(body) == expected


def test_whitespace_only_body_hashes_the_empty_string() -> None:
    assert signing.body_hash(b"  \r\n") == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("/perl/api/v2/auth", "/perl/api/v2/auth", ""),
        ("/a?b=1?c", "/a", "b=1?c"),  # only the first '?' splits
        ("/a?", "/a", ""),
        (
            "/u/joe%40example.com/x?q=a+b&r=%20&r=&flag",
            "/u/joe%40example.com/x",
            "q=a+b&r=%20&r=&flag",
        ),
    ],
)
def test_split_target_keeps_raw_bytes(target: str, path: str, query: str) -> None:
    assert signing.split_target(target) == (path, query)


@pytest.mark.parametrize(
    ("method", "path", "query", "digest", "expected"),
    [
        # The revocation request: no query, no body.
        (
            "DELETE",
            "/perl/api/v2/auth",
            "",
            "",
            "a626350b2ebffecb6a7782eb0d739a4ab05646727c52f26015cc6843e265460b",
        ),
        (
            "GET",
            "/perl/api/v2/user/joe@example.com/profile",
            "",
            "",
            "740a38c3de7e4f4e5806877e7452af339005b27ce7a3f750b9514d09b0ec4f86",
        ),
        # %40 is signed as sent, not decoded to '@': a different signature.
        (
            "GET",
            "/perl/api/v2/user/joe%40example.com/profile",
            "",
            "",
            "001d08cad0c897f614ffe9e3e579e7e6bb74b7427e3af48578c37caaf6533a2b",
        ),
        # %2F in a segment, '+', '%20', a repeated key, an empty value, a bare flag.
        (
            "GET",
            "/perl/api/v2/account/42/files/a%2Fb",
            "q=a+b&r=%20&r=&flag",
            "",
            "059310b6c805216236c5fc57c410a69bd5cb8b0696bdf398bc8847a6d46ade21",
        ),
        (
            "POST",
            "/perl/api/v2/account/42/echo",
            "",
            BODY_SHA,
            "e1932aeeb056ee5feb235ab5fd545950a44e3f50304001b27b6372367de751ca",
        ),
        # The method is upper-cased before signing.
        (
            "post",
            "/perl/api/v2/account/42/echo",
            "",
            BODY_SHA,
            "e1932aeeb056ee5feb235ab5fd545950a44e3f50304001b27b6372367de751ca",
        ),
    ],
)
def test_request_signature_matches_vector(
    method: str, path: str, query: str, digest: str, expected: str
) -> None:
    assert signing.request_signature(KEY, "CODE-1", method, path, query, digest) == expected


def test_signature_cookie_is_code_colon_signature_in_lower_case_hex() -> None:
    cookie = signing.signature_cookie(KEY, "CODE-1", "DELETE", "/perl/api/v2/auth", "", "")
    assert cookie == "CODE-1:a626350b2ebffecb6a7782eb0d739a4ab05646727c52f26015cc6843e265460b"


def test_verify_ignores_hex_case_and_rejects_other_digests() -> None:
    sig = signing.hmac_hex(KEY, "x")
    assert signing.verify(sig, sig.upper())
    assert not signing.verify(sig, sig[:-1] + ("0" if sig[-1] != "0" else "1"))
    assert not signing.verify(sig, "\u00e9")
