"""Auth-code harvesting from streamed responses (proxy/harvest.py)."""

from __future__ import annotations

import gzip
import json
import random
import zlib
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.schemes.luxsci.harvest import CodeHarvester, _json_document, code_in_body


def harvest(chunks: Iterable[bytes], encoding: str | None = None) -> str | None:
    harvester = CodeHarvester(encoding)
    for chunk in chunks:
        harvester.feed(chunk)
    return harvester.result()


def one(body: bytes, encoding: str | None = None) -> str | None:
    return harvest([body], encoding)


def bytewise(body: bytes) -> list[bytes]:
    return [body[i : i + 1] for i in range(len(body))]


def in_chunks(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


# Bodies whose code is "CODE-1" wherever `auth` sits, with decoys around it.
ESCAPED_CODE = b'"c\\u0073\\"\\\\d/\\/\\n"'  # decodes to: cs"\d//<newline>
ESCAPED_VALUE = 'cs"\\d//\n'
SPLIT_BODIES = [
    (b'{"auth":"CODE-1","success":1}', "CODE-1"),
    (b'{"success":1,"auth":"CODE-1"}', "CODE-1"),
    (b'{"success":1,"auth":"CODE-1","data":{"n":[1,2]}}', "CODE-1"),
    (
        b'{"data":{"auth":"nested","x":[{"auth":"deeper"}]},"note":"\\"auth\\":\\"fake\\"",'
        b'"list":["auth","}","{"],"auth":' + ESCAPED_CODE + b"}",
        ESCAPED_VALUE,
    ),
    (b' \r\n{ "\\u0061uth" : "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80" , "x" : null }\n', "é€😀"),
    (b'{"success":0,"error_message":"auth failed"}', None),
    (b'{"auth":17,"x":"y"}', None),
]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"auth":"CODE-1","success":1,"data":{"id":5}}', "CODE-1"),
        (b'{"success":1,"data":{"id":5},"auth":"CODE-1"}', "CODE-1"),
        (b'{"success":1,"auth":"CODE-1","data":{"id":5}}', "CODE-1"),
        (b'{"success":1,"data":[{"id":5}],"auth":"CODE-1"}', "CODE-1"),
        (b'{\n  "success": 1,\n  "auth": "CODE-1"\n}\n', "CODE-1"),
    ],
    ids=["first", "last", "middle", "after-array", "pretty"],
)
def test_top_level_key_anywhere(body: bytes, code: str) -> None:
    assert one(body) == code


def test_nested_auth_is_ignored() -> None:
    assert one(b'{"success":1,"data":{"auth":"nested"}}') is None
    assert one(b'{"data":{"auth":"nested"},"list":[{"auth":"x"}],"auth":"top"}') == "top"
    assert one(b'{"data":[[{"auth":"a"}],{"b":{"auth":"c"}}],"auth":"top"}') == "top"


def test_auth_inside_string_values_is_ignored() -> None:
    assert one(b'{"message":"auth","other":"\\"auth\\":\\"fake\\""}') is None
    assert one(b'{"message":"\\"auth\\":\\"fake\\"","auth":"real"}') == "real"
    assert one(b'{"k\\"auth":"fake","auth\\"":"fake2"}') is None


def test_escapes_are_decoded() -> None:
    assert one(b'{"auth":' + ESCAPED_CODE + b"}") == ESCAPED_VALUE
    assert one(b'{"\\u0061\\u0075\\u0074\\u0068":"k"}') == "k"  # the key, fully escaped
    assert one(b'{"x":"\\\\","auth":"after-backslash"}') == "after-backslash"
    assert one(b'{"x":"\\\\\\"","auth":"after-escaped-quote"}') == "after-escaped-quote"
    assert one(b'{"auth":"\\ud83d\\ude00"}') == "😀"


@pytest.mark.parametrize(("body", "code"), SPLIT_BODIES)
def test_every_split_position(body: bytes, code: str | None) -> None:
    assert json.loads(body).get("auth") == code or code is None
    for cut in range(len(body) + 1):
        assert harvest([body[:cut], body[cut:]]) == code, cut
    for first in range(1, len(body)):
        for second in range(first, len(body), 7):
            assert harvest([body[:first], body[first:second], body[second:]]) == code


@pytest.mark.parametrize(("body", "code"), SPLIT_BODIES)
def test_one_byte_at_a_time(body: bytes, code: str | None) -> None:
    assert harvest(bytewise(body)) == code


def test_done_and_no_more_scanning() -> None:
    harvester = CodeHarvester()
    harvester.feed(b'{"auth":"CODE-1"')
    assert not harvester.done  # not yet confirmed by ',' or '}'
    harvester.feed(b',"x":')
    assert harvester.done
    assert harvester.result() == "CODE-1"
    harvester.feed(b"garbage that would otherwise fail")
    assert harvester.result() == "CODE-1"


