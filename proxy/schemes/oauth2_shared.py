"""OAuth 2.0 tokens shared by the replicas of one integration through Redis.

Several proxy processes with one OAuth client must not refresh on their own: a server
that rotates refresh tokens (RFC 6749 §6) makes each one single-use, so two replicas
refreshing with the same one invalidate each other, and N replicas make N token calls
per expiry. With `auth.state_store` they keep one record in Redis instead: the current
access token with its expiry, and the newest refresh token. A replica that needs a
token reads the record first and uses a valid one as it is; only the holder of a lock
calls the token endpoint, and it writes the new record before releasing the lock.

Keys (one hash tag, so a Redis Cluster keeps them on one node, and the scripts may
touch both): `luxsci-proxy:oauth:{<digest>}:state` (a hash: `v`, the record's version,
and `blob`, the sealed record) and `...:lock`. The digest is of the token URL, client
id and integration name: the same binding as the state file's.

The record is sealed like the state file (AES-256-GCM, `auth.state_key`, the binding
as associated data): nothing in Redis, its dump or its AOF is a token in clear text.
The version is in clear and only orders writes: a write names the version it replaces
(compare-and-set), so a holder whose lock ran out never overwrites a newer record.

The lock is SET NX PX with a random value and released by a compare-and-delete script:
a holder that dies loses it when it expires, and never deletes another's.

Pure parts (`SharedRecord`, `encode`, `decode`) are separate from the Redis I/O
(`SharedTokens`), whose every error becomes `SharedStoreUnavailable`, with a message
that never holds the URL's password.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from proxy.redis_connect import connect, redact_url
from proxy.schemes.oauth2_state import Sealer, fingerprint

T = TypeVar("T")

_MAGIC = b"luxsci-proxy oauth2 shared v1\n"
# Each Redis call is bounded by this: an outage must not hold a request longer.
OP_TIMEOUT = 0.5

# KEYS: the lock. ARGV: the holder's value. Deletes it only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: the state hash. ARGV: the version replaced ('0': none yet), the new version,
# the new sealed record. Returns 1 when written, 0 when another wrote first.
_WRITE = """
local v = redis.call('HGET', KEYS[1], 'v') or '0'
if v ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'blob', ARGV[3])
return 1
"""


class SharedStoreUnavailable(Exception):
    """Redis did not answer, or refused: the caller falls back to the local path."""


@dataclass(frozen=True, slots=True)
class SharedRecord:
    """The shared state of one integration's tokens; times are wall-clock (time.time()),
    the one clock all replicas have in common."""

    access_token: str = field(repr=False)
    obtained_at: float
    expires_at: float
    refresh_at: float
    # None: the grant has none (client_credentials).
    refresh_token: str | None = field(repr=False)
    # fingerprint() of the configured refresh token this line descends from ("" if none).
    origin: str


def binding_digest(binding: str, integration: str) -> str:
    return fingerprint(f"{binding}\n{integration}")[:16]


def keys_prefix(binding: str, integration: str) -> str:
    return f"luxsci-proxy:oauth:{{{binding_digest(binding, integration)}}}"


def encode(record: SharedRecord, sealer: Sealer) -> bytes:
    plain = json.dumps(
        {
            "access_token": record.access_token,
            "obtained_at": record.obtained_at,
            "expires_at": record.expires_at,
            "refresh_at": record.refresh_at,
            "refresh_token": record.refresh_token,
            "origin": record.origin,
        }
    )
    return sealer.seal(plain.encode())


def decode(blob: bytes, sealer: Sealer) -> SharedRecord | None:
    """The record; None when it does not open (another key or integration) or is damaged:
    the replica then refreshes and writes a good one over it."""
    plain = sealer.open(blob)
    if plain is None:
        return None
    try:
        data = json.loads(plain)
        refresh = data["refresh_token"]
        return SharedRecord(
            str(data["access_token"]),
            float(data["obtained_at"]),
            float(data["expires_at"]),
            float(data["refresh_at"]),
            None if refresh is None else str(refresh),
            str(data["origin"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


class SharedTokens:
    """The Redis side: read the record, take and release the lock, write a new record."""

    def __init__(
        self,
        url: str,
        keys: list[bytes],
        binding: str,
        integration: str,
        lock_ttl: float,
        op_timeout: float = OP_TIMEOUT,
    ) -> None:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.where = redact_url(url)
        self.lock_ttl = lock_ttl
        self._op_timeout = op_timeout
        self._sealer = Sealer(keys, _MAGIC + f"{binding}\n{integration}".encode())
        prefix = keys_prefix(binding, integration)
        self._state_key = f"{prefix}:state"
        self._lock_key = f"{prefix}:lock"
        # No retries of its own: a failed call falls back to the local path at once.
        self._client: Any = connect(url, op_timeout=op_timeout, retry=Retry(NoBackoff(), 0))
        self._release = self._client.register_script(_RELEASE)
        self._write = self._client.register_script(_WRITE)

    async def _bounded(self, call: Awaitable[T]) -> T:
        from redis.exceptions import RedisError

        try:
            async with asyncio.timeout(self._op_timeout * 2):
                return await call
        except (RedisError, OSError) as e:  # asyncio's TimeoutError is an OSError
            # The class name only: redis-py's messages may quote the address, never
            # the password, but nothing here needs more than the kind of failure.
            raise SharedStoreUnavailable(f"{self.where}: {type(e).__name__}") from None

    async def read(self) -> tuple[int, SharedRecord | None]:
        """(version, record): version 0 and None when there is none yet."""
        found = await self._bounded(self._client.hmget(self._state_key, ["v", "blob"]))
        version, blob = found
        if version is None or blob is None:
            return 0, None
        return int(version), decode(bytes(blob), self._sealer)

    async def write(self, replaces: int, record: SharedRecord) -> bool:
        """Write the record over version `replaces`; False when another replica wrote first."""
        blob = encode(record, self._sealer)
        done = await self._bounded(
            self._write(keys=[self._state_key], args=[str(replaces), str(replaces + 1), blob])
        )
        return bool(done)

    async def lock(self) -> str | None:
        """The lock's value when taken, None when another replica holds it."""
        value = secrets.token_hex(16)
        taken = await self._bounded(
            self._client.set(self._lock_key, value, nx=True, px=max(1, int(self.lock_ttl * 1000)))
        )
        return value if taken else None

    async def unlock(self, value: str) -> None:
        await self._bounded(self._release(keys=[self._lock_key], args=[value]))

    async def close(self) -> None:
        await self._client.aclose()
