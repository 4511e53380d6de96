"""The reply-event appends of held turns, sent together in one round trip."""

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


class Appends:
    """Every turn that appends in one pass of the event loop (the replies of one decode
    step do) shares one pipeline, so a batch of concurrent replies costs one round trip
    per token instead of one each. A turn's append is one ``append.lua``: its fencing
    token checked, its ``XADD``s, ``PEXPIRE`` and whether it was cancelled. A script that
    fails fails only its own turn's append."""

    #: At most this many appends go in one pipeline.
    MAX_BATCH = 256

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._pending: list[tuple[Keys, int, list[StreamEntry], list[str],
                                  asyncio.Future]] = []
        self._sending: set[asyncio.Task[None]] = set()

    def add(self, keys: Keys, fence: int, entries: list[StreamEntry], cancels: list[str]
            ) -> asyncio.Future[bool | None]:
        """Queue one turn's append; the future says whether one of ``cancels`` is in the
        session's cancel set (``None``: the fencing token was stale, nothing written), or
        raises what Redis answered."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)  # after every task woken in this pass
        self._pending.append((keys, fence, entries, cancels, future))
        if len(self._pending) >= self.MAX_BATCH:
            self._flush()
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _execute(self, batch: list[tuple[Keys, int, list[StreamEntry], list[str],
                                               asyncio.Future]]) -> list[Any]:
        store = self._store
        pipe = store.client.pipeline(transaction=False)
        for keys, fence, entries, cancels, _ in batch:
            lua.queue(pipe, "append", [keys.meta, keys.stream, keys.cancel],
                      [fence, store.ttl_ms, store.stream_max_len, len(entries),
                       *entry_args(entries), *cancels])
        return await pipe.execute(raise_on_error=False)

    async def _send(self, batch: list[tuple[Keys, int, list[StreamEntry], list[str],
                                            asyncio.Future]]) -> None:
        try:
            results = await self._execute(batch)
            if any(lua.is_noscript(r) for r in results):  # Redis restarted: none ran
                await lua.load(self._store.client, "append")
                results = await self._execute(batch)
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
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():  # its turn stopped waiting
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            elif result[0] == 0:
                future.set_result(None)
            else:
                future.set_result(bool(result[1]))
