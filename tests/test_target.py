"""The request-target model: one parse, and every consumer reads the same classification."""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import AccessConfig
from proxy.errors import BadRequest, Forbidden
from proxy.pipeline.admission import AccessPolicy
from proxy.schemes.bearer import BearerScheme
from proxy.schemes.luxsci.scheme import LuxSciScheme
from proxy.target import Kind, Target, parse

# Its session is never touched by budget(): the scheme's rule is pure.
LUXSCI = LuxSciScheme(cast(Any, None))
BEARER = BearerScheme("k")


@pytest.mark.parametrize(
    ("raw", "kind", "subject"),
    [
        ("/perl/api/v2/auth", Kind.AUTH, None),
        ("/perl/api/v2/auth/", Kind.AUTH, None),
        ("/perl/api/v2/authx", Kind.OTHER, None),
        ("/perl/api/v2/auth/more", Kind.OTHER, None),
        ("/perl/api/v2/user/joe@example.com/profile", Kind.USER, "joe@example.com"),
        # The review's example: every consumer must see a user request here.
        ("/perl/api/v2/%75ser/joe@example.com/profile", Kind.USER, "joe@example.com"),
        ("/perl/api/v2/user/joe%40example.com", Kind.USER, "joe@example.com"),
        ("/Perl/API/V2/USER/joe/x", Kind.USER, "joe"),
        ("/perl/api/v2/user", Kind.OTHER, None),
        ("/perl/api/v2/account/42/users", Kind.ACCOUNT, "42"),
        ("/perl/api/v2/%61ccount/42", Kind.ACCOUNT, "42"),
        ("/perl/api/v2/user%2Fjoe/profile", Kind.OTHER, None),
        ("/elsewhere/user/joe", Kind.OTHER, None),
        ("/", Kind.OTHER, None),
    ],
)
def test_a_target_is_classified_on_its_decoded_segments(
    raw: str, kind: Kind, subject: str | None
) -> None:
    target = parse(raw)
    assert (target.kind, target.subject) == (kind, subject)
    assert target.raw == raw and target.path == raw  # nothing re-encoded


def test_the_percent_encoded_user_path_is_one_request_to_every_consumer() -> None:
    target = parse("/perl/api/v2/%75ser/joe@example.com/profile")
    policy = AccessPolicy(AccessConfig(protected_users=("JOE@example.com",)))
    with pytest.raises(Forbidden):
        policy.check_request("GET", target)
    assert LUXSCI.budget(target) == "user"
    assert target.masked_path() == "/perl/api/v2/%75ser/[user]/profile"


@pytest.mark.parametrize(
    "raw",
    [
        "/perl/api/v2/user%2Fceo@example.com/profile",
        "/perl/api/v2%2Fuser%2Fceo@example.com/profile",
        "/perl/api/v2/user%5Cceo@example.com",
        "/perl%2fapi%2fv2%2fuser%2fCEO%40example.com",
    ],
)
def test_an_encoded_slash_cannot_side_step_a_protected_user(raw: str) -> None:
    target = parse(raw)
    assert "ceo@example.com" in target.users
    with pytest.raises(Forbidden):
        AccessPolicy(AccessConfig(protected_users=("ceo@example.com",))).check_request(
            "GET", target
        )


def test_encoded_slashes_are_kept_by_default_and_refused_when_configured() -> None:
    assert parse("/a%2Fb%5Cc?x=%2F").raw == "/a%2Fb%5Cc?x=%2F"
    assert parse("/a%2Fb").segments == ("a/b",)  # one segment: split at literal '/' only
    with pytest.raises(BadRequest, match="encoded_slashes"):
        parse("/a%2Fb", encoded_slashes="reject")
    with pytest.raises(BadRequest, match="encoded_slashes"):
        parse("/a%5cb", encoded_slashes="reject")
    assert parse("/a?x=%2F", encoded_slashes="reject").query == "x=%2F"  # the query is not a path


