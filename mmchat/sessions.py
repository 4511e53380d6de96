"""Where sessions live: the :class:`SessionStore` interface and the in-process default.

A session is three things, kept apart so a turn writes only what changed:

* ``state``: the serialised RNN state after the last turn (bytes, replaced per turn);
* ``memory``: the memory bank, one serialised entry per attachment (bytes, appended);
* ``history``: the turns as JSON-able dicts (appended).

Nothing here is pickled: stores hold plain bytes and JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, AsyncIterator


@dataclass
class SessionData:
    session_id: str
    state: bytes | None = None
    memory: list[bytes] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


class SessionStore(ABC):
    """Async storage for sessions. Implementations must be safe to share between tasks."""

    @abstractmethod
    async def load(self, session_id: str) -> SessionData | None:
        """Return the session, or ``None`` if there is none (or it expired)."""

    @abstractmethod
    async def save_turn(self, session_id: str, *, state: bytes, memory_added: list[bytes],
                        turns: list[dict[str, Any]], max_memory: int) -> None:
        """Replace the state, append memory entries and turns, keep the last ``max_memory``
        memory entries. Creates the session if needed."""

    @abstractmethod
    async def delete(self, session_id: str) -> None:
        """Forget the session. Deleting a missing session is not an error."""

    @abstractmethod
    def lock(self, session_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold this while a turn runs so turns of one session run one at a time."""

    async def ping(self) -> None:
        """Raise :class:`mmchat.errors.StoreUnavailable` if the store cannot be reached."""

    async def close(self) -> None:
        """Release connections."""


class MemoryStore(SessionStore):
    """Sessions in this process's memory, with a sliding TTL. The embedded default."""

    def __init__(self, *, ttl_seconds: float = 86_400, clock=time.monotonic) -> None:
        self._ttl = ttl_seconds
        self._clock = clock
        self._sessions: dict[str, tuple[float, SessionData]] = {}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def _live(self, session_id: str) -> SessionData | None:
        entry = self._sessions.get(session_id)
        if entry is None:
            return None
        touched, data = entry
        now = self._clock()
        if now - touched > self._ttl:
            del self._sessions[session_id]
            return None
        self._sessions[session_id] = (now, data)
        return data

    async def load(self, session_id: str) -> SessionData | None:
        data = self._live(session_id)
        if data is None:
            return None
        return SessionData(session_id, data.state, list(data.memory),
                           [dict(t) for t in data.history])

    async def save_turn(self, session_id: str, *, state: bytes, memory_added: list[bytes],
                        turns: list[dict[str, Any]], max_memory: int) -> None:
        data = self._live(session_id) or SessionData(session_id)
        data.state = state
        data.memory = (data.memory + list(memory_added))[-max_memory:] if max_memory else []
        data.history.extend(dict(t) for t in turns)
        self._sessions[session_id] = (self._clock(), data)

    async def delete(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    @contextlib.asynccontextmanager
    async def lock(self, session_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(session_id) or (asyncio.Lock(), 0)
        self._locks[session_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[session_id]
            if users == 1:
                del self._locks[session_id]
            else:
                self._locks[session_id] = (lock, users - 1)
