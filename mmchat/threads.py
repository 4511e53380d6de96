"""Worker threads that never keep the process alive.

The engine's model, media and encoder threads run in :class:`DaemonPool`\\ s. The
standard ``ThreadPoolExecutor`` joins its (non-daemon) threads when the interpreter
exits, so a program that ends without closing its engine would wait on a reply whose
reader went away, forever. A daemon thread does not hold the exit up; the engine stops
the work of its threads from an ``atexit`` hook (:meth:`mmchat.Engine.start`), so none
of them is inside torch while the interpreter finalizes.
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
        self._lock = threading.Lock()
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
            future, fn, args, kwargs = work
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # the caller sees it, as with ThreadPoolExecutor
                future.set_exception(exc)
            else:
                future.set_result(result)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