@pytest.mark.parametrize(
    "raw",
    [
        "/a/../b",
        "/a/%2e%2E/b",
        "/a/.%2E/b",
        "/a/./b",
        "/a%2F..%2Fb",  # a dot-segment behind encoded slashes
        "/a%5C..%5Cb",
        "/a//b",
        "/a\\b",
        "/a/%zz",
        "/a/%",
        "/a/%00",
        "/a/%ff",
        "/a?q=%G0",
        "http://x/y",
        "//x/y",
        "*",
        "",
    ],
)
def test_targets_that_could_mean_two_things_are_refused(raw: str) -> None:
    with pytest.raises(BadRequest):
        parse(raw)


def test_a_question_mark_with_no_query_is_kept() -> None:
    assert parse("/p?").raw == "/p?"
    assert parse("/p").raw == "/p"
    assert parse("/p?").query == ""


def test_only_a_user_login_is_masked_in_the_raw_path() -> None:
    assert parse("/perl/api/v2/user/joe%40x.com/a?b").masked_path() == "/perl/api/v2/user/[user]/a"
    assert parse("/perl/api/v2/account/42/a").masked_path() == "/perl/api/v2/account/42/a"


def test_the_bearer_scheme_spends_one_budget_whatever_the_path() -> None:
    assert BEARER.budget(parse("/perl/api/v2/user/joe/x")) == "account"


# -- the property: every consumer agrees with one independent reading ---------------------------

_LOGIN = "joe@example.com"


def _spell(text: str, draw: st.DrawFn) -> str:
    """`text` with each character percent-encoded or case-flipped at random."""
    out = []
    for ch in text:
        how = draw(st.sampled_from(["plain", "plain", "encode", "upper"]))
        if how == "encode":
            out.append("".join(f"%{b:02{draw(st.sampled_from('xX'))}}" for b in ch.encode()))
        elif how == "upper":
            out.append(ch.upper())
        else:
            out.append(ch)
    return "".join(out)


@st.composite
def targets(draw: st.DrawFn) -> str:
    area = draw(st.sampled_from(["user", "account", "auth", "users", "other"]))
    words = ["perl", "api", "v2", area]
    if draw(st.booleans()):
        words.append(draw(st.sampled_from([_LOGIN, "42", "CEO@Example.com"])))
    words += draw(st.lists(st.sampled_from(["profile", "x", "a b", "é"]), max_size=2))
    if draw(st.booleans()):
        words = words[draw(st.integers(0, 2)) :]  # a prefix cut: not the API's root any more
    path = "/" + "/".join(_spell(w, draw) for w in words)
    if draw(st.booleans()):
        path += "/"
    if draw(st.booleans()):
        path += "?" + draw(st.sampled_from(["", "a=1", "q=%2F"]))
    return path


def _oracle(raw: str) -> tuple[str, str | None]:
    """The classification read independently: decode everything, compare lower-cased."""
    path = raw.partition("?")[0]
    words = [unquote(w) for w in path.split("/")[1:] if w != ""]
    low = [w.lower() for w in words]
    if low[:3] != ["perl", "api", "v2"] or len(words) < 4:
        return "other", None
    if low[3] == "auth" and len(words) == 4:
        return "auth", None
    if low[3] in ("user", "account") and len(words) >= 5:
        return low[3], words[4]
    return "other", None


@given(raw=targets())
def test_every_consumer_sees_the_same_classification(raw: str) -> None:
    target: Target = parse(raw)
    kind, subject = _oracle(raw)
    assert target.kind.value == kind and target.subject == subject
    # The limiter's budget.
    assert LUXSCI.budget(target) == ("user" if kind == "user" else "account")
    # Log masking: a user's login never survives redaction, in any spelling.
    masked = target.masked_path()
    assert ("[user]" in masked) == (kind == "user")
    # Protected users: fires exactly for a user path naming the protected login.
    policy = AccessPolicy(AccessConfig(protected_users=(_LOGIN,)))
    protected = kind == "user" and subject is not None and subject.lower() == _LOGIN
    if protected:
        with pytest.raises(Forbidden):
            policy.check_request("GET", target)
    else:
        policy.check_request("GET", target)
    # What goes upstream is what came in.
    assert target.raw == raw
