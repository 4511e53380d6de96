"""Rate limiting: a token bucket that takes the time as an argument."""

from __future__ import annotations


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` saved. Pure: the
    caller passes the time (``loop.time()``, say) to every call."""

    def __init__(self, rate: float, burst: float, *, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now

    def try_acquire(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are enough; ``False`` (and take none) if not."""
        if cost > self.burst:
            raise ValueError(f"cost {cost} can never fit a burst of {self.burst}")
        self._refill(now)
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    def retry_after(self, now: float, cost: float = 1.0) -> float:
        """Seconds from ``now`` until ``cost`` tokens are there."""
        self._refill(now)
        return max(0.0, (cost - self._tokens) / self.rate)
