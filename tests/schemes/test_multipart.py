"""LuxSci file uploads (proxy/multipart.py) against fixed byte vectors.

Hashes are pinned as literals (not recomputed with the code under test) so a change in
what gets hashed or sent shows up as a failing vector.
"""

from __future__ import annotations

import hashlib
import json

import aiohttp
import pytest

from proxy.errors import BadRequest
from proxy.schemes.luxsci.multipart import Part, boundary_of, build, parse, prepare_upload

B = "LuxSciBoundary7MA4YWxk"
DASH = b"--" + B.encode()

REPORT = b"Hello, LuxSci!\n"
REPORT_SHA = "8637ee22b8f221e40aa7434798e214448244e58e96788cc58735c792836e2cb2"
# Binary content full of framing look-alikes: CRLF, "--", a boundary prefix, and a
# trailing "--" that abuts the next delimiter.
BLOB = b"\x00\x01\r\n--\r\n--LuxSci\xff\xfe\r\n\r\n--"
BLOB_SHA = "b21b5f4becdd3b57c8f5164939822d50802a106eab4708c99c3368392db11158"

JSON = (
    b'{"subject":"Quarterly report","attachments":['
    b'{"name":"report.txt","hash":"' + REPORT_SHA.encode() + b'"},'
    b'{"name":"blob.bin","hash":"' + BLOB_SHA.encode() + b'"}]}'
)
JSON_SHA = "0e23194a765de73a245183c91ca44b6f420696f1424da40f30c7874595797e5d"

JSON_HEADERS = (
    b'Content-Disposition: form-data; name="json"; filename="json.js"\r\n'
    b"Content-Type: application/json\r\n"
)


def file_part(filename: str, data: bytes) -> bytes:
    return (
        DASH + b"\r\n"
        b'Content-Disposition: form-data; name="files"; filename="' + filename.encode() + b'"\r\n'
        b"Content-Type: application/octet-stream\r\n"
        b"\r\n" + data + b"\r\n"
    )


def json_part(doc: bytes) -> bytes:
    return DASH + b"\r\n" + JSON_HEADERS + b"\r\n" + doc + b"\r\n"


CLOSE = DASH + b"--\r\n"
FILES = file_part("report.txt", REPORT) + file_part("blob.bin", BLOB)
# Like the protocol's example: json part first, then one `files` part per file.
BODY = json_part(JSON) + FILES + CLOSE


def body_with_json(doc: bytes) -> bytes:
    return json_part(doc) + FILES + CLOSE


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_of(body: bytes, boundary: str = B) -> object:
    [part] = [p for p in parse(body, boundary) if p.name == "json"]
    return json.loads(part.data)


# --- a correct upload passes through untouched -------------------------------------------


def test_pinned_vectors_are_what_they_claim() -> None:
    assert sha(REPORT) == REPORT_SHA
    assert sha(BLOB) == BLOB_SHA
    assert sha(JSON) == JSON_SHA


def test_complete_upload_is_sent_byte_identical() -> None:
    prepared = prepare_upload(BODY, B)
    assert prepared.changed is False
    assert prepared.body is BODY  # the very same object: nothing rebuilt or copied
    assert prepared.body_digest == JSON_SHA


def test_body_digest_is_of_the_trimmed_json_part() -> None:
    body = body_with_json(b" \r\n\t" + JSON + b"\n\r\n ")
    prepared = prepare_upload(body, B)
    assert prepared.changed is False
    assert prepared.body is body
    assert prepared.body_digest == JSON_SHA


def test_parse_fields() -> None:
    parts = parse(BODY, B)
    assert [(p.name, p.filename, p.content_type) for p in parts] == [
        ("json", "json.js", "application/json"),
        ("files", "report.txt", "application/octet-stream"),
        ("files", "blob.bin", "application/octet-stream"),
    ]
    assert parts[0].data == JSON
    assert parts[1].data == REPORT
    assert parts[2].data == BLOB  # CRLF and "--" inside the content survive
    assert parts[0].headers == (
        ("Content-Disposition", 'form-data; name="json"; filename="json.js"'),
        ("Content-Type", "application/json"),
    )


