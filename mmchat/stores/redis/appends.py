"""Script calls of concurrent turns, sent together in one round trip.

Every turn that begins, appends or ends in one pass of the event loop (the replies of
one decode step do, and the messages of a burst) shares one pipeline: a batch of
concurrent replies costs one round trip per step instead of one each, and one
connection from the pool instead of one each. A script that fails fails only its own
call.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...errors import TurnLost
from ...sessions import StreamEntry
from . import lua
from .keys import Keys

if TYPE_CHECKING:
    from .store import RedisStore


def entry_args(entries: Sequence[StreamEntry]) -> list[str]:
    """Stream entries as the scripts take them: id, response id, kind, text, data."""
    args: list[str] = []
    for entry in entries:
        data = json.dumps(dict(entry.data), ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False) if entry.data else ""
        args += [f"{entry.seq}-0", entry.response_id, entry.kind, entry.text, data]
    return args


def lost(session_id: str) -> TurnLost:
    return TurnLost(f"the turn's hold on session {session_id!r} passed to another turn "
                    "(its lease ran out); what it had not yet written was refused")


_Call = tuple[str, list[str], list[Any], "asyncio.Future[Any]"]


class Scripts:
    """Lua script calls gathered over one pass of the event loop and sent as one
    pipeline (``transaction=False``: each script is atomic by itself)."""

    #: At most this many calls go in one pipeline.
    MAX_BATCH = 256

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._pending: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()

    def run(self, name: str, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Queue script ``name``; the future has what Redis answered, or raises it."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)  # after every task woken in this pass
        self._pending.append((name, keys, args, future))
        if len(self._pending) >= self.MAX_BATCH:
            self._flush()
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        client = self._store.client
        if self._store.clustered:  # a cluster client pipelines no scripts: one call each
            return list(await asyncio.gather(
                *(client.evalsha(lua.script(name).sha, len(keys), *keys, *args)
                  for name, keys, args, _ in batch), return_exceptions=True))
        pipe = client.pipeline(transaction=False)
        for name, keys, args, _ in batch:
            lua.queue(pipe, name, keys, args)
        return await pipe.execute(raise_on_error=False)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            results = await self._execute(batch)
            missing = [i for i, r in enumerate(results) if lua.is_noscript(r)]
            if missing:  # Redis restarted: those did not run
                for name in {batch[i][0] for i in missing}:
                    await lua.load(self._store.client, name)
                again = await self._execute([batch[i] for i in missing])
                for i, result in zip(missing, again, strict=True):
                    results[i] = result
        except BaseException as exc:  # the round trip failed: every call did
            for *_, future in batch:
                if not future.done():
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:  # this task was cancelled (the loop is closing)
                        future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller stopped waiting
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


class Appends:
    """A held turn's append: one ``append.lua`` (its fencing token checked, its
    ``XADD``s, ``PEXPIRE`` and whether it was cancelled), batched by :class:`Scripts`."""

    def __init__(self, store: RedisStore, scripts: Scripts) -> None:
        self._store = store
        self._scripts = scripts

    @property
    def _sending(self) -> set[asyncio.Task[None]]:
        return self._scripts._sending

    async def add(self, keys: Keys, fence: int, entries: list[StreamEntry],
                  cancels: list[str]) -> bool | None:
        """Append one turn's entries: whether one of ``cancels`` is in the session's
        cancel set (``None``: the fencing token was stale, nothing written), or raise
        what Redis answered."""
        store = self._store
        result = await self._scripts.run(
            "append", [keys.meta, keys.stream, keys.cancel],
            [fence, store.ttl_ms, store.stream_max_len, len(entries), *entry_args(entries),
             *cancels])
        return None if result[0] == 0 else bool(result[1])
