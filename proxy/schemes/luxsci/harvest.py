"""Pick the rolling auth code out of a LuxSci response while it streams past.

Every success response carries the next auth code as the top-level `auth` key of its JSON
object (../shared/PROTOCOL.md, "Auth codes roll"). Bodies can be many MB and are streamed
to the client, so this is an incremental scanner over the raw bytes rather than a parser
over a buffered body: compiled regexes jump over strings, scalars and shallow nested
values in C, and Python code runs only per structural token of the top-level object
and per bracket where nesting is deeper than the regex fast path covers.

It is deliberately not a full JSON validator. It tracks the bracket stack, the key/value
grammar of the top-level object, and the exact `auth` value (json.loads on the raw string
token, so escapes like `\\u0073` are decoded). Anything it cannot make sense of makes it
give up with no code, which the caller treats like a response without one.

Scanning bytes, not text, is safe: UTF-8 multi-byte sequences never contain ASCII bytes,
so structural characters are found correctly however a chunk splits a character; the
captured token is decoded only once it is complete.
"""

from __future__ import annotations

import json
import re
import zlib

# Outside strings at the top level: the next byte that matters.
_TOKEN = re.compile(rb'["{}\[\]:,]')
# The rest of a string up to (not including) its closing quote or a backslash that ends
# the chunk. Possessive throughout, so a string running off a chunk costs one pass.
_STRING_REST = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+', re.DOTALL)


def _deep_skip_pattern(levels: int) -> re.Pattern[bytes]:
    """Skip, in one C call, everything below the top level that needs no Python.

    That is scalars, ':', ',', complete strings and complete containers nested up to
    `levels` deep (typical API rows: objects holding small arrays). It stops at a bracket
    it cannot pair within the chunk, or at a string that runs off the chunk, and Python
    then takes that one step. Possessive quantifiers keep a failed attempt (a container
    cut by the chunk end) to a single pass; it costs at most `levels` rescans per chunk.
    """
    # Unrolled `plain (item plain)*` form: measured ~3x faster in sre than `(plain|item)*`.
    string = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
    plain = rb'[^"{}\[\]]*+'
    content = plain + rb"(?:" + string + plain + rb")*+"
    for _ in range(levels):
        container = rb"\{" + content + rb"\}|\[" + content + rb"\]"
        content = plain + rb"(?:(?:" + string + rb"|" + container + rb")" + plain + rb")*+"
    return re.compile(content, re.DOTALL)


_DEEP_SKIP = _deep_skip_pattern(3)
_WHITESPACE = re.compile(rb"[ \t\r\n]*+")
_NON_WHITESPACE = re.compile(rb"[^ \t\r\n]")

_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN_BRACE, _CLOSE_BRACE = ord("{"), ord("}")
_OPEN_BRACKET, _CLOSE_BRACKET = ord("["), ord("]")
_COLON, _COMMA = ord(":"), ord(",")

# Where we are inside the top-level object.
_FIRST_KEY = 0  # after '{': a key or '}'
_KEY = 1  # after ',': a key
_COLON_NEXT = 2  # after a key
_VALUE = 3  # after ':'
_AFTER_VALUE = 4  # after a value: ',' or '}'

# What the current string is, for the top-level object.
_SKIP, _KEY_STRING, _AUTH_STRING = 0, 1, 2

# Longest raw key that can still decode to "auth" ("\u0061" per letter is 24 bytes):
# longer keys are not kept, so a huge key costs no memory.
_MAX_AUTH_KEY = 24
# An auth code is a few dozen bytes; a giant `auth` value is not one, and keeping it
# would let a response make the proxy buffer an unbounded token.
_MAX_CODE = 16 * 1024

# Decompressed output per zlib call, so a small compressed chunk cannot balloon in memory.
_MAX_INFLATE = 256 * 1024


_DECODER = json.JSONDecoder()
_JSON_SPACE = " \t\n\r"


