"""The newest refresh token, kept encrypted on disk so a restart does not lose it.

An authorization server that rotates refresh tokens (RFC 6749 §6) makes the old one
useless the moment it answers, and many also treat a second use of an old one as theft
and revoke the whole family. So a rotated token is written before anything else is done
with its answer, and a restart starts from the newest one, never from the one in the
config it descends from.

The file holds one record, AES-256-GCM encrypted (the `cryptography` package) under
`auth.state_key`, with the integration (token URL and client id) as associated data, so
a file copied to another integration does not decrypt there. Several keys may be given:
the first encrypts, every one is tried to decrypt (key rotation). Inside: the refresh
token, and a digest of the configured one it descends from: when the config names a
different refresh token (an operator issued a new one), that one wins over the file.
Written to a temporary file and renamed (mode 0600): a crash never leaves half a file.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_MAGIC = b"luxsci-proxy oauth2 state v1\n"
_NONCE = 12
KEY_BYTES = 32
# The file is tiny; anything much larger is not ours.
_MAX_FILE = 64 * 1024


class StateUnreadable(Exception):
    """The state file exists but cannot be used (wrong key, damaged, not ours)."""


def parse_keys(text: str) -> list[bytes]:
    """`auth.state_key`: one or more 32-byte keys, each base64 (standard or URL-safe) or
    64 hex digits, separated by commas or white space; ValueError says what is wrong."""
    keys = []
    for part in re.split(r"[\s,]+", text.strip()):
        if not part:
            continue
        key = _decode_key(part)
        if key is None:
            raise ValueError(
                f"each key must be {KEY_BYTES} random bytes as base64 or hex "
                "(make one with: openssl rand -base64 32)"
            )
        keys.append(key)
    if not keys:
        raise ValueError("no key given")
    return keys


def _decode_key(text: str) -> bytes | None:
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            key = decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            continue
        if len(key) == KEY_BYTES:
            return key
    return None


def fingerprint(refresh_token: str) -> str:
    """Which configured refresh token a stored one descends from (only ever stored encrypted)."""
    return hashlib.sha256(refresh_token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class StoredToken:
    refresh_token: str = field(repr=False)
    # fingerprint() of the configured refresh token this one descends from.
    origin: str
    saved_at: float


class Sealer:
    """AES-256-GCM with `auth.state_key`: the first key seals, every one is tried to open;
    `context` is the associated data (what the sealed text belongs to)."""

    def __init__(self, keys: list[bytes], context: bytes) -> None:
        if not keys:
            raise ValueError("a token store needs a key")
        # Imported here: `cryptography` costs ~7 MiB of RSS and ~20 ms at start-up, and
        # only a refresh-token grant with a state file (or a shared store) encrypts
        # anything; parse_keys and the rest of this module are needed by every oauth2
        # config check.
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._keys = [AESGCM(k) for k in keys]
        self.context = context

    def seal(self, plain: bytes) -> bytes:
        """Nonce, then ciphertext and tag."""
        nonce = secrets.token_bytes(_NONCE)
        return nonce + self._keys[0].encrypt(nonce, plain, self.context)

    def open(self, blob: bytes) -> bytes | None:
        """The plain text; None when no key opens it (another key, another context, damage)."""
        if len(blob) < _NONCE + 16:
            return None
        from cryptography.exceptions import InvalidTag  # loaded with AESGCM in __init__

        for key in self._keys:
            with contextlib.suppress(InvalidTag):
                return bytes(key.decrypt(blob[:_NONCE], blob[_NONCE:], self.context))
        return None


class TokenStore:
    def __init__(self, path: Path, keys: list[bytes], binding: str) -> None:
        self.path = path
        self._sealer = Sealer(keys, _MAGIC + binding.encode())

    def load(self) -> StoredToken | None:
        """The stored token; None when there is no file; StateUnreadable when it is unusable."""
        try:
            with self.path.open("rb") as f:
                blob = f.read(_MAX_FILE + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateUnreadable(f"cannot read {self.path}: {e.strerror}") from None
        # The magic, a nonce and at least GCM's 16-byte tag, or it is not ours.
        if not blob.startswith(_MAGIC) or not len(_MAGIC) + _NONCE + 16 <= len(blob) <= _MAX_FILE:
            raise StateUnreadable(f"{self.path} is not an oauth2 state file")
        plain = self._sealer.open(blob[len(_MAGIC) :])
        if plain is None:
            raise StateUnreadable(
                f"{self.path} does not decrypt with auth.state_key (another key, or another "
                "integration's file)"
            )
        try:
            data = json.loads(plain)
            return StoredToken(str(data["refresh_token"]), str(data["origin"]), float(data["at"]))
        except (ValueError, KeyError, TypeError):
            raise StateUnreadable(f"{self.path} holds an unreadable record") from None

    def save(self, refresh_token: str, origin: str) -> None:
        """Write the token atomically (temporary file, fsync, rename; mode 0600). OSError
        when the disk refuses."""
        record = json.dumps({"refresh_token": refresh_token, "origin": origin, "at": time.time()})
        blob = _MAGIC + self._sealer.seal(record.encode())
        folder = self.path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkstemp creates the file 0600: the token is never readable by others, not even
        # for the moment before a chmod.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # The rename itself must reach the disk too, or a crash may bring the old file back.
        with contextlib.suppress(OSError):
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
