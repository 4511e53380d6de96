"""Sessions in Redis, so any number of server processes can share them.

This is the only module in mmchat that imports ``redis``.

URL forms (``sessions.url``):

* ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS) and
  ``unix://[[user]:password@]/path/to/redis.sock[?db=N]``: one server, through a bounded
  blocking pool: a call waits up to ``pool_timeout`` for a free connection, then fails.
* ``redis+cluster://[[user]:password@]host[:port][,host[:port]...]`` (or
  ``rediss+cluster://``): Redis Cluster, the hosts being startup nodes. Each node gets
  up to ``max_connections`` connections.
* ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db]``
  (or ``rediss+sentinel://``): the master that the Sentinels (default port 26379) name
  for ``service_name``. The password is the master's; add ``?sentinel_password=...`` if
  the Sentinels want one too. The pool follows failovers and holds up to
  ``max_connections``; a call beyond that fails at once instead of waiting.

Keys of one session share the hash tag ``{<session_id>}``, so in a cluster they live in
one slot and one node serves a whole turn:

==================================  ======  ====================================
``{prefix}:s:{<id>}:state``         string  serialised RNN state (raw bytes)
``{prefix}:s:{<id>}:memory``        list    memory-bank entries (raw bytes)
``{prefix}:s:{<id>}:history``       list    turns, one JSON document each
``{prefix}:s:{<id>}:meta``          hash    ``owner``
``{prefix}:s:{<id>}:stream``        stream  reply events for resume, id ``<seq>-0``
``{prefix}:s:{<id>}:msgids``        set     client message ids already taken
``{prefix}:s:{<id>}:lock``          string  the turn lock's token (own lease)
``{prefix}:s:{<id>}:cancel``        set     cancels asked for (own TTL, see below)
==================================  ======  ====================================

A multi-command call is one ``MULTI``/``EXEC`` round trip (on Cluster one plain
pipeline to the session's node, see :meth:`RedisStore._pipeline`). A turn
(:meth:`RedisStore.begin_turn`) is two: one Lua script claims the message id, takes the
lock and reads state, memory and the stream's tail; one pipeline saves the turn, appends
the reply's last events and releases the lock. In between, the turns whose reply events
come out of one decode step append them in one shared pipeline (:class:`_Appends`), so
streaming costs one round trip per step, not one per reply and step.

A cancel (:meth:`RedisStore.request_cancel`) may reach a node other than the one
generating the reply. It is recorded in the ``cancel`` set as ``m:<message id>``, or
``l:<lock token>`` for "the reply running now" (nothing if no turn holds the session),
for ``cancel_ttl`` seconds. Every batch of reply events a turn appends asks, in the same
pipeline, whether its message id or its lock token is there (``SMISMEMBER``), and so
does the script that begins a turn; ending the turn removes both. Ids of messages are
never reused in a session and tokens are random, so a cancel that comes too late
matches no other reply.

Every key but the lock and the cancel set has a sliding TTL of ``ttl_seconds``, renewed
by :meth:`load`, :meth:`save_turn`, :meth:`claim_session` and a turn's begin and end
(and by stream appends and message claims for their own key). Nothing is pickled. A
failed call is not retried (Cluster excepted: redis-py's retries follow slot moves
there), so a turn is never written twice; it raises :class:`StoreUnavailable` and the
pool reconnects on the next call. A pooled connection that sat idle for
``health_check_interval`` seconds is first checked with a ``PING``; if that finds it
closed (Redis restarted meanwhile), it reconnects before the command is sent, so a
restart does not fail one call per stale connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.exceptions
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..config import SessionsConfig
from ..errors import ConfigError, DuplicateMessage, SessionBusy, StateError, StoreUnavailable
from ..sessions import (
    SessionData,
    SessionStore,
    SessionTurn,
    StreamEntry,
    TurnWrite,
    check_owner,
    check_stream_entries,
    validate_session_id,
)

log = logging.getLogger(__name__)

#: Exceptions that mean "Redis cannot serve us right now"; each becomes StoreUnavailable.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,  # refused, reset, pool exhausted, LOADING, auth
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,  # a replica after failover
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.RedisClusterException,
    OSError,
)

# Begin a turn. KEYS: lock, msgids, state, memory, stream, history, meta, cancel.
# ARGV: token, lock lease (ms), TTL (ms), owner ('' for any)[, message id to claim].
# Returns {3} if an owner is given and the session is gone, {4} if it is someone
# else's (nothing claimed, nothing locked), {0} if the message id was taken before,
# {1} if the lock is busy (the id, if any, is claimed all the same), else {2, state,
# memory, stream tail, whether a cancel of the message was asked for}.
_BEGIN_TURN = """
if ARGV[4] ~= '' then
  local owner = redis.call('HGET', KEYS[7], 'owner')
  if not owner then
    return {3}
  end
  if owner ~= ARGV[4] then
    return {4}
  end
