"""Sessions in this process's memory: the embedded default.

Records are kept in the order they were last touched (an ordered dict, oldest first),
so freeing what is no longer wanted costs nothing per session still alive: every call
that touches or creates a record first drops, from the front, the records whose TTL ran
out and then, while there are more than ``max_sessions``, the least recently used ones.
A session is dropped whole (state, memory, history, owner, stream and message ids go
together, and it leaves its subject's index at once), so a client that comes back to
it is told ``unknown_session``, as for an expired one. A session whose turn holds its
lock is never dropped: it counts as used.
No timer and no thread: a store nobody calls holds what it held.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import SessionBusy
from ..sessions import (
    SessionData,
    SessionHead,
    SessionStore,
    StreamEntry,
    check_stream_entries,
    validate_session_id,
)
from ..subjects import Erased, indexed

__all__ = ["MemoryStore"]


@dataclass
class _Record:
    data: SessionData
    touched: float
    stream: collections.deque[StreamEntry]
    #: Oldest first (a dict keeps insertion order), trimmed to ``message_ids_max_len``.
    message_ids: dict[str, None] = field(default_factory=dict)
    #: Set (and replaced) whenever the stream grows, to wake :meth:`MemoryStore.wait_stream`.
    grew: asyncio.Event = field(default_factory=asyncio.Event)

    def exists(self) -> bool:
        data = self.data
        return bool(data.state is not None or data.memory or data.history or data.owner)


class MemoryStore(SessionStore):
    """Sessions in this process's memory, with a sliding TTL. The embedded default.

    ``ttl_seconds`` frees a session that long after it was last used, without it being
    looked up again; ``max_sessions`` bounds the sessions held (the least recently used
    goes first); ``lock_timeout`` bounds the wait for a session's lock (then
    :class:`SessionBusy`); ``stream_max_len`` bounds the reply events kept per session
    for resume, ``history_max_len`` the history entries (the newest are kept) and
    ``message_ids_max_len`` the client message ids remembered against retries.
    """

    def __init__(self, *, ttl_seconds: float = 86_400,
                 clock: Callable[[], float] = time.monotonic, lock_timeout: float = 10.0,
                 stream_max_len: int = 2048, max_sessions: int = 10_000,
                 history_max_len: int = 1024, message_ids_max_len: int = 1024) -> None:
        if min(stream_max_len, history_max_len, message_ids_max_len) < 1:
            raise ValueError("stream_max_len, history_max_len and message_ids_max_len "
                             "must be at least 1")
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self._ttl = ttl_seconds
        self._clock = clock
        self._lock_timeout = lock_timeout
        self._stream_max_len = stream_max_len
        self._max_sessions = max_sessions
        self._history_max_len = history_max_len
        self._message_ids_max_len = message_ids_max_len
        #: Oldest touch first.
        self._sessions: collections.OrderedDict[str, _Record] = collections.OrderedDict()
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        #: owner -> ids of the sessions it claimed (subjects only), oldest claim first.
        self._owned: dict[str, dict[str, None]] = {}
        #: alias -> (session id, when set), oldest first; bounded as the sessions are.
        self._aliases: collections.OrderedDict[str, tuple[str, float]] = (
            collections.OrderedDict())

    @property
    def held(self) -> int:
        """How many session records are held now (expired ones not yet swept included)."""
        return len(self._sessions)

    def _sweep(self, now: float) -> None:
        """Drop expired records from the front, then the least recently used beyond
        ``max_sessions``; a record whose lock is in use moves to the back instead."""
        sessions = self._sessions
        skipped = 0
        while sessions and skipped < len(sessions):
            session_id, record = next(iter(sessions.items()))
            expired = now - record.touched > self._ttl
            if not expired and len(sessions) <= self._max_sessions:
                return
            if session_id in self._locks:
                record.touched = now
                sessions.move_to_end(session_id)
                skipped += 1
                continue
            self._drop(session_id)

    def _drop(self, session_id: str) -> _Record | None:
        """Forget a session, and take it out of its owner's index."""
        record = self._sessions.pop(session_id, None)
        owner = None if record is None else record.data.owner
        if owner is not None and owner in self._owned:
            ids = self._owned[owner]
            ids.pop(session_id, None)
            if not ids:
                del self._owned[owner]
        return record

    def _record(self, session_id: str, *, create: bool = False,
                touch: bool = True) -> _Record | None:
        validate_session_id(session_id)
        now = self._clock()
        record = self._sessions.get(session_id)
        if record is not None and now - record.touched > self._ttl:
            self._drop(session_id)
            record = None
        if record is None:
            if not create:
                return None
            record = _Record(SessionData(session_id), now,
                             collections.deque(maxlen=self._stream_max_len))
            self._sessions[session_id] = record
            touch = True
        if touch:
            record.touched = now
            self._sessions.move_to_end(session_id)
            self._sweep(now)
        return record

    async def load(self, session_id: str) -> SessionData | None:
        record = self._record(session_id)
        if record is None or not record.exists():
            return None
        data = record.data
        return SessionData(session_id, data.state, list(data.memory),
                           [dict(t) for t in data.history], data.owner)

    async def head(self, session_id: str) -> SessionHead | None:
        record = self._record(session_id)
        if record is None or not record.exists():
            return None
        return SessionHead(session_id, record.data.owner)

    async def save_turn(self, session_id: str, *, state: bytes, memory_added: list[bytes],
                        turns: list[dict[str, Any]], max_memory: int) -> None:
        if max_memory < 0:
            raise ValueError("max_memory must not be negative")
        data = self._record(session_id, create=True).data
        data.state = bytes(state)
        memory = data.memory + [bytes(m) for m in memory_added]
        data.memory = memory[-max_memory:] if max_memory else []
        data.history.extend(dict(t) for t in turns)
        del data.history[:-self._history_max_len]

    async def delete(self, session_id: str) -> None:
        validate_session_id(session_id)
        self._drop(session_id)

    @contextlib.asynccontextmanager
    async def lock(self, session_id: str) -> AsyncIterator[None]:
        validate_session_id(session_id)
        lock, users = self._locks.get(session_id) or (asyncio.Lock(), 0)
        self._locks[session_id] = (lock, users + 1)
        try:
            try:
                await asyncio.wait_for(lock.acquire(), self._lock_timeout)
            except TimeoutError:
                raise SessionBusy(
                    f"session {session_id!r} is busy: another turn held it for more than "
                    f"{self._lock_timeout}s") from None
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[session_id]
            if users == 1:
                del self._locks[session_id]
            else:
                self._locks[session_id] = (lock, users - 1)

    async def claim_session(self, session_id: str, owner: str) -> str:
        if not owner:
            raise ValueError("owner must be a non-empty string")
        data = self._record(session_id, create=True).data
        if data.owner is None:
            data.owner = owner
            if indexed(owner):
                self._owned.setdefault(owner, {})[session_id] = None
        return data.owner

    async def owned_sessions(self, owner: str) -> list[str]:
        ids = [sid for sid in list(self._owned.get(owner, ()))
               if (record := self._record(sid, touch=False)) is not None
               and record.data.owner == owner]
        return sorted(ids)

    async def erase_owned(self, owner: str) -> Erased:
        erased = Erased()
        for session_id in list(self._owned.get(owner, ())):
            async with self.lock(session_id):
                record = self._record(session_id, touch=False)
                if record is None or record.data.owner != owner:
                    continue
                self._drop(session_id)
                data = record.data
                erased += Erased(1, len(data.history), len(data.memory), len(record.stream),
                                 len(record.message_ids))
        self._owned.pop(owner, None)
        return erased

    async def claim_message(self, session_id: str, message_id: str) -> bool:
        ids = self._record(session_id, create=True).message_ids
        if message_id in ids:
            return False
        ids[message_id] = None
        while len(ids) > self._message_ids_max_len:
            del ids[next(iter(ids))]
        return True

    async def release_message(self, session_id: str, message_id: str) -> None:
        record = self._record(session_id, touch=False)
        if record is not None:
            record.message_ids.pop(message_id, None)

    async def set_alias(self, alias: str, session_id: str) -> None:
        validate_session_id(session_id)
        now = self._clock()
        aliases = self._aliases
        aliases[alias] = (session_id, now)
        aliases.move_to_end(alias)
        while aliases:
            _, (_, when) = next(iter(aliases.items()))
            if now - when <= self._ttl and len(aliases) <= self._max_sessions:
                break
            aliases.popitem(last=False)

    async def take_alias(self, alias: str) -> str | None:
        found = self._aliases.pop(alias, None)
        if found is None or self._clock() - found[1] > self._ttl:
            return None
        return found[0]

    async def append_stream(self, session_id: str, entries: Sequence[StreamEntry]) -> None:
        if not entries:
            return
        record = self._record(session_id, create=True)
        check_stream_entries(entries, record.stream[-1].seq if record.stream else 0)
        record.stream.extend(entries)
        grew, record.grew = record.grew, asyncio.Event()
        grew.set()

    async def read_stream(self, session_id: str, after_seq: int = 0, *,
                          limit: int | None = None) -> list[StreamEntry]:
        record = self._record(session_id, touch=False)
        if record is None:
            return []
        entries = [e for e in record.stream if e.seq > after_seq]
        return entries if limit is None else entries[:limit]

    async def wait_stream(self, session_id: str, after_seq: int, *,
                          timeout: float) -> list[StreamEntry]:
        record = self._record(session_id, create=True, touch=False)
        grew = record.grew
        entries = await self.read_stream(session_id, after_seq)
        if entries:
            return entries
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(grew.wait(), max(timeout, 0))
        return await self.read_stream(session_id, after_seq)

    async def stream_tail(self, session_id: str) -> StreamEntry | None:
        record = self._record(session_id, touch=False)
        return record.stream[-1] if record is not None and record.stream else None
