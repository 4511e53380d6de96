"""Fewer frames per reply: consecutive deltas merged into one, with no I/O.

A connection that asked for ``coalesce`` N (``hello.coalesce``, or the server's
``server.coalesce``) gets each reply's first delta at once, so the time to first token
is unchanged, and the later ones in deltas of up to N tokens. A ``delta`` carrying
several tokens numbers them ``first_seq`` to ``seq``; its text is theirs joined. Held
text goes out before any other event (a ``done``, an ``error``, another reply's delta),
so nothing is reordered and a short reply is ``started``, a delta, at most one more
delta and ``done``. N = 1 is per-token streaming: every event passes as it is.
"""

from __future__ import annotations

from .protocol import Delta, ServerEvent


class DeltaCoalescer:
    """Feed it a connection's server events in order; it returns the events to send."""

    def __init__(self, tokens: int) -> None:
        if tokens < 1:
            raise ValueError("a delta carries at least one token")
        self.tokens = tokens
        self._held: list[Delta] = []
        self._streaming: str | None = None  # the reply whose first delta went out

    def feed(self, event: ServerEvent) -> list[ServerEvent]:
        """The events to send now, in order, for ``event`` (none while it is held)."""
        if self.tokens == 1:
            return [event]
        if type(event) is not Delta:
            return [*self.flush(), event]
        if event.response_id != self._streaming:
            out = self.flush()
            self._streaming = event.response_id
            out.append(event)
            return out
        self._held.append(event)
        return self.flush() if len(self._held) >= self.tokens else []

    def flush(self) -> list[ServerEvent]:
        """The held text as one delta (none when nothing is held)."""
        held = self._held
        if not held:
            return []
        self._held = []
        if len(held) == 1:
            return [held[0]]
        last = held[-1]
        first = held[0].first_seq or held[0].seq
        return [Delta(last.response_id, last.seq, "".join(d.text for d in held), first)]