def _json_document(body: bytes) -> object:
    """json.loads(body) for a UTF-8 body, None where that would raise; about twice as
    fast on small answers (no encoding detection, no regex for the surrounding space)."""
    try:
        # A BOM is skipped as json.loads skips it ("utf-8-sig" would, but in Python code).
        text = body.decode("utf-8")
        text = (text[1:] if text.startswith("\ufeff") else text).lstrip(_JSON_SPACE)
        doc, end = _DECODER.raw_decode(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: an answer nested thousands deep. The scan after this keeps its
        # own bracket stack and never recurses.
        return None
    if text[end:].strip(_JSON_SPACE):
        return None  # more after the document: not JSON, as json.loads would say
    return doc


def code_in_body(body: bytes, content_encoding: str | None) -> str | None:
    """The top-level `auth` string of a complete body (a small answer), or None.

    Plain JSON takes one C-speed parse; anything else (compressed, or not quite
    JSON) the same scan as a streamed body."""
    if content_encoding is None:
        doc = _json_document(body)
        if isinstance(doc, dict):
            code = doc.get("auth")
            return code if isinstance(code, str) else None
    harvester = CodeHarvester(content_encoding)
    harvester.feed(body)
    return harvester.result()


class CodeHarvester:
    """Feed response body chunks; result() is the top-level `auth` string once seen."""

    def __init__(self, content_encoding: str | None = None) -> None:
        self._done = False
        self._result: str | None = None
        self._started = False  # seen the opening '{'
        self._stack = bytearray()  # open brackets; len() is the depth
        self._state = _FIRST_KEY
        self._in_string = False
        self._escape_pending = False  # a chunk ended right after a backslash in a string
        self._string_kind = _SKIP
        self._raw = bytearray()  # the key or auth value being captured
        self._raw_overflow = False
        self._key_is_auth = False
        self._candidate: str | None = None  # auth value seen, awaiting ',' or '}'
        self._scalar_seen = False  # non-blank text after the current ':'

        self._inflater: zlib._Decompress | None = None
        self._try_raw_deflate = False
        self._compressed_head = bytearray()  # input kept until zlib accepts the header
        coding = _single_coding(content_encoding)
        if coding in ("gzip", "x-gzip", "deflate"):
            # 47 = 32 + 15: zlib auto-detects a gzip or zlib header.
            self._inflater = zlib.decompressobj(wbits=47)
            # Servers often send "deflate" without the zlib header that HTTP requires.
            self._try_raw_deflate = coding == "deflate"
        elif coding != "identity":
            self._done = True  # e.g. "br": no decoder in the standard library

    @property
    def done(self) -> bool:
        """True once the code is found or the scan gave up; feeding more is pointless."""
        return self._done

    def result(self) -> str | None:
        return self._result

    def feed(self, chunk: bytes) -> None:
        if self._done or not chunk:
            return
        if self._inflater is None:
            self._scan(chunk)
        else:
            self._inflate(chunk)

    def _inflate(self, chunk: bytes) -> None:
        assert self._inflater is not None
        if self._try_raw_deflate:
            if len(self._compressed_head) + len(chunk) > _MAX_INFLATE:
                # zlib judges the header within the first bytes: long past that, a
                # fallback will not be needed, and keeping the input would be unbounded.
                self._try_raw_deflate = False
                self._compressed_head = bytearray()
            else:
                self._compressed_head += chunk
        data = chunk
        while data and not self._done:
            try:
                out = self._inflater.decompress(data, _MAX_INFLATE)
            except zlib.error:
                if not self._try_raw_deflate:
                    self._give_up()
                    return
                self._try_raw_deflate = False
                self._inflater = zlib.decompressobj(wbits=-15)
                data = bytes(self._compressed_head)
                self._compressed_head = bytearray()
                continue
            if out:
                if self._try_raw_deflate:  # the header was accepted: no fallback needed
                    self._try_raw_deflate = False
                    self._compressed_head = bytearray()
                self._scan(out)
            data = self._inflater.unconsumed_tail

    def _give_up(self) -> None:
        self._done = True
        self._result = None
        self._raw = bytearray()

    def _scan(self, buf: bytes) -> None:
        n = len(buf)
        i = 0
        while i < n and not self._done:
            if self._in_string:
                i = self._scan_string(buf, i)
                continue
            depth = len(self._stack)
            if depth >= 2:
                i = self._scan_deep(buf, i, n)
                continue
            if depth == 0:
                if self._started:
                    return  # unreachable: closing the top level sets done
                m = _WHITESPACE.match(buf, i)
                assert m is not None
                e = m.end()
                if e == n:
                    return
                if buf[e] != _OPEN_BRACE:
                    self._give_up()  # not a JSON object
                    return
                self._started = True
                self._stack.append(_OPEN_BRACE)
                i = e + 1
                continue
            i = self._scan_top(buf, i, n)

    def _scan_deep(self, buf: bytes, i: int, n: int) -> int:
        """Below the top level: follow brackets until back at depth 1 or out of input."""
        stack = self._stack
        match = _DEEP_SKIP.match
        while True:
            m = match(buf, i)
            assert m is not None  # the pattern matches the empty string
            e = m.end()
            if e == n:
                return n
            c = buf[e]
            i = e + 1
            if c == _QUOTE:
                self._start_string(_SKIP)
                return i
            if c in (_OPEN_BRACE, _OPEN_BRACKET):
                stack.append(c)
                continue
            self._close(c)
            if self._done:
                return n
            if len(stack) == 1:
                self._state = _AFTER_VALUE
                return i

    def _scan_top(self, buf: bytes, i: int, n: int) -> int:
        """One step inside the top-level object; returns where to continue."""
        m = _TOKEN.search(buf, i)
        j = n if m is None else m.start()
        state = self._state
        # Between tokens only whitespace is allowed, except a scalar after a ':' (which
        # may span chunks, hence the flag).
        if _NON_WHITESPACE.search(buf, i, j):
            if state != _VALUE:
                self._give_up()
                return n
            self._scalar_seen = True
        if m is None:
            return n
        c = buf[j]
        if state in (_FIRST_KEY, _KEY):
            if c == _QUOTE:
                self._start_string(_KEY_STRING)
            elif c == _CLOSE_BRACE and state == _FIRST_KEY:
                self._close(c)
            else:
                self._give_up()
        elif state == _COLON_NEXT:
            if c == _COLON:
                self._state = _VALUE
                self._scalar_seen = False
            else:
                self._give_up()
        elif state == _VALUE:
            scalar = self._scalar_seen
            if self._key_is_auth:
                # Only a string is a code; anything else means this response has none.
                if c == _QUOTE and not scalar:
                    self._start_string(_AUTH_STRING)
                else:
                    self._give_up()
            elif c == _QUOTE and not scalar:
                self._start_string(_SKIP)
            elif c in (_OPEN_BRACE, _OPEN_BRACKET) and not scalar:
                self._stack.append(c)
            elif c == _COMMA and scalar:
                self._state = _KEY
            elif c == _CLOSE_BRACE and scalar:
                self._close(c)
            else:
                self._give_up()
        else:  # _AFTER_VALUE
            if c in (_COMMA, _CLOSE_BRACE):
                if self._candidate is not None:
                    # The value is complete and well placed: that is the code.
                    self._result = self._candidate
                    self._done = True
                elif c == _COMMA:
                    self._state = _KEY
                else:
                    self._close(c)
            else:
                self._give_up()
        return j + 1

    def _start_string(self, kind: int) -> None:
        self._in_string = True
        self._string_kind = kind
        self._raw = bytearray()
        self._raw_overflow = False

    def _scan_string(self, buf: bytes, i: int) -> int:
        n = len(buf)
        kind = self._string_kind
        if self._escape_pending:
            # The byte after a backslash is never the closing quote.
            self._escape_pending = False
            if kind != _SKIP:
                self._capture(buf, i, i + 1)
            i += 1
            if i == n:
                return n
        # Fast path: memchr-speed finds when there is no backslash before the quote.
        quote = buf.find(b'"', i)
        e = n if quote < 0 else quote
        if buf.find(b"\\", i, e) >= 0:
            m = _STRING_REST.match(buf, i)
            assert m is not None  # the pattern matches the empty string
            e = m.end()
        if kind != _SKIP:
            self._capture(buf, i, e)
        if e == n:
            return n
        if buf[e] == _BACKSLASH:  # only possible as the chunk's last byte
            self._escape_pending = True
            if kind != _SKIP:
                self._capture(buf, e, n)
            return n
        self._in_string = False  # buf[e] is the closing quote
        self._end_string()
        return e + 1

    def _capture(self, buf: bytes, start: int, end: int) -> None:
        if self._raw_overflow:
            return
        limit = _MAX_AUTH_KEY if self._string_kind == _KEY_STRING else _MAX_CODE
        if len(self._raw) + (end - start) > limit:
            self._raw_overflow = True
            self._raw = bytearray()
            return
        self._raw += buf[start:end]

    def _end_string(self) -> None:
        kind = self._string_kind
        if kind == _KEY_STRING:
            self._state = _COLON_NEXT
            self._key_is_auth = not self._raw_overflow and self._decode() == "auth"
        elif kind == _AUTH_STRING:
            code = None if self._raw_overflow else self._decode()
            if code is None:
                self._give_up()
                return
            self._candidate = code
            self._state = _AFTER_VALUE
        elif len(self._stack) == 1:
            self._state = _AFTER_VALUE
        self._raw = bytearray()

    def _decode(self) -> str | None:
        """The captured raw string token as JSON decodes it; None if it is not valid."""
        try:
            value = json.loads('"' + self._raw.decode("utf-8") + '"')
        except ValueError:  # JSONDecodeError, or UnicodeDecodeError
            return None
        return value if isinstance(value, str) else None

    def _close(self, c: int) -> None:
        opener = _OPEN_BRACE if c == _CLOSE_BRACE else _OPEN_BRACKET
        if not self._stack or self._stack[-1] != opener:
            self._give_up()
            return
        self._stack.pop()
        if not self._stack:
            # The top-level object ended without a usable `auth`.
            self._done = True


def _single_coding(content_encoding: str | None) -> str:
    """The one content coding in effect: "identity", a coding name, or "" if several."""
    if content_encoding is None:
        return "identity"
    codings = [
        c.strip().lower() for c in content_encoding.split(",") if c.strip().lower() != "identity"
    ]
    codings = [c for c in codings if c]
    if not codings:
        return "identity"
    return codings[0] if len(codings) == 1 else ""
