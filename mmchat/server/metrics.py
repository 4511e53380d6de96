"""Prometheus metrics of one server process, in a registry of its own.

This is the only module that imports ``prometheus_client``. Two servers in one process
(as in the tests) keep separate counts.

Under ``mmchat serve --workers N`` (:mod:`.workers`) every worker writes its values to
files in :data:`MULTIPROC_ENV`'s folder (prometheus_client's multiprocess mode) and
``/metrics``, whichever worker answers, renders all workers' together: counters and
histograms summed, gauges summed or, for the up/down ones, the lowest of the live
workers.
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
)

from ..errors import StoreUnavailable
from ..sessions import (
    SessionData,
    SessionHead,
    SessionStore,
    SessionTurn,
    StreamEntry,
    TurnWrite,
)
from ..subjects import Erased
from .episodes import Episodes

#: The kind of trouble (see :mod:`.episodes`) of session store errors and outages.
STORE_TROUBLE = "session store"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
#: The environment variable naming the folder of the workers' metric files.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """Connections, sessions, turns, time to first token, tokens/s, errors by code and
    session-store latency; and, as every Prometheus exporter has them, the process's
    (``process_*``: resident memory, CPU seconds, open files, ...) and the platform's
    (``python_info``).

    With :data:`MULTIPROC_ENV` set (a worker of ``mmchat serve --workers``), the values
    go to that folder and :meth:`render` sums all workers'; the ``process_*`` and
    ``python_info`` metrics, which are one process's, are left out."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        #: The folder of all workers' values, or None for this process's alone.
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        if self.multiprocess_dir is None:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.connections = Gauge("mmchat_connections", "Open WebSocket connections.",
                                 multiprocess_mode="livesum", registry=r)
        self.connections_opened = Counter("mmchat_connections_opened",
                                          "WebSocket connections accepted.", registry=r)
        self.sessions = Gauge("mmchat_active_sessions",
                              "Sessions with at least one open connection here.",
                              multiprocess_mode="livesum", registry=r)
        self.turns = Counter("mmchat_turns", "Replies that ended, by finish reason.",
                             ["finish_reason"], registry=r)
        self.turns_running = Gauge("mmchat_turns_running",
                                   "Replies being generated (or waiting for their session).",
                                   multiprocess_mode="livesum", registry=r)
        self.ttft = Histogram("mmchat_time_to_first_token_seconds",
                              "From a message's arrival to its first streamed delta.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tokens = Counter("mmchat_tokens", "Reply tokens generated.", registry=r)
        self.tokens_per_second = Histogram("mmchat_reply_tokens_per_second",
                                           "Tokens per second of each reply.",
                                           buckets=_RATE_BUCKETS, registry=r)
        self.errors = Counter("mmchat_errors", "Error events sent to clients, by code.",
                              ["code"], registry=r)
        self.store_latency = Histogram("mmchat_store_latency_seconds",
                                       "Session store (Redis) call latency, by operation.",
                                       ["op"], buckets=_LATENCY_BUCKETS, registry=r)
        self.store_up = Gauge("mmchat_store_up",
                              "1 if the last session store ping succeeded, else 0.",
                              multiprocess_mode="livemin", registry=r)
        self.plugin_up = Gauge("mmchat_plugin_up", "1 if a modality's plugin is in service, "
                               "0 while its circuit breaker keeps it out.",
                               ["modality", "plugin"], multiprocess_mode="livemin",
                               registry=r)
        self.openai_sessions = Counter(
            "mmchat_openai_sessions", "OpenAI endpoint requests by how their session was "
            "found: continued (the history matched a session), rebuilt (seeded from the "
            "history) or new (no history).", ["how"], registry=r)
        # Label children by value: labels() takes a lock and builds a key each call.
        self._errors: dict[str, Any] = {}
        self._turns: dict[str, Any] = {}
        self._store_ops: dict[str, Any] = {}
        self.plugin_failures = Gauge("mmchat_plugin_failures", "Failures and timeouts of a "
                                     "modality's decode and encoder calls so far.",
                                     ["modality", "plugin"], multiprocess_mode="livesum",
                                     registry=r)

    def error(self, code: str) -> None:
        """Count an error event sent with ``code``."""
        child = self._errors.get(code)
        if child is None:
            child = self._errors[code] = self.errors.labels(code)
        child.inc()

    def turn_ended(self, finish_reason: str) -> None:
        """Count a reply that ended with ``finish_reason``."""
        child = self._turns.get(finish_reason)
        if child is None:
            child = self._turns[finish_reason] = self.turns.labels(finish_reason)
        child.inc()

    def store_call(self, op: str, seconds: float) -> None:
        """Record one session-store call's latency."""
        child = self._store_ops.get(op)
        if child is None:
            child = self._store_ops[op] = self.store_latency.labels(op)
        child.observe(seconds)

    def observe_plugins(self, health: Sequence[dict[str, Any]]) -> None:
        """Set the plugin gauges from :meth:`mmchat.Engine.plugin_health`."""
        for h in health:
            self.plugin_up.labels(h["modality"], h["plugin"]).set(h["state"] != "open")
            self.plugin_failures.labels(h["modality"], h["plugin"]).set(h["failures"])

    def render(self) -> bytes:
        """The text exposition format for ``/metrics``: this process's, or every
        worker's together."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        together = CollectorRegistry()
        multiprocess.MultiProcessCollector(together, self.multiprocess_dir)
        return generate_latest(together)


def worker_exited(folder: str, pid: int) -> None:
    """Drop a worker that ended from the live gauges of the folder (its counters and
    histograms stay in the sums, as counts never go down)."""
    multiprocess.mark_process_dead(pid, folder)


def clear_worker_values(folder: str) -> None:
    """Remove the metric files an earlier run left in ``folder``."""
    for path in glob.glob(os.path.join(folder, "*.db")):
        os.remove(path)


class TimedStore(SessionStore):
    """Wraps a :class:`SessionStore` and records each call's latency in
    ``mmchat_store_latency_seconds``. Blocking waits (``wait_stream``), the lock and
    beginning a turn (which waits for the lock) are not timed: their duration is the
    other party's, not the store's. Ending a turn is, as ``end_turn``."""

    def __init__(self, inner: SessionStore, metrics: Metrics,
                 episodes: Episodes | None = None) -> None:
        self.inner = inner
        self._metrics = metrics
        #: Every call's outcome, so outages are logged once per episode.
        self.episodes = episodes or Episodes()

    @contextlib.contextmanager
    def _watched(self):
        try:
            yield
        except StoreUnavailable as exc:
            self.episodes.failed(STORE_TROUBLE, str(exc))
            raise
        self.episodes.succeeded(STORE_TROUBLE)

    def _timed(self, op: str) -> _Timed:
        return _Timed(self, op)

    async def load(self, session_id: str) -> SessionData | None:
        with self._timed("load"):
            return await self.inner.load(session_id)

    async def save_turn(self, session_id: str, *, state: bytes, memory_added: list[bytes],
                        turns: list[dict[str, Any]], max_memory: int) -> None:
        with self._timed("save_turn"):
            await self.inner.save_turn(session_id, state=state, memory_added=memory_added,
                                       turns=turns, max_memory=max_memory)

    async def delete(self, session_id: str) -> None:
        with self._timed("delete"):
            await self.inner.delete(session_id)

    def lock(self, session_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self.inner.lock(session_id)

    async def begin_turn(self, session_id: str, *, message_id: str | None = None,
                         owner: str | None = None) -> SessionTurn:
        with self._watched():
            inner = await self.inner.begin_turn(session_id, message_id=message_id,
                                                owner=owner)
        return _TimedTurn(inner, self)

    async def head(self, session_id: str) -> SessionHead | None:
        with self._timed("head"):
            return await self.inner.head(session_id)

    async def ping(self) -> None:
        with self._timed("ping"):
            await self.inner.ping()

    async def probe(self, node: str) -> None:
        with self._timed("probe"):
            await self.inner.probe(node)

    async def close(self) -> None:
        await self.inner.close()

    async def claim_session(self, session_id: str, owner: str) -> str:
        with self._timed("claim_session"):
            return await self.inner.claim_session(session_id, owner)

    async def owned_sessions(self, owner: str) -> list[str]:
        with self._timed("owned_sessions"):
            return await self.inner.owned_sessions(owner)

    async def erase_owned(self, owner: str) -> Erased:
        with self._watched():  # waits for turn locks: not the store's own latency
            return await self.inner.erase_owned(owner)

    async def claim_message(self, session_id: str, message_id: str) -> bool:
        with self._timed("claim_message"):
            return await self.inner.claim_message(session_id, message_id)

    async def release_message(self, session_id: str, message_id: str) -> None:
        with self._timed("release_message"):
            await self.inner.release_message(session_id, message_id)

    async def request_cancel(self, session_id: str, message_id: str | None = None) -> None:
        with self._timed("request_cancel"):
            await self.inner.request_cancel(session_id, message_id)

    async def set_alias(self, alias: str, session_id: str) -> None:
        with self._timed("set_alias"):
            await self.inner.set_alias(alias, session_id)

    async def take_alias(self, alias: str) -> str | None:
        with self._timed("take_alias"):
            return await self.inner.take_alias(alias)

    async def append_stream(self, session_id: str, entries: Sequence[StreamEntry]) -> None:
        with self._timed("append_stream"):
            await self.inner.append_stream(session_id, entries)

    async def read_stream(self, session_id: str, after_seq: int = 0, *,
                          limit: int | None = None) -> list[StreamEntry]:
        with self._timed("read_stream"):
            return await self.inner.read_stream(session_id, after_seq, limit=limit)

    async def wait_stream(self, session_id: str, after_seq: int, *,
                          timeout: float) -> list[StreamEntry]:
        return await self.inner.wait_stream(session_id, after_seq, timeout=timeout)

    async def stream_tail(self, session_id: str) -> StreamEntry | None:
        with self._timed("stream_tail"):
            return await self.inner.stream_tail(session_id)


class _Timed:
    """``with store._timed(op):`` a call's latency recorded and its outcome watched (a
    plain class: it runs around every append of every reply)."""

    __slots__ = ("_store", "_op", "_start")

    def __init__(self, store: TimedStore, op: str) -> None:
        self._store, self._op = store, op

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> None:
        store = self._store
        store._metrics.store_call(self._op, time.perf_counter() - self._start)
        if kind is None:
            store.episodes.succeeded(STORE_TROUBLE)
        elif isinstance(exc, StoreUnavailable):
            store.episodes.failed(STORE_TROUBLE, str(exc))


class _TimedTurn(SessionTurn):
    """A turn of the wrapped store, whose appends are timed as ``append_stream`` and
    whose end as ``end_turn``."""

    def __init__(self, inner: SessionTurn, store: TimedStore) -> None:
        super().__init__(inner.session_id, state=inner.state, memory=inner.memory,
                         tail=inner.tail, cancel_requested=inner.cancel_requested)
        self._inner = inner
        self._store = store

    async def _append(self, entries: list[StreamEntry]) -> bool:
        with self._store._timed("append_stream"):
            return await self._inner.append(entries)

    async def _finish(self, write: TurnWrite | None, entries: list[StreamEntry]) -> None:
        if write is not None:
            self._inner.save(state=write.state, memory_added=write.memory_added,
                             turns=write.turns, max_memory=write.max_memory)
        with self._store._timed("end_turn"):
            await self._inner.end(entries)
