"""Running a reply's turn on the event loop, for a started :class:`~mmchat.engine.Engine`.

A turn decodes and encodes its attachments (in the modalities' own threads), holds
its session, is prefilled on the model thread (:mod:`mmchat.turnwork`), streams its
tokens as :class:`~mmchat.replies.Delta` s, and saves what it added to the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from datetime import UTC, datetime
from typing import Any

from .budget import DecodeAllowance
from .config import Config
from .errors import Cancelled, MMChatError
from .isolation import until_cancelled
from .modality import Attachment, Modality
from .replies import Delta, Reply, ReplyStream
from .sessions import SessionStore, SessionTurn
from .turnhooks import TurnHooks
from .turnwork import (
    UNSTARTED,
    Finish,
    Finished,
    Prefill,
    finish_turns,
    prefill_turns,
    raise_if_error,
)

logger = logging.getLogger(__name__)


class TurnRunner:
    """Runs the turns of one engine once its model is loaded: the engine validates a
    message, makes its :class:`ReplyStream` and hands the rest to :meth:`run`."""

    def __init__(self, config: Config, store: SessionStore, hooks: TurnHooks, *,
                 model: Any, tokenizer: Any, scheduler: Any, guard: Any,
                 media_pool: Executor, fallback_threshold: Callable[[], float],
                 closing: Callable[[], bool]) -> None:
        self.config = config
        self.store = store
        self.hooks = hooks
        self.model = model  # the DialogueLM
        self.tokenizer = tokenizer
        self.scheduler = scheduler  # batching.DecodeScheduler
        self.guard = guard  # isolation.PluginGuard: the modalities' threads
        self.media_pool = media_pool
        #: The engine's current threshold (``Engine.fallback_threshold`` may be set later).
        self.fallback_threshold = fallback_threshold
        self.closing = closing  # true once the engine is closing

    async def run(self, session_id: str, text: str,
                  attachments: list[tuple[Modality, Attachment]], params: Any,
                  stream: ReplyStream, turn: SessionTurn | None,
                  allowance: DecodeAllowance | None = None) -> None:
        """Run the turn and put its end (its :class:`Reply`, or the exception that
        ended it) in ``stream``'s queue; then the ``record_turn`` hooks."""
        try:
            reply = await self._turn(session_id, text, attachments, params, stream, turn,
                                     allowance)
            stream._put(reply)
            await self.hooks.record(session_id, text, [a for _, a in attachments], reply)
        except Cancelled as exc:
            stream._put(dropped_reply(stream) if self.closing() else exc)
        except Exception as exc:  # every failure reaches the consumer, nothing is lost
            if not isinstance(exc, MMChatError):
                logger.exception("turn failed for session %s", session_id)
            stream._put(exc)

    async def _turn(self, session_id: str, text: str,
                    attachments: list[tuple[Modality, Attachment]], params: Any,
                    stream: ReplyStream, turn: SessionTurn | None,
                    allowance: DecodeAllowance | None = None) -> Reply:
        from .generate import needs_fallback

        t0, received = time.perf_counter(), now()
        # a turn cancelled while its media wait (on a slow plugin, say) ends there
        vectors = (await until_cancelled(self.media(attachments, allowance), stream._cancel)
                   if attachments else [])
        t_media = time.perf_counter()
        held = self.store.turn(session_id) if turn is None else contextlib.nullcontext(turn)
        async with held as session:
            stream._holds_session = True
            # Model work runs between the steps of the replies being decoded together,
            # with the prefills of every turn that arrived meanwhile in one batch.
            new_entries, run, first = await self.scheduler.call_batched(
                self._prefill, Prefill(attachments, vectors, list(session.memory),
                                       session.state or None, text, params,
                                       lambda: stream.cancelled))
            t_prefill = time.perf_counter()
            dropped = self._pushed_out(session.memory, new_entries)
            redactor = self.hooks.redactor(session_id)
            t_first = await self._decode(run, first, stream, redactor)
            done = await self._finish_turn(Finish(run, stream.cancelled, new_entries))
            reply_text = _trim_stop(self.tokenizer.decode(run.tokens), params.stop)
            if redactor is not None:  # a failed redaction ends the turn, nothing stored
                if redactor.error is not None:
                    raise redactor.error
                reply_text = redactor.text(reply_text, final=True)
            confidence = run.generation.confidence
            fallback = needs_fallback(done.finish_reason, confidence, self.fallback_threshold())
            if fallback:
                reply_text = self.config.generation.fallback_text
            turns: list[dict[str, Any]] = [
                {"role": "user", "id": uuid.uuid4().hex, "time": received, "text": text,
                 "attachments": [{"modality": m.name, "mime_type": a.mime_type, "id": a.id}
                                 for m, a in attachments]},
                {"role": "assistant", "id": uuid.uuid4().hex, "time": now(),
                 "text": reply_text, "finish_reason": done.finish_reason,
                 **({"fallback": True} if fallback else {}),
                 "usage": {"prompt_tokens": run.prompt_tokens,
                           "completion_tokens": len(run.tokens)},
                 "attention": done.attention,
                 # its fields are plain values: no deep copy (asdict) per reply
                 "generation": {**{f: getattr(params, f) for f in params.__dataclass_fields__},
                                "stop": list(params.stop)}},
            ]
            session.save(state=done.state, memory_added=done.memory_added, turns=turns,
                         max_memory=self.config.fusion.max_memory)
        t_end = time.perf_counter()

        def ms(a: float, b: float) -> float:
            return round((b - a) * 1000, 3)

        return Reply(
            session_id=session_id, text=reply_text, finish_reason=done.finish_reason,
            attention=done.attention, prompt_tokens=run.prompt_tokens,
            completion_tokens=len(run.tokens),
            timings={"decode_media": ms(t0, t_media), "prefill": ms(t_media, t_prefill),
                     "first_token": ms(t0, t_first or t_end), "total": ms(t0, t_end)},
            dropped=dropped, confidence=round(confidence, 4), fallback=fallback)

    def _pushed_out(self, memory: Sequence[bytes], new: Sequence[Any]) -> list[str]:
        """Ids of the attachments that the turn's new ones push out of the memory bank,
        oldest first (read from the stored entries' headers only)."""
        from .state import entry_attachment_id

        over = len(memory) + len(new) - self.config.fusion.max_memory
        if over <= 0:
            return []
        ids = ([entry_attachment_id(entry) for entry in memory[:over]]
               + [entry.attachment_id for entry in new[:max(0, over - len(memory))]])
        return [i for i in ids if i]  # entries stored before ids were kept have none

    async def media(self, attachments: list[tuple[Modality, Attachment]],
                    allowance: DecodeAllowance | None = None) -> list[Any]:
        """Decode each attachment (a failure raises), then encode it (batched with the
        attachments of other turns): its vectors, or the exception its encoding raised.
        Both run in the modality's own threads, limited and checked. A turn decodes its
        attachments one after another, so it holds one decode thread at a time; each
        decode's CPU time is charged to ``allowance``."""
        guard = self.guard
        features = [await guard.decode(m, a, allowance) for m, a in attachments]
        return await asyncio.gather(*(
            guard.encode(modality, f) for (modality, _), f in zip(attachments, features)),
            return_exceptions=True)

    async def _decode(self, run: Any, first: Any, stream: ReplyStream,
                      redactor: Any = None) -> float | None:
        """Stream the reply's tokens into ``stream`` as deltas (through ``redactor``, a
        :class:`~mmchat.turnhooks.Redactor`) until decoding ends, the first one at once
        when the prefill chose it; ``perf_counter()`` of the first."""
        put = stream._put
        deltas = _Deltas(self.tokenizer,
                         put if redactor is None else redactor.wrap(put, stream.cancel))
        started = first is not UNSTARTED  # sampled: its first token came with it
        if started:
            deltas.take(first)
            if first is None or run.generation.sampler.done:
                return deltas.first
        stop = self.scheduler.feed(run, deltas.take, cancelled=lambda: stream.cancelled,
                                   started=started)
        try:
            await deltas.finished
        finally:
            stop()
        return deltas.first

    async def _finish_turn(self, item: Finish) -> Finished:
        """The turn's stored form, made on the model thread between two steps (in the
        media pool once the engine is closing, so a cancelled turn is still saved)."""
        finished: Finished
        try:
            finished = await self.scheduler.call_batched(self._finish, item)
        except Cancelled:
            loop = asyncio.get_running_loop()
            done = await loop.run_in_executor(self.media_pool, finish_turns, [item])
            finished = raise_if_error(done[0])
        return finished

    def _finish(self, items: list[Finish]) -> list[Any]:
        """:func:`~mmchat.turnwork.finish_turns`; one bound method, so the scheduler
        batches the turns that finish together."""
        return finish_turns(items)

    def _prefill(self, items: list[Prefill]) -> list[Any]:
        """:func:`~mmchat.turnwork.prefill_turns` with this engine's model; one bound
        method, so the scheduler batches the turns that arrive together."""
        return prefill_turns(self.model, self.tokenizer, self.scheduler.decoder,
                             self.config.fusion.max_memory, items)