def test_build_reproduces_a_canonical_body() -> None:
    assert build(parse(BODY, B), B) == BODY


def test_build_parse_round_trip() -> None:
    parts = [
        Part.field("json", b"{}", filename="json.js", content_type="application/json"),
        Part.field("files", BLOB, filename='we"ird\\name.bin'),
        Part.field("note", b""),
        Part.field("files", b"\r\n", filename="crlf.txt", content_type="text/plain"),
    ]
    assert parse(build(parts, B), B) == parts


def test_build_refuses_data_containing_the_boundary() -> None:
    with pytest.raises(ValueError, match="boundary"):
        build([Part.field("files", b"x\r\n" + DASH + b"\r\n", filename="a")], B)
    with pytest.raises(ValueError, match="at least one part"):
        build([], B)


def test_preamble_and_epilogue_are_tolerated() -> None:
    body = b"This is a preamble.\r\n" + BODY + b"epilogue"
    assert [p.data for p in parse(body, B)] == [JSON, REPORT, BLOB]
    prepared = prepare_upload(body, B)
    assert prepared.body is body
    assert prepared.body_digest == JSON_SHA


def test_close_delimiter_without_final_crlf_and_with_padding() -> None:
    body = json_part(JSON) + DASH + b" \t\r\n" + FILES[len(DASH) + 2 :] + DASH + b"--"
    assert [p.data for p in parse(body, B)] == [JSON, REPORT, BLOB]


def test_other_parts_pass_through() -> None:
    note = (
        DASH + b'\r\nContent-Disposition: form-data; name="note"\r\nX-Extra:  kept \r\n\r\n'
        b"free text\r\n"
    )
    body = json_part(b'{"subject":"x"}') + note + FILES + CLOSE
    prepared = prepare_upload(body, B)
    assert prepared.changed is True
    assert note in prepared.body
    [kept] = [p for p in parse(prepared.body, B) if p.name == "note"]
    assert kept.headers[1] == ("X-Extra", "kept")
    assert kept.data == b"free text"


# --- what the proxy fills in ---------------------------------------------------------------

FILLED = (
    b'{"subject":"x","attachments":['
    b'{"name":"report.txt","hash":"' + REPORT_SHA.encode() + b'"},'
    b'{"name":"blob.bin","hash":"' + BLOB_SHA.encode() + b'"}]}'
)


@pytest.mark.parametrize(
    "doc",
    [
        b'{"subject":"x"}',
        b'{"subject": "x", "attachments": null}',
        b'{"subject":"x","attachments":[]}',
        b'{"subject":"x","attachments":[{"name":"report.txt"},{"name":"blob.bin","hash":""}]}',
        b'{"subject":"x","attachments":[{"name":"report.txt","hash":null}]}',
        b'{"subject":"x","attachments":[{"name":"report.txt","hash":"'
        + REPORT_SHA.encode()
        + b'"}]}',
    ],
    ids=["no-attachments", "null", "empty-list", "missing-hashes", "null-hash", "unlisted-file"],
)
def test_attachments_filled(doc: bytes) -> None:
    body = body_with_json(doc)
    prepared = prepare_upload(body, B)
    assert prepared.changed is True
    # Only the json part changes: every other byte of the body is kept.
    assert prepared.body == body_with_json(FILLED)
    assert prepared.body_digest == sha(FILLED)


def test_unlisted_file_is_appended_after_listed_ones() -> None:
    doc = b'{"attachments":[{"name":"blob.bin","hash":"' + BLOB_SHA.encode() + b'"}]}'
    prepared = prepare_upload(body_with_json(doc), B)
    assert json_of(prepared.body) == {
        "attachments": [
            {"name": "blob.bin", "hash": BLOB_SHA},
            {"name": "report.txt", "hash": REPORT_SHA},
        ]
    }


