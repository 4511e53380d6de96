"""One client's conversation over one WebSocket, without the socket.

:class:`Connection` is fed frames (:meth:`Connection.receive`) and puts what it sends
into :attr:`Connection.outbox`: serialised events, then a final :class:`Close`.
``app.py`` does the socket I/O. Slow jobs (a message's reply, a resume) run one after
another in a worker task, so a connection's replies come in the order its messages
did; cancel and ping are answered at once. A cancel of a reply this process is not
generating goes to the session store, which carries it to the process that is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..budget import DecodeAllowance
from ..coalesce import DeltaCoalescer
from ..errors import MMChatError, SessionBusy, SessionLost
from ..modality import Attachment
from ..protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_POLICY_VIOLATION,
    Cancel,
    Error,
    FrameAssembler,
    Hello,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Ready,
    ServerEvent,
    TokenBucket,
    from_stream_entry,
    parse_client_event,
    serialize,
)
from ..sessions import StreamEntry
from .auth import owner_for
from .turns import Turn, TurnRequest, split_error

if TYPE_CHECKING:
    from .app import ChatServer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Close:
    """The last item of an outbox: close the WebSocket with this code."""

    code: int
    reason: str


@dataclass(frozen=True)
class _Resume:
    last_seq: int


@dataclass(frozen=True)
class _Message:
    id: str
    text: str
    attachments: Sequence[Attachment]
    received: float = field(default_factory=time.perf_counter)


class Connection:
    def __init__(self, server: ChatServer) -> None:
        self.server = server
        settings = server.settings
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.outbox: asyncio.Queue[str | Close] = asyncio.Queue()
        self.session_id: str | None = None
        self.subject: str | None = None
        self.closing = False
        self._loop = loop
        self._assembler = FrameAssembler(server.limits)
        self._coalescer = DeltaCoalescer(1)  # until hello says otherwise
        self._rate = TokenBucket(settings.messages_per_second, settings.burst, now=now)
        self._media = DecodeAllowance(settings.media_decode_rate,
                                      settings.media_decode_seconds)
        self._strikes = TokenBucket(settings.max_strikes / 60, settings.max_strikes, now=now)
        self._jobs: asyncio.Queue[_Message | _Resume] = asyncio.Queue(
            maxsize=2 * settings.burst)
        self._queued: set[str] = set()  # ids of messages waiting in _jobs
        self._cancelled: set[str] = set()  # of those, the ones cancelled before starting
        self._worker: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._hello_timer = loop.call_later(settings.hello_timeout_seconds,
                                            self._hello_expired)

    @property
    def idle(self) -> bool:
        """Whether the worker has nothing in hand or waiting (a resume included)."""
        return self._idle.is_set() and self._jobs.empty()

    # -- sending ---------------------------------------------------------------------

    def send(self, event: ServerEvent) -> None:
        if not self.closing:
            for item in self._coalescer.feed(event):
                self.outbox.put_nowait(serialize(item))

    def flush(self) -> None:
        """Send the delta text held back for coalescing, if any."""
        if not self.closing:
            for item in self._coalescer.flush():
                self.outbox.put_nowait(serialize(item))

    def error(self, code: str, message: str, ref: str | None = None, *,
              fatal: bool = False) -> None:
        self.server.metrics.error(code)
        self.send(Error(code, message, ref, fatal))

    def close(self, code: int, reason: str) -> None:
        if not self.closing:
            self.outbox.put_nowait(Close(code, reason[:120]))
            self.closing = True
            self._hello_timer.cancel()

    def _refuse(self, exc: ProtocolError) -> None:
        self.error(exc.code, exc.message, exc.ref, fatal=exc.fatal)
        if exc.fatal:
            self.close(exc.close_code or CLOSE_POLICY_VIOLATION, exc.code)
        else:
            self._strike()

    def _strike(self) -> None:
        """Count a bad or rate-limited event; too many close the connection."""
        if not self._strikes.try_acquire(self._loop.time()):
            self.error("rate_limited", "too many bad or rate-limited events; closing",
                       fatal=True)
            self.close(CLOSE_POLICY_VIOLATION, "abuse: too many bad or rate-limited events")

    def _limited(self, ref: str | None) -> bool:
        now = self._loop.time()
        if self._rate.try_acquire(now):
            return False
        s = self.server.settings
        self.error("rate_limited", f"more than {s.messages_per_second:g} messages/s (burst "
                   f"{s.burst}); retry in {self._rate.retry_after(now):.2f}s", ref)
        self._strike()
        return True

    # -- receiving -------------------------------------------------------------------

    async def receive(self, frame: str | bytes) -> None:
        """Handle one frame from the client."""
        if self.closing:
            return
        try:
            if isinstance(frame, str):
                await self._event(parse_client_event(frame, self.server.limits))
            elif self.session_id is None:
                raise ProtocolError("hello_required", "the first event must be hello, not a "
                                    "binary frame", fatal=True)
            else:
                message = self._assembler.add_frame(frame)
                if message is not None:
                    self._accept(message)
        except ProtocolError as exc:
            self._refuse(exc)
        except Exception:
            logger.exception("connection to session %s failed", self.session_id)
            self.error(MMChatError.code, "the server failed; see its log", fatal=True)
            self.close(CLOSE_INTERNAL_ERROR, "internal error")

    def receive_invalid_text(self) -> None:
        """Handle a text frame that is not valid UTF-8: refused like any bad frame."""
        if not self.closing:
            self._refuse(ProtocolError("malformed_json", "a text frame is not valid UTF-8"))

    async def _event(self, event: Hello | Message | Cancel | Ping) -> None:
        if self.session_id is None:
            if not isinstance(event, Hello):
                raise ProtocolError("hello_required", f"the first event must be hello, not "
                                    f"{event.type}", event.type, fatal=True)
            await self._hello(event)
        elif isinstance(event, Message):
            message = self._assembler.add_message(event)
            if message is not None:
                self._accept(message)
        elif isinstance(event, Cancel):
            await self._cancel(event.id)
        elif isinstance(event, Ping):
            if not self._limited("ping"):
                self.send(Pong(event.nonce))
        else:
            raise ProtocolError("bad_value", "hello was already sent on this connection",
                                "hello")

    async def _hello(self, hello: Hello) -> None:
        server = self.server
        subject = server.auth.subject(hello.token)
        owner = owner_for(subject)
        store = server.store
        session_id = hello.session_id
        resumed = False
        try:
            if session_id is not None:
                try:
                    head = await store.head(session_id)
                except SessionLost:
                    self.error("session_lost", f"the store lost part of session "
                               f"{session_id!r}; this is a new one", "hello")
                    head = session_id = None
                if head is None and session_id is not None:
                    self.error("unknown_session", f"there is no session {session_id!r} (it "
                               "may have expired); this is a new one", "hello")
                    session_id = None
                elif head is not None:
                    # an ownerless session is nobody's to take: sessions the server
                    # opens are claimed at once, and turns never re-create a lost one
                    if head.owner != owner:
                        raise ProtocolError("forbidden", "that session is not available to "
                                            "this client", "hello", fatal=True)
                    resumed = True
            if session_id is None:
                session_id = uuid.uuid4().hex
                await store.claim_session(session_id, owner)
        except ProtocolError:
            raise
        except MMChatError as exc:
            self.error(exc.code, f"{exc.message}; send hello again", "hello")
            return
        self.session_id, self.subject = session_id, subject
        self._hello_timer.cancel()
        server.session_joined(session_id)
        coalesce = hello.coalesce or server.settings.coalesce
        self._coalescer = DeltaCoalescer(coalesce)
        self.send(Ready(session_id, modalities=server.modality_info, resumed=resumed,
                        limits=server.limits, coalesce=coalesce))
        self._worker = asyncio.create_task(self._work(), name=f"mmchat-conn:{session_id}")
        if resumed and hello.last_seq is not None:
            self._jobs.put_nowait(_Resume(hello.last_seq))

    def _accept(self, message: Message) -> None:
        if self._limited(message.id):
            return
        if self.server.draining:
            self.going_away()
            return
        if message.id in self._queued:
            self.error("duplicate_message", f"message {message.id!r} is already waiting",
                       message.id)
            return
        job = _Message(message.id, message.text,
                       [a.to_attachment() for a in message.attachments])
        try:
            self._jobs.put_nowait(job)
        except asyncio.QueueFull:
            self.error("rate_limited", f"{self._jobs.maxsize} messages already wait on this "
                       "connection", message.id)
            self._strike()
            return
        self._queued.add(message.id)

    async def _cancel(self, message_id: str | None) -> None:
        """Cancel the reply to ``message_id`` (any running reply when ``None``) here, and
        through the session store unless it was found here: another process may be
        generating it (another connection of the session sent the message, or this
        client came back here while its old node still generates)."""
        turns = self.server.turns.running(self.session_id)
        hit = [t for t in turns if message_id is None or t.message_id == message_id]
        for turn in hit:
            turn.cancel()
        if not hit and message_id in self._queued:
            self._cancelled.add(message_id)
            return
        if (hit and message_id is not None) or self._limited(message_id or "cancel"):
            return
        try:
            await self.server.store.request_cancel(self.session_id, message_id)
        except MMChatError as exc:
            self.error(exc.code, f"{exc.message}; the cancel may not reach another server",
                       message_id or "cancel")

    def _hello_expired(self) -> None:
        if self.session_id is None and not self.closing:
            self.error("hello_required", f"no hello within "
                       f"{self.server.settings.hello_timeout_seconds:g}s", fatal=True)
            self.close(CLOSE_POLICY_VIOLATION, "no hello")

    # -- the worker ------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            job = await self._jobs.get()
            self._idle.clear()
            try:
                await self.outbox.join()  # the client reads what it was sent first
                if isinstance(job, _Resume):
                    await self._resume(job.last_seq)
                elif self.server.draining:
                    self._queued.discard(job.id)
                else:
                    await self._reply(job)
            finally:
                self.flush()
                if self._jobs.empty():
                    self._idle.set()

    async def _reply(self, job: _Message) -> None:
        await self._start_turn(job).follow(self.send, tokens=self._coalescer.tokens)

    def _start_turn(self, job: _Message) -> Turn:
        """Start the message's turn. The turn claims the message id (a taken one ends
        it with ``duplicate_message``) and runs on if the client goes away."""
        try:
            return self.server.turns.start(
                TurnRequest(self.session_id, job.id, job.text, job.attachments,
                            job.received, owner_for(self.subject), self._media),
                cancelled=job.id in self._cancelled)
        finally:
            self._queued.discard(job.id)
            self._cancelled.discard(job.id)

    async def _resume(self, last_seq: int) -> None:
        """Replay the session's reply events after ``last_seq``, then follow a reply
        that is still being generated, here or by another process."""
        store, session_id = self.server.store, self.session_id
        try:
            entries = await store.read_stream(session_id, last_seq)
            if entries and entries[0].seq > last_seq + 1:
                self.error("resume_unavailable", f"events {last_seq + 1} to "
                           f"{entries[0].seq - 1} are no longer kept; each reply's full "
                           "text is in its done", "hello")
            for entry in entries:
                self._replay(entry)
            if entries:
                cursor, open_reply = entries[-1].seq, not entries[-1].final
            else:
                tail = await store.stream_tail(session_id)
                cursor = last_seq
                open_reply = tail is not None and not tail.final and tail.seq <= last_seq
            if open_reply:
                await self._follow(cursor)
        except MMChatError as exc:
            self.error(exc.code, exc.message, "hello")

    async def _follow(self, cursor: int) -> None:
        server, session_id = self.server, self.session_id
        idle = server.settings.resume_idle_seconds
        while True:
            try:
                async for entry in server.store.follow_stream(session_id, cursor,
                                                              idle_timeout=idle):
                    self._replay(entry)
                    cursor = entry.seq
                return
            except TimeoutError:
                # the done that closes it carries reply_lost
                with contextlib.suppress(SessionBusy):
                    await server.turns.recover(session_id, owner_for(self.subject))

    def _replay(self, entry: StreamEntry) -> None:
        """Send a stored reply event; the error that ended a reply goes before its done."""
        error, entry = split_error(entry)
        if error is not None:
            self.error(error.code, error.message, error.ref)
        self.send(from_stream_entry(entry))

    # -- ending ----------------------------------------------------------------------

    def going_away(self) -> None:
        self.error("going_away", "the server is shutting down; reconnect and resume",
                   fatal=True)
        self.close(CLOSE_GOING_AWAY, "server shutting down")

    async def shutdown(self, timeout: float) -> None:
        """Finish forwarding the reply in hand (up to ``timeout`` s), then go away."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        self.going_away()

    def finish(self) -> None:
        """The socket closed: stop the worker (replies keep running for resume)."""
        self.closing = True
        self._hello_timer.cancel()
        if self._worker is not None:
            self._worker.cancel()
        if self.session_id is not None:
            self.server.session_left(self.session_id)
