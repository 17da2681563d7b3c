"""LuxSci file uploads: check a client's multipart/form-data body and fix it only if needed.

The rules are in ../shared/PROTOCOL.md ("File uploads"): one part named `json` holding the
request JSON with an `attachments` list of `{"name", "hash"}` (SHA-256 hex of each file),
one part named `files` per file, file names unique, CRLF framing. The request signature
hashes the trimmed `json` part, not the whole body.

Pure functions over a whole body, no I/O: bytes, or a read-only mmap of a spooled body
(`plan_upload`; the scan only finds, slices and hashes, which both support). The body is
never copied part by part: the scanner records offsets, files are hashed through a
memoryview, and a body that needs no change is returned as the very same bytes object,
because what is signed must be exactly what is sent. A change is one splice (the json
part replaced, or one inserted), which the caller applies to bytes or to the file.

Names and filenames are taken as sent: a quoted-string only has `\\"` and `\\\\`
unescaped (other backslashes stay, so old Windows paths survive) and nothing is
percent-decoded, since the API receives the same bytes and matches them the same way.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from proxy.errors import BadRequest
from proxy.jsonbounds import MAX_DEPTH, nesting_within
from proxy.schemes.luxsci.signing import body_hash

JSON_PART = "json"
FILES_PART = "files"
_JSON_FILENAME = "json.js"
_JSON_CONTENT_TYPE = "application/json"

# RFC 2046 bchars: 1-70 of these, and the last one may not be a space.
_BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")

# One `; name=value` parameter. Unquoted values are accepted more loosely than an HTTP
# token because real clients send unquoted boundaries containing '/', ':', '=' or '?'.
_PARAM_RE = re.compile(
    r'[ \t]*;[ \t]*([^\s;="]+)[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|([^\s;"]*))[ \t]*',
    re.DOTALL,
)
_TRAILING_SEMICOLON_RE = re.compile(r"[ \t]*;?[ \t]*")
_QUOTED_PAIR_RE = re.compile(r'\\([\\"])')

_HEADER_LINE_RE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*?)[ \t]*")
_AFTER_DELIMITER_RE = re.compile(rb"[ \t]*\r\n")  # transport padding, then CRLF


@dataclass(frozen=True)
class Part:
    headers: tuple[tuple[str, str], ...]  # as sent, in order (names as written)
    name: str | None  # Content-Disposition name
    filename: str | None
    content_type: str | None
    data: bytes

    @classmethod
    def field(
        cls,
        name: str,
        data: bytes,
        *,
        filename: str | None = None,
        content_type: str | None = None,
    ) -> Part:
        """A form-data part whose headers agree with its fields, so build/parse round-trip."""
        disposition = f"form-data; name={_quote(name)}"
        if filename is not None:
            disposition += f"; filename={_quote(filename)}"
        headers: list[tuple[str, str]] = [("Content-Disposition", disposition)]
        if content_type is not None:
            headers.append(("Content-Type", content_type))
        return cls(tuple(headers), name, filename, content_type, data)


# A whole body: bytes, or a read-only mapping of a spooled one.
Buffer = bytes | mmap.mmap


@dataclass(frozen=True)
class PreparedUpload:
    body: bytes  # what goes upstream: the original object when nothing had to change
    body_digest: str  # the signature's body_hash: trimmed json part as sent upstream
    changed: bool


@dataclass(frozen=True, slots=True)
class Splice:
    """Bytes [start, end) of the body replaced by `insert` (start == end: inserted)."""

    start: int
    end: int
    insert: bytes


@dataclass(frozen=True, slots=True)
class UploadPlan:
    body_digest: str  # the signature's body_hash: trimmed json part as it will be sent
    splice: Splice | None  # None: the body goes as it is


@dataclass(frozen=True, slots=True)
class _Span:
    """A part as found in the body: data stays in the body, only its offsets are kept."""

    index: int  # 1-based, for messages
    headers: tuple[tuple[str, str], ...]
    name: str | None
    filename: str | None
    content_type: str | None
    start: int  # first byte of the part's headers
    data_start: int
    data_end: int


def boundary_of(content_type: str) -> str | None:
    """The boundary of a multipart/form-data Content-Type; None for any other type."""
    media_type, semicolon, rest = content_type.partition(";")
    if media_type.strip().lower() != "multipart/form-data":
        return None
    params = _parse_params(semicolon + rest, "Content-Type")
    boundary = params.get("boundary")
    if boundary is None:
        raise BadRequest("multipart/form-data Content-Type has no boundary parameter")
    return _check_boundary(boundary)


def parse(body: bytes, boundary: str) -> list[Part]:
    """Split a multipart/form-data body into its parts; BadRequest if it is malformed."""
    _first, spans = _scan(body, boundary)
    return [
        Part(s.headers, s.name, s.filename, s.content_type, body[s.data_start : s.data_end])
        for s in spans
    ]


def build(parts: Sequence[Part], boundary: str) -> bytes:
    """Serialize parts with CRLF framing; parse(build(parts, b), b) == parts."""
    if not parts:
        raise ValueError("a multipart body needs at least one part")
    dash = b"--" + _check_boundary(boundary).encode("ascii")
    chunks: list[bytes] = []
    for part in parts:
        chunks += _part_chunks(part, dash)
    chunks.append(dash + b"--\r\n")
    return b"".join(chunks)


def prepare_upload(body: bytes, boundary: str) -> PreparedUpload:
    """Check an upload against the protocol and fill in what a client may leave out
    (`plan_upload`), applied to bytes."""
    plan = plan_upload(body, boundary)
    cut = plan.splice
    if cut is None:
        return PreparedUpload(body, plan.body_digest, False)
    view = memoryview(body)
    new_body = b"".join((view[: cut.start], cut.insert, view[cut.end :]))
    return PreparedUpload(new_body, plan.body_digest, True)


def plan_upload(body: Buffer, boundary: str) -> UploadPlan:
    """Check an upload against the protocol and say what to fill in.

    Missing `attachments`, missing hashes, unlisted files and a missing `json` part are
    filled in; anything that contradicts the files (wrong hash, a listed file that was
    not sent, duplicate names) is the client's mistake and raises BadRequest.
    """
    first, spans = _scan(body, boundary)

    json_spans = [s for s in spans if s.name == JSON_PART]
    if len(json_spans) > 1:
        raise BadRequest(
            f"multipart body has {len(json_spans)} parts named 'json'; send exactly one"
        )

    hashes: dict[str, str] = {}  # filename -> sha256 hex, in file order
    # Released on leaving: a mapping cannot be closed while a view of it is alive.
    with memoryview(body) as view:
        for s in spans:
            if s.name != FILES_PART:
                continue
            if not s.filename:
                raise BadRequest(f"multipart part {s.index} is named 'files' but has no filename")
            if s.filename in hashes:
                raise BadRequest(
                    f"two files are named {s.filename!r}; file names must be unique in one upload"
                )
            hashes[s.filename] = hashlib.sha256(view[s.data_start : s.data_end]).hexdigest()

    if not json_spans:
        # A legacy app can just post files: the proxy writes the json part for it.
        doc: dict[str, Any] = {"attachments": []}
        _reconcile(doc, hashes)
        new_json = _dump(doc)
        new_part = Part.field(
            JSON_PART, new_json, filename=_JSON_FILENAME, content_type=_JSON_CONTENT_TYPE
        )
        # Placed first, right where the original opening delimiter starts.
        part = b"".join(_part_chunks(new_part, b"--" + boundary.encode("ascii")))
        return UploadPlan(body_hash(new_json), Splice(first, first, part))

    js = json_spans[0]
    raw_json = body[js.data_start : js.data_end]
    doc = _load_json_part(raw_json, js.index)
    if not _reconcile(doc, hashes):
        return UploadPlan(body_hash(raw_json), None)
    new_json = _dump(doc)
    return UploadPlan(body_hash(new_json), Splice(js.data_start, js.data_end, new_json))


def _reconcile(doc: dict[str, Any], hashes: dict[str, str]) -> bool:
    """Make doc["attachments"] agree with the uploaded files; True if doc changed."""
    attachments = doc.get("attachments")
    if attachments is None:  # absent or null: nothing was listed, list every file
        doc["attachments"] = [{"name": n, "hash": h} for n, h in hashes.items()]
        return True
    if not isinstance(attachments, list):
        raise BadRequest(f"json part: 'attachments' must be a list, got {_json_type(attachments)}")

    changed = False
    listed: set[str] = set()
    for i, entry in enumerate(attachments):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadRequest(f"json part: attachments[{i}] must be an object with a string 'name'")
        name: str = entry["name"]
        if name in listed:
            raise BadRequest(f"attachment {name!r} is listed twice in the json part")
        listed.add(name)
        actual = hashes.get(name)
        if actual is None:
            raise BadRequest(
                f"attachment {name!r} is listed in the json part but no file part has that filename"
            )
        given = entry.get("hash")
        if given is None or given == "":
            entry["hash"] = actual
            changed = True
        elif not isinstance(given, str):
            raise BadRequest(f"attachment {name!r}: hash must be a string, got {_json_type(given)}")
        elif given.lower() != actual:
            raise BadRequest(f"attachment {name!r}: hash does not match the file's SHA-256")

    for name, actual in hashes.items():
        if name not in listed:
            attachments.append({"name": name, "hash": actual})
            changed = True
    return changed


def _load_json_part(raw: bytes, index: int) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"json part (multipart part {index}) is not valid UTF-8") from exc
    # Parsed whatever its size (attachments are filled in), but never past the bound:
    # json.loads (and json.dumps after it) would recurse into a RecursionError.
    if not nesting_within(raw):
        raise BadRequest(f"json part (multipart part {index}) nests deeper than {MAX_DEPTH} levels")
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError, or a NaN/Infinity literal
        raise BadRequest(f"json part (multipart part {index}) is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BadRequest(
            f"json part (multipart part {index}) must hold a JSON object, got {_json_type(doc)}"
        )
    return doc


def _reject_constant(name: str) -> NoReturn:
    # Python accepts NaN/Infinity but re-serializing them would send the API invalid JSON.
    raise ValueError(f"{name} is not valid JSON")


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _check_boundary(boundary: str) -> str:
    if not _BOUNDARY_RE.fullmatch(boundary):
        raise BadRequest(
            f"multipart boundary {boundary!r} is not valid: RFC 2046 allows 1-70 letters, "
            "digits and '()+_,-./:=? or spaces, not ending in a space"
        )
    return boundary


def _parse_params(text: str, where: str) -> dict[str, str]:
    """`; a=b; c="d"` -> {"a": "b", "c": "d"}, names lower-cased."""
    params: dict[str, str] = {}
    pos = 0
    while True:
        m = _PARAM_RE.match(text, pos)
        if m is None:
            break
        key = m.group(1).lower()
        quoted = m.group(2)
        value = _QUOTED_PAIR_RE.sub(r"\1", quoted) if quoted is not None else m.group(3)
        if key in params:
            raise BadRequest(f"{where} has the parameter {key!r} twice")
        params[key] = value
        pos = m.end()
    if not _TRAILING_SEMICOLON_RE.fullmatch(text, pos):
        raise BadRequest(f"{where} has unparseable parameters: {text[pos:][:60]!r}")
    return params


def _quote(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("a multipart header parameter cannot contain CR or LF")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _decode_ext_value(value: str, index: int) -> str:
    """RFC 5987 `charset'lang'pct-encoded`, as some clients send in `filename*`."""
    charset, sep1, rest = value.partition("'")
    _lang, sep2, encoded = rest.partition("'")
    if not (sep1 and sep2):
        raise BadRequest(f"multipart part {index} has a malformed filename* parameter")
    try:
        return urllib.parse.unquote(encoded, encoding=charset or "utf-8", errors="strict")
    except (LookupError, UnicodeDecodeError) as exc:
        raise BadRequest(
            f"multipart part {index} has a filename* that is not valid {charset or 'utf-8'}"
        ) from exc


def _at(body: Buffer, pos: int, prefix: bytes) -> bool:
    """body.startswith(prefix, pos), which a mapping lacks."""
    return body[pos : pos + len(prefix)] == prefix


def _scan(body: Buffer, boundary: str) -> tuple[int, list[_Span]]:
    """Find every part; returns (offset of the opening delimiter, spans)."""
    dash = b"--" + _check_boundary(boundary).encode("ascii")
    delimiter = b"\r\n" + dash
    if _at(body, 0, dash):
        first = 0
    else:
        # RFC 2046 allows a preamble; the opening delimiter then follows a CRLF.
        found = body.find(delimiter)
        if found < 0:
            raise BadRequest(
                "multipart body does not contain the opening delimiter '--' + boundary "
                "(does the boundary in Content-Type match the body?)"
            )
        first = found + 2

    spans: list[_Span] = []
    pos = first + len(dash)
    while not _at(body, pos, b"--"):  # "--" after a delimiter closes the body
        index = len(spans) + 1
        m = _AFTER_DELIMITER_RE.match(body, pos)
        if m is None:
            raise BadRequest(
                f"multipart delimiter before part {index} is not followed by CRLF "
                "(multipart framing must use CRLF line endings)"
            )
        start = m.end()
        end = body.find(delimiter, start)
        if end < 0:
            raise BadRequest(
                f"multipart body has no closing delimiter '--' + boundary + '--' "
                f"after part {index} (truncated body?)"
            )
        spans.append(_scan_part(body, start, end, index))
        pos = end + len(delimiter)
    if not spans:
        raise BadRequest("multipart body has no parts")
    return first, spans


def _scan_part(body: Buffer, start: int, end: int, index: int) -> _Span:
    if _at(body, start, b"\r\n") and start + 2 <= end:
        header_end, data_start = start, start + 2  # a part with no headers at all
    else:
        sep = body.find(b"\r\n\r\n", start, end)
        if sep < 0:
            raise BadRequest(
                f"multipart part {index} has no blank line between its headers and its body"
            )
        header_end, data_start = sep, sep + 4

    headers: list[tuple[str, str]] = []
    if header_end > start:
        for line in body[start:header_end].split(b"\r\n"):
            m = _HEADER_LINE_RE.fullmatch(line)
            if m is None:
                _bad(f"multipart part {index} has a bad header line {line[:80]!r}")
            try:
                value = m.group(2).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadRequest(
                    f"multipart part {index} has a header that is not valid UTF-8"
                ) from exc
            headers.append((m.group(1).decode("ascii"), value))

    disposition = _single_header(headers, "content-disposition", index)
    if disposition is None:
        _bad(f"multipart part {index} has no Content-Disposition header")
    disposition_type, semicolon, rest = disposition.partition(";")
    if disposition_type.strip().lower() != "form-data":
        _bad(
            f"multipart part {index} has Content-Disposition {disposition_type.strip()!r}, "
            "expected 'form-data'"
        )
    params = _parse_params(semicolon + rest, f"multipart part {index} Content-Disposition")
    name = params.get("name")
    if not name:
        _bad(f"multipart part {index} has no Content-Disposition name")
    filename = params.get("filename")
    if filename is None and "filename*" in params:
        filename = _decode_ext_value(params["filename*"], index)

    return _Span(
        index=index,
        headers=tuple(headers),
        name=name,
        filename=filename,
        content_type=_single_header(headers, "content-type", index),
        start=start,
        data_start=data_start,
        data_end=end,
    )


def _single_header(headers: list[tuple[str, str]], lower_name: str, index: int) -> str | None:
    values = [v for k, v in headers if k.lower() == lower_name]
    if len(values) > 1:
        _bad(f"multipart part {index} has {len(values)} {lower_name} headers")
    return values[0] if values else None


def _bad(message: str) -> NoReturn:
    raise BadRequest(message)


def _part_chunks(part: Part, dash: bytes) -> list[bytes]:
    """One part with its opening delimiter; a list so large data is copied only once."""
    lines = [dash, b"\r\n"]
    for name, value in part.headers:
        if "\r" in value or "\n" in value or not _HEADER_LINE_RE.fullmatch(name.encode() + b":"):
            raise ValueError(f"cannot serialize multipart header {name!r}")
        lines.append(f"{name}: {value}\r\n".encode())
    if part.data.startswith(dash) or b"\r\n" + dash in part.data:
        raise ValueError("multipart part data contains the boundary; choose another boundary")
    lines += [b"\r\n", part.data, b"\r\n"]
    return lines
