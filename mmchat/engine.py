"""The embedding API: :class:`Engine` turns messages plus attachments into streamed replies.

Model, Pillow and librosa work never runs on the event loop: each modality decodes
and encodes in threads of its own, with a time limit and its output checked
(:mod:`mmchat.isolation`; attachments that arrive together are encoded in one call per
modality, while replies decode), and the rest of the model work in one dedicated thread.

This module holds the engine's lifecycle and its public methods; a reply's turn runs in
:mod:`mmchat.turnrunner`, its model-thread work in :mod:`mmchat.turnwork`.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack

from . import config as config_module
from .budget import DecodeAllowance
from .config import Config
from .errors import (
    EmptyMessage,
    EngineClosed,
    InputError,
    MediaTooLarge,
    MessageTooLong,
    MMChatError,
    SessionForbidden,
)
from .isolation import run_plugin
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
from .threads import EngineThreads
from .turnhooks import TurnHooks
from .turnrunner import TurnRunner, dropped_reply, now
from .turnwork import raise_if_error

if TYPE_CHECKING:
    from .sync import SyncEngine

__all__ = ["Delta", "Engine", "Reply", "ReplyStream"]

logger = logging.getLogger(__name__)

#: How long :meth:`Engine.close` waits for cancelled replies to finish saving.
CLOSE_TIMEOUT_S = 10.0


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
        self._threads: EngineThreads | None = None  # the model and media threads, once started
        self._scheduler: Any = None  # batching.DecodeScheduler, once the model is loaded
        self._guard: Any = None  # isolation.PluginGuard: the modalities' threads
        self._runner: TurnRunner | None = None  # runs the turns, once the model is loaded
        self._streams: set[ReplyStream] = set()  # replies whose turn is still running
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closed = False
        self._at_exit: Callable[[], None] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
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
            self._threads = threads = EngineThreads()
            # Neither holds the engine: one its program dropped unclosed is still collected
            # (its work stops then), and its threads are still waited for at exit.
            self._finalizer = weakref.finalize(self, threads.release)
            self._finalizer.atexit = False
            self._at_exit = functools.partial(_stop_at_exit, weakref.ref(self), threads)
            atexit.register(self._at_exit)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(threads.model, self._load_model)
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
        assert self._threads is not None
        self._scheduler = DecodeScheduler(decoder, self._threads.model)
        self._guard = PluginGuard(self.served_modalities, self.model.encoders,
                                  self.model.config.d_model, self.config.plugins,
                                  extend=self.model.with_objects
                                  if self.model.objects is not None else None)
        self._threads.on_stop(self._scheduler.close)
        self._threads.on_stop(self._guard.close)
        for pool in self._guard.encoder_pools():
            self._threads.wait_for(pool)
        self._runner = TurnRunner(
            self.config, self.store, self._hooks, model=self.model, tokenizer=self.tokenizer,
            scheduler=self._scheduler, guard=self._guard, media_pool=self._threads.media,
            fallback_threshold=lambda: self.fallback_threshold,
            closing=lambda: self._closed)

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
        assert self._threads is not None
        for modality in self.modalities.values():
            if modality.name not in self.model.kind_index:
                continue
            t0 = time.perf_counter()
            try:
                example = await loop.run_in_executor(
                    self._threads.media, run_plugin, modality, "example", modality.example)
                if example is None:
                    continue
                vectors = await self._turns().media([(modality, Attachment(*example))])
                raise_if_error(vectors[0])
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
        if self._finalizer is not None:
            self._finalizer.detach()
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
                stream._put(dropped_reply(stream))
        if self._started:
            self.plugins.call_each("shutdown", engine=self)
        await self.store.close()
        if self._threads is not None:
            await self._threads.model.aclose()
            await self._threads.media.aclose()
        self._scheduler = self._guard = self._runner = None
        self._started = False

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
            self._turns().run(session_id, text, resolved, params, stream, turn, media_allowance))
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
        vectors = [raise_if_error(v) for v in await self._turns().media(media)]
        added: list[dict[str, Any]] = []
        if transcript.system is not None:
            added.append({"role": "system", "id": uuid.uuid4().hex, "time": now(),
                          "text": transcript.system})
        for turn in seeded:
            time_now = now()
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

    def _turns(self) -> TurnRunner:
        """The :class:`~mmchat.turnrunner.TurnRunner` of the started engine."""
        assert self._runner is not None, "the engine has not started"
        return self._runner

    def _modality_for(self, attachment: Attachment) -> Modality:
        from .isolation import choose_modality

        modality = choose_modality(self.modalities, attachment,
                                   None if self.model is None else self.model.kind_index)
        if len(attachment.data) > modality.max_bytes:
            raise MediaTooLarge(f"{modality.name} attachment is {len(attachment.data)} bytes; "
                                f"the limit is {modality.max_bytes}")
        return modality


def _stop_at_exit(ref: weakref.ReferenceType[Engine], threads: EngineThreads) -> None:
    """``atexit``: stop the worker threads of an engine its program did not close (and
    wait for them, so none is inside torch while the interpreter finalizes), even if
    the garbage collector already took the engine."""
    engine = ref()  # close() unregisters this hook, so a live engine here is open
    if engine is not None and engine._sync is not None and not engine._sync.closed:
        engine._sync.close_at_exit()  # its loop still runs: close it there
    else:
        threads.stop()
