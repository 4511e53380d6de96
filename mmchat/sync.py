"""The engine for code without an event loop: :class:`SyncEngine`.

One event loop runs in one daemon thread (the pattern of anyio's ``BlockingPortal``);
every method hands its work to that loop and blocks the calling thread until it is
done, so any number of threads (a Flask or Django worker pool, a
``ThreadPoolExecutor``, Celery) can call one engine at once. The loop and the
engine's worker threads are daemon threads and an ``atexit`` hook closes the engine,
so a program that never calls :meth:`SyncEngine.close` still exits at once.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, Unpack

from .errors import EngineClosed
from .modality import Attachment, Modality
from .replies import Delta, Reply, ReplyStream
from .settings import GenerationSettings

if TYPE_CHECKING:
    from .config import Config
    from .engine import Engine
    from .plugins import PluginHost
    from .sessions import SessionStore
    from .subjects import Erased

T = TypeVar("T")

#: How long the ``atexit`` hook waits for a forgotten engine to close.
EXIT_CLOSE_TIMEOUT_S = 15.0


class SyncEngine:
    """Blocking twin of :class:`mmchat.Engine`, safe to call from any thread.

    ``SyncEngine(config, store=..., plugins=...)`` takes what ``Engine`` takes;
    ``SyncEngine.wrap(engine)`` drives an engine that is not started yet. Use it as a
    context manager or call :meth:`close`; after that every method raises
    :class:`~mmchat.errors.EngineClosed`.
    """

    def __init__(self, config: Config | None = None, *, store: SessionStore | None = None,
                 plugins: PluginHost | None = None) -> None:
        from .engine import Engine

        self._setup(Engine(config, store=store, plugins=plugins))

    @classmethod
    def from_config(cls, path: str | Path | None = None, *, store: SessionStore | None = None,
                    plugins: PluginHost | None = None) -> SyncEngine:
        from . import config as config_module

        return cls(config_module.load(path), store=store, plugins=plugins)

    @classmethod
    def wrap(cls, engine: Engine) -> SyncEngine:
        """Drive ``engine`` from its own loop thread. The engine must not have started
        on another event loop."""
        self = cls.__new__(cls)
        self._setup(engine)
        return self

    def _setup(self, engine: Engine) -> None:
        self.engine = engine
        with engine._sync_lock:
            if engine._sync is not None:
                raise RuntimeError("this engine already has a SyncEngine: engine.sync()")
            engine._sync = self
        self._lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="mmchat-loop", daemon=True)
        self._thread.start()
        self._at_exit = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._at_exit)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def modalities(self) -> dict[str, Modality]:
        return self.engine.modalities

    @property
    def model_description(self) -> str:
        return self.engine.model_description

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> SyncEngine:
        """Load plugins and the model; the other methods start the engine when needed."""
        self._call(self.engine.start)
        return self

    def close(self) -> None:
        """Close the engine (every stream still running ends cancelled, as
        :meth:`mmchat.Engine.close` says) and stop the loop thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self._at_exit)
            closing = asyncio.run_coroutine_threadsafe(self.engine.close(), self._loop)
        try:
            closing.result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if threading.current_thread() is not self._thread:
                self._thread.join()

    def close_at_exit(self) -> None:
        """Close, waiting at most :data:`EXIT_CLOSE_TIMEOUT_S`: turns still running are
        saved as cancelled and no worker thread is left inside torch when the
        interpreter finalizes."""
        if self._closed:
            return
        worker = threading.Thread(target=self.close, name="mmchat-exit", daemon=True)
        worker.start()
        worker.join(EXIT_CLOSE_TIMEOUT_S)

    def __enter__(self) -> SyncEngine:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- conversations ---------------------------------------------------------------

    def new_session_id(self) -> str:
        return self.engine.new_session_id()

    def reply(self, session_id: str, text: str = "",
              attachments: Sequence[Attachment | str | Path] = (), *,
              timeout: float | None = None, subject: str | None = None,
              **generation: Unpack[GenerationSettings]) -> Reply:
        """Blocking :meth:`mmchat.Engine.reply`. A ``KeyboardInterrupt`` while it waits
        cancels the turn (saved as cancelled)."""
        return self._call(self.engine.reply, session_id, text, attachments,
                          timeout=timeout, subject=subject, **generation)

    def stream(self, session_id: str, text: str = "",
               attachments: Sequence[Attachment | str | Path] = (), *,
               timeout: float | None = None, subject: str | None = None,
               **generation: Unpack[GenerationSettings]) -> SyncReplyStream:
        """Start a reply; iterate the result for its :class:`~mmchat.Delta`\\ s.
        Validation errors raise here."""
        stream = self._call(self.engine.stream, session_id, text, attachments,
                            timeout=timeout, subject=subject, **generation)
        return SyncReplyStream(self, stream)

    def reset(self, session_id: str) -> None:
        self._call(self.engine.reset, session_id)

    def history(self, session_id: str) -> list[dict[str, Any]]:
        return self._call(self.engine.history, session_id)

    def seed(self, session_id: str, turns: Sequence[Mapping[str, Any]] = (), *,
             system: str | None = None, subject: str | None = None) -> list[dict[str, Any]]:
        """Blocking :meth:`mmchat.Engine.seed`."""
        return self._call(self.engine.seed, session_id, turns, system=system,
                          subject=subject)

    def sessions(self, subject: str) -> list[str]:
        """Blocking :meth:`mmchat.Engine.sessions`."""
        return self._call(self.engine.sessions, subject)

    def export(self, session_id: str | None = None, *, subject: str | None = None) -> str:
        """Blocking :meth:`mmchat.Engine.export`."""
        return self._call(self.engine.export, session_id, subject=subject)

    def erase(self, subject: str) -> Erased:
        """Blocking :meth:`mmchat.Engine.erase`."""
        return self._call(self.engine.erase, subject)

    # -- the loop thread -------------------------------------------------------------

    def _call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the loop and wait for it in this thread."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("a SyncEngine method was called on its own loop thread (from "
                               "a hook or plugin?); use the async Engine there")
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed; make a new one")
            future = asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), self._loop)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if self._closed:
                raise EngineClosed("the engine closed while this call waited") from None
            raise
        except BaseException:
            future.cancel()  # a KeyboardInterrupt, say: the work stops too
            raise

    def _soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the loop (if it still runs), without waiting."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn)

    def _run_loop(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            # calls still waiting when the engine closed end (as EngineClosed)
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


class SyncReplyStream:
    """Iterator of :class:`~mmchat.Delta` for a reply running on a :class:`SyncEngine`;
    :attr:`reply` is set once it is exhausted.

    Leaving the loop early (``break``, an exception) or :meth:`cancel` cancels the turn:
    it stops within one decode step and is saved as cancelled. Usable as a context
    manager, which cancels the turn on exit unless it finished.
    """

    def __init__(self, engine: SyncEngine, stream: ReplyStream) -> None:
        self._engine = engine
        self._stream = stream

    @property
    def reply(self) -> Reply | None:
        return self._stream.reply

    def cancel(self) -> None:
        self._engine._soon(self._stream.cancel)

    def __iter__(self) -> Iterator[Delta]:
        stream = self._stream
        try:
            while True:
                try:
                    delta = self._engine._call(stream.__anext__)
                except StopAsyncIteration:
                    return
                except EngineClosed:
                    yield from self._left_at_close()
                    return
                yield delta
        finally:
            if not stream._ended:  # left early, or this thread was interrupted
                self.cancel()

    def _left_at_close(self) -> Iterator[Delta]:
        """Once the engine closed (its loop stopped): the deltas the turn left, then its
        end (the cancelled reply)."""
        if threading.current_thread() is not self._engine._thread:
            self._engine._thread.join()
        stream = self._stream
        while not stream._ended:
            try:
                item = stream._queue.get_nowait()
            except asyncio.QueueEmpty:
                raise EngineClosed("the engine closed before this reply ended") from None
            if isinstance(item, Delta):
                yield item
            else:
                stream._end(item)

    def __enter__(self) -> SyncReplyStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._stream.reply is None:
            self.cancel()


def _close_at_exit(ref: weakref.ReferenceType[SyncEngine]) -> None:
    """``atexit``: close an engine its program forgot to close."""
    sync = ref()
    if sync is not None:
        sync.close_at_exit()
