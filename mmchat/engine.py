"""The embedding API: :class:`Engine` turns messages plus attachments into streamed replies.

Model, Pillow and librosa work never runs on the event loop: each modality decodes
and encodes in threads of its own, with a time limit and its output checked
(:mod:`mmchat.isolation`; attachments that arrive together are encoded in one call per
modality, while replies decode), and the rest of the model work in one dedicated thread.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack

from . import config as config_module
from .budget import DecodeAllowance
from .config import Config
from .errors import (
    Cancelled,
    EmptyMessage,
    EngineClosed,
    InputError,
    MediaTooLarge,
    MessageTooLong,
    MMChatError,
    SessionForbidden,
)
from .isolation import run_plugin, until_cancelled
from .modality import Attachment, Modality
from .plugins import PluginHost
from .replies import Delta, Reply, ReplyStream
from .sessions import SessionStore, SessionTurn, validate_session_id
from .settings import GenerationSettings
from .stores import open_store
from .subjects import (
    Erased,
    erase_subject,
    export_lines,
    export_records,
    owner_for,
    subject_sessions,
    validate_subject,
)
from .threads import DaemonPool

if TYPE_CHECKING:
    from .sync import SyncEngine

__all__ = ["Delta", "Engine", "Reply", "ReplyStream"]
from .turnhooks import TurnHooks

logger = logging.getLogger(__name__)

#: How long :meth:`Engine.close` waits for cancelled replies to finish saving.
CLOSE_TIMEOUT_S = 10.0

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
        self._hooks = TurnHooks(self.plugins)  # prepare_turn, redact_text, record_turn
        self.store = store or open_store(c.sessions)
        self.model: Any = None  # the DialogueLM, once started
        self.tokenizer: Any = None  # its Tokenizer
        self.checkpoint_meta: dict[str, Any] = {}
        self.fallback_threshold = 0.0  # resolved when the model loads (loading.fallback_threshold)
        self._model_pool: DaemonPool | None = None
        self._media_pool: DaemonPool | None = None
        self._scheduler: Any = None  # batching.DecodeScheduler, once the model is loaded
        self._guard: Any = None  # isolation.PluginGuard: the modalities' threads
        self._streams: set[ReplyStream] = set()  # replies whose turn is still running
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closed = False
        self._at_exit: Callable[[], None] | None = None
        self._sync: SyncEngine | None = None  # drives the *_sync methods
        self._sync_lock = threading.RLock()

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
            self._check_open()
            if self._started:
                return self
            self._model_pool = DaemonPool(1, "mmchat-model")
            self._media_pool = DaemonPool(2, "mmchat-media")
            self._at_exit = functools.partial(_stop_at_exit, weakref.ref(self))
            atexit.register(self._at_exit)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._model_pool, self._load_model)
            await self._warm_up()
            self._started = True
        self.plugins.call_each("startup", engine=self)
        return self

    def _load_model(self) -> None:
        from .batching import DecodeScheduler
        from .fastpath import build_decoder
        from .isolation import PluginGuard
        from .loading import fallback_threshold, load_model

        self.model, self.tokenizer, self.checkpoint_meta = load_model(self.config, self.modalities)
        self.fallback_threshold = fallback_threshold(self.config, self.checkpoint_meta)
        decoder = build_decoder(self.model, fast=self.config.model.fast_decode)
        assert self._model_pool is not None
        self._scheduler = DecodeScheduler(decoder, self._model_pool)
        self._guard = PluginGuard(self.served_modalities, self.model.encoders,
                                  self.model.config.d_model, self.config.plugins)

    @property
    def served_modalities(self) -> dict[str, Modality]:
        """The modalities the loaded model takes (every installed one before it loads)."""
        if self.model is None:
            return dict(self.modalities)
        return {m: self.modalities[m] for m in self.model.kind_index}

    def plugin_health(self) -> list[dict[str, Any]]:
        """Each served modality's plugin, breaker state (``closed``, ``open``,
        ``half_open``), failures and time limit."""
        return [] if self._guard is None else self._guard.health()

    async def _warm_up(self) -> None:
        """Decode and encode each modality's :meth:`~mmchat.Modality.example` once, as a
        turn would; a failure is logged (the modality's first turn will fail loudly)."""
        loop = asyncio.get_running_loop()
        for modality in self.modalities.values():
            if modality.name not in self.model.kind_index:
                continue
            t0 = time.perf_counter()
            try:
                example = await loop.run_in_executor(
                    self._media_pool, run_plugin, modality, "example", modality.example)
                if example is None:
                    continue
                vectors = await self._media([(modality, Attachment(*example))])
                _raise_if_error(vectors[0])
            except Exception:
                logger.exception("warming up modality %r failed", modality.name)
                continue
            logger.info("warmed up modality %r in %.0f ms", modality.name,
                        (time.perf_counter() - t0) * 1000)

    async def close(self) -> None:
        """Cancel the replies still running, then release the model, store and threads.

        Every stream still running ends as :meth:`ReplyStream.cancel` ends it: its
        iteration stops and its reply has finish_reason ``"cancelled"``. A turn that had
        reached the model is saved up to its last token; one still decoding its media
        or waiting for its session is dropped, with an empty reply. Afterwards every
        method raises :class:`~mmchat.errors.EngineClosed`. Nothing here blocks the
        event loop: the decode worker needs it to hand replies their ends.
        """
        if self._closed:
            return
        self._closed = True
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
        streams = list(self._streams)
        for stream in streams:
            stream.cancel()
        if self._scheduler is not None:
            self._scheduler.close()
        if self._guard is not None:
            self._guard.close()
        tasks = {s._task: s for s in streams if s._task is not None}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
            for task in pending:  # stuck outside the model (a store call, say)
                task.cancel()
                stream = tasks[task]
                stream._queue.put_nowait(self._dropped(stream))
        if self._started:
            self.plugins.call_each("shutdown", engine=self)
        await self.store.close()
        for pool in (self._model_pool, self._media_pool):
            if pool is not None:
                await pool.aclose()
        self._scheduler = self._guard = None
        self._started = False

    def _stop_threads(self) -> None:
        """Without an event loop (at exit): stop model work and wait for the worker
        threads to end, so none of them is inside torch while the interpreter finalizes."""
        if self._scheduler is not None:
            self._scheduler.close()
        if self._guard is not None:
            self._guard.close()
        for pool in (self._model_pool, self._media_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed("the engine is closed; make a new one")

    async def __aenter__(self) -> "Engine":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- conversations ---------------------------------------------------------------

    def new_session_id(self) -> str:
        return uuid.uuid4().hex

    async def stream(self, session_id: str, text: str = "",
                     attachments: Sequence[Attachment | str | Path] = (), *,
                     turn: SessionTurn | None = None, timeout: float | None = None,
                     subject: str | None = None,
                     media_allowance: DecodeAllowance | None = None,
                     **generation: Unpack[GenerationSettings]) -> ReplyStream:
        """Start a reply. Validation errors raise here, before anything is stored.

        ``generation`` overrides ``[generation]`` settings for this reply
        (``strategy="beam"``, ``seed=1`` ...).

        ``timeout`` (seconds, from this call): when it passes the turn is cancelled and
        the stream raises :class:`~mmchat.errors.ReplyTimeout`.

        ``subject`` (any text, see :mod:`mmchat.subjects`) claims the session for that
        subject unless it has one (as the server does for a token's subject);
        :class:`~mmchat.errors.SessionForbidden` if another subject has it.

        ``turn`` is the session already held for this reply (from the store's
        ``begin_turn``): the engine then neither locks nor loads, and only stages the
        turn's write in it (``turn.save``) for its holder to send with ``turn.end()``.
        Without it the engine holds the session itself for the turn.

        ``media_allowance`` is charged the CPU time of decoding the attachments; while it
        is spent, the stream raises :class:`~mmchat.errors.MediaBusy` before anything is
        decoded or stored (the server gives each connection one).
        """
        await self.start()
        from .generate import GenerationParams

        self._check_session_id(session_id)
        if turn is not None and turn.session_id != session_id:
            raise InputError(f"the turn held is of session {turn.session_id!r}, "
                             f"not {session_id!r}")
        if timeout is not None and not timeout > 0:
            raise InputError(f"timeout must be a number of seconds above 0, not {timeout!r}")
        atts = [a if isinstance(a, Attachment) else Attachment.from_path(a) for a in attachments]
        text, atts = await self._hooks.prepare(session_id, text, atts)
        self._check_message(text, atts)
        resolved = [(self._modality_for(a), a) for a in atts]
        if resolved and media_allowance is not None:
            media_allowance.admit()
        try:
            params = GenerationParams.from_config(self.config.generation, **generation)
        except (ValueError, MMChatError) as exc:
            raise InputError(str(exc)) from None
        await self._claim(session_id, subject)
        stream = ReplyStream(asyncio.Queue(), session_id=session_id)
        stream._set_timeout(timeout)
        stream._task = asyncio.create_task(
            self._run_turn(session_id, text, resolved, params, stream, turn, media_allowance))
        self._streams.add(stream)
        stream._task.add_done_callback(lambda _: self._streams.discard(stream))
        return stream

    async def reply(self, session_id: str, text: str = "",
                    attachments: Sequence[Attachment | str | Path] = (), *,
                    timeout: float | None = None, subject: str | None = None,
                    **generation: Unpack[GenerationSettings]) -> Reply:
        """Generate a whole reply and return it with attention mass, usage and timings.

        Cancelling the task that awaits it cancels the turn, as ``timeout`` does.
        ``subject`` claims the session as :meth:`stream` says."""
        stream = await self.stream(session_id, text, attachments, timeout=timeout,
                                   subject=subject, **generation)
        return await stream.wait()

    async def reset(self, session_id: str) -> None:
        self._check_open()
        self._check_session_id(session_id)
        await self.store.delete(session_id)

    async def history(self, session_id: str) -> list[dict[str, Any]]:
        self._check_open()
        data = await self.store.load(session_id)
        return [] if data is None else data.history

    # -- subjects (mmchat.subjects; no model needed) ------------------------------------

    async def sessions(self, subject: str) -> list[str]:
        """Ids of ``subject``'s live sessions, sorted (expired ones drop out)."""
        self._check_open()
        return await subject_sessions(self.store, self._subject(subject))

    async def export(self, session_id: str | None = None, *,
                     subject: str | None = None) -> str:
        """The transcript of one session, or of every session of ``subject``, as JSON
        Lines: one object per message (its :meth:`history` entry, with ``session`` and
        ``subject`` first; the schema is in docs/api.md). :meth:`seed` takes the records
        of one session back."""
        self._check_open()
        if session_id is not None:
            self._check_session_id(session_id)
        if (session_id is None) == (subject is None):
            raise InputError("export takes a session id or subject=, exactly one")
        return export_lines(await export_records(
            self.store, session_id,
            subject=None if subject is None else self._subject(subject)))

    async def erase(self, subject: str) -> Erased:
        """Erase every trace of ``subject``: each of its sessions' state, memory,
        history, reply stream, message ids and cancels, and its index. A turn running
        in one of them ends first. Returns the counts of what was erased."""
        self._check_open()
        return await erase_subject(self.store, self._subject(subject))

    async def seed(self, session_id: str, turns: Sequence[Mapping[str, Any]] = (), *,
                   system: str | None = None, subject: str | None = None
                   ) -> list[dict[str, Any]]:
        """Add a transcript's turns to a session without generating: its state, memory
        and history then are what they would be had the replies been generated (a
        greedy reply that ended by itself). ``turns`` alternate user turns (``text``,
        ``attachments``: :class:`Attachment`\\ s or paths) and assistant turns (``text``);
        :meth:`history` entries and :meth:`export` records qualify.

        ``system`` (or a first turn with role ``system``) starts a new session with a
        system text: stored first in its history and run through the model before the
        turns, without generating; a session that has turns already refuses one.
        ``subject`` claims the session as :meth:`reply` does. Returns the history
        entries added."""
        from .seeding import read_transcript, seeded_state
        from .state import MemoryEntry, dumps_entry

        await self.start()
        self._check_session_id(session_id)
        transcript = read_transcript(turns, self.config.limits.max_text_chars, system)
        seeded = transcript.turns
        media = [(self._modality_for(a), a) for turn in seeded for a in turn.attachments]
        await self._claim(session_id, subject)
        vectors = [_raise_if_error(v) for v in await self._media(media)]
        added: list[dict[str, Any]] = []
        if transcript.system is not None:
            added.append({"role": "system", "id": uuid.uuid4().hex, "time": _now(),
                          "text": transcript.system})
        for turn in seeded:
            time_now = _now()
            added += [
                {"role": "user", "id": uuid.uuid4().hex, "time": time_now, "text": turn.text,
                 "attachments": [{"modality": self._modality_for(a).name,
                                  "mime_type": a.mime_type, "id": a.id}
                                 for a in turn.attachments]},
                {"role": "assistant", "id": uuid.uuid4().hex, "time": time_now,
                 "text": turn.reply, "finish_reason": "seeded"},
            ]
        async with self.store.turn(session_id) as session:
            if transcript.system is not None and session.state:
                raise InputError(f"session {session_id!r} has turns already; a system "
                                 "text can only start a session")
            state = await self._scheduler.call(
                seeded_state, self.model, self.tokenizer, self._scheduler.decoder,
                session.state or None, transcript)
            entries = [dumps_entry(MemoryEntry(m.name, v, a.id))
                       for (m, a), v in zip(media, vectors)]
            session.save(state=state, memory_added=entries, turns=added,
                         max_memory=self.config.fusion.max_memory)
        return added

    # -- sync twins (mmchat.SyncEngine is the full sync API) ---------------------------

    def reply_sync(self, session_id: str, text: str = "",
                   attachments: Sequence[Attachment | str | Path] = (), *,
                   timeout: float | None = None, subject: str | None = None,
                   **generation: Unpack[GenerationSettings]) -> Reply:
        """Blocking :meth:`reply`, through :meth:`sync` (safe from any thread)."""
        return self.sync().reply(session_id, text, attachments, timeout=timeout,
                                 subject=subject, **generation)

    def stream_sync(self, session_id: str, text: str = "",
                    attachments: Sequence[Attachment | str | Path] = (), *,
                    timeout: float | None = None, subject: str | None = None,
                    **generation: Unpack[GenerationSettings]) -> Iterator[Delta]:
        """Blocking iterator of deltas, through :meth:`sync`; leaving it early or closing
        it cancels the turn. ``self.sync().stream(...)`` also gives the reply."""
        return iter(self.sync().stream(session_id, text, attachments, timeout=timeout,
                                       subject=subject, **generation))

    def close_sync(self) -> None:
        self.sync().close()

    def sync(self) -> SyncEngine:
        """The :class:`~mmchat.SyncEngine` that runs this engine on a loop thread of its
        own (made on first use). Use either it or this engine's async methods."""
        from .sync import SyncEngine

        with self._sync_lock:
            return self._sync or SyncEngine.wrap(self)

    # -- internals -------------------------------------------------------------------

    @staticmethod
    def _subject(subject: str) -> str:
        try:
            return validate_subject(subject)
        except ValueError as exc:
            raise InputError(str(exc)) from None

    async def _claim(self, session_id: str, subject: str | None) -> None:
        """Make ``subject`` the session's owner unless it has one; refuse another's."""
        if subject is None:
            return
        owner = owner_for(self._subject(subject))
        if await self.store.claim_session(session_id, owner) != owner:
            raise SessionForbidden(f"session {session_id!r} belongs to another subject")

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
        from .isolation import choose_modality

        modality = choose_modality(self.modalities, attachment,
                                   None if self.model is None else self.model.kind_index)
        if len(attachment.data) > modality.max_bytes:
            raise MediaTooLarge(f"{modality.name} attachment is {len(attachment.data)} bytes; "
                                f"the limit is {modality.max_bytes}")
        return modality

    async def _run_turn(self, session_id: str, text: str,
                        attachments: list[tuple[Modality, Attachment]], params: Any,
                        stream: ReplyStream, turn: SessionTurn | None,
                        allowance: DecodeAllowance | None = None) -> None:
        try:
            reply = await self._turn(session_id, text, attachments, params, stream, turn,
                                     allowance)
            stream._queue.put_nowait(reply)
            await self._hooks.record(session_id, text, [a for _, a in attachments], reply)
        except Cancelled as exc:
            stream._queue.put_nowait(self._dropped(stream) if self._closed else exc)
        except Exception as exc:  # every failure reaches the consumer, nothing is lost
            if not isinstance(exc, MMChatError):
                logger.exception("turn failed for session %s", session_id)
            stream._queue.put_nowait(exc)

    def _dropped(self, stream: ReplyStream) -> Reply:
        """The end of a turn the closing engine dropped before it reached the model."""
        return Reply(session_id=stream.session_id, text="", finish_reason="cancelled", attention={},
                     prompt_tokens=0, completion_tokens=0, timings={})

    async def _turn(self, session_id: str, text: str,
                    attachments: list[tuple[Modality, Attachment]], params: Any,
                    stream: ReplyStream, turn: SessionTurn | None,
                    allowance: DecodeAllowance | None = None) -> Reply:
        from .generate import needs_fallback

        t0, received = time.perf_counter(), _now()
        # a turn cancelled while its media wait (on a slow plugin, say) ends there
        vectors = (await until_cancelled(self._media(attachments, allowance), stream._cancel)
                   if attachments else [])
        t_media = time.perf_counter()
        held = self.store.turn(session_id) if turn is None else contextlib.nullcontext(turn)
        async with held as session:
            stream._holds_session = True
            # Model work runs between the steps of the replies being decoded together,
            # with the prefills of every turn that arrived meanwhile in one batch.
            new_entries, run, first = await self._scheduler.call_batched(
                self._prefill, _Prefill(attachments, vectors, list(session.memory),
                                        session.state or None, text, params,
                                        lambda: stream.cancelled))
            t_prefill = time.perf_counter()
            dropped = self._pushed_out(session.memory, new_entries)
            redactor = self._hooks.redactor(session_id)
            t_first = await self._decode(run, first, stream, redactor)
            done = await self._finish_turn(_Finish(run, stream.cancelled, new_entries))
            reply_text = self._trim_stop(self.tokenizer.decode(run.tokens), params.stop)
            if redactor is not None:  # a failed redaction ends the turn, nothing stored
                if redactor.error is not None:
                    raise redactor.error
                reply_text = redactor.text(reply_text, final=True)
            confidence = run.generation.confidence
            fallback = needs_fallback(done.finish_reason, confidence, self.fallback_threshold)
            if fallback:
                reply_text = self.config.generation.fallback_text
            turns: list[dict[str, Any]] = [
                {"role": "user", "id": uuid.uuid4().hex, "time": received, "text": text,
                 "attachments": [{"modality": m.name, "mime_type": a.mime_type, "id": a.id}
                                 for m, a in attachments]},
                {"role": "assistant", "id": uuid.uuid4().hex, "time": _now(),
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

    async def _media(self, attachments: list[tuple[Modality, Attachment]],
                     allowance: DecodeAllowance | None = None) -> list[Any]:
        """Decode each attachment (a failure raises), then encode it (batched with the
        attachments of other turns): its vectors, or the exception its encoding raised.
        Both run in the modality's own threads, limited and checked. A turn decodes its
        attachments one after another, so it holds one decode thread at a time; each
        decode's CPU time is charged to ``allowance``."""
        guard = self._guard
        features = [await guard.decode(m, a, allowance) for m, a in attachments]
        return await asyncio.gather(*(
            guard.encode(modality, f) for (modality, _), f in zip(attachments, features)),
            return_exceptions=True)

    async def _decode(self, run: Any, first: Any, stream: ReplyStream,
                      redactor: Any = None) -> float | None:
        """Stream the reply's tokens into ``stream`` as deltas (through ``redactor``, a
        :class:`~mmchat.turnhooks.Redactor`) until decoding ends, the first one at once
        when the prefill chose it; ``perf_counter()`` of the first."""
        put = stream._queue.put_nowait
        deltas = _Deltas(self.tokenizer,
                         put if redactor is None else redactor.wrap(put, stream.cancel))
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
        finished: _Finished
        try:
            finished = await self._scheduler.call_batched(self._finish, item)
        except Cancelled:
            loop = asyncio.get_running_loop()
            done = await loop.run_in_executor(self._media_pool, self._finish, [item])
            finished = _raise_if_error(done[0])
        return finished

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


def _now() -> str:
    """The time now, for transcripts: ISO 8601 in UTC."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _raise_if_error(value: Any) -> Any:
    if isinstance(value, Exception):
        raise value
    return value


def _stop_at_exit(ref: weakref.ReferenceType[Engine]) -> None:
    """``atexit``: stop the worker threads of an engine its program did not close."""
    engine = ref()
    if engine is None or engine._closed:
        return
    if engine._sync is not None and not engine._sync.closed:
        engine._sync.close_at_exit()  # its loop still runs: close it there
    else:
        engine._stop_threads()
