"""File uploads: multipart/form-data read with aiohttp's own multipart parser.

The parser is independent of whatever built the request, which is the point:
a proxy's hand-made multipart body must survive a second implementation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.helpers import parse_mimetype

JSON_PART = "json"
JSON_FILENAME = "json.js"
FILES_PART = "files"


class UploadError(ValueError):
    """The upload is malformed; the message is written for the client."""


@dataclass
class Upload:
    json_bytes: bytes
    files: list[tuple[str, bytes]] = field(default_factory=list)


def _mime(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


async def read_upload(request: web.Request) -> Upload:
    """Split a multipart body into its json part and its files; structural checks only."""
    if not parse_mimetype(request.headers.get("Content-Type", "")).parameters.get("boundary"):
        raise UploadError("multipart/form-data without a boundary")
    json_bytes: bytes | None = None
    files: list[tuple[str, bytes]] = []
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            if isinstance(part, MultipartReader):
                raise UploadError("nested multipart parts are not supported")
            json_bytes = await _take_part(part, json_bytes, files)
    except UploadError:
        raise
    except (ValueError, LookupError, AssertionError, web.HTTPException) as exc:
        raise UploadError(f"malformed multipart body: {exc}") from exc
    if json_bytes is None:
        raise UploadError('multipart body has no part named "json"')
    return Upload(json_bytes, files)


async def _take_part(
    part: BodyPartReader, json_bytes: bytes | None, files: list[tuple[str, bytes]]
) -> bytes | None:
    data = bytes(await part.read(decode=False))
    if part.name == JSON_PART:
        if json_bytes is not None:
            raise UploadError('more than one part named "json"')
        if part.filename != JSON_FILENAME:
            raise UploadError(f'the "json" part must have filename "{JSON_FILENAME}"')
        if _mime(part.headers.get("Content-Type")) != "application/json":
            raise UploadError('the "json" part must have Content-Type application/json')
        return data
    if part.name == FILES_PART:
        if not part.filename:
            raise UploadError('every "files" part needs a filename')
        if any(name == part.filename for name, _ in files):
            raise UploadError(f"two files named {part.filename!r} in one request")
        files.append((part.filename, data))
        return json_bytes
    raise UploadError(f"unexpected multipart part named {part.name!r}")


def verify_attachments(payload: Any, files: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """Check `attachments` against the uploaded files; the verified list for the response."""
    if not isinstance(payload, dict) or "attachments" not in payload:
        raise UploadError('the "json" part must be an object with an "attachments" array')
    attachments = payload["attachments"]
    if not isinstance(attachments, list):
        raise UploadError('"attachments" must be an array')
    declared: dict[str, str] = {}
    for item in attachments:
        if not (
            isinstance(item, dict)
            and isinstance(item.get("name"), str)
            and isinstance(item.get("hash"), str)
        ):
            raise UploadError('every attachment needs a string "name" and "hash"')
        if item["name"] in declared:
            raise UploadError(f"attachment {item['name']!r} is listed twice")
        declared[item["name"]] = item["hash"].lower()
    uploaded = {name for name, _ in files}
    missing = sorted(set(declared) - uploaded)
    if missing:
        raise UploadError(f"attachments listed but not uploaded: {', '.join(missing)}")
    unlisted = sorted(uploaded - set(declared))
    if unlisted:
        raise UploadError(f"files uploaded but not listed in attachments: {', '.join(unlisted)}")
    verified = []
    for name, data in files:
        digest = hashlib.sha256(data).hexdigest()
        if declared[name] != digest:
            raise UploadError(f"hash mismatch for attachment {name!r}")
        verified.append({"name": name, "size": len(data), "hash": digest})
    return verified


def parse_json_part(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UploadError(f'the "json" part is not valid UTF-8 JSON: {exc}') from exc
