"""The public result types: :class:`Reply`, :class:`Delta` and :class:`ReplyStream`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from .errors import ReplyTimeout


@dataclass(frozen=True)
class Delta:
    """A piece of streamed reply text."""

    text: str
    index: int  # 0-based position of this delta within the reply
    token_id: int


@dataclass
class Reply:
    session_id: str
    text: str
    finish_reason: str  # "stop", "length", "loop" or "cancelled"
    attention: dict[str, float]  # mean attention mass per modality
    prompt_tokens: int
    completion_tokens: int
    #: milliseconds: decode_media (decoding and encoding attachments), prefill,
    #: first_token, total
    timings: dict[str, float]
    #: ids of the attachments this turn pushed out of the memory bank (it keeps the last
    #: ``fusion.max_memory``), oldest first
    dropped: list[str] = field(default_factory=list)
    #: the lowest probability the model gave a token it chose (end of reply included)
    confidence: float = 0.0
    #: True when ``text`` is ``[generation] fallback_text`` in place of the model's reply
    #: (too unsure, or it looped); the streamed deltas were the model's
    fallback: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "text": self.text,
            "finish_reason": self.finish_reason, "attention": self.attention,
            "usage": {"prompt_tokens": self.prompt_tokens,
                      "completion_tokens": self.completion_tokens},
            "timings": self.timings, "dropped": self.dropped,
            "confidence": self.confidence, "fallback": self.fallback,
        }


#: What a turn puts on its stream's queue: deltas, then its reply or the exception
#: that ended it.
StreamItem = Delta | Reply | BaseException


@dataclass(eq=False)
class ReplyStream:
    """Async iterator of :class:`Delta`; :attr:`reply` is set once it is exhausted.

    Breaking out of the loop does not stop generation: the reply completes and is
    saved. Call :meth:`cancel` to stop within one decode step; cancelling the task
    that iterates (or awaits :meth:`wait`) does the same. With a ``timeout`` the
    stream raises :class:`~mmchat.errors.ReplyTimeout` once it passes.
    """

    _queue: asyncio.Queue[StreamItem]
    session_id: str = ""
    _task: asyncio.Task[None] | None = None
    _cancel: asyncio.Event = field(default_factory=asyncio.Event)
    reply: Reply | None = None
    _deadline: asyncio.TimerHandle | None = None
    _timeout: float | None = None
    _timed_out: bool = False
    #: the turn holds its session: once cancelled it ends within one decode step
    _holds_session: bool = False
    _ended: bool = False
    #: the stream's end (its reply or exception) is in the queue
    _end_queued: bool = False
    #: :meth:`take` waiting for ``_wanted`` items, woken by :meth:`_put` (not by each)
    _taker: asyncio.Future[None] | None = None
    _wanted: int = 1

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __aiter__(self) -> ReplyStream:
        return self

    async def __anext__(self) -> Delta:
        if self._ended:
            raise StopAsyncIteration
        item = await self._get()
        if isinstance(item, Delta):
            return item
        self._end(item)
        raise StopAsyncIteration

    async def take(self, at_least: int = 1) -> tuple[list[Delta], Reply | Exception | None]:
        """The deltas waiting now (at least ``at_least``, unless the stream ends first),
        and how the stream ended if it did: the :class:`Reply`, or the exception that
        ended it. Waiting for several deltas wakes the caller once, not once for each.
        Do not call it again once it returned an end."""
        queue = self._queue
        if queue.qsize() < max(1, at_least) and not self._end_queued:
            self._wanted = max(1, at_least)
            self._taker = asyncio.get_running_loop().create_future()
            try:
                await self._taker
            except asyncio.CancelledError:  # whoever waited for the reply gave up on it
                self.cancel()
                raise
            finally:
                self._taker = None
        items = [queue.get_nowait() for _ in range(queue.qsize())]
        last = items[-1]
        if isinstance(last, Delta):
            return [i for i in items if isinstance(i, Delta)], None
        items.pop()
        end: Reply | Exception
        try:
            self._end(last)
        except Exception as exc:
            end = exc
        else:
            assert self.reply is not None
            end = self.reply
        return [i for i in items if isinstance(i, Delta)], end

    async def wait(self) -> Reply:
        """Drain the stream and return the finished reply."""
        async for _ in self:
            pass
        assert self.reply is not None
        return self.reply

    def _put(self, item: StreamItem) -> None:
        """Queue a delta, or the stream's end (its reply or exception): what the turn
        producing the stream calls."""
        self._queue.put_nowait(item)
        if not isinstance(item, Delta):
            self._end_queued = True
        taker = self._taker
        if taker is not None and not taker.done() and (
                self._end_queued or self._queue.qsize() >= self._wanted):
            taker.set_result(None)

    async def _get(self) -> StreamItem:
        try:
            return await self._queue.get()
        except asyncio.CancelledError:  # whoever waited for the reply gave up on it
            self.cancel()
            raise

    def _end(self, item: Reply | BaseException) -> None:
        """Take the stream's last item: set :attr:`reply`, or raise what ended it."""
        self._ended = True
        if self._deadline is not None:
            self._deadline.cancel()
        if isinstance(item, BaseException):
            raise item
        self.reply = item
        if self._timed_out and item.finish_reason == "cancelled":
            raise ReplyTimeout(f"the reply took longer than its timeout of "
                               f"{self._timeout:g} s and was cancelled", reply=item)

    def _set_timeout(self, timeout: float | None) -> None:
        if timeout is not None:
            self._timeout = timeout
            self._deadline = asyncio.get_running_loop().call_later(timeout, self._expire)

    def _expire(self) -> None:
        """The deadline passed: cancel the turn. One that holds its session ends within a
        decode step (and raises with what it saved); one still waiting for its media
        or its session raises now, and is saved empty once it gets there."""
        if self._ended:
            return
        self._timed_out = True
        self.cancel()
        if not self._holds_session:
            self._put(ReplyTimeout(
                f"the reply did not start within its timeout of {self._timeout:g} s "
                "and was cancelled"))