def test_upper_case_hash_is_accepted_and_left_alone() -> None:
    body = body_with_json(JSON.replace(REPORT_SHA.encode(), REPORT_SHA.upper().encode()))
    prepared = prepare_upload(body, B)
    assert prepared.changed is False
    assert prepared.body is body


def test_non_ascii_json_is_reserialized_as_utf8() -> None:
    prepared = prepare_upload(body_with_json('{"subject":"Grüße €"}'.encode()), B)
    new_json = b'{"subject":"Gr\xc3\xbc\xc3\x9fe \xe2\x82\xac","attachments":['
    assert new_json in prepared.body


def test_missing_json_part_is_created_first() -> None:
    body = FILES + CLOSE  # a legacy app just posts files
    prepared = prepare_upload(body, B)
    expected_json = (
        b'{"attachments":[{"name":"report.txt","hash":"' + REPORT_SHA.encode() + b'"},'
        b'{"name":"blob.bin","hash":"' + BLOB_SHA.encode() + b'"}]}'
    )
    assert prepared.changed is True
    assert prepared.body == json_part(expected_json) + body
    assert prepared.body_digest == sha(expected_json)
    first = parse(prepared.body, B)[0]
    assert (first.name, first.filename, first.content_type) == (
        "json",
        "json.js",
        "application/json",
    )


def test_missing_json_part_after_a_preamble() -> None:
    body = b"preamble\r\n" + FILES + CLOSE
    prepared = prepare_upload(body, B)
    assert prepared.body.startswith(b"preamble\r\n" + DASH + b"\r\n" + JSON_HEADERS)
    assert prepared.body.endswith(FILES + CLOSE)


# --- client mistakes -------------------------------------------------------------------------


def rejects(body: bytes, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        prepare_upload(body, B)


def test_wrong_hash_rejected() -> None:
    doc = JSON.replace(BLOB_SHA.encode(), REPORT_SHA.encode())
    rejects(body_with_json(doc), r"attachment 'blob\.bin': hash does not match the file's SHA-256")


def test_non_string_hash_rejected() -> None:
    rejects(
        body_with_json(b'{"attachments":[{"name":"report.txt","hash":42}]}'),
        r"attachment 'report\.txt': hash must be a string",
    )


def test_duplicate_file_names_rejected() -> None:
    body = json_part(b"{}") + file_part("a.txt", b"1") + file_part("a.txt", b"2") + CLOSE
    rejects(body, "two files are named 'a.txt'")


def test_listed_but_missing_file_rejected() -> None:
    doc = b'{"attachments":[{"name":"report.txt"},{"name":"ghost.pdf","hash":"00"}]}'
    rejects(body_with_json(doc), "attachment 'ghost.pdf' is listed .* no file part")


def test_file_listed_twice_rejected() -> None:
    doc = b'{"attachments":[{"name":"report.txt"},{"name":"report.txt"}]}'
    rejects(body_with_json(doc), "'report.txt' is listed twice")


def test_file_part_without_filename_rejected() -> None:
    body = (
        json_part(b"{}") + DASH + b'\r\nContent-Disposition: form-data; name="files"\r\n\r\nx\r\n'
    )
    rejects(body + CLOSE, "part 2 is named 'files' but has no filename")


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        (b'{"attachments":', "json part .* is not valid JSON"),
        (b"\xff{}", "json part .* is not valid UTF-8"),
        (b"[]", "json part .* must hold a JSON object, got an array"),
        (b'{"x":NaN}', "json part .* is not valid JSON"),
        (b'{"attachments":{}}', "'attachments' must be a list, got an object"),
        (b'{"attachments":["report.txt"]}', r"attachments\[0\] must be an object with a string"),
        (b'{"attachments":[{"hash":"00"}]}', r"attachments\[0\] must be an object with a string"),
    ],
)
def test_bad_json_part_rejected(doc: bytes, match: str) -> None:
    rejects(body_with_json(doc), match)


def test_two_json_parts_rejected() -> None:
    rejects(json_part(JSON) + json_part(JSON) + FILES + CLOSE, "2 parts named 'json'")


# --- framing ---------------------------------------------------------------------------------

