"""A client's allowance of media decode time, so one client cannot keep the decoders
busy for everyone else.

:class:`DecodeAllowance` counts the CPU seconds a client's attachments took to decode
(measured on the decode thread, so time spent waiting for a core is not charged): up to
``burst`` seconds at once, regained at ``rate`` seconds per second. A decode starts only
while the balance is above zero and is charged what it used when it ends, so the balance
may go below zero after a costly picture; until it is back above zero the client's
attachments are refused with :class:`~mmchat.errors.MediaBusy`, which names the wait.
The server keeps one per connection (``[server] media_decode_seconds`` and
``media_decode_rate``); an embedding program may pass its own to
:meth:`mmchat.Engine.stream`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from .errors import MediaBusy


class DecodeAllowance:
    """CPU seconds of media decoding: ``burst`` at once, ``rate`` regained per second.

    Not thread-safe: call it from one thread (the engine calls it on its event loop).
    """

    def __init__(self, rate: float, burst: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(rate) and rate > 0 and math.isfinite(burst) and burst > 0):
            raise ValueError(f"rate and burst must be positive seconds, not {rate!r} and "
                             f"{burst!r}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._balance = float(burst)
        self._last = clock()
        #: CPU seconds charged so far.
        self.spent = 0.0

    @property
    def balance(self) -> float:
        """Seconds left now (below zero: owed)."""
        self._refill()
        return self._balance

    def _refill(self) -> None:
        now = self._clock()
        if now > self._last:
            self._balance = min(self.burst, self._balance + (now - self._last) * self.rate)
            self._last = now

    def retry_after(self) -> float:
        """Seconds until a decode may start again (0 when one may now)."""
        balance = self.balance
        return 0.0 if balance > 0 else (-balance) / self.rate + 1e-3

    def admit(self) -> None:
        """Raise :class:`MediaBusy` unless there is time left to start a decode."""
        if self.balance > 0:
            return
        wait = self.retry_after()
        raise MediaBusy(f"this connection used its media decode time ({self.burst:g} CPU "
                        f"seconds, {self.rate:g} regained per second); send attachments "
                        f"again in {wait:.1f}s", retry_after=wait)

    def charge(self, seconds: float) -> None:
        """Take the CPU seconds a decode used."""
        if seconds > 0:
            self._refill()
            self._balance -= seconds
            self.spent += seconds
