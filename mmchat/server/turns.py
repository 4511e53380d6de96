"""Replies as server-side tasks that outlive their connection.

A :class:`Turn` holds its session (:meth:`SessionStore.begin_turn`: the message id
claimed, the session locked, state, memory and the stream's tail read, in one round trip
with Redis), numbers the reply's events after the tail, appends them to the stream and
only then publishes them to subscribers. So whatever a client has seen is in the session
store, and a client that reconnects, to this process or another, replays and follows the
same events with the same seqs. A turn whose client went away keeps running (bounded by
max_new_tokens), so the reply can still be resumed.

The engine runs in the held session (``Engine.stream(turn=...)``) and stages its write
there; the reply's ``done`` goes with that write and the unlock, in one round trip, so
it is in the stream before the next turn of the session numbers its events.

A cancel sent through another process reaches the turn through the session store
(:meth:`SessionStore.request_cancel`): the held session reports it when the turn
begins and with each batch of events appended, and the turn then cancels itself as for
a local cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..budget import DecodeAllowance
from ..errors import DuplicateMessage, MMChatError, StoreUnavailable, TurnLost
from ..modality import Attachment
from ..protocol import Delta, Done, Error, Started, Usage, to_stream_entry
from ..sessions import SessionStore, SessionTurn, StreamEntry
from .metrics import Metrics

logger = logging.getLogger(__name__)

ReplyEvent = Started | Delta | Done | Error


@dataclass(frozen=True)
class TurnRequest:
    session_id: str
    message_id: str
    text: str = ""
    attachments: Sequence[Attachment] = ()
    #: ``time.perf_counter()`` when the message arrived, for time to first token.
    received: float = field(default_factory=time.perf_counter)
    #: The session's owner as the connection knows it: the turn runs only in a session
    #: that still exists with this owner (``None``: no check, the session may be new).
    owner: str | None = None
    #: The connection's allowance of media decode time, charged by this turn's decodes.
    media_allowance: DecodeAllowance | None = None


class Turn:
    """One reply: generation, persistence and fan-out to subscribers."""

    def __init__(self, manager: TurnManager, request: TurnRequest) -> None:
        self.manager = manager
        self.request = request
        self.response_id = uuid.uuid4().hex
        self.events: list[ReplyEvent] = []
        self.finished = asyncio.Event()
        #: Each listener and the deltas it takes at a time (its connection's coalesce).
        self._listeners: dict[Callable[[ReplyEvent], None], int] = {}
        self._cancel_requested = False
        self._stream: Any = None
        self._store_error: StoreUnavailable | TurnLost | None = None
        self._failed = False  # an error event was published

    @property
    def message_id(self) -> str:
        return self.request.message_id

    def cancel(self) -> None:
        """Stop generating within one decode step; the reply ends ``cancelled``."""
        self._cancel_requested = True
        if self._stream is not None:
            self._stream.cancel()

    async def follow(self, send: Callable[[ReplyEvent], None], *, tokens: int = 1) -> None:
        """Hand every event of this reply, from its start, to ``send`` (as each is
        published, on the event loop); return after the last one. ``send`` takes the
        deltas after a reply's first ``tokens`` at a time (a connection that coalesces
        them): while every listener does, the turn stores and publishes them in groups
        of that many, one append for the group instead of one each."""
        for event in self.events:
            send(event)
        if self.finished.is_set():
            return
        self._listeners[send] = max(1, tokens)
        try:
            await self.finished.wait()
        finally:
            self._listeners.pop(send, None)

    def _publish(self, events: Sequence[ReplyEvent]) -> None:
        self.events += events
        for send in list(self._listeners):
            for event in events:
                try:
                    send(event)
                except Exception:  # one listener's failure must not end the reply
                    logger.exception("reply %s: a listener failed", self.response_id)
                    self._listeners.pop(send, None)
                    break

    def _group(self) -> int:
        """The deltas to gather before storing and publishing them: the fewest any
        listener takes at a time (one without listeners: whoever follows the reply
        through the store gets every token as it comes)."""
        return min(self._listeners.values(), default=1)

    def _end(self) -> None:
        self.finished.set()
        self._listeners.clear()

    async def _append(self, events: Sequence[Started | Delta | Done], held: SessionTurn, *,
                      last: bool, error: Error | None = None) -> bool:
        """Append to the session stream through ``held``; the ``last`` events end the
        turn (the engine's write, the events and the unlock go together). A batch
        mid-reply learns whether the reply was cancelled through another process.
        ``False`` (and keep the error) if the store failed or refused the write as stale
        (the session passed to another turn: nothing more of this reply is stored)."""
        entries = [to_stream_entry(e) for e in events]
        if error is not None:  # why the reply ends, for whoever follows it elsewhere
            entries[-1] = with_error(entries[-1], error)
        if isinstance(self._store_error, TurnLost):
            return False
        try:
            if held.ended:  # the error's done after a failed end
                await self.manager.store.append_stream(self.request.session_id, entries)
            elif last:
                await held.end(entries)
            elif await held.append(entries) and not self._cancel_requested:
                logger.info("reply %s: cancelled through the session store",
                            self.response_id)
                self.cancel()
        except (StoreUnavailable, TurnLost) as exc:
            logger.warning("reply %s: events could not be saved: %s", self.response_id, exc)
            self._store_error = exc
            return False
        return True

    def _fail(self, code: str, message: str) -> None:
        self._failed = True
        self.manager.metrics.error(code)
        self._publish([Error(code, message, self.message_id)])

    async def run(self) -> None:
        request, manager = self.request, self.manager
        store = manager.store
        try:
            t_wait = time.perf_counter()
            async with store.turn(request.session_id, message_id=request.message_id,
                                  owner=request.owner) as held:
                queue_ms = (time.perf_counter() - t_wait) * 1000
                tail = held.tail
                if tail is not None and not tail.final:
                    tail = (await manager.close_lost_reply(held, tail)).done
                stream = await manager.engine.stream(
                    request.session_id, request.text, request.attachments, turn=held,
                    media_allowance=request.media_allowance)
                self._stream = stream
                if self._cancel_requested or held.cancel_requested:
                    self.cancel()
                await self._pump(stream, held, tail.seq if tail is not None else 0,
                                 queue_ms)
        except DuplicateMessage as exc:  # the claim is the first copy's: keep it
            self._fail(exc.code, exc.message)
        except TurnLost as exc:  # another turn has the session: nothing more was stored
            logger.warning("reply %s: %s", self.response_id, exc)
            if not self._failed:
                self._fail(exc.code, exc.message)
            if not any(isinstance(e, Started) for e in self.events):
                with contextlib.suppress(StoreUnavailable):
                    await store.release_message(request.session_id, request.message_id)
        except MMChatError as exc:  # before the reply started: the message may be retried
            self._fail(exc.code, exc.message)
            with contextlib.suppress(StoreUnavailable):
                await store.release_message(request.session_id, request.message_id)
        except Exception:
            logger.exception("reply %s to message %s failed", self.response_id,
                             request.message_id)
            self._fail(MMChatError.code, "the server failed while replying; see its log")
        finally:
            self._end()

    async def _pump(self, stream: Any, held: SessionTurn, seq: int, queue_ms: float) -> None:
        """Stream the engine's deltas into the session stream, a batch per store round
        trip (while one append is in flight the next deltas gather), publishing each
        batch once it is saved; the last batch ends ``held``. After the first delta,
        deltas wait until there are as many as the listeners take at a time
        (:meth:`_group`), or the reply ends. Raises :class:`MMChatError` if the reply
        fails before it started.

        Clients only ever see saved seqs. If the store fails mid-reply, generation is
        cancelled and the reply ends with an ``error`` and a ``done`` at the next seq,
        the seq the session's next turn also gives the reply when it finds it open.
        """
        request, metrics = self.request, self.manager.metrics
        end: Any = None  # the Reply, or the exception that ended the stream
        started = broken = False
        texts: list[str] = []  # of the deltas published
        try:
            while end is None:
                batch, end = await stream.take(self._group() if started else 1)
                if broken:
                    continue
                failed = isinstance(end, Exception)
                last = end is not None and not failed
                events: list[Started | Delta | Done] = []
                next_seq = seq
                if not started and (batch or last):
                    next_seq += 1
                    events.append(Started(request.message_id, self.response_id, next_seq))
                for delta in batch:
                    next_seq += 1
                    events.append(Delta(self.response_id, next_seq, delta.text))
                if last:
                    next_seq += 1
                    events.append(self._done(end, next_seq, queue_ms))
                if not events:
                    continue
                if not await self._append(events, held, last=last):
                    broken = True
                    stream.cancel()
                    continue
                self._publish(events)
                if batch and not texts:
                    metrics.ttft.observe(time.perf_counter() - request.received)
                started, seq = True, next_seq
                texts += [delta.text for delta in batch]
                if last:
                    self._count(end)
        finally:
            if end is None:  # left early: stop generating, and wait until it stopped
                stream.cancel()
                while end is None:
                    _, end = await stream.take()
        if broken:
            error: MMChatError = self._store_error
        elif isinstance(end, Exception):
            error = end
            if not isinstance(error, MMChatError):
                logger.error("reply %s failed", self.response_id, exc_info=error)
                error = MMChatError("the server failed while replying; see its log")
        else:
            return
        if not started:
            raise error
        message = error.message + ("; the reply was stopped" if broken else "")
        self._fail(error.code, message)
        metrics.turn_ended("error")
        done = Done(self.response_id, seq + 1, "".join(texts), "error", Usage(0, len(texts)))
        await self._append([done], held, last=True,
                           error=Error(error.code, message, self.message_id))
        self._publish([done])

    def _done(self, reply: Any, seq: int, queue_ms: float) -> Done:
        return Done(self.response_id, seq, reply.text, reply.finish_reason,
                    Usage(reply.prompt_tokens, reply.completion_tokens),
                    dict(reply.attention), {**reply.timings, "queue": round(queue_ms, 3)},
                    tuple(reply.dropped) or None, reply.confidence, reply.fallback)

    def _count(self, reply: Any) -> None:
        metrics = self.manager.metrics
        metrics.turn_ended(reply.finish_reason)
        metrics.tokens.inc(reply.completion_tokens)
        total = reply.timings.get("total", 0.0) / 1000
        if reply.completion_tokens and total > 0:
            metrics.tokens_per_second.observe(reply.completion_tokens / total)


class TurnManager:
    """The replies running in this process, by session."""

    def __init__(self, engine: Any, store: SessionStore, metrics: Metrics) -> None:
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self._turns: dict[str, list[Turn]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, request: TurnRequest, *, cancelled: bool = False) -> Turn:
        """Begin a reply; it runs to its end whatever happens to the caller."""
        turn = Turn(self, request)
        if cancelled:
            turn.cancel()
        self._turns.setdefault(request.session_id, []).append(turn)
        task = asyncio.create_task(turn.run(), name=f"mmchat-turn:{turn.response_id}")
        self._tasks.add(task)
        self.metrics.turns_running.inc()

        def forget(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self.metrics.turns_running.dec()
            turns = self._turns.get(request.session_id, [])
            if turn in turns:
                turns.remove(turn)
            if not turns:
                self._turns.pop(request.session_id, None)

        task.add_done_callback(forget)
        return turn

    def running(self, session_id: str) -> list[Turn]:
        """The turns of ``session_id`` in this process, oldest first."""
        return list(self._turns.get(session_id, ()))

    @property
    def active(self) -> int:
        return len(self._tasks)

    def cancel_all(self) -> None:
        for turns in self._turns.values():
            for turn in turns:
                turn.cancel()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no turn runs (at most ``timeout`` s); whether none does."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        return not self._tasks

    async def close_lost_reply(self, held: SessionTurn, tail: StreamEntry) -> LostReply:
        """End a reply whose generator died (or stalled and lost the session): a
        ``done`` with finish reason ``error`` and the text streamed so far, appended
        through ``held``, the caller's hold on the session."""
        session_id = held.session_id
        entries = await self.store.read_stream(session_id)
        mine = [e for e in entries if e.response_id == tail.response_id]
        text = "".join(e.text for e in mine if e.kind == "delta")
        done = Done(tail.response_id, tail.seq + 1, text, "error",
                    Usage(0, sum(e.kind == "delta" for e in mine)))
        message_id = next((e.data.get("id") for e in mine if e.kind == "started"), None)
        entry = with_error(to_stream_entry(done), Error(
            "reply_lost", "the process generating this reply stopped; the reply ends with "
            "what was streamed", message_id))
        await held.append([entry])
        self.metrics.turn_ended("error")
        logger.warning("session %s: reply %s was left open by a process that stopped; "
                       "closed it after seq %d", session_id, tail.response_id, tail.seq)
        return LostReply(entry, message_id)

    async def recover(self, session_id: str, owner: str | None = None) -> LostReply | None:
        """Close the session's open reply if nobody generates it any more (its session
        is not held). Returns what this call closed, if anything."""
        async with self.store.turn(session_id, owner=owner) as held:
            tail = held.tail
            if tail is None or tail.final:
                return None
            return await self.close_lost_reply(held, tail)


def with_error(entry: StreamEntry, error: Error) -> StreamEntry:
    """A reply's ``done`` entry with the error that ended it (see :func:`split_error`):
    every client that replays or follows the reply gets that error before the ``done``,
    as the client of the process that generated it does."""
    fields = {"code": error.code, "message": error.message, "ref": error.ref}
    return dataclasses.replace(entry, data={**entry.data, "error": fields})


def split_error(entry: StreamEntry) -> tuple[Error | None, StreamEntry]:
    """The error kept with a ``done`` entry (if any), and the entry without it."""
    fields = entry.data.get("error") if entry.final else None
    if not isinstance(fields, dict):
        return None, entry
    data = {k: v for k, v in entry.data.items() if k != "error"}
    return (Error(fields["code"], fields["message"], fields.get("ref")),
            dataclasses.replace(entry, data=data))


@dataclass(frozen=True)
class LostReply:
    """A reply closed because the process generating it stopped."""

    done: StreamEntry
    message_id: str | None