DISPOSITION = b'Content-Disposition: form-data; name="x"\r\n'


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "opening delimiter"),
        (b"no multipart here", "opening delimiter"),
        (BODY.replace(B.encode(), b"OtherBoundary"), "opening delimiter"),
        (BODY[: -len(CLOSE)], "no closing delimiter"),
        (BODY[:-40], "no closing delimiter"),
        (BODY.replace(b"\r\n", b"\n"), "CRLF"),
        (DASH + b"--\r\n", "no parts"),
        (DASH + b"\r\n" + DISPOSITION + b"no colon\r\n\r\nx\r\n" + CLOSE, "bad header line"),
        (DASH + b"\r\n" + DISPOSITION + CLOSE, "no blank line between its headers"),
        (DASH + b"\r\n\r\ndata\r\n" + CLOSE, "part 1 has no Content-Disposition header"),
        (DASH + b"\r\nContent-Type: text/plain\r\n\r\nx\r\n" + CLOSE, "no Content-Disposition"),
        (
            json_part(b"{}") + DASH + b"\r\nContent-Disposition: form-data\r\n\r\nx\r\n" + CLOSE,
            "multipart part 2 has no Content-Disposition name",
        ),
        (
            DASH + b'\r\nContent-Disposition: attachment; name="x"\r\n\r\nx\r\n' + CLOSE,
            "'attachment', expected 'form-data'",
        ),
        (
            DASH + b"\r\n" + DISPOSITION + b" folded: line\r\n\r\nx\r\n" + CLOSE,
            "bad header line",
        ),
        (DASH + b"\r\nBad Name: x\r\n" + DISPOSITION + b"\r\nx\r\n" + CLOSE, "bad header line"),
        (
            DASH + b'\r\nContent-Disposition: form-data; name="x\r\n\r\nx\r\n' + CLOSE,
            "unparseable parameters",
        ),
        (
            DASH + b"\r\n" + DISPOSITION + DISPOSITION + b"\r\nx\r\n" + CLOSE,
            "2 content-disposition headers",
        ),
        (
            DASH + b'\r\nContent-Disposition: form-data; name="\xff"\r\n\r\nx\r\n' + CLOSE,
            "not valid UTF-8",
        ),
        (DASH + b"X\r\n" + DISPOSITION + b"\r\nx\r\n" + CLOSE, "not followed by CRLF"),
    ],
    ids=[
        "empty",
        "not-multipart",
        "wrong-boundary",
        "no-close",
        "truncated",
        "lf-only",
        "zero-parts",
        "header-without-colon",
        "no-separator",
        "no-headers",
        "no-disposition",
        "no-name",
        "not-form-data",
        "folded-header",
        "space-in-name",
        "unterminated-quote",
        "duplicate-disposition",
        "header-not-utf8",
        "boundary-prefix",
    ],
)
def test_malformed_framing_rejected(body: bytes, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        parse(body, B)
    with pytest.raises(BadRequest, match=match):
        prepare_upload(body, B)


def test_disposition_parameters() -> None:
    body = (
        DASH + b'\r\ncontent-disposition: Form-Data ; NAME = "files" ; filename="a\\"b\\\\c\\d.txt"'
        b"\r\n\r\n1\r\n" + DASH + b"\r\nContent-Disposition: form-data; name=files; "
        b"filename*=UTF-8''%C3%A9t%C3%A9.txt\r\n\r\n2\r\n" + CLOSE
    )
    first, second = parse(body, B)
    assert (first.name, first.filename) == ("files", 'a"b\\c\\d.txt')
    assert first.headers[0][0] == "content-disposition"  # names kept as written
    assert (second.name, second.filename) == ("files", "été.txt")


def test_large_body_parses() -> None:
    big = bytes(range(256)) * (8 * 4096)  # 8 MiB including CR, LF and '-'
    body = json_part(b"{}") + file_part("big.bin", big) + CLOSE
    prepared = prepare_upload(body, B)
    assert json_of(prepared.body) == {"attachments": [{"name": "big.bin", "hash": sha(big)}]}
    assert prepared.body.endswith(file_part("big.bin", big) + CLOSE)


# --- boundary_of -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        (f"multipart/form-data; boundary={B}", B),
        (f'multipart/form-data; boundary="{B}"', B),
        (f'Multipart/Form-Data;charset=utf-8; BOUNDARY = "{B}" ;', B),
        ('multipart/form-data; boundary="a b:c=d?e"', "a b:c=d?e"),
        (
            "multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW",
            "----WebKitFormBoundary7MA4YWxkTrZu0gW",
        ),
        ("multipart/form-data; boundary=" + "x" * 70, "x" * 70),
        ("application/json", None),
        ("application/json; boundary=abc", None),
        ("multipart/mixed; boundary=abc", None),
        ("text/plain", None),
        ("", None),
    ],
)
def test_boundary_of(content_type: str, boundary: str | None) -> None:
    assert boundary_of(content_type) == boundary


