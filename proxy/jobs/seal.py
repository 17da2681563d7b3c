"""Encryption at rest for stored requests and answers: AES-GCM, keys by id, rotation.

A sealed blob is `01 | key id (4 bytes) | nonce (12 bytes) | ciphertext+tag`; with
`jobs.encrypt: false` it is `00 | plaintext`. The key id travels with every blob, so
after a rotation (a new key listed first) old records still open with the old key,
for as long as it stays listed. The associated data names the job and the field, so a
blob copied onto another job, or from the request column to the answer column, fails
to open instead of being read as something it is not.

A key id is the first 4 bytes of HMAC-SHA256(key, "luxsci-proxy jobs key id"): it
tells keys apart without saying anything about them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.jobs.errors import UnreadableRecord

_CLEAR = 0
_AES_GCM = 1
_ID_LEN = 4
_NONCE_LEN = 12
_ID_LABEL = b"luxsci-proxy jobs key id"


def key_id(key: bytes) -> bytes:
    return hmac.new(key, _ID_LABEL, hashlib.sha256).digest()[:_ID_LEN]


class Sealer:
    """Seals with the first key (or not at all with `encrypt` false); opens with any."""

    def __init__(self, keys: Sequence[bytes], encrypt: bool = True) -> None:
        if encrypt and not keys:
            raise ValueError("encryption needs at least one key")
        self._keys = {key_id(k): AESGCM(k) for k in keys}
        self._sealing = (key_id(keys[0]), AESGCM(keys[0])) if encrypt else None

    @property
    def encrypts(self) -> bool:
        return self._sealing is not None

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        if self._sealing is None:
            return bytes([_CLEAR]) + plaintext
        kid, aead = self._sealing
        # 96-bit random nonces: safe for far more records than a store ever holds
        # (NIST SP 800-38D: up to 2**32 messages per key).
        nonce = os.urandom(_NONCE_LEN)
        return bytes([_AES_GCM]) + kid + nonce + aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """The plaintext, or UnreadableRecord saying why (never what it holds)."""
        if not blob:
            raise UnreadableRecord("empty record")
        kind = blob[0]
        if kind == _CLEAR:
            return blob[1:]
        if kind != _AES_GCM:
            raise UnreadableRecord(f"unknown record format {kind}")
        head = 1 + _ID_LEN + _NONCE_LEN
        if len(blob) < head + 16:
            raise UnreadableRecord("truncated record")
        kid = blob[1 : 1 + _ID_LEN]
        aead = self._keys.get(kid)
        if aead is None:
            raise UnreadableRecord(f"sealed with key id {kid.hex()}, which is not among jobs.keys")
        try:
            return aead.decrypt(blob[1 + _ID_LEN : head], blob[head:], aad)
        except InvalidTag:
            raise UnreadableRecord("does not authenticate (corrupt or altered)") from None
