"""Worker threads that never keep the process alive.

The engine's model, media and encoder threads run in :class:`DaemonPool`\\ s. The
standard ``ThreadPoolExecutor`` joins its (non-daemon) threads when the interpreter
exits, so a program that ends without closing its engine would wait on a reply whose
reader went away, forever. A daemon thread does not hold the exit up; the engine stops
the work of its threads from an ``atexit`` hook (:meth:`mmchat.Engine.start`), so none
of them is inside torch while the interpreter finalizes.

:class:`EngineThreads` holds one engine's pools and the work that runs on them, apart
from the engine, so that they can still be stopped when a program dropped its engine
without closing it and the garbage collector took it before the exit.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonPool(Executor):
    """``workers`` daemon threads named ``name-N`` taking work from one queue."""

    def __init__(self, workers: int, name: str) -> None:
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        # Reentrant: an engine's finalizer may shut the pool down from a garbage
        # collection that began inside submit().
        self._lock = threading.RLock()
        self._shutdown = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: Future[T] = Future()
            self._queue.put((future, fn, args, kwargs))
            return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if not self._shutdown:
                self._shutdown = True
                if cancel_futures:
                    self._cancel_queued()
                for _ in self._threads:
                    self._queue.put(None)
        if wait:
            current = threading.current_thread()
            for thread in self._threads:
                if thread is not current:
                    thread.join()

    async def aclose(self) -> None:
        """:meth:`shutdown`, waiting for the threads to end without blocking the event
        loop (nor needing an executor of its own, which may be gone at exit)."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def wait() -> None:
            self.shutdown(wait=True)
            loop.call_soon_threadsafe(_settle, ended)

        threading.Thread(target=wait, name="mmchat-pool-close", daemon=True).start()
        await ended

    def _cancel_queued(self) -> None:
        while True:
            try:
                work = self._queue.get_nowait()
            except queue.Empty:
                return
            if work is not None:
                work[0].cancel()

    def _work(self) -> None:
        while (work := self._queue.get()) is not None:
            _run(*work)
            # An idle thread holds nothing: the last job's function may be a method of
            # an engine its program dropped, which the collector must still be able to take.
            del work


class EngineThreads:
    """One engine's model and media threads, and what stops the work on them.

    It holds no reference to the engine: the engine's finalizer stops the work when
    the garbage collector takes an engine nobody closed (:meth:`release`), and the
    ``atexit`` hook waits for the threads to end (:meth:`stop`).
    """

    def __init__(self) -> None:
        self.model = DaemonPool(1, "mmchat-model")
        self.media = DaemonPool(2, "mmchat-media")
        self._stoppers: list[Callable[[], None]] = []  # each stops one kind of work, never blocks
        self._also: list[DaemonPool] = []  # others' pools that run torch: waited for too

    def on_stop(self, stop: Callable[[], None]) -> None:
        """Call ``stop()`` (which must not block) when the threads stop."""
        self._stoppers.append(stop)

    def wait_for(self, pool: DaemonPool) -> None:
        """:meth:`stop` also waits for ``pool``'s threads (shut down by a stopper)."""
        self._also.append(pool)

    def release(self) -> None:
        """Stop the work and let the threads end, without waiting for them; drop what
        the work held (the model, say)."""
        stoppers, self._stoppers = self._stoppers, []
        for stop in stoppers:
            stop()
        for pool in (self.model, self.media):
            pool.shutdown(wait=False, cancel_futures=True)

    def stop(self) -> None:
        """:meth:`release`, then wait for the threads to end (never from one of them)."""
        self.release()
        for pool in (self.model, self.media, *self._also):
            pool.shutdown(wait=True)


def _run(future: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...],
         kwargs: dict[str, Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # the caller sees it, as with ThreadPoolExecutor
        future.set_exception(exc)
    else:
        future.set_result(result)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
