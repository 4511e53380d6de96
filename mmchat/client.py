"""An async Python client for ``mmchat serve``: streaming, cancel, resume, attachments.

::

    from mmchat.client import Client

    async with await Client.connect("ws://127.0.0.1:8765/") as client:
        reply = await client.send("what colour is the circle?", ["circle.png"])
        async for delta in reply:
            print(delta.text, end="", flush=True)
        print(reply.done.finish_reason)

``Client.connect(url, coalesce=8)`` asks for fewer frames: each reply's first delta at
once, the rest in deltas of up to 8 tokens (``Delta.first_seq`` to ``Delta.seq``;
docs/protocol.md, "Coalesced deltas").

If the connection drops, iterating a reply raises :class:`ConnectionLost`;
``await client.resume()`` (optionally with another server's URL) reconnects to the
session and the same reply objects carry on: events the client already has are not
delivered twice. This is the only module of the client side that imports
``websockets``; all event parsing and writing is :mod:`mmchat.protocol`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from .errors import MMChatError
from .modality import Attachment
from .protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Delta,
    Done,
    Error,
    Hello,
    Limits,
    Message,
    ModalityInfo,
    Ping,
    Pong,
    ProtocolError,
    Ready,
    ServerEvent,
    Started,
    WireAttachment,
    parse_server_event,
    serialize,
)

__all__ = ["CannotConnect", "Client", "ConnectionLost", "Reply", "ServerError"]

#: Attachments bigger than this (all together) go in binary frames unless told otherwise.
BINARY_THRESHOLD = 64 * 1024

AttachmentLike = Attachment | str | Path | tuple[bytes, str]


class ServerError(MMChatError):
    """An ``error`` event from the server; :attr:`code` is its code."""

    def __init__(self, event: Error) -> None:
        super().__init__(event.message, code=event.code)
        self.event = event
        self.ref = event.ref
        self.fatal = event.fatal


class ConnectionLost(MMChatError):
    """The connection closed. The session lives on: ``await client.resume()``."""

    code = "connection_lost"

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


class CannotConnect(MMChatError):
    """The server could not be reached, or refused the WebSocket handshake (an HTTP
    status such as 403 for a refused Origin or 503 while it shuts down)."""

    code = "cannot_connect"


class Reply:
    """One reply, an async iterator of its :class:`~mmchat.protocol.Delta` events.

    After the iteration, :attr:`done` holds the ``done`` event (full text, finish
    reason, usage, attention, timings). An ``error`` that refused the message is raised
    by the iteration; errors during a reply are kept in :attr:`errors` (a ``done`` with
    finish reason ``error`` follows them).
    """

    def __init__(self, client: Client, message_id: str | None,
                 response_id: str | None = None) -> None:
        self.client = client
        self.message_id = message_id
        self.response_id = response_id
        self.started: Started | None = None
        self.deltas: list[Delta] = []
        self.done: Done | None = None
        self.errors: list[ServerError] = []
        self._queue: asyncio.Queue[Delta | Done | MMChatError] = asyncio.Queue()
        self._finished = False

    @property
    def text(self) -> str:
        """The text streamed so far (all of it once :attr:`done` is set)."""
        return self.done.text if self.done is not None else "".join(d.text for d in self.deltas)

    def _feed(self, item: Started | Delta | Done | MMChatError) -> None:
        if isinstance(item, Started):
            self.started = item
            self.response_id = item.response_id
            return
        if isinstance(item, Delta):
            self.deltas.append(item)
        self._queue.put_nowait(item)

    def __aiter__(self) -> Reply:
        return self

    async def __anext__(self) -> Delta:
        while not self._finished:
            item = await self._queue.get()
            if isinstance(item, Delta):
                return item
            if isinstance(item, Done):
                self.done = item
                self._finished = True
                break
            if isinstance(item, ServerError) and self.started is not None and not item.fatal:
                self.errors.append(item)
                continue
            if isinstance(item, ServerError):
                self._finished = True
            raise item
        raise StopAsyncIteration

    async def wait(self, timeout: float | None = None) -> Done:
        """Consume the rest of the reply and return its ``done``."""
        async with asyncio.timeout(timeout):
            async for _ in self:
                pass
        assert self.done is not None
        return self.done

    async def cancel(self) -> None:
        """Ask the server to stop this reply; it still ends with a ``done``."""
        await self.client.cancel(self.message_id)


class Client:
    """One conversation with an mmchat server. Build it with :meth:`connect`."""

    def __init__(self, url: str, *, token: str | None = None, origin: str | None = None,
                 open_timeout: float = 10.0, coalesce: int | None = None,
                 **ws_options: Any) -> None:
        self.url = url
        self.token = token
        #: Asked of the server in every hello: the most tokens one delta may carry
        #: after a reply's first (``None``: the server's default; docs/protocol.md).
        self.coalesce = coalesce
        self.origin = origin
        self.open_timeout = open_timeout
        self.ws_options = ws_options
        self.session_id: str | None = None
        #: The highest reply-event seq received; resume asks for what follows it.
        self.last_seq = 0
        self.ready: Ready | None = None
        #: Non-fatal errors that came with the last hello (``unknown_session``, say).
        self.notices: list[ServerError] = []
        self.close_code: int | None = None
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, Reply] = {}  # by message id
        self._by_response: dict[str, Reply] = {}
        self._finished: collections.deque[str] = collections.deque(maxlen=1024)
        self._events: asyncio.Queue[ServerEvent | ConnectionLost] = asyncio.Queue()
        self._replies: asyncio.Queue[Reply] = asyncio.Queue()
        self._pings: dict[str, asyncio.Future[Pong]] = {}

    # -- connecting ------------------------------------------------------------------

    @classmethod
    async def connect(cls, url: str, *, token: str | None = None,
                      session_id: str | None = None, last_seq: int | None = None,
                      **options: Any) -> Client:
        """Connect and say hello; ``session_id`` (and ``last_seq``) reattach a session.

        Raises :class:`ServerError` when the hello is refused (``unauthorized``,
        ``forbidden`` ...)."""
        client = cls(url, token=token, **options)
        client.session_id = session_id
        client.last_seq = last_seq or 0
        await client._open(url, session_id, last_seq)
        return client

    async def _open(self, url: str, session_id: str | None, last_seq: int | None) -> Ready:
        headers = {"Origin": self.origin} if self.origin else None
        try:
            ws = await connect(url, open_timeout=self.open_timeout, compression=None,
                               additional_headers=headers, max_size=None, **self.ws_options)
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            raise CannotConnect(f"cannot connect to {url}: {exc}") from exc
        try:
            await ws.send(serialize(Hello(PROTOCOL_VERSION, self.token, session_id,
                                          last_seq, self.coalesce)))
            self.notices = []
            async with asyncio.timeout(self.open_timeout):
                while True:
                    event = parse_server_event(await ws.recv())
                    if isinstance(event, Ready):
                        break
                    if isinstance(event, Error):
                        # unknown_session and session_lost come with a new session;
                        # other hello errors (store_unavailable, say) mean there is no
                        # session yet.
                        refused = event.ref == "hello" and event.code not in (
                            "unknown_session", "session_lost")
                        if event.fatal or refused:
                            raise ServerError(event)
                        self.notices.append(ServerError(event))
        except BaseException:
            await ws.close()
            raise
        if event.session_id != session_id:
            self.last_seq = 0  # a new session numbers from 1
        self._ws, self.ready, self.session_id = ws, event, event.session_id
        self.close_code = None
        self._reader = asyncio.create_task(self._read(ws))
        return event

    async def resume(self, url: str | None = None) -> Ready:
        """Reconnect (to ``url``, another server say) and pick the session up after
        :attr:`last_seq`: missed events go to the replies they belong to."""
        if self.session_id is None:
            raise RuntimeError("resume() needs a session: connect first")
        await self._drop()
        if url is not None:
            self.url = url
        return await self._open(self.url, self.session_id, self.last_seq)

    async def close(self) -> None:
        await self._drop()

    async def _drop(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def limits(self) -> Limits:
        assert self.ready is not None
        return self.ready.limits

    @property
    def modalities(self) -> tuple[ModalityInfo, ...]:
        assert self.ready is not None
        return self.ready.modalities

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._reader is not None and not self._reader.done()

    @property
    def server_headers(self) -> dict[str, str]:
        """The HTTP headers of the server's answer to the last connection's handshake
        (``X-Mmchat-Worker`` names the worker under ``mmchat serve --workers``)."""
        assert self._ws is not None and self._ws.response is not None, "not connected"
        return dict(self._ws.response.headers.raw_items())

    # -- sending ---------------------------------------------------------------------

    async def send(self, text: str = "", attachments: Iterable[AttachmentLike] = (), *,
                   message_id: str | None = None, binary: bool | None = None) -> Reply:
        """Send a message; iterate the returned :class:`Reply` for its deltas.

        Attachments are :class:`mmchat.Attachment` s, paths, or ``(bytes, mime_type)``.
        They travel as binary frames when ``binary`` is true (default: when together
        over 64 KiB), else inline as base64."""
        atts = [_attachment(a) for a in attachments]
        if binary is None:
            binary = sum(len(a.data) for a in atts) > BINARY_THRESHOLD
        message_id = message_id or uuid.uuid4().hex
        if message_id in self._pending:
            raise ValueError(f"message {message_id!r} is already waiting for its reply")
        wire = tuple(
            WireAttachment(a.mime_type, a.modality, frame=i) if binary
            else WireAttachment(a.mime_type, a.modality, data=a.data)
            for i, a in enumerate(atts))
        reply = Reply(self, message_id)
        self._pending[message_id] = reply
        ws = self._socket()
        try:
            await ws.send(serialize(Message(message_id, text, wire)))
            if binary:
                for a in atts:
                    await ws.send(a.data)
        except ConnectionClosed as exc:
            reply._feed(ConnectionLost(f"connection closed while sending: {exc}"))
        return reply

    async def reply(self, text: str = "", attachments: Iterable[AttachmentLike] = (), *,
                    timeout: float | None = None, **options: Any) -> Reply:
        """Send a message and wait for its whole reply."""
        reply = await self.send(text, attachments, **options)
        await reply.wait(timeout)
        return reply

    async def cancel(self, message_id: str | None = None) -> None:
        """Stop the reply to ``message_id`` (any running reply when ``None``)."""
        await self._socket().send(serialize(Cancel(message_id)))

    async def ping(self, nonce: str | None = None, timeout: float = 10.0) -> Pong:
        """Send a protocol ``ping`` and wait for its ``pong``."""
        nonce = nonce or uuid.uuid4().hex
        future = self._pings[nonce] = asyncio.get_running_loop().create_future()
        try:
            await self._socket().send(serialize(Ping(nonce)))
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._pings.pop(nonce, None)

    async def send_raw(self, frame: str | bytes) -> None:
        """Send any frame as is (for tests of what servers do with bad input)."""
        await self._socket().send(frame)

    async def next_event(self, timeout: float | None = None) -> ServerEvent:
        """The next event that belongs to no reply (errors, unawaited pongs). Raises
        :class:`ConnectionLost` once the connection is closed and nothing is left."""
        async with asyncio.timeout(timeout):
            event = await self._events.get()
        if isinstance(event, ConnectionLost):
            self._events.put_nowait(event)
            raise event
        return event

    async def next_reply(self, timeout: float | None = None) -> Reply:
        """The next reply this client did not ask for: replayed or followed after a
        resume, or sent by another connection of the session."""
        async with asyncio.timeout(timeout):
            return await self._replies.get()

    def _socket(self) -> ClientConnection:
        if self._ws is None:
            raise ConnectionLost("not connected: call resume()")
        return self._ws

    # -- receiving -------------------------------------------------------------------

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for frame in ws:
                if isinstance(frame, str):
                    self._route(parse_server_event(frame))
        except ConnectionClosed:
            pass
        except ProtocolError as exc:
            await ws.close(1002, f"unreadable event: {exc.code}")
        self.close_code = ws.close_code
        lost = ConnectionLost(f"connection closed ({ws.close_code} {ws.close_reason})",
                              ws.close_code)
        for reply in {*self._pending.values(), *self._by_response.values()}:
            reply._feed(lost)
        self._events.put_nowait(lost)
        if self._ws is ws:
            self._ws = None

    def _route(self, event: ServerEvent) -> None:
        if isinstance(event, (Started, Delta, Done)):
            rid = event.response_id
            if event.seq <= self.last_seq and (rid in self._by_response or
                                               rid in self._finished):
                return  # had it already
            # A lower seq of a reply never seen means the session's stream started
            # over (its store lost it); follow the new numbering.
            self.last_seq = event.seq
            reply = self._reply_for(event)
            reply._feed(event)
            if isinstance(event, Done):
                self._by_response.pop(rid, None)
                self._finished.append(rid)
                if reply.message_id is not None:
                    self._pending.pop(reply.message_id, None)
        elif isinstance(event, Error) and event.ref in self._pending:
            reply = self._pending[event.ref]
            if reply.started is None:
                self._pending.pop(event.ref)
            reply._feed(ServerError(event))
        elif isinstance(event, Pong) and event.nonce in self._pings:
            future = self._pings[event.nonce]
            if not future.done():
                future.set_result(event)
        else:
            self._events.put_nowait(event)

    def _reply_for(self, event: Started | Delta | Done) -> Reply:
        reply = self._by_response.get(event.response_id)
        if reply is not None:
            return reply
        if isinstance(event, Started) and event.id in self._pending:
            reply = self._pending[event.id]
        else:
            reply = Reply(self, event.id if isinstance(event, Started) else None,
                          event.response_id)
            self._replies.put_nowait(reply)
        self._by_response[event.response_id] = reply
        return reply


def _attachment(item: AttachmentLike) -> Attachment:
    if isinstance(item, Attachment):
        return item
    if isinstance(item, (str, Path)):
        return Attachment.from_path(item)
    if isinstance(item, tuple) and len(item) == 2:
        data, mime_type = item
        return Attachment(bytes(data), mime_type)
    raise TypeError(f"an attachment is an Attachment, a path or (bytes, mime_type), "
                    f"not {type(item).__name__}")