end
if #ARGV > 4 then
  if redis.call('SADD', KEYS[2], ARGV[5]) == 0 then
    return {0}
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1}
end
for i = 2, 7 do
  redis.call('PEXPIRE', KEYS[i], ARGV[3])
end
local cancelled = 0
if #ARGV > 4 then
  cancelled = redis.call('SISMEMBER', KEYS[8], 'm:' .. ARGV[5])
end
return {2, redis.call('GET', KEYS[3]), redis.call('LRANGE', KEYS[4], 0, -1),
        redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1), cancelled}
"""

# Record a cancel. KEYS: cancel, lock. ARGV: TTL (ms)[, message id]. Without a message
# id, the turn holding the lock now is meant (by its token); returns 0 if there is none.
_REQUEST_CANCEL = """
local member
if #ARGV > 1 then
  member = 'm:' .. ARGV[2]
else
  local token = redis.call('GET', KEYS[2])
  if not token then
    return 0
  end
  member = 'l:' .. token
end
redis.call('SADD', KEYS[1], member)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# Delete the lock only if it still holds our token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Extend the lock's lease only if it still holds our token.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_SCHEMES = {
    "redis": "single", "rediss": "single", "unix": "single",
    "redis+cluster": "cluster", "rediss+cluster": "cluster",
    "redis+sentinel": "sentinel", "rediss+sentinel": "sentinel",
}


class _SeqRefused(ValueError):
    """Redis refused a stream entry's id: its seq does not follow the stream's last."""


@dataclass(frozen=True)
class RedisURL:
    """A parsed ``sessions.url``. ``kind`` is ``single``, ``cluster`` or ``sentinel``."""

    kind: str
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    ssl: bool = False
    username: str | None = None
    password: str | None = None
    db: int = 0
    service: str | None = None
    sentinel_password: str | None = None

    @property
    def display(self) -> str:
        """The URL without credentials, for messages and logs."""
        parts = urlsplit(self.url)
        netloc = parts.netloc.rpartition("@")[2]
        return f"{parts.scheme}://{netloc}{parts.path}"


def parse_redis_url(url: str) -> RedisURL:
    """Parse a URL of one of the forms in the module docstring; :class:`ConfigError` if not."""
    parts = urlsplit(url)
    kind = _SCHEMES.get(parts.scheme)
    if kind is None:
        raise ConfigError(
            f"sessions.url {RedisURL('single', url).display!r} is not allowed: the scheme "
            f"must be one of {', '.join(_SCHEMES)}")
    if kind == "single":
        return RedisURL("single", url, ssl=parts.scheme == "rediss")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, password = None, None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    default_port = 26379 if kind == "sentinel" else 6379
    hosts = tuple(_host_port(item, default_port, url) for item in hostlist.split(",") if item)
    if not hosts:
        raise ConfigError(f"sessions.url {url!r} names no host")
    segments = [unquote(s) for s in parts.path.split("/") if s]
    service, db = None, 0
    if kind == "sentinel":
        if not segments:
            raise ConfigError(
                "sessions.url: a Sentinel URL needs the service name as its path, "
                "as in redis+sentinel://host:26379/mymaster")
        service, segments = segments[0], segments[1:]
    if segments:
        if kind == "cluster" or len(segments) > 1 or not segments[0].isdigit():
            raise ConfigError(f"sessions.url path {parts.path!r} is not allowed here")
        db = int(segments[0])
    query = parse_qs(parts.query)
    return RedisURL(kind, url, hosts, ssl=parts.scheme.startswith("rediss"),
                    username=username, password=password, db=db, service=service,
                    sentinel_password=(query.get("sentinel_password") or [None])[0])


