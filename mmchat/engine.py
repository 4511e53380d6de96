"""The embedding API: :class:`Engine` turns messages plus attachments into streamed replies.

Model, Pillow and librosa work never runs on the event loop: media decode in a small
thread pool, the modality encoders in a thread of their own (attachments that arrive
together are encoded in one call per modality, while replies decode), and the rest of
the model work in one dedicated thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as config_module
from .config import Config
from .errors import (
    Cancelled,
    EmptyMessage,
    InputError,
    MediaTooLarge,
    MessageTooLong,
    MMChatError,
    UnsupportedMedia,
)
from .modality import Attachment, Modality
from .plugins import PluginHost
from .sessions import SessionStore, SessionTurn, validate_session_id
from .stores import open_store

logger = logging.getLogger(__name__)

#: How long :meth:`Engine.close` waits for cancelled replies to finish saving.
CLOSE_TIMEOUT_S = 10.0

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
            "timings": self.timings, "confidence": self.confidence, "fallback": self.fallback,
        }


@dataclass(eq=False)
class ReplyStream:
    """Async iterator of :class:`Delta`; :attr:`reply` is set once it is exhausted.

    Breaking out of the loop does not stop generation: the reply completes and is
    saved. Call :meth:`cancel` to stop within one decode step.
    """

    _queue: asyncio.Queue
    _task: asyncio.Task | None = None
    _cancel: asyncio.Event = field(default_factory=asyncio.Event)
    reply: Reply | None = None

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __aiter__(self) -> "ReplyStream":
        return self

    async def __anext__(self) -> Delta:
        item = await self._queue.get()
        if isinstance(item, Delta):
            return item
        if isinstance(item, BaseException):
            raise item
        self.reply = item
        raise StopAsyncIteration

    async def take(self) -> tuple[list[Delta], Reply | Exception | None]:
        """The deltas waiting now (at least one, unless the stream ends first), and how
        the stream ended if it did: the :class:`Reply`, or the exception that ended it.
        Do not call it again once it returned an end."""
        queue = self._queue
        items = [await queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        end = None if isinstance(items[-1], Delta) else items.pop()
        if isinstance(end, Reply):
            self.reply = end
        return items, end

    async def wait(self) -> Reply:
        """Drain the stream and return the finished reply."""
        async for _ in self:
            pass
        assert self.reply is not None
        return self.reply


#: In place of a first token: the reply (beam search) chooses its own from the start.
_UNSTARTED = object()


@dataclass
class _Prefill:
    """A turn waiting for its prefill on the model thread."""

    attachments: list[tuple[Modality, Attachment]]
    vectors: list[Any]  # encoded, one per attachment, or the exception its encoding raised
    memory: list[bytes]  # the session's stored memory entries before this turn
    state: bytes | None  # the stored SessionState, or None for a new session
    text: str
    params: Any  # GenerationParams
    cancelled: Callable[[], bool] = lambda: False  # the reply was cancelled meanwhile


@dataclass
class _Finish:
    """A decoded turn waiting on the model thread to become what the store keeps."""

    run: Any  # TurnRun
    cancelled: bool
    new_entries: list[Any]  # MemoryEntry of this turn's attachments


@dataclass
class _Finished:
    state: bytes
    memory_added: list[bytes]
    finish_reason: str
    attention: dict[str, float]


class Engine:
    """Loads plugins and the model once, then serves any number of sessions.

    ``Engine(config)`` is cheap; the model loads on :meth:`start` (or first use).
    """

    def __init__(self, config: Config | None = None, *, store: SessionStore | None = None,
                 plugins: PluginHost | None = None) -> None:
        self.config = config or Config()
        c = self.config
        self.plugins = plugins or PluginHost.from_config(c)
        self.store = store or open_store(c.sessions)
        self.model = None
        self.tokenizer = None
        self.checkpoint_meta: dict[str, Any] = {}
        self.fallback_threshold = 0.0  # resolved when the model loads (loading.fallback_threshold)
        self._model_pool: ThreadPoolExecutor | None = None
        self._media_pool: ThreadPoolExecutor | None = None
        self._encoder_pool: ThreadPoolExecutor | None = None
        self._scheduler: Any = None  # batching.DecodeScheduler, once the model is loaded
        self._encoders: Any = None  # a DecodeScheduler without a decoder, on _encoder_pool
        self._streams: set[ReplyStream] = set()  # replies whose turn is still running
        self._start_lock = asyncio.Lock()
        self._started = False

    @classmethod
    def from_config(cls, path: str | Path | None = None, **kwargs: Any) -> "Engine":
        return cls(config_module.load(path), **kwargs)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def modalities(self) -> dict[str, Modality]:
        return self.plugins.modalities

    @property
    def model_description(self) -> str:
        if self.model is None:
            return "not loaded"
        c = self.model.config
        source = self.checkpoint_meta.get("path", "untrained")
        return (f"{c.rnn} {c.n_layer}x{c.n_hidden}, fusion={c.fusion}, "
                f"{self.model.num_params() / 1e6:.1f}M params ({source})")

    async def start(self) -> "Engine":
        """Load plugins and the model (in a worker thread) and run ``startup`` hooks."""
        async with self._start_lock:
            if self._started:
                return self
            self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="mmchat-model")
            self._media_pool = ThreadPoolExecutor(2, thread_name_prefix="mmchat-media")
            self._encoder_pool = ThreadPoolExecutor(1, thread_name_prefix="mmchat-encode")
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._model_pool, self._load_model)
            self._started = True
        self.plugins.call_each("startup", engine=self)
        return self

    def _load_model(self) -> None:
        from .batching import DecodeScheduler
        from .fastpath import build_decoder
        from .loading import fallback_threshold, load_model

        self.model, self.tokenizer, self.checkpoint_meta = load_model(self.config, self.modalities)
        self.fallback_threshold = fallback_threshold(self.config, self.checkpoint_meta)
        decoder = build_decoder(self.model, fast=self.config.model.fast_decode)
        self._scheduler = DecodeScheduler(decoder, self._model_pool)
        self._encoders = DecodeScheduler(None, self._encoder_pool)

    async def close(self) -> None:
        """Cancel the replies still running, then release the model, store and threads.

        An in-flight reply ends with finish_reason ``"cancelled"`` (or, if it had not
        reached the model yet, with :class:`~mmchat.errors.Cancelled`). Nothing here
        blocks the event loop: the decode worker needs it to hand replies their ends.
        """
        streams = list(self._streams)
        for stream in streams:
            stream.cancel()
        for scheduler in (self._scheduler, self._encoders):
            if scheduler is not None:
                scheduler.close()
        tasks = {s._task: s for s in streams if s._task is not None}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
            for task in pending:  # stuck outside the model (a store call, say)
                task.cancel()
                tasks[task]._queue.put_nowait(Cancelled("the engine closed"))
        if self._started:
            self.plugins.call_each("shutdown", engine=self)
        await self.store.close()
        loop = asyncio.get_running_loop()
        for pool in (self._model_pool, self._media_pool, self._encoder_pool):
            if pool is not None:
                await loop.run_in_executor(None, pool.shutdown)
        self._scheduler = self._encoders = None
        self._started = False

    async def __aenter__(self) -> "Engine":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- conversations ---------------------------------------------------------------

    def new_session_id(self) -> str:
        return uuid.uuid4().hex

    async def stream(self, session_id: str, text: str = "",
                     attachments: Sequence[Attachment | str | Path] = (), *,
                     turn: SessionTurn | None = None, **generation: Any) -> ReplyStream:
        """Start a reply. Validation errors raise here, before anything is stored.

        ``generation`` overrides ``[generation]`` settings for this reply
        (``strategy="beam"``, ``seed=1`` ...).

        ``turn`` is the session already held for this reply (from the store's
        ``begin_turn``): the engine then neither locks nor loads, and only stages the
        turn's write in it (``turn.save``) for its holder to send with ``turn.end()``.
        Without it the engine holds the session itself for the turn.
        """
        await self.start()
        from .generate import GenerationParams

        self._check_session_id(session_id)
        if turn is not None and turn.session_id != session_id:
            raise InputError(f"the turn held is of session {turn.session_id!r}, "
                             f"not {session_id!r}")
        atts = [a if isinstance(a, Attachment) else Attachment.from_path(a) for a in attachments]
        self._check_message(text, atts)
        resolved = [(self._modality_for(a), a) for a in atts]
        try:
            params = GenerationParams.from_config(self.config.generation, **generation)
        except (ValueError, MMChatError) as exc:
            raise InputError(str(exc)) from None
        queue: asyncio.Queue = asyncio.Queue()
        stream = ReplyStream(queue)
        stream._task = asyncio.create_task(
            self._run_turn(session_id, text, resolved, params, stream, turn))
        self._streams.add(stream)
        stream._task.add_done_callback(lambda _: self._streams.discard(stream))
        return stream

    async def reply(self, session_id: str, text: str = "",
                    attachments: Sequence[Attachment | str | Path] = (),
                    **generation: Any) -> Reply:
        """Generate a whole reply and return it with attention mass, usage and timings."""
        stream = await self.stream(session_id, text, attachments, **generation)
        return await stream.wait()

    async def reset(self, session_id: str) -> None:
        self._check_session_id(session_id)
        await self.store.delete(session_id)

    async def history(self, session_id: str) -> list[dict[str, Any]]:
        data = await self.store.load(session_id)
        return [] if data is None else data.history

    # -- sync wrappers for scripts ---------------------------------------------------

    def reply_sync(self, session_id: str, text: str = "",
                   attachments: Sequence[Attachment | str | Path] = (), **generation: Any
                   ) -> Reply:
        """Blocking :meth:`reply` for scripts (not for use inside a running event loop)."""
        return self._runner().run(self.reply(session_id, text, attachments, **generation))

    def stream_sync(self, session_id: str, text: str = "",
                    attachments: Sequence[Attachment | str | Path] = (), **generation: Any
                    ) -> Generator[Delta, None, Reply]:
        """Blocking iterator of deltas for scripts; it returns the finished :class:`Reply`
        (``reply = yield from engine.stream_sync(...)``)."""
        runner = self._runner()
        stream = runner.run(self.stream(session_id, text, attachments, **generation))
        while True:
            try:
                yield runner.run(stream.__anext__())
            except StopAsyncIteration:
                assert stream.reply is not None
                return stream.reply

    def close_sync(self) -> None:
        runner = self._runner()
        runner.run(self.close())
        runner.close()
        self._sync_runner = None

    def _runner(self) -> asyncio.Runner:
        runner = getattr(self, "_sync_runner", None)
        if runner is None:
            runner = self._sync_runner = asyncio.Runner()
        return runner

    # -- internals -------------------------------------------------------------------

    def _check_session_id(self, session_id: str) -> None:
        try:
            validate_session_id(session_id)
        except ValueError as exc:
            raise InputError(str(exc)) from None

    def _check_message(self, text: str, attachments: Sequence[Attachment]) -> None:
        limits = self.config.limits
        if not isinstance(text, str):
            raise InputError(f"text must be a string, not {type(text).__name__}")
        if not text.strip() and not attachments:
            raise EmptyMessage("message is empty: send text, an attachment, or both")
        if len(text) > limits.max_text_chars:
            raise MessageTooLong(f"message has {len(text)} characters; the limit is "
                                 f"{limits.max_text_chars} (limits.max_text_chars)")
        if len(attachments) > limits.max_attachments:
            raise InputError(f"message has {len(attachments)} attachments; the limit is "
                             f"{limits.max_attachments} (limits.max_attachments)")

    def _modality_for(self, attachment: Attachment) -> Modality:
        modalities = self.modalities
        if attachment.modality is not None:
            modality = modalities.get(attachment.modality)
            if modality is None:
                raise UnsupportedMedia(f"unknown modality {attachment.modality!r}; this server "
                                       f"accepts: {', '.join(sorted(modalities)) or 'none'}")
            if not modality.accepts(attachment.mime_type):
                raise UnsupportedMedia(f"modality {modality.name!r} does not accept "
                                       f"{attachment.mime_type!r}; it accepts "
                                       f"{', '.join(modality.mime_types)}")
        else:
            matches = [m for m in modalities.values() if m.accepts(attachment.mime_type)]
            if not matches:
                accepted = sorted(t for m in modalities.values() for t in m.mime_types)
                raise UnsupportedMedia(f"no modality accepts MIME type {attachment.mime_type!r}; "
                                       f"accepted: {', '.join(accepted) or 'none'}")
            modality = matches[0]
        if len(attachment.data) > modality.max_bytes:
            raise MediaTooLarge(f"{modality.name} attachment is {len(attachment.data)} bytes; "
                                f"the limit is {modality.max_bytes}")
        if self.model is not None and modality.name not in self.model.kind_index:
            raise UnsupportedMedia(f"the loaded model was not trained with modality "
                                   f"{modality.name!r}")
        return modality

    async def _run_turn(self, session_id: str, text: str,
                        attachments: list[tuple[Modality, Attachment]], params: Any,
                        stream: ReplyStream, turn: SessionTurn | None) -> None:
        try:
            reply = await self._turn(session_id, text, attachments, params, stream, turn)
            stream._queue.put_nowait(reply)
        except Exception as exc:  # every failure reaches the consumer, nothing is lost
            if not isinstance(exc, MMChatError):
                logger.exception("turn failed for session %s", session_id)
            stream._queue.put_nowait(exc)

    async def _turn(self, session_id: str, text: str,
                    attachments: list[tuple[Modality, Attachment]], params: Any,
                    stream: ReplyStream, turn: SessionTurn | None) -> Reply:
        from .generate import needs_fallback

        t0 = time.perf_counter()
        vectors = await self._media(attachments)
        t_media = time.perf_counter()
        held = self.store.turn(session_id) if turn is None else contextlib.nullcontext(turn)
        async with held as session:
            # Model work runs between the steps of the replies being decoded together,
            # with the prefills of every turn that arrived meanwhile in one batch.
            new_entries, run, first = await self._scheduler.call_batched(
                self._prefill, _Prefill(attachments, vectors, list(session.memory),
                                        session.state or None, text, params,
                                        lambda: stream.cancelled))
            t_prefill = time.perf_counter()
            t_first = await self._decode(run, first, stream)
            done = await self._finish_turn(_Finish(run, stream.cancelled, new_entries))
            reply_text = self._trim_stop(self.tokenizer.decode(run.tokens), params.stop)
            confidence = run.generation.confidence
            fallback = needs_fallback(done.finish_reason, confidence, self.fallback_threshold)
            if fallback:
                reply_text = self.config.generation.fallback_text
            turns = [
                {"role": "user", "text": text, "attachments": [
                    {"modality": m.name, "mime_type": a.mime_type, "id": a.id}
                    for m, a in attachments]},
                {"role": "assistant", "text": reply_text, "finish_reason": done.finish_reason,
                 **({"fallback": True} if fallback else {})},
            ]
            session.save(state=done.state, memory_added=done.memory_added, turns=turns,
                         max_memory=self.config.fusion.max_memory)
        t_end = time.perf_counter()
        ms = lambda a, b: round((b - a) * 1000, 3)  # noqa: E731
        return Reply(
            session_id=session_id, text=reply_text, finish_reason=done.finish_reason,
            attention=done.attention, prompt_tokens=run.prompt_tokens,
            completion_tokens=len(run.tokens),
            timings={"decode_media": ms(t0, t_media), "prefill": ms(t_media, t_prefill),
                     "first_token": ms(t0, t_first or t_end), "total": ms(t0, t_end)},
            confidence=round(confidence, 4), fallback=fallback)

    async def _media(self, attachments: list[tuple[Modality, Attachment]]) -> list[Any]:
        """Decode each attachment (media pool; a failure raises), then encode it (encoder
        thread, batched with the attachments of other turns): its vectors, or the
        exception its encoding raised."""
        loop = asyncio.get_running_loop()
        features = await asyncio.gather(*(
            loop.run_in_executor(self._media_pool, self.plugins.wrap_call, modality, "decode",
                                 modality.decode, att.data, att.mime_type)
            for modality, att in attachments))
        return await asyncio.gather(*(
            self._encoders.call_batched(self._encode_batch, (modality, f))
            for (modality, _), f in zip(attachments, features)), return_exceptions=True)

    async def _decode(self, run: Any, first: Any, stream: ReplyStream) -> float | None:
        """Stream the reply's tokens into ``stream`` as deltas until decoding ends, the
        first one at once when the prefill chose it; ``perf_counter()`` of the first."""
        deltas = _Deltas(self.tokenizer, stream._queue.put_nowait)
        started = first is not _UNSTARTED  # sampled: its first token came with it
        if started:
            deltas.take(first)
            if first is None or run.generation.sampler.done:
                return deltas.first
        stop = self._scheduler.feed(run, deltas.take, cancelled=lambda: stream.cancelled,
                                    started=started)
        try:
            await deltas.finished
        finally:
            stop()
        return deltas.first

    async def _finish_turn(self, item: _Finish) -> _Finished:
        """The turn's stored form, made on the model thread between two steps (in the
        media pool once the engine is closing, so a cancelled turn is still saved)."""
        try:
            return await self._scheduler.call_batched(self._finish, item)
        except Cancelled:
            loop = asyncio.get_running_loop()
            done = await loop.run_in_executor(self._media_pool, self._finish, [item])
            return _raise_if_error(done[0])

    def _finish(self, items: list[_Finish]) -> list[Any]:
        """On the model thread: each decoded turn's state, new memory entries and
        attention mass, serialised for the store."""
        from .state import dumps_entry, dumps_state

        out: list[Any] = []
        for item in items:
            try:
                state, reason = item.run.finish(cancelled=item.cancelled)
                out.append(_Finished(dumps_state(state),
                                     [dumps_entry(e) for e in item.new_entries], reason,
                                     item.run.attention_by_modality()))
            except Exception as exc:
                out.append(exc)
        return out

    def _prefill(self, items: list[_Prefill]) -> list[Any]:
        """On the model thread: read every turn's stored state, then prefill all the
        turns (their new attachments already encoded) in one batch and
        choose each sampled reply's first token, so it reaches the client without waiting
        for a decode step. One result per item, ``(new memory entries, run, first token
        or None at once at the end)``, ``_UNSTARTED`` in place of the token for beam
        search and cancelled replies, or the exception that item alone raises."""
        from .batching import first_token
        from .runtime import TurnRequest, start_turns
        from .state import MemoryEntry, loads_entry, loads_state

        out: list[Any] = [None] * len(items)
        todo: dict[int, tuple[list[Any], TurnRequest]] = {}
        for i, item in enumerate(items):
            try:
                state = loads_state(item.state) if item.state else None
                memory = [loads_entry(b) for b in item.memory]
                new = [MemoryEntry(m.name, _raise_if_error(v), a.id)
                       for (m, a), v in zip(item.attachments, item.vectors)]
            except Exception as exc:
                out[i] = exc
                continue
            keep = (memory + new)[-self.config.fusion.max_memory:]
            todo[i] = new, TurnRequest(state, keep, item.text, item.params,
                                       min(len(new), len(keep)))
        decoder = self._scheduler.decoder
        requests = [request for _, request in todo.values()]
        runs: list[Any]
        try:
            runs = start_turns(self.model, self.tokenizer, requests, decoder)
        except Exception as exc:
            if len(requests) == 1:
                runs = [exc]
            else:  # one bad turn (a corrupt state, say) must not fail the others
                runs = []
                for request in requests:
                    try:
                        runs += start_turns(self.model, self.tokenizer, [request], decoder)
                    except Exception as one:
                        runs.append(one)
        for (i, (new, _)), run in zip(todo.items(), runs):
            if isinstance(run, Exception):
                out[i] = run
                continue
            try:
                first = (_UNSTARTED if run.generation.sampler is None or items[i].cancelled()
                         else first_token(run))
            except Exception as exc:
                out[i] = exc
                continue
            out[i] = new, run, first
        return out

    def _encode_batch(self, items: list[tuple[Modality, Any]]) -> list[Any]:
        """On the encoder thread: each attachment's vectors, or the exception its encoding
        raised. One encoder call per modality, then one per attachment of a modality
        whose batch failed, so a bad one fails only its own turn."""
        by_modality: dict[str, list[int]] = {}
        for k, (modality, _) in enumerate(items):
            by_modality.setdefault(modality.name, []).append(k)
        out: list[Any] = [None] * len(items)
        for group in by_modality.values():
            modality = items[group[0]][0]
            try:
                vectors = self._encode(modality, [items[k][1] for k in group])
                for k, v in zip(group, vectors):
                    out[k] = v
            except Exception:
                for k in group:
                    try:
                        out[k] = self._encode(modality, [items[k][1]])[0]
                    except Exception as exc:
                        out[k] = exc
        return out

    def _encode(self, modality: Modality, features: list[Any]) -> list[Any]:
        import torch

        x, lengths = modality.collate(features)
        with torch.inference_mode():
            return self.plugins.wrap_call(modality, "encode", self.model.encode, modality.name,
                                          x, lengths)

    @staticmethod
    def _trim_stop(text: str, stops: Iterable[str]) -> str:
        for s in stops:
            if s and s in text:
                text = text[: text.index(s)]
        return text


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


def _raise_if_error(value: Any) -> Any:
    if isinstance(value, Exception):
        raise value
    return value
