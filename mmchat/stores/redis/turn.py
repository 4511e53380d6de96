"""A held turn of the Redis store: fenced appends and a fenced end in one script."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis.exceptions

from ...sessions import SessionTurn, StreamEntry, TurnWrite
from .appends import entry_args, lost
from .lock import RedisLock

if TYPE_CHECKING:
    from .store import RedisStore


class SeqRefused(ValueError):
    """Redis refused a stream entry's id: its seq does not follow the stream's last."""


def refused(exc: redis.exceptions.ResponseError, session_id: str,
            entries: Sequence[StreamEntry]) -> Exception:
    """:class:`SeqRefused` if Redis refused a stream entry's id, else ``exc``."""
    if not entries or "equal or smaller" not in str(exc):
        return exc
    return seq_refused(session_id, entries)


def seq_refused(session_id: str, entries: Sequence[StreamEntry]) -> SeqRefused:
    return SeqRefused(f"stream seq {entries[0].seq} does not follow the stream's last "
                      f"seq in session {session_id!r}")


def write_args(write: TurnWrite | None) -> list[Any]:
    """A turn's write as ``end_turn.lua`` takes it."""
    if write is None:
        return ["0", "", 0, 0, 0]
    turns = [json.dumps(turn, ensure_ascii=False, separators=(",", ":"),
                        allow_nan=False).encode() for turn in write.turns]
    return ["1", write.state, write.max_memory, len(write.memory_added),
            *write.memory_added, len(turns), *turns]


class RedisTurn(SessionTurn):
    """A turn of :meth:`RedisStore.begin_turn`, holding the lock's fencing token
    (:attr:`fence`). Appending is one round trip: the token checked, the stream entries
    and the question whether this turn's reply was cancelled. Ending it is one: the token
    checked, the write, the stream entries, forgetting the turn's cancels and the
    token-checked lock release, in one script. With a stale token nothing is written
    and both raise :class:`mmchat.errors.TurnLost`."""

    def __init__(self, store: RedisStore, lock: RedisLock, message_id: str | None,
                 **loaded: Any) -> None:
        super().__init__(lock.session_id, **loaded)
        self._store = store
        self._lock = lock
        self.fence = lock.fence
        #: The members of the ``cancel`` set that mean this turn.
        self._cancels = [f"l:{lock.token}"]
        if message_id is not None:
            self._cancels.append(f"m:{message_id}")

    async def _append(self, entries: list[StreamEntry]) -> bool:
        store = self._store
        async with store._guard("append_stream"):
            try:
                cancelled = await store.appends.add(self._lock.keys, self.fence,
                                                    entries, self._cancels)
            except redis.exceptions.ResponseError as exc:
                raise refused(exc, self.session_id, entries) from exc
        if cancelled is None:
            raise lost(self.session_id)
        return cancelled

    async def _finish(self, write: TurnWrite | None, entries: list[StreamEntry]) -> None:
        store, lock = self._store, self._lock
        keys = lock.keys
        await lock.stop_renewal()
        try:
            async with store._guard("end_turn"):
                written, released, seq_refused_ = await store.scripts.run(
                    "end_turn",
                    [keys.meta, keys.stream, keys.cancel, *keys.fair_lock, keys.state,
                     keys.memory, keys.history, keys.msgids],
                    [self.fence, lock.token, store.ttl_ms, store.stream_max_len,
                     keys.wake_prefix, store.history_max_len, *write_args(write),
                     len(entries),
                     *entry_args(entries), *self._cancels])
        except BaseException:
            await lock.release_quietly()  # in case the script did not run
            raise
        if not written:
            raise lost(self.session_id)
        lock.check_released(bool(released))
        if seq_refused_:  # the rest was done
            raise seq_refused(self.session_id, entries)