@pytest.mark.parametrize(
    ("content_type", "match"),
    [
        ("multipart/form-data", "no boundary parameter"),
        ("multipart/form-data; charset=utf-8", "no boundary parameter"),
        ('multipart/form-data; boundary=""', "not valid"),
        ("multipart/form-data; boundary=" + "x" * 71, "not valid"),
        ('multipart/form-data; boundary="ends with space "', "not valid"),
        ("multipart/form-data; boundary=a*b", "not valid"),
        ("multipart/form-data; boundary=a; boundary=b", "'boundary' twice"),
        ('multipart/form-data; boundary="abc', "unparseable"),
    ],
)
def test_boundary_of_rejects(content_type: str, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        boundary_of(content_type)


# --- interop with a real client library ------------------------------------------------------


class _Sink:
    """The slice of aiohttp's AbstractStreamWriter that MultipartWriter.write uses."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    async def write(self, data: bytes) -> None:
        self.buffer += data


async def test_aiohttp_multipart_writer_interop() -> None:
    writer = aiohttp.MultipartWriter("form-data", boundary="aiohttp-boundary-1234")
    writer.append(JSON, {"Content-Type": "application/json"}).set_content_disposition(
        "form-data", name="json", filename="json.js"
    )
    for filename, data in (("report.txt", REPORT), ("blob.bin", BLOB)):
        writer.append(data, {"Content-Type": "application/octet-stream"}).set_content_disposition(
            "form-data", name="files", filename=filename
        )
    sink = _Sink()
    await writer.write(sink)  # type: ignore[arg-type]
    body = bytes(sink.buffer)

    boundary = boundary_of(writer.headers["Content-Type"])
    assert boundary == "aiohttp-boundary-1234"
    parts = parse(body, boundary)
    assert [(p.name, p.filename, p.data) for p in parts] == [
        ("json", "json.js", JSON),
        ("files", "report.txt", REPORT),
        ("files", "blob.bin", BLOB),
    ]
    prepared = prepare_upload(body, boundary)
    assert prepared.body is body
    assert prepared.body_digest == JSON_SHA


async def test_aiohttp_formdata_interop() -> None:
    form = aiohttp.FormData()
    form.add_field("json", b'{"subject":"x"}', filename="json.js", content_type="application/json")
    form.add_field("files", REPORT, filename="report.txt")
    form.add_field("files", BLOB, filename="blob.bin", content_type="application/octet-stream")
    payload = form()
    body = await payload.as_bytes()
    boundary = boundary_of(payload.content_type)
    assert boundary is not None
    prepared = prepare_upload(body, boundary)
    assert prepared.changed is True
    assert json_of(prepared.body, boundary) == {
        "subject": "x",
        "attachments": [
            {"name": "report.txt", "hash": REPORT_SHA},
            {"name": "blob.bin", "hash": BLOB_SHA},
        ],
    }
    # Every other part is byte-identical after the rewrite.
    assert [p for p in parse(prepared.body, boundary) if p.name != "json"] == [
        p for p in parse(body, boundary) if p.name != "json"
    ]