def test_object_without_auth_is_done_at_its_end() -> None:
    harvester = CodeHarvester()
    harvester.feed(b'{"success":0}')
    assert harvester.done
    assert harvester.result() is None


# --- encodings --------------------------------------------------------------------------------

BODY = b'{"success":1,"data":{"auth":"no","text":"' + b"x" * 3000 + b'"},"auth":"CODE-1"}'


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("encoding", "compressed"),
    [
        ("gzip", gzip.compress(BODY)),
        ("x-gzip", gzip.compress(BODY)),
        ("GZip", gzip.compress(BODY)),
        ("deflate", zlib.compress(BODY)),  # zlib-wrapped, as HTTP specifies
        ("deflate", raw_deflate(BODY)),  # raw, as many servers send it
        ("identity, gzip", gzip.compress(BODY)),
        ("identity", BODY),
        (None, BODY),
    ],
)
def test_content_encodings(encoding: str | None, compressed: bytes) -> None:
    assert one(compressed, encoding) == "CODE-1"
    assert harvest(bytewise(compressed), encoding) == "CODE-1"
    assert harvest(in_chunks(compressed, 7), encoding) == "CODE-1"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_every_split_position(encoding: str) -> None:
    body = b'{"x":{"auth":"no"},"auth":"CODE-\\u0031"}'
    compressed = gzip.compress(body) if encoding == "gzip" else raw_deflate(body)
    for cut in range(len(compressed) + 1):
        assert harvest([compressed[:cut], compressed[cut:]], encoding) == "CODE-1", cut


@pytest.mark.parametrize("encoding", ["br", "compress", "zstd", "gzip, br", "gzip, gzip"])
def test_unsupported_encoding_disables_harvesting(encoding: str) -> None:
    harvester = CodeHarvester(encoding)
    assert harvester.done
    harvester.feed(b'{"auth":"CODE-1"}')
    assert harvester.result() is None


def test_corrupt_compressed_body_gives_up() -> None:
    harvester = CodeHarvester("gzip")
    harvester.feed(b"this is not gzip at all")
    assert harvester.done
    assert harvester.result() is None


def test_gzip_bomb_is_scanned_in_bounded_steps() -> None:
    big = b'{"data":"' + b"0" * (20 * 1024 * 1024) + b'","auth":"CODE-1"}'
    assert one(gzip.compress(big, compresslevel=1), "gzip") == "CODE-1"


# --- not JSON, malformed, truncated -----------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>502 Bad Gateway</body></html>",
        b'["auth","CODE-1"]',
        b'"auth"',
        b"null",
        b"\xef\xbb\xbf{}",
        b'{"auth" "CODE-1"}',
        b'{"auth":"CODE-1" "x":1}',
        b'{"a":1 "auth":"CODE-1"}',
        b'{"a":,"auth":"CODE-1"}',
        b'{"a":[1,2},"auth":"CODE-1"}',
        b'{"a":{"b":1]],"auth":"CODE-1"}',
        b'{,"auth":"CODE-1"}',
        b'{"a":1,,"auth":"CODE-1"}',
        b'{"auth":"bad escape \\x"}',
        b'{"auth":"raw\ncontrol"}',
        b'{"auth":"\xff\xfe"}',
        b'{"auth":null}',
        b'{"auth":{"code":"x"}}',
        b'{"auth":["x"]}',
        b'{"auth":1,"auth":"later duplicate"}',
    ],
)
def test_not_json_or_malformed_gives_none(body: bytes) -> None:
    harvester = CodeHarvester()
    harvester.feed(body)
    assert harvester.result() is None
    assert harvester.done
    assert harvest(bytewise(body)) is None


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   \r\n",
        b"{",
        b'{"au',
        b'{"auth"',
        b'{"auth":',
        b'{"auth":"CODE',
        b'{"auth":"CODE-1\\',
        b'{"auth":"CODE-1"',  # a value not yet followed by ',' or '}' is not confirmed
        b'{"data":{"x":"}',
    ],
)
def test_truncated_gives_none(body: bytes) -> None:
    harvester = CodeHarvester()
    harvester.feed(body)
    assert harvester.result() is None
    assert not harvester.done  # more input could still complete it


def test_oversized_auth_value_is_not_a_code() -> None:
    assert one(b'{"auth":"' + b"a" * 100_000 + b'"}') is None
    assert one(b'{"' + b"k" * 100_000 + b'":"v","auth":"CODE-1"}') == "CODE-1"