class _Deltas:
    """A reply's tokens as they come from the scheduler (on the event loop, without a
    task switch per token), turned into :class:`Delta` text pieces for ``put``.
    :attr:`finished` resolves when decoding ends (or fails)."""

    def __init__(self, tokenizer: Any, put: Callable[[Delta], None]) -> None:
        self.tokenizer = tokenizer
        self.put = put
        self.ids: list[int] = []
        self.shown = ""
        self.index = 0  # of the next delta
        self.first: float | None = None  # perf_counter() of the first token
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def take(self, item: Any) -> None:
        if self.finished.done():
            return
        if item is None:
            self.finished.set_result(None)
        elif isinstance(item, BaseException):
            self.finished.set_exception(item)
        else:
            self.first = self.first or time.perf_counter()
            self.ids.append(item.id)
            full = self.tokenizer.decode(self.ids)
            if full.startswith(self.shown) and len(full) > len(self.shown):
                self.put(Delta(full[len(self.shown):], self.index, item.id))
                self.shown = full
                self.index += 1


def dropped_reply(stream: ReplyStream) -> Reply:
    """The end of a turn the closing engine dropped before it reached the model."""
    return Reply(session_id=stream.session_id, text="", finish_reason="cancelled", attention={},
                 prompt_tokens=0, completion_tokens=0, timings={})


def now() -> str:
    """The time now, for transcripts: ISO 8601 in UTC."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _trim_stop(text: str, stops: Iterable[str]) -> str:
    for s in stops:
        if s and s in text:
            text = text[: text.index(s)]
    return text
