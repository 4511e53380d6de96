"""The turn lock of one session: a fair queue with fencing tokens (see
``scripts/queue.lua``).

Waiters are served in arrival order, whichever process they are in. A waiter sleeps on
its own wake list (``BLPOP``) and is pushed when the lock is freed for it; it also wakes
every :attr:`RedisLock.REFRESH` seconds to keep its place (a place not kept for
:attr:`RedisLock.PLACE_KEPT` seconds is dropped, so a dead waiter holds nobody up) and,
first in line, when the holder's lease ends (a holder that died). It gives up with
:class:`SessionBusy`, naming its place, after the store's ``lock_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NamedTuple

from ...errors import SessionBusy, StoreUnavailable
from . import lua

if TYPE_CHECKING:
    from .store import RedisStore

log = logging.getLogger(__name__)


class Attempt(NamedTuple):
    """One try at the lock: whether it was granted; if not, the place in the queue
    (from 1) and the ms left of the holder's lease (-2: none holds it)."""

    granted: bool
    place: int = 0
    lease_left_ms: int = -2


class RedisLock(contextlib.AbstractAsyncContextManager[None]):
    """The fair turn lock of one session, with a random token per holder, released and
    renewed by token-checking scripts, renewed in the background while held.
    :attr:`fence` is the fencing token of the grant (it grows with every grant)."""

    #: Seconds between a waiter's tries (each keeps its place in the queue).
    REFRESH = 0.5
    #: Seconds a waiter's place is kept without a try.
    PLACE_KEPT = 4.0

    def __init__(self, store: RedisStore, session_id: str) -> None:
        self._store = store
        self.keys = store.keys(session_id)
        self._key = self.keys.lock
        self.session_id = session_id
        self.token = secrets.token_hex(16)
        self.fence: int | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def lease_ms(self) -> int:
        """The lease in milliseconds."""
        return max(1, int(self._store.lock_lease * 1000))

    @property
    def queue_args(self) -> list[int | str]:
        """The place kept (ms), the session TTL (ms) and the wake prefix, as the take
        scripts want them after the token and lease."""
        return [int(self.PLACE_KEPT * 1000), self._store.ttl_ms, self.keys.wake_prefix]

    async def _take(self) -> Attempt:
        """One try of ``acquire.lua``."""
        keys = self.keys
        async with self._store._guard("lock"):
            reply = await lua.run(self._store.client, "acquire",
                                  [keys.lock, keys.queue, keys.waiters, keys.meta],
                                  [self.token, self.lease_ms, *self.queue_args])
        if reply[0] == 1:
            self.fence = int(reply[1])
            return Attempt(True)
        return Attempt(False, int(reply[1]), int(reply[2]))

    async def acquire(self, attempt: Callable[[], Awaitable[Attempt]] | None = None) -> None:
        """Take the lock in turn; :class:`SessionBusy` after ``lock_wait``.

        ``attempt`` replaces :meth:`_take`: one try that queues this lock's token (or
        keeps its place), takes the lock when it is first in line, and sets
        :attr:`fence` when it got it.
        """
        attempt = attempt or self._take
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._store.lock_wait
        try:
            while True:
                got = await attempt()
                if got.granted:
                    return
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise SessionBusy(
                        f"session {self.session_id!r} is busy: waited "
                        f"{self._store.lock_wait:g}s at place {got.place} of its queue "
                        "for the turns ahead")
                pause = min(remaining, self.REFRESH)
                if got.place == 1 and got.lease_left_ms >= 0:  # next: wake as it ends
                    pause = min(pause, got.lease_left_ms / 1000 + 0.001)
                await self._sleep(pause)
        except BaseException:
            await self._leave()
            raise

    async def _sleep(self, seconds: float) -> None:
        """Wait until woken (the lock was freed for this waiter) or ``seconds`` pass."""
        async with self._store._guard("lock wait"):
            await self._store.client.blpop([self.keys.wake_prefix + self.token],
                                           timeout=max(0.01, round(seconds, 3)))

    async def _leave(self) -> None:
        """Give up this waiter's place (a place left behind is dropped in time anyway)."""
        try:
            async with self._store._guard("lock leave"):
                await lua.run(self._store.client, "leave", self.keys.fair_lock,
                              [self.token, self.keys.wake_prefix])
        except StoreUnavailable as exc:
            log.warning("could not leave the queue of session %r: %s", self.session_id, exc)

    async def renew(self) -> bool:
        """Extend the lease; ``False`` if the lock is no longer ours."""
        async with self._store._guard("lock renewal"):
            return bool(await lua.run(self._store.client, "renew", [self._key],
                                      [self.token, self.lease_ms]))

    async def release(self) -> bool:
        """Drop the lock if it is still ours and wake the next waiter; ``False`` if it
        was not ours."""
        async with self._store._guard("lock release"):
            return bool(await lua.run(self._store.client, "release", self.keys.fair_lock,
                                      [self.token, self.keys.wake_prefix]))

    async def _renew_forever(self) -> None:
        interval = self._store.lock_lease / 3
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            try:
                if not await self.renew():
                    log.warning("lost the lock of session %r: its lease ran out while a "
                                "turn was running", self.session_id)
                    return
            except StoreUnavailable as exc:
                log.warning("could not renew the lock of session %r: %s", self.session_id, exc)

    def start_renewal(self) -> None:
        """Renew the lease in the background until :meth:`stop_renewal`."""
        self._stop = asyncio.Event()
        self._renewer = asyncio.create_task(self._renew_forever(),
                                            name=f"mmchat-lock-renewal:{self.session_id}")

    async def stop_renewal(self) -> None:
        """Stop renewing, and wait until no renewal is in flight.

        The event ends the loop; cancelling only cuts short a renewal in flight. A
        cancellation alone is not enough: Python 3.11's ``asyncio.wait_for`` (which
        redis-py writes through) drops one that lands as its write completes, and the
        lock was then renewed forever while this waited.
        """
        renewer, self._renewer = self._renewer, None
        if renewer is None:
            return
        self._stop.set()
        renewer.cancel()
        await asyncio.wait([renewer])
        if not renewer.cancelled() and renewer.exception() is not None:
            log.warning("renewing the lock of session %r failed: %r", self.session_id,
                        renewer.exception())

    def check_released(self, ours: bool) -> None:
        """Log a release that found the lock no longer ours."""
        if not ours:
            log.warning("the lock of session %r had already passed to someone else "
                        "when the turn ended", self.session_id)

    async def release_quietly(self) -> None:
        """:meth:`release`, logging instead of raising when Redis is unreachable: the
        lease runs out by itself, and failing here would hide the turn's outcome."""
        try:
            self.check_released(await self.release())
        except StoreUnavailable as exc:
            log.warning("could not release the lock of session %r: %s", self.session_id, exc)

    async def __aenter__(self) -> None:
        await self.acquire()
        self.start_renewal()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop_renewal()
        await self.release_quietly()
