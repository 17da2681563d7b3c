"""The job store for several replicas: Redis, with a stream and one consumer group.

Layout (every key carries one hash tag, `{luxsci-proxy:jobs:<name>}`, so on a Redis
Cluster they all live in one slot and every script may touch any of them):

    <P>:job:<id>     a hash per job: the plain fields, the sealed records, and which
                     stream entry (`entry`) and which replica (`holder`) has it now
    <P>:stream       jobs ready to run; the group `runners` hands each entry to one
                     replica (a consumer, named uniquely per process)
    <P>:delayed      queued jobs not due yet (backoff, a spent day): id -> when;
                     moved into the stream when due, in the script that takes work
    <P>:all          every job, by submission order (max_jobs, `jobs list`)
    <P>:state:<s>    jobs by state, by creation time (counts, the oldest queued)
    <P>:expiry       unfinished jobs by expiry time
    <P>:finished     finished jobs by end time (purging)
    <P>:callbacks    callbacks due, by time (a replica leases one while delivering it)
    <P>:idem         owner + idempotency key digest -> job id

Every transition is one Lua script, conditional on the state it leaves and, for the
runner's own steps, on this replica still holding the job: two replicas never both
act on one job. A replica holding entries keeps them fresh (XCLAIM ... JUSTID, every
third of `jobs.visibility_timeout`); entries left idle longer belong to a replica
that died, and any other takes them over with XAUTOCLAIM under SQLite's crash rule:
a job that was `running` goes back in line if its method is idempotent, else it ends
`outcome_unknown`. Nothing else settles another replica's jobs: no start-up lock.

Durability is Redis's: with `appendonly yes` and `appendfsync always` a script's
effects are on disk before its reply, so no 202 goes out for a job Redis could lose.
Replication is asynchronous: with `min_replicas` (jobs.redis_min_replicas) a submission and a
`running` mark also wait (WAIT) until that many replicas have them, so a failover cannot
lose an acknowledged job or send one twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import quote

import structlog
from redis.exceptions import RedisError, ResponseError

from proxy.jobs.errors import StoreError, Unconfirmed
from proxy.jobs.model import TERMINAL, Job, State
from proxy.jobs.store import PURGE_SLICE, NewJob, Stats, Submitted
from proxy.pipeline.retry import IDEMPOTENT
from proxy.redis_connect import RedisURLError, connect, parse_url, redact_url

log = structlog.get_logger("proxy.jobs")

GROUP = "runners"
# How long one Redis call may take before the store counts as unreachable. Longer than
# the limits' (a script's reply waits for an fsync with appendfsync always).
OP_TIMEOUT = 5.0
# Due jobs moved from the delayed set into the stream per look.
PROMOTE_MAX = 1000
# Redis calls in flight at once (connections in the pool).
MAX_CALLS = 32
# Entries of dead replicas taken over per script run.
RECLAIM_SLICE = 100
# Jobs whose time is up, settled per script run.
EXPIRE_SLICE = 1000

# The plain fields, in the order Job takes them; then the sealed records.
_PLAIN = (
    "id",
    "owner",
    "method",
    "scope",
    "state",
    "created_at",
    "expires_at",
    "next_attempt_at",
    "finished_at",
    "attempts",
    "last_error",
    "response_status",
    "callback_state",
)
_BLOBS = ("request", "response", "callback")

_UNKNOWN_AFTER_CRASH = (
    "the replica running this request stopped while it was in flight; it may or may not "
    "have been carried out, so it is not sent again (luxsci-proxy jobs retry sends it again)"
)


_UNCONFIRMED = (
    "not sent: too few Redis replicas confirmed it was running (jobs.redis_min_replicas); "
    "it goes again"
)


def _lua_list(names: Sequence[str]) -> str:
    return "{" + ", ".join(f"'{n}'" for n in names) + "}"


def _lua_set(names: Sequence[str]) -> str:
    return "{" + ", ".join(f"['{n}'] = true" for n in sorted(names)) + "}"


# Shared by every script. KEYS[1] is the stream (it names the slot); the other keys are
# built from ARGV[1], the prefix, and carry the same hash tag. ARGV[2] is the group,
# ARGV[3] this replica's consumer name; a script's own arguments start at ARGV[4].
_PRELUDE = f"""
local P, GROUP, ME = ARGV[1], ARGV[2], ARGV[3]
local STREAM = KEYS[1]
local PLAIN = {_lua_list(_PLAIN)}
local TERMINAL = {_lua_set([s.value for s in TERMINAL])}
local IDEMPOTENT = {_lua_set(sorted(IDEMPOTENT))}
local function jk(id) return P .. ':job:' .. id end
-- The plain fields, then the records named in `extra` (false for the others).
local function view(id, extra)
  local out = redis.call('HMGET', jk(id), unpack(PLAIN))
  for _, f in ipairs({{'request', 'response', 'callback'}}) do
    if extra[f] then out[#out + 1] = redis.call('HGET', jk(id), f)
    else out[#out + 1] = false end
  end
  return out
end
local function put(k, f, v)
  if v == nil or v == '' then redis.call('HDEL', k, f) else redis.call('HSET', k, f, v) end
end
local function restate(id, new)
  local k = jk(id)
  local old = redis.call('HGET', k, 'state')
  if old then redis.call('ZREM', P .. ':state:' .. old, id) end
  -- A corrupt creation time must not stop the script (and every job behind it).
  redis.call('ZADD', P .. ':state:' .. new, tonumber(redis.call('HGET', k, 'created_at')) or 0, id)
  redis.call('HSET', k, 'state', new)
end
-- The job leaves the stream: its entry acknowledged and deleted, nobody holds it.
local function unentry(id)
  local k = jk(id)
  local e = redis.call('HGET', k, 'entry')
  if e and e ~= '' then
    redis.call('XACK', STREAM, GROUP, e)
    redis.call('XDEL', STREAM, e)
  end
  redis.call('HSET', k, 'entry', '', 'holder', '')
end
local function enqueue(id)
  local e = redis.call('XADD', STREAM, '*', 'id', id)
  redis.call('HSET', jk(id), 'entry', e, 'holder', '')
end
local function drop(e)
  redis.call('XACK', STREAM, GROUP, e)
  redis.call('XDEL', STREAM, e)
end
local function settle(id, state, now, err, status, response)
  local k = jk(id)
  restate(id, state)
  unentry(id)
  redis.call('ZREM', P .. ':delayed', id)
  redis.call('ZREM', P .. ':expiry', id)
  redis.call('HSET', k, 'finished_at', now)
  put(k, 'last_error', err)
  put(k, 'response_status', status)
  put(k, 'response', response)
  if redis.call('HEXISTS', k, 'callback') == 1 then
    redis.call('HSET', k, 'callback_state', 'pending', 'callback_attempts', 0,
               'callback_next_at', now)
    redis.call('ZADD', P .. ':callbacks', now, id)
  else
    redis.call('HDEL', k, 'callback_state', 'callback_next_at')
  end
  redis.call('ZADD', P .. ':finished', now, id)
end
local function mine(k)
  local h = redis.call('HGET', k, 'holder')
  return (not h) or h == '' or h == ME
end
"""

# ARGV: id, owner, idem, method, scope, created, expires, request, callback, max_jobs.
# {0, job with its request}: the key named an existing job; {2}: full; {1, job}: stored.
_SUBMIT = """
local id, owner, idem = ARGV[4], ARGV[5], ARGV[6]
if idem ~= '' then
  local found = redis.call('HGET', P .. ':idem', owner .. '\\n' .. idem)
  if found and redis.call('EXISTS', jk(found)) == 1 then
    return {0, view(found, {request = true})}
  end
end
if redis.call('ZCARD', P .. ':all') >= tonumber(ARGV[13]) then return {2} end
local k = jk(id)
redis.call('HSET', k, 'id', id, 'owner', owner, 'method', ARGV[7], 'scope', ARGV[8],
           'state', 'queued', 'created_at', ARGV[9], 'expires_at', ARGV[10],
           'next_attempt_at', ARGV[9], 'attempts', 0, 'callback_attempts', 0,
           'request', ARGV[11])
put(k, 'callback', ARGV[12])
if idem ~= '' then
  redis.call('HSET', k, 'idem', idem)
  redis.call('HSET', P .. ':idem', owner .. '\\n' .. idem, id)
end
redis.call('ZADD', P .. ':all', redis.call('INCR', P .. ':seq'), id)
redis.call('ZADD', P .. ':state:queued', ARGV[9], id)
redis.call('ZADD', P .. ':expiry', ARGV[10], id)
enqueue(id)
return {1, view(id, {})}
"""

# ARGV: now, count, ids in the runner's hands. Due delayed jobs into the stream, then new
# entries for this replica: {entry id, job with its request and callback} for each job it
# now holds.
_TAKE = f"""
local now = ARGV[4]
local ready = redis.call('ZRANGEBYSCORE', P .. ':delayed', '-inf', now, 'LIMIT', 0,
                         {PROMOTE_MAX})
for _, id in ipairs(ready) do
  redis.call('ZREM', P .. ':delayed', id)
  if redis.call('HGET', jk(id), 'state') == 'queued' then enqueue(id) end
end
local skip = {{}}
for i = 6, #ARGV do skip[ARGV[i]] = true end
local out = {{}}
local got = redis.call('XREADGROUP', 'GROUP', GROUP, ME, 'COUNT', ARGV[5],
                       'STREAMS', STREAM, '>')
if not got then return out end
for _, entry in ipairs(got[1][2]) do
  local e, id = entry[1], entry[2][2]
  local k = jk(id)
  if redis.call('HGET', k, 'state') == 'queued' and redis.call('HGET', k, 'entry') == e then
    if skip[id] then
      -- Taken over while still in this replica's hands (its heartbeat lost), and read
      -- back here: held, its older copy's mark would pass too and it would go out twice.
      -- Back in line instead; that copy finds it no longer held and leaves it.
      unentry(id)
      enqueue(id)
    else
      redis.call('HSET', k, 'holder', ME)
      out[#out + 1] = {{e, view(id, {{request = true, callback = true}})}}
    end
  else
    drop(e)  -- the job moved on (cancelled, expired, purged) since it was put in line
  end
end
return out
"""

# ARGV: now, idle ms, count, cursor. Entries idle past the visibility timeout: their
# replica is gone. Returns {re-queued running jobs, {ids ended outcome_unknown}, the next
# cursor ('0-0': the whole pending list was scanned)}.
_RECLAIM = f"""
local now = ARGV[4]
local got = redis.call('XAUTOCLAIM', STREAM, GROUP, ME, ARGV[5], ARGV[7], 'COUNT', ARGV[6])
local requeued, unknown = 0, {{}}
for _, entry in ipairs(got[2]) do
  -- Redis 6.2 lists an entry deleted meanwhile as nil: nothing to take over.
  if entry then
    local e, id = entry[1], entry[2][2]
    local k = jk(id)
    local s = redis.call('HGET', k, 'state')
    if redis.call('HGET', k, 'entry') ~= e or (s ~= 'queued' and s ~= 'running') then
      drop(e)
    elseif s == 'running' and not IDEMPOTENT[redis.call('HGET', k, 'method')] then
      settle(id, 'outcome_unknown', now, '{_UNKNOWN_AFTER_CRASH}')
      unknown[#unknown + 1] = id
    else
      if s == 'running' then
        restate(id, 'queued')
        requeued = requeued + 1
      end
      unentry(id)
      redis.call('HSET', k, 'next_attempt_at', now)
      enqueue(id)
    end
  end
end
-- Consumers silent past the timeout with nothing pending (replicas gone, their jobs
-- taken over) leave the group; one still alive comes back with its next read.
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', STREAM, GROUP)) do
  local info = {{}}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['name'] ~= ME and info['pending'] == 0 and info['idle'] > tonumber(ARGV[5]) then
    redis.call('XGROUP', 'DELCONSUMER', STREAM, GROUP, info['name'])
  end
end
return {{requeued, unknown, got[1]}}
"""

# ARGV: (id, entry) pairs this replica holds. Keeps them fresh; returns those it lost.
_HEARTBEAT = """
local lost = {}
for i = 4, #ARGV, 2 do
  local id, e = ARGV[i], ARGV[i + 1]
  local k = jk(id)
  if redis.call('HGET', k, 'holder') == ME and redis.call('HGET', k, 'entry') == e then
    redis.call('XCLAIM', STREAM, GROUP, ME, 0, e, 'JUSTID')
  else
    lost[#lost + 1] = id
  end
end
return lost
"""

# ARGV: (id, entry) pairs. At shutdown: held jobs not sent yet go back in line for the
# others at once (not after the visibility timeout); a consumer left with nothing
# pending is removed from the group.
_RELEASE = """
for i = 4, #ARGV, 2 do
  local id, e = ARGV[i], ARGV[i + 1]
  local k = jk(id)
  if redis.call('HGET', k, 'holder') == ME and redis.call('HGET', k, 'entry') == e
     and redis.call('HGET', k, 'state') == 'queued' then
    unentry(id)
    enqueue(id)
  end
end
if #redis.call('XPENDING', STREAM, GROUP, '-', '+', 1, ME) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', STREAM, GROUP, ME)
end
return 0
"""

# ARGV: id, now.
_MARK_RUNNING = """
local id = ARGV[4]
local k = jk(id)
local s = redis.call('HGET', k, 'state')
if (s ~= 'queued' and s ~= 'running') or redis.call('HGET', k, 'holder') ~= ME then
  return 0
end
restate(id, 'running')
redis.call('HINCRBY', k, 'attempts', 1)
redis.call('HSET', k, 'next_attempt_at', ARGV[5])
return 1
"""

# ARGV: id, now, error. A running mark the replicas did not confirm: the request was not
# sent, so the job goes back in line (as not attempted) rather than waiting, `running`,
# for the take-over, which would end a POST `outcome_unknown`.
_UNMARK = """
local id = ARGV[4]
local k = jk(id)
if redis.call('HGET', k, 'state') ~= 'running' or redis.call('HGET', k, 'holder') ~= ME then
  return 0
end
restate(id, 'queued')
redis.call('HINCRBY', k, 'attempts', -1)
unentry(id)
redis.call('HSET', k, 'next_attempt_at', ARGV[5])
put(k, 'last_error', ARGV[6])
redis.call('ZADD', P .. ':delayed', ARGV[5], id)
return 1
"""

# ARGV: id, state, now, status, response, error.
_FINISH = """
local id = ARGV[4]
local k = jk(id)
local s = redis.call('HGET', k, 'state')
if (not s) or TERMINAL[s] or not mine(k) then return 0 end
settle(id, ARGV[5], ARGV[6], ARGV[9], ARGV[7], ARGV[8])
return 1
"""

# ARGV: id, at, error.
_REQUEUE = """
local id = ARGV[4]
local k = jk(id)
local s = redis.call('HGET', k, 'state')
if (s ~= 'queued' and s ~= 'running') or not mine(k) then return 0 end
restate(id, 'queued')
unentry(id)
redis.call('HSET', k, 'next_attempt_at', ARGV[5])
put(k, 'last_error', ARGV[6])
redis.call('ZADD', P .. ':delayed', ARGV[5], id)
return 1
"""

# ARGV: now.
_EXPIRE = f"""
local now = ARGV[4]
local n = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. ':expiry', '-inf', now, 'LIMIT', 0,
                               {EXPIRE_SLICE})) do
  local s = redis.call('HGET', jk(id), 'state')
  if s == 'queued' then
    settle(id, 'expired', now, 'not done within jobs.max_age')
    n = n + 1
  elseif s ~= 'running' then
    redis.call('ZREM', P .. ':expiry', id)
  end
end
return n
"""

# ARGV: before, slice, states...
_PURGE = """
local wanted = {}
for i = 6, #ARGV do wanted[ARGV[i]] = true end
local n = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. ':finished', '-inf', '(' .. ARGV[4],
                               'LIMIT', 0, ARGV[5])) do
  local k = jk(id)
  local s = redis.call('HGET', k, 'state')
  if (not s) or wanted[s] then
    local idem, owner = redis.call('HGET', k, 'idem'), redis.call('HGET', k, 'owner')
    if idem and owner and redis.call('HGET', P .. ':idem', owner .. '\\n' .. idem) == id then
      redis.call('HDEL', P .. ':idem', owner .. '\\n' .. idem)
    end
    if s then redis.call('ZREM', P .. ':state:' .. s, id) end
    for _, z in ipairs({'all', 'finished', 'callbacks', 'expiry', 'delayed'}) do
      redis.call('ZREM', P .. ':' .. z, id)
    end
    redis.call('DEL', k)
    if s then n = n + 1 end
  end
end
return n
"""

# ARGV: id. A submission the replicas did not confirm (its client was answered 503):
# gone again, unless a replica took it meanwhile (then it runs: the README's case).
_WITHDRAW = """
local id = ARGV[4]
local k = jk(id)
if redis.call('HGET', k, 'state') ~= 'queued' or redis.call('HGET', k, 'holder') ~= '' then
  return 0
end
unentry(id)
local idem, owner = redis.call('HGET', k, 'idem'), redis.call('HGET', k, 'owner')
if idem and owner and redis.call('HGET', P .. ':idem', owner .. '\\n' .. idem) == id then
  redis.call('HDEL', P .. ':idem', owner .. '\\n' .. idem)
end
redis.call('ZREM', P .. ':state:queued', id)
for _, z in ipairs({'all', 'expiry', 'delayed'}) do redis.call('ZREM', P .. ':' .. z, id) end
redis.call('DEL', k)
return 1
"""

# ARGV: id, now.
_CANCEL = """
local id = ARGV[4]
local k = jk(id)
if redis.call('EXISTS', k) == 0 then return false end
if redis.call('HGET', k, 'state') == 'queued' then
  settle(id, 'cancelled', ARGV[5], 'cancelled before it ran')
end
return view(id, {})
"""

# ARGV: id, now, expires.
_RETRY = """
local id = ARGV[4]
local k = jk(id)
if redis.call('EXISTS', k) == 0 then return false end
local s = redis.call('HGET', k, 'state')
if s == 'outcome_unknown' or s == 'failed' then
  restate(id, 'queued')
  redis.call('HSET', k, 'next_attempt_at', ARGV[5], 'expires_at', ARGV[6],
             'callback_attempts', 0,
             'last_error', 'sent again by an operator (jobs retry)')
  redis.call('HDEL', k, 'finished_at', 'response_status', 'response', 'callback_state',
             'callback_next_at')
  redis.call('ZREM', P .. ':finished', id)
  redis.call('ZREM', P .. ':callbacks', id)
  redis.call('ZADD', P .. ':expiry', ARGV[6], id)
  enqueue(id)
end
return view(id, {})
"""

# ARGV: now, limit, lease until. Callbacks due, leased to this replica until the lease
# ends (another replica delivers it then if this one died): {job, deliveries so far}.
_CALLBACKS_TAKE = """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. ':callbacks', '-inf', ARGV[4],
                               'LIMIT', 0, ARGV[5])) do
  local k = jk(id)
  if redis.call('HGET', k, 'callback_state') == 'pending' then
    redis.call('ZADD', P .. ':callbacks', ARGV[6], id)
    out[#out + 1] = {view(id, {callback = true}), redis.call('HGET', k, 'callback_attempts')}
  else
    redis.call('ZREM', P .. ':callbacks', id)
  end
end
return out
"""

# ARGV: id, state, attempts, at.
_CALLBACK_RESULT = """
local id = ARGV[4]
local k = jk(id)
if redis.call('HGET', k, 'callback_state') ~= 'pending' then return 0 end
redis.call('HSET', k, 'callback_state', ARGV[5], 'callback_attempts', ARGV[6],
           'callback_next_at', ARGV[7])
if ARGV[5] == 'pending' then
  redis.call('ZADD', P .. ':callbacks', ARGV[7], id)
else
  redis.call('ZREM', P .. ':callbacks', id)
end
return 1
"""

_SCRIPTS = {
    "submit": _SUBMIT,
    "withdraw": _WITHDRAW,
    "take": _TAKE,
    "reclaim": _RECLAIM,
    "heartbeat": _HEARTBEAT,
    "release": _RELEASE,
    "mark_running": _MARK_RUNNING,
    "unmark": _UNMARK,
    "finish": _FINISH,
    "requeue": _REQUEUE,
    "expire": _EXPIRE,
    "purge": _PURGE,
    "cancel": _CANCEL,
    "retry": _RETRY,
    "callbacks_take": _CALLBACKS_TAKE,
    "callback_result": _CALLBACK_RESULT,
}


def _num(value: Any) -> str:
    return repr(float(value))


def _text(value: Any) -> str | None:
    return None if value is None else bytes(value).decode()


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _job(values: Sequence[Any]) -> Job:
    """A job from the plain fields and the three records, as the scripts list them.
    Raises ValueError (or TypeError) for a record that is not a job's."""
    plain = values[: len(_PLAIN)]
    blobs = [*values[len(_PLAIN) :], None, None, None][:3]
    (id_, owner, method, scope, state, created, expires, next_at, finished) = plain[:9]
    attempts, error, status, callback_state = plain[9:13]
    if id_ is None or state is None or created is None or expires is None or method is None:
        raise ValueError("a field is missing")
    return Job(
        id=bytes(id_).decode(),
        owner=_text(owner) or "",
        method=bytes(method).decode(),
        scope=_text(scope) or "",
        state=State(bytes(state).decode()),
        created_at=float(created),
        expires_at=float(expires),
        next_attempt_at=float(next_at if next_at is not None else created),
        finished_at=_float(finished),
        attempts=_int(attempts) or 0,
        last_error=_text(error),
        response_status=_int(status),
        callback_state=_text(callback_state),
        request=None if blobs[0] is None else bytes(blobs[0]),
        response=None if blobs[1] is None else bytes(blobs[1]),
        callback=None if blobs[2] is None else bytes(blobs[2]),
    )


def consumer_name() -> str:
    """Unique per process, and readable in XINFO: host, pid, and a random tail (a pid is
    reused after a restart; a dead replica's entries must not look like the new one's)."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"


class RedisStore:
    def __init__(
        self,
        url: str,
        name: str,
        max_jobs: int,
        visibility_timeout: float = 60.0,
        *,
        runner: bool = True,
        client: Any = None,
        min_replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        self.url = url
        self.max_jobs = max_jobs
        self.visibility_timeout = visibility_timeout
        self.min_replicas = min_replicas
        self.replica_timeout = replica_timeout
        self.consumer = consumer_name()
        self._prefix = f"{{luxsci-proxy:jobs:{name}}}"
        self._stream = f"{self._prefix}:stream"
        self._where = redact_url(url)
        # Both spellings of each password: an error could show either.
        self._secrets: set[str] = set()
        with contextlib.suppress(RedisURLError):  # config validation parsed it already
            target = parse_url(url)
            for secret in (target.password, target.sentinel_password):
                if secret:
                    self._secrets |= {secret, quote(secret, safe="")}
        # A call with WAIT may take the replica timeout on top: the socket must not give
        # up first (a cut-short WAIT reads as a lost connection, not as not confirmed).
        op_timeout = OP_TIMEOUT + (replica_timeout if min_replicas else 0.0)
        self._client: Any = client if client is not None else connect(url, op_timeout=op_timeout)
        self._scripts = {
            name: self._client.register_script(_PRELUDE + s) for name, s in _SCRIPTS.items()
        }
        # Jobs this replica has taken and not let go of: id -> stream entry. The
        # heartbeat keeps these entries fresh, and only these.
        self._held: dict[str, bytes] = {}
        self._runner = runner
        # Calls in flight at once, each on its own connection: a burst of submissions
        # waits here rather than opening a connection apiece. Redis runs scripts one at
        # a time anyway, and fsyncs once for all the replies of one event-loop turn.
        self._calls = asyncio.Semaphore(MAX_CALLS)
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False

    # -- life cycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Reach Redis and make the stream's consumer group (once, by whoever is first)."""
        await self._ensure_group()
        if self._runner:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _ensure_group(self) -> None:
        try:
            await self._client.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise self._fault(e) from None
        except (RedisError, OSError) as e:
            raise self._fault(e) from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            while not self._heartbeat.done():
                self._heartbeat.cancel()
                await asyncio.wait({self._heartbeat}, timeout=0.1)
        if self._runner:
            # Best effort: what is not released now is reclaimed after the timeout.
            with contextlib.suppress(StoreError):
                await self._run("release", *self._pairs(self._held))
        self._held.clear()
        await self._client.aclose()

    async def _beat(self) -> None:
        every = self.visibility_timeout / 3
        while True:
            await asyncio.sleep(every)
            held = dict(self._held)
            if not held:
                continue
            try:
                lost = await self._run("heartbeat", *self._pairs(held), gated=False)
            except StoreError as e:
                log.error("jobs_store_failed", operation="heartbeat", error=str(e))
                continue
            for raw in lost:
                job_id = bytes(raw).decode()
                # Only the entry asked about: `due` may have taken it again meanwhile.
                if self._held.get(job_id) == held.get(job_id):
                    self._held.pop(job_id, None)

    @staticmethod
    def _pairs(held: dict[str, bytes]) -> list[Any]:
        return [x for job_id, entry in held.items() for x in (job_id, entry)]

    # -- calls ----------------------------------------------------------------------------

    def _fault(self, e: BaseException) -> StoreError:
        why = str(e) or type(e).__name__
        for secret in self._secrets:
            why = why.replace(secret, "***")
        return StoreError(f"jobs store {self._where}: {why}")

    async def _run(self, script: str, *args: Any, gated: bool = True) -> Any:
        """`gated=False`: not queued behind the other calls for a slot (the heartbeat: held
        back by a burst of slow submissions, it would let a live replica's jobs go)."""
        argv = [self._prefix, GROUP, self.consumer, *args]
        async with self._calls if gated else contextlib.nullcontext():
            try:
                try:
                    return await self._scripts[script](keys=[self._stream], args=argv)
                except ResponseError as e:
                    # The stream or its group is gone (Redis emptied): make them again.
                    if "NOGROUP" not in str(e):
                        raise
                    await self._ensure_group()
                    return await self._scripts[script](keys=[self._stream], args=argv)
            except (RedisError, OSError, TimeoutError) as e:
                raise self._fault(e) from None

    async def _replicated(self, script: str, *args: Any) -> Any:
        """`_run`, and with `min_replicas` the script's writes confirmed by that many
        replicas before the reply. WAIT counts what its own connection wrote, so both go
        in one pipeline (one connection); a shortfall is a StoreError: the write may be
        on the master alone, and a failover would lose it."""
        if not self.min_replicas:
            return await self._run(script, *args)
        argv = [self._prefix, GROUP, self.consumer, *args]
        wait_ms = max(1, int(self.replica_timeout * 1000))

        async def both() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            await self._scripts[script](keys=[self._stream], args=argv, client=pipe)
            pipe.execute_command("WAIT", self.min_replicas, wait_ms)
            replies: list[Any] = await pipe.execute()
            return replies

        async with self._calls:
            try:
                try:
                    reply, confirmed = await both()
                except ResponseError as e:
                    if "NOGROUP" not in str(e):
                        raise
                    await self._ensure_group()
                    reply, confirmed = await both()
            except (RedisError, OSError, TimeoutError) as e:
                raise self._fault(e) from None
        if int(confirmed) < self.min_replicas:
            raise Unconfirmed(
                f"jobs store {self._where}: {int(confirmed)} of {self.min_replicas} replicas "
                f"confirmed the write within {self.replica_timeout:g} s "
                "(jobs.redis_min_replicas)",
                reply,
            )
        return reply

    async def _call(self, make: Callable[[], Awaitable[Any]]) -> Any:
        async with self._calls:
            try:
                return await make()
            except (RedisError, OSError, TimeoutError) as e:
                raise self._fault(e) from None

    def _parse(self, values: Sequence[Any], job_id: str | None = None) -> Job | None:
        """The job, or None (reported by id) for a record that is not one."""
        try:
            return _job(values)
        except (ValueError, TypeError, UnicodeDecodeError, IndexError) as e:
            named = job_id or (_text(values[0]) if values and values[0] is not None else "?")
            log.error("job_record_unreadable", job_id=named, record="job", error=str(e))
            return None

    # -- submission -----------------------------------------------------------------------

    async def submit(self, new: NewJob) -> Submitted:
        try:
            reply = await self._submit(new)
        except Unconfirmed as e:
            # The client is told 503: the job made here is withdrawn unless a replica has
            # taken it meanwhile, so a retry without an Idempotency-Key does not make a
            # second job beside one that runs (the README's "not confirmed" case).
            if isinstance(e.reply, list) and e.reply and e.reply[0] == 1:
                with contextlib.suppress(StoreError):
                    await self._run("withdraw", new.id)
            raise
        if reply[0] == 2:
            return Submitted(None, created=False, full=True)
        job = self._parse(reply[1])
        if job is None:
            # The job an idempotency key names cannot be read (reported above): neither
            # it nor a second job can be answered for; the gateway says unavailable.
            raise StoreError(f"jobs store {self._where}: the job under this key is unreadable")
        return Submitted(job, created=reply[0] == 1)

    async def _submit(self, new: NewJob) -> Any:
        return await self._replicated(
            "submit",
            new.id,
            new.owner,
            new.idem or "",
            new.method,
            new.scope,
            _num(new.created_at),
            _num(new.expires_at),
            new.request,
            new.callback or b"",
            self.max_jobs,
        )

    # -- the runner's transitions ---------------------------------------------------------

    async def mark_running(self, job_id: str, now: float) -> bool:
        """With `min_replicas`, the replicas have `running` before the request goes
        out: a failover then cannot hand the job out again as queued (a second send)."""
        try:
            done = bool(await self._replicated("mark_running", job_id, _num(now)))
        except Unconfirmed:
            # Not sent, though the master has it `running`: back in line now. Should that
            # fail too, the take-over settles it after the visibility timeout.
            self._held.pop(job_id, None)
            with contextlib.suppress(StoreError):
                await self._run("unmark", job_id, _num(now), _UNCONFIRMED)
            raise
        except StoreError:
            # Not sent: let go (as in finish), taken over after the visibility timeout.
            self._held.pop(job_id, None)
            raise
        if not done:
            self._held.pop(job_id, None)
        return done

    async def finish(
        self,
        job_id: str,
        state: State,
        now: float,
        *,
        status: int | None = None,
        response: bytes | None = None,
        error: str | None = None,
    ) -> bool:
        try:
            done = await self._run(
                "finish",
                job_id,
                state.value,
                _num(now),
                "" if status is None else str(status),
                response or b"",
                error or "",
            )
        finally:
            # Let go even when Redis did not answer (a failover): kept fresh by the
            # heartbeat, the job would stay `running` for as long as this process
            # lives; let go, it is taken over after the visibility timeout by the
            # crash rule.
            self._held.pop(job_id, None)
        return bool(done)

    async def requeue(self, job_id: str, at: float, error: str | None) -> bool:
        try:
            done = await self._run("requeue", job_id, _num(at), error or "")
        finally:
            self._held.pop(job_id, None)  # as in finish
        return bool(done)

    async def recover(self, now: float) -> tuple[int, list[str]]:
        """At start: only what the visibility timeout gives up (replicas that died).
        Jobs other live replicas are running are theirs: no lock says otherwise here."""
        return await self.reclaim(now)

    async def reclaim(self, now: float) -> tuple[int, list[str]]:
        """Take over the entries of replicas gone silent for the visibility timeout."""
        requeued = 0
        unknown: list[str] = []
        idle_ms = int(self.visibility_timeout * 1000)
        # XAUTOCLAIM looks at a bounded stretch of the pending list per call and says where
        # to go on: followed to the end, idle entries behind many fresh ones are found too.
        cursor = "0-0"
        while True:
            count, ids, after = await self._run(
                "reclaim", _num(now), idle_ms, RECLAIM_SLICE, cursor
            )
            requeued += int(count)
            unknown += [bytes(i).decode() for i in ids]
            cursor = bytes(after).decode()
            if cursor == "0-0":
                return requeued, unknown

    def let_go(self, job_id: str) -> None:
        """A worker dropped the job (a bug): no longer kept fresh, so after the visibility
        timeout a replica (this one too) takes it over by the crash rule."""
        self._held.pop(job_id, None)

    async def expire(self, now: float) -> int:
        total = 0
        while (n := int(await self._run("expire", _num(now)))) > 0:
            total += n
            if n < EXPIRE_SLICE:
                break
        return total

    async def purge(self, before: float, states: frozenset[State] = TERMINAL) -> int:
        names = sorted(s.value for s in states)
        total = 0
        while (deleted := int(await self._run("purge", _num(before), PURGE_SLICE, *names))) > 0:
            total += deleted
            if deleted < PURGE_SLICE:
                break
        return total

    # -- clients and operators ------------------------------------------------------------

    async def cancel(self, job_id: str, now: float) -> Job | None:
        reply = await self._run("cancel", job_id, _num(now))
        return None if reply is None else self._parse(reply, job_id)

    async def retry(self, job_id: str, now: float, max_age: float) -> Job | None:
        reply = await self._run("retry", job_id, _num(now), _num(now + max_age))
        return None if reply is None else self._parse(reply, job_id)

    async def get(self, job_id: str, blobs: bool = False) -> Job | None:
        fields = (*_PLAIN, *_BLOBS) if blobs else _PLAIN
        values = await self._call(lambda: self._client.hmget(self._key(job_id), fields))
        if values[0] is None:
            return None
        return self._parse(values, job_id)

    def _key(self, job_id: str) -> str:
        return f"{self._prefix}:job:{job_id}"

    async def due(self, now: float, limit: int, skip: Sequence[str] = ()) -> list[Job]:
        """Jobs for this replica to run, oldest first: it holds them until it settles or
        re-queues them. The group never hands an entry out twice, but a job taken over
        (its heartbeat lost past the timeout) is put in line under a new entry and may
        come back here while `skip` (the runner's hands) still has it: the script puts
        such a one back in line rather than hand it to a second worker."""
        if limit <= 0:
            return []
        reply = await self._run("take", _num(now), limit, *skip)
        jobs = []
        for entry, values in reply:
            job = self._parse(values)
            if job is None:
                continue  # reported; it stays with this replica until reclaimed
            self._held[job.id] = bytes(entry)
            jobs.append(job)
        return jobs

    async def next_due(self, skip: Sequence[str] = ()) -> float | None:
        """When the next delayed job is due (jobs already in the stream are due now)."""
        first = await self._call(
            lambda: self._client.zrange(f"{self._prefix}:delayed", 0, 0, withscores=True)
        )
        return float(first[0][1]) if first else None

    async def callbacks_due(self, now: float, limit: int) -> list[tuple[Job, int]]:
        lease = now + self.visibility_timeout
        reply = await self._run("callbacks_take", _num(now), limit, _num(lease))
        out = []
        for values, attempts in reply:
            job = self._parse(values)
            if job is not None:
                out.append((job, int(attempts or 0)))
        return out

    async def next_callback(self) -> float | None:
        first = await self._call(
            lambda: self._client.zrange(f"{self._prefix}:callbacks", 0, 0, withscores=True)
        )
        return float(first[0][1]) if first else None

    async def callback_result(self, job_id: str, state: str, attempts: int, at: float) -> None:
        await self._run("callback_result", job_id, state, attempts, _num(at))

    async def stats(self) -> Stats:
        pipe = self._client.pipeline(transaction=False)
        for s in State:
            pipe.zcard(f"{self._prefix}:state:{s.value}")
        pipe.zrange(f"{self._prefix}:state:queued", 0, 0, withscores=True)
        replies = await self._call(pipe.execute)
        counts = {s.value: int(n) for s, n in zip(State, replies, strict=False)}
        oldest = replies[-1]
        return Stats(counts, float(oldest[0][1]) if oldest else None)

    async def list(self, state: State | None = None, limit: int = 100) -> list[Job]:
        index = f"{self._prefix}:all" if state is None else f"{self._prefix}:state:{state.value}"
        ids = await self._call(lambda: self._client.zrevrange(index, 0, limit - 1))
        if not ids:
            return []
        pipe = self._client.pipeline(transaction=False)
        for raw in ids:
            pipe.hmget(self._key(bytes(raw).decode()), _PLAIN)
        rows = await self._call(pipe.execute)
        jobs = []
        for raw, values in zip(ids, rows, strict=True):
            if values[0] is None:
                continue  # purged meanwhile
            job = self._parse(values, bytes(raw).decode())
            if job is not None:
                jobs.append(job)
        return jobs

    # -- tests and fault drills -------------------------------------------------------------

    def held(self) -> dict[str, bytes]:
        """The jobs this replica holds now (id -> stream entry)."""
        return dict(self._held)
