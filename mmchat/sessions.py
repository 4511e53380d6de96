"""Where sessions live: the :class:`SessionStore` interface (the in-process default,
:class:`MemoryStore`, is in :mod:`mmchat.stores.memory`, importable from here too).

A session is three things, kept apart so a turn writes only what changed:

* ``state``: the serialised RNN state after the last turn (bytes, replaced per turn);
* ``memory``: the memory bank, one serialised entry per attachment (bytes, appended);
* ``history``: the turns as JSON-able dicts (appended).

Around them a store keeps what a scaled-out server needs:

* ``owner``: the auth subject that created the session (:meth:`SessionStore.claim_session`),
  and per owning subject an index of its sessions (:meth:`SessionStore.owned_sessions`,
  :meth:`SessionStore.erase_owned`; see :mod:`mmchat.subjects`);
* the reply *stream*: the ``started``/``delta``/``done`` events of recent replies, numbered
  by a session-wide ``seq``, so a client that reconnects (to any node) can replay what it
  missed and follow a reply that is still being generated;
* the ids of client messages already taken, so a retried message is not processed twice.

A turn holds its session through a :class:`SessionTurn` (:meth:`SessionStore.turn`):
taking it locks the session and reads what the turn needs, ending it saves the turn,
appends the reply's last events and unlocks. A store can do each in one round trip.
A store shared by several processes also carries cancels between them
(:meth:`SessionStore.request_cancel`): the turn learns of one when it appends reply
events (:meth:`SessionTurn.append`), in the same round trip.

A session is whole or it is gone: a store that can lose part of one (a Redis evicting
keys) never serves it with parts missing, but deletes what is left and raises
:class:`mmchat.errors.SessionLost`. A client's return to a session reads only its head
(:meth:`SessionStore.head`), so its cost does not grow with the conversation.

Nothing here is pickled: stores hold plain bytes and JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import (
    DuplicateMessage,
    SessionExpired,
    SessionForbidden,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from .stores.memory import MemoryStore  # noqa: F401  (the lazy export below)
    from .subjects import Erased

log = logging.getLogger(__name__)

#: Kinds of :class:`StreamEntry`; ``done`` ends a reply.
STREAM_KINDS = ("started", "delta", "done")

_SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def validate_session_id(session_id: str) -> str:
    """Return ``session_id`` or raise :class:`ValueError`.

    Ids are 1 to 128 characters from ``A-Z a-z 0-9 . _ : -``, which keeps them safe
    inside Redis keys and cluster hash tags.
    """
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise ValueError(f"bad session id {session_id!r}: use 1 to 128 of A-Z a-z 0-9 . _ : -")
    return session_id


@dataclass
class SessionData:
    session_id: str
    state: bytes | None = None
    memory: list[bytes] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    #: The auth subject that owns the session, once :meth:`SessionStore.claim_session` ran.
    owner: str | None = None


@dataclass(frozen=True)
class SessionHead:
    """What a client's return to a session reads: that it exists, and its owner
    (``None``: nobody, a session of the embedded engine)."""

    session_id: str
    owner: str | None = None


@dataclass(frozen=True)
class StreamEntry:
    """One event of a reply, kept so a resuming client can replay it.

    ``seq`` counts every entry of the session from 1 without gaps, across replies.
    ``kind`` is one of :data:`STREAM_KINDS`; ``data`` holds the JSON-able rest of the
    event (the message id for ``started``; finish reason, usage, ... for ``done``).
    """

    seq: int
    response_id: str
    kind: str
    text: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.kind == "done"


def check_owner(session_id: str, owner: str | None, current: str | None) -> None:
    """Raise unless a turn for ``owner`` may run in a session owned by ``current``.

    ``owner=None`` (the embedded engine) runs anywhere, and may create the session.
    Otherwise the session must exist with that owner: :class:`SessionExpired` when it
    is gone (a session is never re-created under a client that had it), else
    :class:`SessionForbidden` for another owner.
    """
    if owner is None:
        return
    if current is None:
        raise SessionExpired(f"session {session_id!r} expired or was lost; start a new "
                             "session (hello without session_id)")
    if current != owner:
        raise SessionForbidden("that session is not available to this client")


def check_stream_entries(entries: Sequence[StreamEntry], after_seq: int = 0) -> None:
    """Raise :class:`ValueError` unless ``entries`` have known kinds and rising seqs
    greater than ``after_seq``."""
    last = after_seq
    for entry in entries:
        if entry.kind not in STREAM_KINDS:
            raise ValueError(f"stream entry kind {entry.kind!r} is not one of {STREAM_KINDS}")
        if isinstance(entry.seq, bool) or not isinstance(entry.seq, int) or entry.seq <= last:
            raise ValueError(f"stream seq {entry.seq!r} does not follow seq {last}")
        last = entry.seq


@dataclass(frozen=True)
class TurnWrite:
    """What a turn saves: the arguments of :meth:`SessionStore.save_turn`."""

    state: bytes
    memory_added: list[bytes]
    turns: list[dict[str, Any]]
    max_memory: int


class SessionTurn:
    """One session held for one turn: its lock is taken and what the turn reads is loaded.

    ``state`` is the serialised RNN state (``None`` for a new session), ``memory`` the
    serialised memory bank and ``tail`` the newest reply event (``None`` if there is none).
    ``cancel_requested`` turns true once the store has seen a cancel of this turn's reply
    (:meth:`SessionStore.request_cancel`), at the latest by the next :meth:`append`.
    :meth:`append` adds reply events while the turn runs; :meth:`save` stages the turn's
    write; :meth:`end` sends it together with the reply's last events and releases the
    lock. Stores subclass this and implement :meth:`_append` and :meth:`_finish`.
    """

    def __init__(self, session_id: str, *, state: bytes | None = None,
                 memory: Sequence[bytes] = (), tail: StreamEntry | None = None,
                 cancel_requested: bool = False) -> None:
        self.session_id = session_id
        self.state = state
        self.memory = list(memory)
        self.tail = tail
        self.cancel_requested = cancel_requested
        self.ended = False
        self._write: TurnWrite | None = None

    async def append(self, entries: Sequence[StreamEntry]) -> bool:
        """Append reply events as :meth:`SessionStore.append_stream` does, the session
        staying held. Returns :attr:`cancel_requested`, which a store that carries
        cancels between processes updates in the same round trip."""
        if self.ended:
            raise RuntimeError(f"the turn of session {self.session_id!r} has ended")
        check_stream_entries(entries)
        if entries and await self._append(list(entries)):
            self.cancel_requested = True
        return self.cancel_requested

    async def _append(self, entries: list[StreamEntry]) -> bool:
        """Append the entries; whether a cancel of this turn's reply was requested."""
        raise NotImplementedError

    def save(self, *, state: bytes, memory_added: Sequence[bytes],
             turns: Sequence[dict[str, Any]], max_memory: int) -> None:
        """Stage the turn's write, as :meth:`SessionStore.save_turn` takes it; :meth:`end`
        sends it. A second call replaces the first."""
        if max_memory < 0:
            raise ValueError("max_memory must not be negative")
        if self.ended:
            raise RuntimeError(f"the turn of session {self.session_id!r} has ended")
        self._write = TurnWrite(bytes(state), [bytes(m) for m in memory_added],
                                [dict(t) for t in turns], max_memory)

    async def end(self, entries: Sequence[StreamEntry] = ()) -> None:
        """Send the staged write, append ``entries`` to the reply stream and release the
        lock. Only the first call does anything (a later one with entries is an error).

        The write is not retried if the store fails: the turn is then lost, never
        stored twice.
        """
        if self.ended:
            if entries:
                raise RuntimeError(f"the turn of session {self.session_id!r} has ended")
            return
        check_stream_entries(entries)
        self.ended = True
        write, self._write = self._write, None
        await self._finish(write, list(entries))

    async def _finish(self, write: TurnWrite | None, entries: list[StreamEntry]) -> None:
        """Store the write (if any) and the entries (if any), then release the lock."""
        raise NotImplementedError


