"""Outages logged once per episode, not once per request.

An *episode* of a kind of trouble (``session store``: errors, refused writes and
failovers of the session store; ``connections``: connections refused at the server's
limit) begins with its first failure and ends with the next success. Its first failure
is logged at WARNING with what went wrong; while it lasts, failures are only counted
(a WARNING with the count at most once every ``every`` seconds); its end is logged at
WARNING with how many failed and for how long. The counters of ``/metrics`` count every
failure as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class _Episode:
    began: float
    failures: int = 1
    last_report: float = 0.0


class Episodes:
    """Tracks the open episode of each kind of trouble (see the module docstring)."""

    def __init__(self, *, every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._every = every
        self._clock = clock
        self._open: dict[str, _Episode] = {}

    def failed(self, kind: str, detail: str) -> None:
        """One more failure of ``kind``; logs if it begins an episode (or a report of
        a long one is due)."""
        now = self._clock()
        episode = self._open.get(kind)
        if episode is None:
            self._open[kind] = _Episode(now, last_report=now)
            logger.warning("%s: trouble began: %s", kind, detail)
            return
        episode.failures += 1
        if now - episode.last_report >= self._every:
            episode.last_report = now
            logger.warning("%s: still failing: %d failures in %.0fs, the last: %s", kind,
                           episode.failures, now - episode.began, detail)

    def succeeded(self, kind: str) -> None:
        """A success of ``kind``: ends its episode, if one is open, with a log line."""
        episode = self._open.pop(kind, None)
        if episode is not None:
            logger.warning("%s: back to normal after %d failures in %.1fs", kind,
                           episode.failures, self._clock() - episode.began)

    def failing(self, kind: str) -> int:
        """The failures of ``kind``'s open episode (0: none is open)."""
        episode = self._open.get(kind)
        return 0 if episode is None else episode.failures
