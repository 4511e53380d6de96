"""The Redis session store: sessions, the reply stream, claims and cancels."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import redis.exceptions

from ...config import SessionsConfig
from ...errors import (
    ConfigError,
    DuplicateMessage,
    SessionLost,
    StateError,
    StoreUnavailable,
)
from ...sessions import (
    SessionData,
    SessionHead,
    SessionStore,
    StreamEntry,
    TurnWrite,
    check_owner,
    check_stream_entries,
    validate_session_id,
)
from ...subjects import Erased, indexed
from . import lua, owners
from .appends import Appends, Scripts
from .client import connect
from .keys import Keys, owner_index
from .lock import Attempt, RedisLock
from .turn import RedisTurn, refused
from .url import parse_redis_url

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

class _Guard:
    """See :meth:`RedisStore._guard` (a plain class: it is around every call of every
    turn, where a generator context manager cost several times more)."""

    __slots__ = ("_where", "_action")

    def __init__(self, where: str, action: str) -> None:
        self._where, self._action = where, action

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: Any) -> None:
        if exc is not None and isinstance(exc, UNAVAILABLE_ERRORS):
            raise StoreUnavailable(
                f"Redis session store at {self._where} is unavailable "
                f"({self._action}): {type(exc).__name__}: {exc}") from exc


class RedisStore(SessionStore):
    """A :class:`SessionStore` in Redis (single server, Cluster or Sentinel).

    Round trips: :meth:`load`, :meth:`save_turn`, :meth:`claim_session`,
    :meth:`claim_message` and :meth:`append_stream` are one each; taking an uncontended
    lock is one and releasing it one; :meth:`begin_turn` (uncontended) is one and ending
    its turn one.

    The turn lock (:class:`RedisLock`) is a lease of ``lock_lease`` seconds (default
    5), renewed every third of it while held, so a crashed process blocks its sessions
    for at most one lease. Waiters queue for it in arrival order and give up with
    :class:`SessionBusy` after ``lock_wait`` seconds (default 10: longer than a lease,
    so the first turn after a process died waits out its lease and runs). A cancel
    that no turn has taken up is kept for ``cancel_ttl`` seconds (default 60).
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "mmchat",
                 ttl_seconds: float = 86_400, max_connections: int = 32,
                 pool_timeout: float = 5.0, socket_timeout: float = 5.0,
                 connect_timeout: float = 2.0, lock_lease: float = 5.0,
                 lock_wait: float = 10.0, stream_max_len: int = 2048,
                 health_check_interval: float = 1.0, cancel_ttl: float = 60.0,
                 history_max_len: int = 1024, message_ids_max_len: int = 1024) -> None:
        if not prefix or any(c in prefix for c in "{} "):
            raise ConfigError(f"sessions.prefix = {prefix!r} is not allowed: "
                              "use a non-empty string without braces or spaces")
        if (ttl_seconds <= 0 or lock_lease <= 0 or lock_wait < 0 or stream_max_len < 1
                or cancel_ttl <= 0 or history_max_len < 1 or message_ids_max_len < 1):
            raise ConfigError("Redis store: ttl, lock lease, stream length and cancel ttl "
                              "must be positive")
        if lock_lease >= lock_wait:
            log.warning("sessions.lock_lease_seconds (%g) is not below lock_wait_seconds "
                        "(%g): after a node dies, the first turn of its sessions fails "
                        "with session_busy", lock_lease, lock_wait)
        self._url = parse_redis_url(url)
        self._prefix = prefix
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self._cancel_ttl_ms = max(1, int(cancel_ttl * 1000))
        self._socket_timeout = socket_timeout
        self.lock_lease = lock_lease
        self.lock_wait = lock_wait
        self.stream_max_len = stream_max_len
        self.history_max_len = history_max_len
        self.message_ids_max_len = message_ids_max_len
        #: Script calls of concurrent turns (begin, append, end), one pipeline a pass.
        self.scripts = Scripts(self)
        self.appends = Appends(self, self.scripts)
        self._client, self._sentinel = connect(
            self._url, max_connections=max_connections, pool_timeout=pool_timeout,
            socket_timeout=socket_timeout, connect_timeout=connect_timeout,
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
            ("history_max_len", "history_max_len"),
            ("message_ids_max_len", "message_ids_max_len"),
        ) if hasattr(config, setting)}
        return cls(config.url, prefix=config.prefix, ttl_seconds=config.ttl_seconds,
                   max_connections=config.max_connections, **optional)

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

    @property
    def prefix(self) -> str:
        """What every key of this store starts with (``sessions.prefix``)."""
        return self._prefix

    @property
    def clustered(self) -> bool:
        """Whether the store is a Redis Cluster (whose client pipelines no scripts)."""
        return self._url.kind == "cluster"

    def keys(self, session_id: str) -> Keys:
        """The Redis keys of one session."""
        return Keys.of(self._prefix, session_id)

    def _guard(self, action: str) -> _Guard:
        """``async with self._guard(action):`` Redis's connection errors and timeouts
        raised as :class:`StoreUnavailable`."""
        return _Guard(self._url.display, action)

    async def ping(self) -> None:
        async with self._guard("ping"):
            await self._client.ping()

    async def probe(self, node: str) -> None:
        """Write ``{prefix}:node:<node>:probe`` with a 10 s TTL: Redis full under a
        ``noeviction`` policy refuses it (OOM), as it would refuse a turn."""
        if not node or any(c in node for c in "{} "):
            raise ValueError(f"bad node name {node!r}")
        async with self._guard("write probe"):
            await self._client.set(f"{self._prefix}:node:{node}:probe", "1", px=10_000)

    async def load_scripts(self) -> None:
        """Load every Lua script now, so no later call finds one missing (a call that
        does loads it itself, at the cost of two more round trips)."""
        async with self._guard("load scripts"):
            for name in lua.NAMES:
                await lua.load(self._client, name)

    async def close(self) -> None:
        with contextlib.suppress(*UNAVAILABLE_ERRORS):
            await self._client.aclose()
            if self._sentinel is not None:
                for client in self._sentinel.sentinels:
                    await client.aclose()

    async def load(self, session_id: str) -> SessionData | None:
        """One Lua script: check the session whole (else delete what is left and raise
        :class:`SessionLost`), renew its TTLs and read it."""
        keys = self.keys(session_id)
        async with self._guard("load"):
            found = await lua.run(self._client, "load", list(keys.data), [self.ttl_ms])
        if found[0] == -1:
            raise _lost(session_id)
        _, state, memory, history, owner = found
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

    def _queue_write(self, pipe: Any, keys: Keys, write: TurnWrite) -> None:
        """Queue the commands of :meth:`save_turn` on ``pipe``."""
        encoded = [json.dumps(turn, ensure_ascii=False, separators=(",", ":"),
                              allow_nan=False).encode() for turn in write.turns]
        pipe.set(keys.state, write.state, px=self.ttl_ms)
        if write.memory_added:
            pipe.rpush(keys.memory, *write.memory_added)
        if write.max_memory:
            pipe.ltrim(keys.memory, -write.max_memory, -1)
        else:
            pipe.delete(keys.memory)
        flags = {"s": 1}
        if encoded:
            pipe.rpush(keys.history, *encoded)
            pipe.ltrim(keys.history, -self.history_max_len, -1)
            flags["y"] = 1
        if write.memory_added and write.max_memory:
            flags["m"] = 1
        elif not write.max_memory:
            pipe.hdel(keys.meta, "m")
        pipe.hset(keys.meta, mapping=flags)
        for key in keys.data[1:]:
            pipe.pexpire(key, self.ttl_ms)

    async def delete(self, session_id: str) -> None:
        keys = self.keys(session_id)
        async with self._guard("delete"):
            await self._client.delete(*keys.data, keys.msgids_old, keys.cancel)

    def lock(self, session_id: str) -> RedisLock:
        return RedisLock(self, session_id)

    async def begin_turn(self, session_id: str, *, message_id: str | None = None,
                         owner: str | None = None) -> RedisTurn:
        """One Lua script: check the owner, claim ``message_id``, take the lock in turn
        (or queue for it), renew the TTLs and read state, memory, the stream's tail and
        whether the message was cancelled already. A waiter tries again as :meth:`lock`
        does (without claiming again, the owner checked each time). The lock is renewed
        until the turn ends; the turn carries the grant's fencing token."""
        lock = RedisLock(self, session_id)
        keys = lock.keys
        args: list[Any] = [lock.token, lock.lease_ms, self.ttl_ms, owner or "",
                           int(lock.PLACE_KEPT * 1000), keys.wake_prefix]
        if message_id is not None:
            args += [message_id, self.message_ids_max_len]
        reply: list[Any] = []

        async def attempt() -> Attempt:
            async with self._guard("begin_turn"):
                reply[:] = await self.scripts.run(
                    "begin_turn",
                    [keys.lock, keys.msgids, keys.state, keys.memory, keys.stream,
                     keys.history, keys.meta, keys.cancel, keys.queue, keys.waiters,
                     keys.msgids_old], args)
            if reply[0] == 5:
                raise SessionLost(f"session {session_id!r} lost part of its data in the "
                                  "store, so what was left was deleted; start a new "
                                  "session (hello without session_id)")
            if reply[0] in (3, 4):
                check_owner(session_id, owner, None if reply[0] == 3 else "")
            if reply[0] == 0:
                raise DuplicateMessage(f"message {message_id!r} was already taken in this "
                                       "session; resume to replay its reply")
            del args[6:]  # claimed: a retry only waits for the lock
            if reply[0] == 1:
                return Attempt(False, int(reply[1]), int(reply[2]))
            lock.fence = int(reply[5])
            return Attempt(True)

        await lock.acquire(attempt)
        _, state, memory, tail, cancelled, _ = reply
        lock.start_renewal()
        return RedisTurn(self, lock, message_id, state=state, memory=memory,
                         tail=_entry(_fields(tail[0])) if tail else None,
                         cancel_requested=bool(cancelled))

    async def head(self, session_id: str) -> SessionHead | None:
        """One Lua script: check that the session is whole (else delete what is left
        and raise :class:`SessionLost`), renew its TTLs and read its owner; nothing of
        its history, memory or stream is read."""
        keys = self.keys(session_id)
        async with self._guard("head"):
            found = await self.scripts.run("resume", list(keys.data), [self.ttl_ms])
        if found[0] == -1:
            raise _lost(session_id)
        if found[0] == 0:
            return None
        owner = found[1] if len(found) > 1 else None
        return SessionHead(session_id, owner.decode() if owner is not None else None)

    async def claim_session(self, session_id: str, owner: str) -> str:
        if not owner:
            raise ValueError("owner must be a non-empty string")
        keys = self.keys(session_id)
        async with self._guard("claim_session"):
            pipe = self._pipeline()
            pipe.hsetnx(keys.meta, "owner", owner)
            pipe.hget(keys.meta, "owner")
            for key in keys.data:
                pipe.pexpire(key, self.ttl_ms)
            if indexed(owner):  # an id another owner holds is dropped when read
                pipe.sadd(owner_index(self._prefix, owner), session_id)
                pipe.scard(owner_index(self._prefix, owner))
            _, current, *rest = await pipe.execute()
        if indexed(owner) and owners.due_for_pruning(rest[-1]):
            await owners.owned_sessions(self, owner)
        return current.decode()

    async def owned_sessions(self, owner: str) -> list[str]:
        """See :mod:`.owners`: expired sessions leave the index as it is read."""
        return await owners.owned_sessions(self, owner)

    async def erase_owned(self, owner: str) -> Erased:
        """See :mod:`.owners`: one script per session, under its turn lock."""
        return await owners.erase_owned(self, owner)

    async def claim_message(self, session_id: str, message_id: str) -> bool:
        """One Lua script (``claim.lua``): the newest ``message_ids_max_len`` ids at least
        are remembered, at most twice that."""
        keys = self.keys(session_id)
        async with self._guard("claim_message"):
            added = await lua.run(self._client, "claim",
                                  [keys.msgids, keys.msgids_old, keys.meta],
                                  [message_id, self.message_ids_max_len, self.ttl_ms])
        return added == 1

    async def release_message(self, session_id: str, message_id: str) -> None:
        """Also forgets a cancel of the message, so the client's retry runs."""
        keys = self.keys(session_id)
        async with self._guard("release_message"):
            await lua.run(self._client, "unclaim",
                          [keys.msgids, keys.msgids_old, keys.meta, keys.cancel],
                          [message_id])

    async def set_alias(self, alias: str, session_id: str) -> None:
        """``SET {prefix}:alias:<alias> <session_id>`` with the sessions' TTL."""
        validate_session_id(session_id)
        async with self._guard("set_alias"):
            await self._client.set(self._alias_key(alias), session_id, px=self.ttl_ms)

    async def take_alias(self, alias: str) -> str | None:
        """``GETDEL``: of callers racing for one alias, one gets the session."""
        async with self._guard("take_alias"):
            found = await self._client.getdel(self._alias_key(alias))
        return None if found is None else (found.decode() if isinstance(found, bytes)
                                           else str(found))

    def _alias_key(self, alias: str) -> str:
        if not alias or any(c in alias for c in "{} "):
            raise ValueError(f"bad alias {alias!r}")
        return f"{self._prefix}:alias:{alias}"

    async def request_cancel(self, session_id: str, message_id: str | None = None) -> None:
        """One Lua script: add the cancel to the session's ``cancel`` set."""
        keys = self.keys(session_id)
        args = [self._cancel_ttl_ms] if message_id is None else [self._cancel_ttl_ms,
                                                                  message_id]
        async with self._guard("request_cancel"):
            await lua.run(self._client, "request_cancel", [keys.cancel, keys.lock], args)

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

    def _queue_append(self, pipe: Any, keys: Keys, entries: Sequence[StreamEntry]) -> None:
        """Queue the commands of :meth:`append_stream` on ``pipe``."""
        for entry in entries:
            fields = {"r": entry.response_id, "k": entry.kind, "t": entry.text}
            if entry.data:
                fields["d"] = json.dumps(dict(entry.data), ensure_ascii=False,
                                         separators=(",", ":"), allow_nan=False)
            pipe.xadd(keys.stream, fields, id=f"{entry.seq}-0",
                      maxlen=self.stream_max_len, approximate=True)
        pipe.pexpire(keys.stream, self.ttl_ms)
        pipe.hset(keys.meta, "q", 1)

    @staticmethod
    async def _execute(pipe: Any, session_id: str, entries: Sequence[StreamEntry]) -> list[Any]:
        """Run a pipeline holding stream appends; a refused seq becomes ValueError."""
        try:
            return await pipe.execute()
        except redis.exceptions.ResponseError as exc:
            raise refused(exc, session_id, entries) from exc

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


def _lost(session_id: str) -> SessionLost:
    log.info("session %s had lost a part in Redis; what was left is deleted", session_id)
    return SessionLost(f"session {session_id!r} lost part of its data in the store; "
                       "what was left is deleted")


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