class _LockedTurn(SessionTurn):
    """:meth:`SessionStore.begin_turn`'s default: a turn made of the store's other calls."""

    def __init__(self, store: SessionStore, held: contextlib.AsyncExitStack, session_id: str,
                 data: SessionData | None, tail: StreamEntry | None) -> None:
        super().__init__(session_id, state=data.state if data else None,
                         memory=data.memory if data else (), tail=tail)
        self._store = store
        self._held = held

    async def _append(self, entries: list[StreamEntry]) -> bool:
        await self._store.append_stream(self.session_id, entries)
        return False

    async def _finish(self, write: TurnWrite | None, entries: list[StreamEntry]) -> None:
        try:
            if write is not None:
                await self._store.save_turn(
                    self.session_id, state=write.state, memory_added=write.memory_added,
                    turns=write.turns, max_memory=write.max_memory)
            if entries:
                await self._store.append_stream(self.session_id, entries)
        finally:
            await self._held.aclose()


class SessionStore(ABC):
    """Async storage for sessions. Implementations must be safe to share between tasks.

    The methods after :meth:`lock` have defaults so a minimal store still works: it
    then cannot resume replies, does not deduplicate messages, cannot record owners and
    does not carry cancels between processes.
    """

    @abstractmethod
    async def load(self, session_id: str) -> SessionData | None:
        """Return the session, or ``None`` if there is none (or it expired)."""

    @abstractmethod
    async def save_turn(self, session_id: str, *, state: bytes, memory_added: list[bytes],
                        turns: list[dict[str, Any]], max_memory: int) -> None:
        """Replace the state, append memory entries and turns, keep the last ``max_memory``
        memory entries. Creates the session if needed."""

    @abstractmethod
    async def delete(self, session_id: str) -> None:
        """Forget the session. Deleting a missing session is not an error."""

    @abstractmethod
    def lock(self, session_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold this while a turn runs so turns of one session run one at a time.

        Raises :class:`mmchat.errors.SessionBusy` when the lock stays taken for longer
        than the store's wait limit. Not re-entrant.
        """

    async def begin_turn(self, session_id: str, *, message_id: str | None = None,
                         owner: str | None = None) -> SessionTurn:
        """Take the session's lock (waiting as :meth:`lock` does) and load what a turn
        reads: state, memory and the stream's tail. The caller must ``await end()`` the
        returned turn; :meth:`turn` does that for you.

        With ``owner``, the session must exist and be ``owner``'s (see
        :func:`check_owner`): checked once the lock is held, so it holds for the turn.

        With ``message_id``, first claim it as :meth:`claim_message` does, and raise
        :class:`mmchat.errors.DuplicateMessage` (without locking) if it was taken.
        The claim stays when the lock cannot be had (:class:`SessionBusy`).

        This default is made of :meth:`claim_message`, :meth:`lock`, :meth:`load` and
        :meth:`stream_tail`, and its turn ends with :meth:`save_turn` and
        :meth:`append_stream`; a store can do each end in one round trip instead.
        """
        if message_id is not None and not await self.claim_message(session_id, message_id):
            raise DuplicateMessage(f"message {message_id!r} was already taken in this "
                                   "session; resume to replay its reply")
        held = contextlib.AsyncExitStack()
        await held.enter_async_context(self.lock(session_id))
        try:
            data = await self.load(session_id)
            check_owner(session_id, owner, data.owner if data is not None else None)
            tail = await self.stream_tail(session_id)
        except BaseException:
            await held.aclose()
            raise
        return _LockedTurn(self, held, session_id, data, tail)

    @contextlib.asynccontextmanager
    async def turn(self, session_id: str, *, message_id: str | None = None,
                   owner: str | None = None) -> AsyncIterator[SessionTurn]:
        """:meth:`begin_turn` as a context manager that ends the turn on exit.

        Leaving by an exception still sends what was staged, but an unreachable store
        is then logged instead of hiding the exception.
        """
        held = await self.begin_turn(session_id, message_id=message_id, owner=owner)
        try:
            yield held
        except BaseException:
            try:
                await held.end()
            except StoreUnavailable as exc:
                log.warning("could not end the turn of session %r: %s", session_id, exc)
            raise
        await held.end()

    async def head(self, session_id: str) -> SessionHead | None:
        """What a client returning to the session needs, at a cost that does not grow
        with the session: ``None`` if there is no such session (or it expired), else
        its owner; renews its TTL. Raises :class:`mmchat.errors.SessionLost` when part of
        it is missing (what was left is then deleted: a session is whole or gone).

        This default loads the whole session; stores read only the owner."""
        data = await self.load(session_id)
        return None if data is None else SessionHead(session_id, data.owner)

    async def ping(self) -> None:
        """Raise :class:`mmchat.errors.StoreUnavailable` if the store cannot be reached."""

    async def probe(self, node: str) -> None:
        """Raise :class:`mmchat.errors.StoreUnavailable` if the store cannot take a
        write now (unreachable, or full and refusing writes). ``node`` names the caller:
        a store writes a short-lived key of that node's own. This default pings."""
        await self.ping()

    async def close(self) -> None:
        """Release connections."""

    async def claim_session(self, session_id: str, owner: str) -> str:
        """Make ``owner`` the session's owner unless it already has one; return the owner
        it has afterwards. Creates the session if needed."""
        raise NotImplementedError(f"{type(self).__name__} does not record session owners")

    async def owned_sessions(self, owner: str) -> list[str]:
        """Ids of the live sessions ``owner`` claimed (:meth:`claim_session`), sorted.
        Only subjects' owners are indexed (:func:`mmchat.subjects.indexed`); expired
        sessions are left out (and dropped from the index)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no index of owners")

    async def erase_owned(self, owner: str) -> Erased:
        """Delete every session ``owner`` claimed (its state, memory, history, stream,
        message ids and cancels, each under its turn lock, so a running turn ends
        first) and the owner's index; what was erased. A session another owner holds
        is left alone."""
        raise NotImplementedError(f"{type(self).__name__} keeps no index of owners")

    async def claim_message(self, session_id: str, message_id: str) -> bool:
        """Return ``True`` the first time ``message_id`` is claimed in this session and
        ``False`` after that, so a retried client message is processed once.

        The default store keeps no record and always returns ``True``.
        """
        return True

    async def release_message(self, session_id: str, message_id: str) -> None:
        """Undo :meth:`claim_message`, for a message that failed before any reply began,
        so the client may retry it."""

    async def request_cancel(self, session_id: str, message_id: str | None = None) -> None:
        """Ask whichever process generates it to cancel the reply to ``message_id``
        (with ``None``: the reply of the turn that holds the session now, if any).

        The turn of that message, begun now or later, sees it as
        :attr:`SessionTurn.cancel_requested`; other turns never do, so a cancel that
        comes too late touches nothing. A store serving one process needs none (the
        process cancels its own replies): this default does nothing.
        """

    async def set_alias(self, alias: str, session_id: str) -> None:
        """Name ``session_id`` by ``alias`` (a key of the caller's, such as a hash of
        the conversation the session has seen), for :meth:`take_alias`; it expires with
        the sessions' TTL. The default store keeps no aliases."""

    async def take_alias(self, alias: str) -> str | None:
        """The session ``alias`` names, forgetting the alias (at most one caller gets
        it), or ``None``. The default store keeps no aliases and returns ``None``."""
        return None

    async def append_stream(self, session_id: str, entries: Sequence[StreamEntry]) -> None:
        """Append reply events. Seqs must rise and follow the stream's last seq, else
        :class:`ValueError`. Stores keep a bounded number of the newest entries.

        The default store keeps nothing, so replies cannot be resumed.
        """

    async def read_stream(self, session_id: str, after_seq: int = 0, *,
                          limit: int | None = None) -> list[StreamEntry]:
        """Return kept entries with ``seq > after_seq``, oldest first (at most ``limit``).

        If the first returned seq is not ``after_seq + 1`` the entries in between were
        trimmed away and cannot be replayed.
        """
        return []

    async def wait_stream(self, session_id: str, after_seq: int, *,
                          timeout: float) -> list[StreamEntry]:
        """Like :meth:`read_stream`, but when there is nothing yet wait up to ``timeout``
        seconds for an entry to be appended (possibly by another process). Returns ``[]``
        if none came; may return early, so callers loop."""
        entries = await self.read_stream(session_id, after_seq)
        if entries:
            return entries
        await asyncio.sleep(timeout)
        return await self.read_stream(session_id, after_seq)

    async def stream_tail(self, session_id: str) -> StreamEntry | None:
        """Return the newest entry, or ``None`` if the stream is empty.

        The next reply event takes ``seq = tail.seq + 1`` (or 1 without a tail).
        """
        return None

    async def follow_stream(self, session_id: str, after_seq: int = 0, *,
                            idle_timeout: float = 30.0) -> AsyncIterator[StreamEntry]:
        """Yield the entries after ``after_seq``, then keep yielding new ones while a
        reply is open (the newest entry is not ``done``).

        Ends right away if nothing is newer and no reply is open. Raises
        :class:`TimeoutError` when an open reply gets no entry for ``idle_timeout``
        seconds (the node generating it died, say).
        """
        loop = asyncio.get_running_loop()
        entries = await self.read_stream(session_id, after_seq)
        if not entries:
            tail = await self.stream_tail(session_id)
            if tail is None or tail.final:
                return
        deadline = loop.time() + idle_timeout
        while True:
            if entries:
                for entry in entries:
                    yield entry
                after_seq = entries[-1].seq
                deadline = loop.time() + idle_timeout
                if entries[-1].final:
                    entries = await self.read_stream(session_id, after_seq)
                    if not entries:
                        return
                    continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"session {session_id!r}: no reply event after seq {after_seq} "
                    f"for {idle_timeout}s")
            entries = await self.wait_stream(session_id, after_seq, timeout=remaining)


def __getattr__(name: str) -> Any:
    # MemoryStore moved to mmchat.stores.memory; imported on first use (no circle).
    if name == "MemoryStore":
        from .stores.memory import MemoryStore

        return MemoryStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