def test_deep_nesting_beyond_the_regex_fast_path() -> None:
    deep = b'{"auth":"no"}'
    for _ in range(40):
        deep = b'[1,"]",' + deep + b',{"x":"["}]'
    body = b'{"data":' + deep + b',"auth":"CODE-1"}'
    assert one(body) == "CODE-1"
    assert harvest(in_chunks(body, 5)) == "CODE-1"
    assert harvest(bytewise(body)) == "CODE-1"


# --- big bodies -------------------------------------------------------------------------------


def test_big_body_with_code_last() -> None:
    blob = (b'0123456789abcdef\\"{}[]:,' * 220_000)[: 5 * 1024 * 1024]
    body = b'{"success":1,"data":"' + blob + b'","auth":"CODE-1"}'
    assert len(body) > 5_000_000
    assert harvest(in_chunks(body, 64 * 1024)) == "CODE-1"
    assert harvest(in_chunks(body, 65_537)) == "CODE-1"


def test_big_body_of_small_objects_with_code_last() -> None:
    rows = [{"id": i, "name": f"user{i}@example.com", "tags": ["a", "}"]} for i in range(80_000)]
    body = json.dumps({"success": 1, "data": rows, "auth": "CODE-1"}).encode()
    assert len(body) > 5_000_000
    assert harvest(in_chunks(body, 64 * 1024)) == "CODE-1"


# --- agreement with json.loads ----------------------------------------------------------------

_PIECES = ["a", '"', "\\", "é", "€", "😀", "{", "}", "[", "]", ":", ",", " ", "\n", "auth", "\x01"]


def _random_value(rnd: random.Random, depth: int) -> object:
    roll = rnd.random()
    if depth > 5 or roll < 0.3:
        return rnd.choice([1, -2.5e10, True, False, None, _random_text(rnd), "auth"])
    if roll < 0.6:
        return [_random_value(rnd, depth + 1) for _ in range(rnd.randint(0, 4))]
    return {
        rnd.choice([_random_text(rnd), "auth"]): _random_value(rnd, depth + 1)
        for _ in range(rnd.randint(0, 4))
    }


def _random_text(rnd: random.Random) -> str:
    return "".join(rnd.choice(_PIECES) for _ in range(rnd.randint(0, 6)))


def test_agrees_with_json_loads_on_random_documents() -> None:
    rnd = random.Random(20240611)
    for _ in range(1500):
        items = [(_random_text(rnd), _random_value(rnd, 1)) for _ in range(rnd.randint(0, 5))]
        if rnd.random() < 0.8:
            auth = rnd.choice([_random_text(rnd), _random_text(rnd), 5, None, {"a": 1}])
            items.insert(rnd.randint(0, len(items)), ("auth", auth))
        doc = dict(items)
        body = json.dumps(
            doc,
            ensure_ascii=rnd.random() < 0.5,
            indent=rnd.choice([None, 1, "\t"]),
            separators=rnd.choice([None, (",", ":"), (" , ", " : ")]),
        ).encode()
        expected = doc.get("auth")
        expected = expected if isinstance(expected, str) else None
        chunks, pos = [], 0
        while pos < len(body):
            size = rnd.choice([1, 2, 3, 5, 64, 4096])
            chunks.append(body[pos : pos + size])
            pos += size
        assert harvest(chunks) == expected, body
        # A truncated body never yields a wrong code.
        assert one(body[: rnd.randint(0, len(body))]) in (None, expected)


_JSON_TEXT = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
).map(json.dumps)


@given(
    st.one_of(
        _JSON_TEXT.map(str.encode),
        st.tuples(
            st.sampled_from(["", " ", "\ufeff", "\n\t"]), _JSON_TEXT, st.text(max_size=3)
        ).map(lambda t: "".join(t).encode("utf-8", "surrogatepass")),
        st.binary(max_size=40),
    )
)
def test_the_small_answer_parse_agrees_with_json_loads(body: bytes) -> None:
    """The fast whole-body parse accepts and rejects exactly what json.loads does."""
    try:
        expected = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        expected = None
    assert _json_document(body) == expected


@pytest.mark.parametrize(("body", "code"), SPLIT_BODIES)
def test_a_whole_small_body_gives_the_code_the_scan_gives(body: bytes, code: str | None) -> None:
    assert code_in_body(body, None) == code == one(body)
    # Compressed, it takes the scan: the same answer.
    assert code_in_body(gzip.compress(body), "gzip") == code


def test_a_whole_body_that_is_not_quite_json_still_gets_the_scan() -> None:
    # Trailing junk: json.loads refuses it, the scan has already seen the code.
    body = b'{"auth":"CODE-1","success":1} trailing'
    assert code_in_body(body, None) == one(body)