def _host_port(item: str, default_port: int, url: str) -> tuple[str, int]:
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = item.partition(":")
    if not host or (port and not port.isdigit()):
        raise ConfigError(f"sessions.url {url!r}: cannot read host and port from {item!r}")
    return host, int(port) if port else default_port


@dataclass(frozen=True)
class _Keys:
    state: str
    memory: str
    history: str
    meta: str
    stream: str
    msgids: str
    lock: str
    cancel: str

    @property
    def data(self) -> tuple[str, ...]:
        """Every key with the session's sliding TTL (all but the lock and cancels)."""
        return (self.state, self.memory, self.history, self.meta, self.stream, self.msgids)


@functools.cache
def reconnecting(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` whose health check (a ``PING`` after ``health_check_interval`` idle seconds)
    reconnects once when it finds the connection closed, instead of failing the call.

    Nothing of the caller's command has been sent at that point, so this never repeats a
    write; a timeout is not retried (Redis may be hung, and waiting twice helps nobody).
    """

    class Reconnecting(cls):  # type: ignore[valid-type, misc]
        async def check_health(self) -> None:
            if (not self.health_check_interval
                    or asyncio.get_running_loop().time() <= self.next_health_check):
                return
            try:
                await self._send_ping()
            except (redis.exceptions.TimeoutError, TimeoutError):
                await self.disconnect()
                raise
            except (redis.exceptions.ConnectionError, OSError):
                log.info("reconnecting a stale Redis connection")
                await self.disconnect()
                # a fresh connection needs no check (and connecting must not recurse here)
                loop = asyncio.get_running_loop()
                self.next_health_check = loop.time() + self.health_check_interval
                await self.connect()

    Reconnecting.__name__ = Reconnecting.__qualname__ = f"Reconnecting{cls.__name__}"
    return Reconnecting


class RedisStore(SessionStore):
    """A :class:`SessionStore` in Redis (single server, Cluster or Sentinel).

    Round trips: :meth:`load`, :meth:`save_turn`, :meth:`claim_session`,
    :meth:`claim_message` and :meth:`append_stream` are one each; taking an uncontended
    lock is one and releasing it one; :meth:`begin_turn` (uncontended) is one and ending
    its turn one.

    The turn lock is a lease of ``lock_lease`` seconds (default 15), renewed every third
    of it while held, so a crashed process blocks its sessions for at most one lease.
    Waiting for a busy lock backs off from 5 ms to 100 ms and gives up with
    :class:`SessionBusy` after ``lock_wait`` seconds. A cancel that no turn has taken up
    is kept for ``cancel_ttl`` seconds (default 60).
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "mmchat",
                 ttl_seconds: float = 86_400, max_connections: int = 32,
                 pool_timeout: float = 5.0, socket_timeout: float = 5.0,
                 connect_timeout: float = 2.0, lock_lease: float = 15.0,
                 lock_wait: float = 10.0, stream_max_len: int = 2048,
                 health_check_interval: float = 1.0, cancel_ttl: float = 60.0) -> None:
        if not prefix or any(c in prefix for c in "{} "):
            raise ConfigError(f"sessions.prefix = {prefix!r} is not allowed: "
                              "use a non-empty string without braces or spaces")
        if (ttl_seconds <= 0 or lock_lease <= 0 or lock_wait < 0 or stream_max_len < 1
                or cancel_ttl <= 0):
            raise ConfigError("Redis store: ttl, lock lease, stream length and cancel ttl "
                              "must be positive")
        self._url = parse_redis_url(url)
        self._prefix = prefix
        self._ttl_ms = max(1, int(ttl_seconds * 1000))
        self._cancel_ttl_ms = max(1, int(cancel_ttl * 1000))
        self._socket_timeout = socket_timeout
        self.lock_lease = lock_lease
        self.lock_wait = lock_wait
        self._stream_max_len = stream_max_len
        self._sentinel = None
        self._appends = _Appends(self)
        self._client = self._connect(max_connections=max_connections,
                                     pool_timeout=pool_timeout,
                                     socket_timeout=socket_timeout,
                                     connect_timeout=connect_timeout,
                                     health_check_interval=health_check_interval)

    @classmethod
    def from_config(cls, config: SessionsConfig) -> RedisStore:
        """Build from ``[sessions]``; settings not (yet) in the config keep their defaults."""
        optional = {name: getattr(config, setting) for name, setting in (
            ("pool_timeout", "pool_timeout_seconds"),
            ("socket_timeout", "socket_timeout_seconds"),
            ("connect_timeout", "connect_timeout_seconds"),
            ("lock_lease", "lock_lease_seconds"),
            ("lock_wait", "lock_wait_seconds"),
            ("stream_max_len", "stream_max_len"),
        ) if hasattr(config, setting)}
        return cls(config.url, prefix=config.prefix, ttl_seconds=config.ttl_seconds,
                   max_connections=config.max_connections, **optional)

    def _connect(self, *, max_connections: int, pool_timeout: float, socket_timeout: float,
                 connect_timeout: float, health_check_interval: float) -> Any:
        url = self._url
        timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout}
        checked = {"health_check_interval": health_check_interval}
        if url.kind == "single":
            pool = BlockingConnectionPool.from_url(
                url.url, max_connections=max_connections, timeout=pool_timeout,
                retry=Retry(NoBackoff(), 0), **timeouts, **checked)
            pool.connection_class = reconnecting(pool.connection_class)
            return Redis.from_pool(pool)
        auth = {"username": url.username, "password": url.password, "ssl": url.ssl}
        if url.kind == "cluster":
            from redis.asyncio.cluster import ClusterNode, RedisCluster

            # Cluster keeps redis-py's own retries: they follow MOVED slots and failovers.
            return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in url.hosts],
                                max_connections=max_connections, **auth, **timeouts)
        from redis.asyncio.sentinel import Sentinel

        sentinel_kwargs: dict[str, Any] = {**timeouts, "retry": Retry(NoBackoff(), 0)}
        if url.sentinel_password:
            sentinel_kwargs["password"] = url.sentinel_password
        self._sentinel = Sentinel(list(url.hosts), sentinel_kwargs=sentinel_kwargs,
                                  retry=Retry(NoBackoff(), 0), **timeouts)
        from redis.asyncio.sentinel import SentinelManagedConnection

        return self._sentinel.master_for(
            url.service, db=url.db, max_connections=max_connections, **auth, **checked,
            connection_class=reconnecting(SentinelManagedConnection))

    def _pipeline(self) -> Any:
        # On Cluster, redis-py's async MULTI pipeline looks up each queued command's slot
        # on a private event loop in a thread, which breaks later commands (seen with
        # redis-py 8.1). A plain pipeline sends the same commands to the session's one
        # node in one round trip; the session lock keeps writers apart.
        return self._client.pipeline(transaction=self._url.kind != "cluster")

    @property
    def client(self) -> Any:
        """The underlying ``redis.asyncio`` client, for diagnostics and tests."""
        return self._client

    def keys(self, session_id: str) -> _Keys:
        """The Redis keys of one session."""
        base = f"{self._prefix}:s:{{{validate_session_id(session_id)}}}"
        return _Keys(*(f"{base}:{name}" for name in
                       ("state", "memory", "history", "meta", "stream", "msgids", "lock",
                        "cancel")))

    @contextlib.asynccontextmanager
    async def _guard(self, action: str) -> AsyncIterator[None]:
        try:
            yield
        except UNAVAILABLE_ERRORS as exc:
            raise StoreUnavailable(
                f"Redis session store at {self._url.display} is unavailable "
                f"({action}): {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        async with self._guard("ping"):
            await self._client.ping()

    async def close(self) -> None:
        with contextlib.suppress(*UNAVAILABLE_ERRORS):
            await self._client.aclose()
            if self._sentinel is not None:
                for client in self._sentinel.sentinels:
                    await client.aclose()

    async def load(self, session_id: str) -> SessionData | None:
        keys = self.keys(session_id)
        async with self._guard("load"):
            pipe = self._pipeline()
            pipe.get(keys.state)
            pipe.lrange(keys.memory, 0, -1)
            pipe.lrange(keys.history, 0, -1)
            pipe.hget(keys.meta, "owner")
            for key in keys.data:
                pipe.pexpire(key, self._ttl_ms)
            state, memory, history, owner, *_ = await pipe.execute()
        if state is None and not memory and not history and owner is None:
            return None
        return SessionData(session_id, state, list(memory),
                           [_load_turn(session_id, i, raw) for i, raw in enumerate(history)],
                           owner.decode() if owner is not None else None)

    async def save_turn(self, session_id: str, *, state: bytes, memory_added: list[bytes],
                        turns: list[dict[str, Any]], max_memory: int) -> None:
        if max_memory < 0:
            raise ValueError("max_memory must not be negative")
        write = TurnWrite(bytes(state), [bytes(m) for m in memory_added], list(turns),
                          max_memory)
        async with self._guard("save_turn"):
            pipe = self._pipeline()
            self._queue_write(pipe, self.keys(session_id), write)
            await pipe.execute()

    def _queue_write(self, pipe: Any, keys: _Keys, write: TurnWrite) -> None:
        """Queue the commands of :meth:`save_turn` on ``pipe``."""
        encoded = [json.dumps(turn, ensure_ascii=False, separators=(",", ":"),
                              allow_nan=False).encode() for turn in write.turns]
        pipe.set(keys.state, write.state, px=self._ttl_ms)
        if write.memory_added:
            pipe.rpush(keys.memory, *write.memory_added)
        if write.max_memory:
            pipe.ltrim(keys.memory, -write.max_memory, -1)
        else:
            pipe.delete(keys.memory)
        if encoded:
            pipe.rpush(keys.history, *encoded)
        for key in keys.data[1:]:
            pipe.pexpire(key, self._ttl_ms)

    async def delete(self, session_id: str) -> None:
        keys = self.keys(session_id)
        async with self._guard("delete"):
            await self._client.delete(*keys.data, keys.cancel)

    def lock(self, session_id: str) -> RedisLock:
        return RedisLock(self, session_id)

    async def begin_turn(self, session_id: str, *, message_id: str | None = None,
                         owner: str | None = None) -> RedisTurn:
        """One Lua script: check the owner, claim ``message_id``, take the lock, renew
        the TTLs and read state, memory, the stream's tail and whether the message was
        cancelled already. A busy lock is retried as :meth:`lock` does (without
        claiming again, the owner checked each time). The lock is renewed until the
        turn ends."""
        keys = self.keys(session_id)
        lock = RedisLock(self, session_id)
        args: list[Any] = [lock.token, lock.lease_ms, self._ttl_ms, owner or ""]
        if message_id is not None:
            args.append(message_id)
        reply: list[Any] = []

        async def attempt() -> bool:
            async with self._guard("begin_turn"):
                reply[:] = await self._client.eval(
                    _BEGIN_TURN, 8, keys.lock, keys.msgids, keys.state, keys.memory,
                    keys.stream, keys.history, keys.meta, keys.cancel, *args)
            if reply[0] in (3, 4):
                check_owner(session_id, owner, None if reply[0] == 3 else "")
            if reply[0] == 0:
                raise DuplicateMessage(f"message {message_id!r} was already taken in this "
                                       "session; resume to replay its reply")
            del args[4:]  # claimed: a retry only waits for the lock
            return reply[0] == 2

        await lock.acquire(attempt)
        _, state, memory, tail, cancelled = reply
        lock.start_renewal()
        return RedisTurn(self, lock, message_id, state=state, memory=memory,
                         tail=_entry(_fields(tail[0])) if tail else None,
                         cancel_requested=bool(cancelled))

    async def claim_session(self, session_id: str, owner: str) -> str:
        if not owner:
            raise ValueError("owner must be a non-empty string")
        keys = self.keys(session_id)
        async with self._guard("claim_session"):
            pipe = self._pipeline()
            pipe.hsetnx(keys.meta, "owner", owner)
            pipe.hget(keys.meta, "owner")
            for key in keys.data:
                pipe.pexpire(key, self._ttl_ms)
            _, current, *_ = await pipe.execute()
        return current.decode()

    async def claim_message(self, session_id: str, message_id: str) -> bool:
        keys = self.keys(session_id)
        async with self._guard("claim_message"):
            pipe = self._pipeline()
            pipe.sadd(keys.msgids, message_id)
            pipe.pexpire(keys.msgids, self._ttl_ms)
            added, _ = await pipe.execute()
        return added == 1

    async def release_message(self, session_id: str, message_id: str) -> None:
        """Also forgets a cancel of the message, so the client's retry runs."""
        keys = self.keys(session_id)
        async with self._guard("release_message"):
            pipe = self._pipeline()
            pipe.srem(keys.msgids, message_id)
            pipe.srem(keys.cancel, f"m:{message_id}")
            await pipe.execute()

    async def request_cancel(self, session_id: str, message_id: str | None = None) -> None:
        """One Lua script: add the cancel to the session's ``cancel`` set."""
        keys = self.keys(session_id)
        args = [self._cancel_ttl_ms] if message_id is None else [self._cancel_ttl_ms,
                                                                  message_id]
        async with self._guard("request_cancel"):
            await self._client.eval(_REQUEST_CANCEL, 2, keys.cancel, keys.lock, *args)

    async def append_stream(self, session_id: str, entries: Sequence[StreamEntry]) -> None:
        """Append in one transaction (XADD ... MAXLEN ~ cap, then PEXPIRE).

        Redis refuses an id not above the stream's last one; that becomes ValueError.
        The caller holds the session lock, so there is one writer and that only happens
        when the caller numbered entries wrongly.
        """
        if not entries:
            return
        check_stream_entries(entries)
        async with self._guard("append_stream"):
            pipe = self._pipeline()
            self._queue_append(pipe, self.keys(session_id), entries)
            await self._execute(pipe, session_id, entries)

    def _queue_append(self, pipe: Any, keys: _Keys, entries: Sequence[StreamEntry]) -> None:
        """Queue the commands of :meth:`append_stream` on ``pipe``."""
        for entry in entries:
            fields = {"r": entry.response_id, "k": entry.kind, "t": entry.text}
            if entry.data:
                fields["d"] = json.dumps(dict(entry.data), ensure_ascii=False,
                                         separators=(",", ":"), allow_nan=False)
            pipe.xadd(keys.stream, fields, id=f"{entry.seq}-0",
                      maxlen=self._stream_max_len, approximate=True)
        pipe.pexpire(keys.stream, self._ttl_ms)

    @staticmethod
    async def _execute(pipe: Any, session_id: str, entries: Sequence[StreamEntry]) -> list[Any]:
        """Run a pipeline holding stream appends; a refused seq becomes ValueError."""
        try:
            return await pipe.execute()
        except redis.exceptions.ResponseError as exc:
            raise _refused(exc, session_id, entries) from exc

    async def read_stream(self, session_id: str, after_seq: int = 0, *,
                          limit: int | None = None) -> list[StreamEntry]:
        keys = self.keys(session_id)
        async with self._guard("read_stream"):
            rows = await self._client.xrange(keys.stream, min=f"{after_seq + 1}-0", max="+",
                                             count=limit)
        return [_entry(row) for row in rows]

    async def wait_stream(self, session_id: str, after_seq: int, *,
                          timeout: float) -> list[StreamEntry]:
        """XREAD BLOCK for up to ``timeout`` (cut to 80% of the socket timeout, so the
        wait never looks like a dead server). Holds one pool connection while waiting."""
        keys = self.keys(session_id)
        if self._socket_timeout:
            timeout = min(timeout, 0.8 * self._socket_timeout)
        async with self._guard("wait_stream"):
            reply = await self._client.xread({keys.stream: f"{after_seq}-0"},
                                             block=max(1, int(timeout * 1000)))
        if not reply:
            return []
        if isinstance(reply, dict):  # RESP3 shape
            rows = next(iter(reply.values()))[0]
        else:
            rows = reply[0][1]
        return [_entry(row) for row in rows]

    async def stream_tail(self, session_id: str) -> StreamEntry | None:
        keys = self.keys(session_id)
        async with self._guard("stream_tail"):
            rows = await self._client.xrevrange(keys.stream, max="+", min="-", count=1)
        return _entry(rows[0]) if rows else None


class RedisLock(contextlib.AbstractAsyncContextManager[None]):
    """The turn lock of one session: ``SET NX PX`` with a random token, released and
    renewed by token-checking Lua scripts, renewed in the background while held."""

    def __init__(self, store: RedisStore, session_id: str) -> None:
        self._store = store
        self._key = store.keys(session_id).lock
        self.session_id = session_id
        self.token = secrets.token_hex(16)
        self._renewer: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def lease_ms(self) -> int:
        """The lease in milliseconds."""
        return max(1, int(self._store.lock_lease * 1000))

    async def _take(self) -> bool:
        """One ``SET NX PX`` try."""
        async with self._store._guard("lock"):
            return bool(await self._store.client.set(self._key, self.token, nx=True,
                                                     px=self.lease_ms))

    async def acquire(self, attempt: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Take the lock, waiting with backoff; :class:`SessionBusy` after ``lock_wait``.

        ``attempt`` replaces the plain ``SET NX PX``: one try that sets this lock's token
        and says whether it got the lock.
        """
        attempt = attempt or self._take
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._store.lock_wait
        delay = 0.005
        while True:
            if await attempt():
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise SessionBusy(
                    f"session {self.session_id!r} is busy: another turn held it for more "
                    f"than {self._store.lock_wait}s")
            await asyncio.sleep(min(remaining, delay * random.uniform(0.5, 1.0)))
            delay = min(delay * 2, 0.1)

    async def renew(self) -> bool:
        """Extend the lease; ``False`` if the lock is no longer ours."""
        async with self._store._guard("lock renewal"):
            return bool(await self._store.client.eval(_RENEW, 1, self._key, self.token,
                                                      self.lease_ms))

    async def release(self) -> bool:
        """Drop the lock if it is still ours; ``False`` if it was not."""
        async with self._store._guard("lock release"):
            return bool(await self._store.client.eval(_RELEASE, 1, self._key, self.token))

    async def _renew_forever(self) -> None:
        interval = self._store.lock_lease / 3
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            try:
                if not await self.renew():
                    log.warning("lost the lock of session %r: its lease ran out while a "
                                "turn was running", self.session_id)
                    return
            except StoreUnavailable as exc:
                log.warning("could not renew the lock of session %r: %s", self.session_id, exc)

    def start_renewal(self) -> None:
        """Renew the lease in the background until :meth:`stop_renewal`."""
        self._stop = asyncio.Event()
        self._renewer = asyncio.create_task(self._renew_forever(),
                                            name=f"mmchat-lock-renewal:{self.session_id}")

    async def stop_renewal(self) -> None:
        """Stop renewing, and wait until no renewal is in flight.

        The event ends the loop; cancelling only cuts short a renewal in flight. A
        cancellation alone is not enough: Python 3.11's ``asyncio.wait_for`` (which
        redis-py writes through) drops one that lands as its write completes, and the
        lock was then renewed forever while this waited.
        """
        renewer, self._renewer = self._renewer, None
        if renewer is None:
            return
        self._stop.set()
        renewer.cancel()
        await asyncio.wait([renewer])
        if not renewer.cancelled() and renewer.exception() is not None:
            log.warning("renewing the lock of session %r failed: %r", self.session_id,
                        renewer.exception())

    def check_released(self, ours: bool) -> None:
        """Log a release that found the lock no longer ours."""
        if not ours:
            log.warning("the lock of session %r had already passed to someone else "
                        "when the turn ended", self.session_id)

    async def release_quietly(self) -> None:
        """:meth:`release`, logging instead of raising when Redis is unreachable: the
        lease runs out by itself, and failing here would hide the turn's outcome."""
        try:
            self.check_released(await self.release())
        except StoreUnavailable as exc:
            log.warning("could not release the lock of session %r: %s", self.session_id, exc)

    async def __aenter__(self) -> None:
        await self.acquire()
        self.start_renewal()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop_renewal()
        await self.release_quietly()


def _refused(exc: redis.exceptions.ResponseError, session_id: str,
             entries: Sequence[StreamEntry]) -> Exception:
    """:class:`_SeqRefused` if Redis refused a stream entry's id, else ``exc``."""
    if not entries or "equal or smaller" not in str(exc):
        return exc
    return _SeqRefused(f"stream seq {entries[0].seq} does not follow the stream's last "
                       f"seq in session {session_id!r}")


class _Appends:
    """The reply-event appends of held turns, sent together: every turn that appends
    in one pass of the event loop (the replies of one decode step do) shares one
    pipeline, so a batch of concurrent replies costs one round trip per token instead of
    one each. A turn's commands are its own ``XADD``s, ``PEXPIRE`` and ``SMISMEMBER``; a
    turn's lock keeps other writers off its keys, so they need no ``MULTI``. A command
    that fails fails only its own turn's append."""

    #: At most this many appends go in one pipeline.
    MAX_BATCH = 256

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._pending: list[tuple[_Keys, list[StreamEntry], list[str], asyncio.Future]] = []
        self._sending: set[asyncio.Task[None]] = set()

    def add(self, keys: _Keys, entries: list[StreamEntry], cancels: list[str]
            ) -> asyncio.Future[bool]:
        """Queue one turn's append; the future says whether one of ``cancels`` is in the
        session's cancel set, or raises what Redis answered to the turn's commands."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)  # after every task woken in this pass
        self._pending.append((keys, entries, cancels, future))
        if len(self._pending) >= self.MAX_BATCH:
            self._flush()
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[_Keys, list[StreamEntry], list[str],
                                            asyncio.Future]]) -> None:
        store = self._store
        try:
            pipe = store._client.pipeline(transaction=False)
            for keys, entries, cancels, _ in batch:
                store._queue_append(pipe, keys, entries)
                pipe.smismember(keys.cancel, cancels)
            results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # the round trip failed: every append did
            for *_, future in batch:
                if not future.done():
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:  # this task was cancelled (the loop is closing)
                        future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for _, entries, _, future in batch:
            end = start + len(entries) + 2  # the XADDs, PEXPIRE, SMISMEMBER
            mine, start = results[start:end], end
            if future.done():  # its turn stopped waiting
                continue
            error = next((r for r in mine if isinstance(r, Exception)), None)
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(any(mine[-1]))


class RedisTurn(SessionTurn):
    """A turn of :meth:`RedisStore.begin_turn`. Appending is one round trip: the stream
    entries and the question whether this turn's reply was cancelled. Ending it is one:
    the write, the stream entries, forgetting the turn's cancels and the token-checked
    lock release in one pipeline (one ``MULTI``/``EXEC``; on Cluster a plain pipeline to
    the session's node)."""

    def __init__(self, store: RedisStore, lock: RedisLock, message_id: str | None,
                 **loaded: Any) -> None:
        super().__init__(lock.session_id, **loaded)
        self._store = store
        self._lock = lock
        #: The members of the ``cancel`` set that mean this turn.
        self._cancels = [f"l:{lock.token}"]
        if message_id is not None:
            self._cancels.append(f"m:{message_id}")

    async def _append(self, entries: list[StreamEntry]) -> bool:
        store = self._store
        async with store._guard("append_stream"):
            try:
                return await store._appends.add(store.keys(self.session_id), entries,
                                                self._cancels)
            except redis.exceptions.ResponseError as exc:
                raise _refused(exc, self.session_id, entries) from exc

    async def _finish(self, write: TurnWrite | None, entries: list[StreamEntry]) -> None:
        store, lock = self._store, self._lock
        keys = store.keys(self.session_id)
        await lock.stop_renewal()
        try:
            async with store._guard("end_turn"):
                pipe = store._pipeline()
                if write is not None:
                    store._queue_write(pipe, keys, write)
                if entries:
                    store._queue_append(pipe, keys, entries)
                pipe.srem(keys.cancel, *self._cancels)
                pipe.eval(_RELEASE, 1, keys.lock, lock.token)
                results = await store._execute(pipe, self.session_id, entries)
        except _SeqRefused:  # the rest of the pipeline ran
            raise
        except BaseException:
            await lock.release_quietly()  # in case the pipeline did not run
            raise
        lock.check_released(bool(results[-1]))


def _load_turn(session_id: str, index: int, raw: bytes) -> dict[str, Any]:
    try:
        turn = json.loads(raw)
    except ValueError:
        turn = None
    if not isinstance(turn, dict):
        raise StateError(f"session {session_id!r}: history entry {index} is not a JSON object")
    return turn


def _fields(row: list[Any]) -> tuple[bytes, dict[bytes, bytes]]:
    """A stream entry as a Lua script returns it (a flat field list) as XRANGE gives it."""
    entry_id, flat = row
    return entry_id, dict(zip(flat[::2], flat[1::2], strict=True))


def _entry(row: tuple[bytes, dict[bytes, bytes]]) -> StreamEntry:
    entry_id, fields = row
    seq = int(entry_id.split(b"-", 1)[0])
    data = json.loads(fields[b"d"]) if b"d" in fields else {}
    return StreamEntry(seq, fields[b"r"].decode(), fields[b"k"].decode(),
                       fields.get(b"t", b"").decode(), data)
