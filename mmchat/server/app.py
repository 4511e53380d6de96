"""``ChatServer``: the WebSocket service, and the only module that touches ``websockets``.

One port serves both: WebSocket chat on ``/`` and plain HTTP on ``/healthz``,
``/readyz``, ``/metrics`` and ``/admin/`` (:mod:`mmchat.admin`; answered from
``process_request`` during the opening handshake), and, for a plain ``GET`` without
the WebSocket upgrade, the chat page (:mod:`~mmchat.server.web`). Each connection gets a
:class:`~mmchat.server.connection.Connection` and two tasks: this module's reader loop
feeds it frames and a writer task sends its outbox.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
import uuid
from http import HTTPStatus
from typing import Any

from websockets.asyncio.messages import Assembler
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ..admin import ADMIN_PREFIX, handle_admin
from ..config import Config
from ..errors import StoreUnavailable
from ..protocol import CLOSE_TRY_AGAIN_LATER, Error, Limits, ModalityInfo, serialize
from ..stores import open_store
from .auth import Auth
from .connection import Close, Connection
from .episodes import Episodes
from .metrics import Metrics, TimedStore
from .turns import TurnManager
from .web import WebPage, own_origins

logger = logging.getLogger(__name__)

#: The path WebSocket clients connect to; the others are plain HTTP.
CHAT_PATH = "/"
#: How long /readyz waits for the session store to take its write probe.
READY_PING_SECONDS = 2.0
#: The kind of trouble (see :mod:`.episodes`) of connections refused at the limit.
CONNECTION_TROUBLE = "connections"
#: The response header that names the worker (``1 pid 4242``) under ``--workers``.
WORKER_HEADER = "X-Mmchat-Worker"


class ChatServer:
    """Serves an :class:`~mmchat.engine.Engine` over WebSocket.

    ``ChatServer(config)`` builds its own engine (and session store from
    ``[sessions]``); pass ``engine=`` to serve one you built, whose store is then used.
    ``await server.start()`` listens; ``await server.shutdown()`` drains and stops.
    ``worker`` numbers one of several processes serving one port
    (:mod:`~mmchat.server.workers`): each response then names it in
    :data:`WORKER_HEADER`.
    """

    def __init__(self, config: Config, *, engine: Any = None,
                 env: dict[str, str] | None = None, worker: int | None = None) -> None:
        self.config = config
        self.worker = worker
        self.settings = s = config.server
        self.metrics = Metrics()
        #: Names this process's own keys in the store (the readiness write probe).
        self.node_id = uuid.uuid4().hex[:16]
        self.episodes = Episodes()
        self.auth = Auth.from_config(s, env)
        self._owns_engine = engine is None
        if engine is None:
            from ..engine import Engine

            self.store = TimedStore(open_store(config.sessions), self.metrics,
                                    self.episodes)
            engine = Engine(config, store=self.store)
        else:
            self.store = TimedStore(engine.store, self.metrics, self.episodes)
        self.engine = engine
        self.limits = Limits(
            max_event_bytes=s.max_event_bytes, max_attachments=config.limits.max_attachments,
            max_attachment_bytes=s.max_attachment_bytes,
            max_message_bytes=s.max_message_bytes,
            messages_per_second=s.messages_per_second, burst=s.burst)
        self.turns = TurnManager(engine, self.store, self.metrics)
        #: The chat page served at / (None when ``[server] web`` is off).
        self.web = WebPage() if s.web else None
        self.modality_info: tuple[ModalityInfo, ...] = ()
        self.connections: set[Connection] = set()
        self.draining = False
        self._sessions: collections.Counter[str] = collections.Counter()
        self._ws: Server | None = None
        self._address: tuple[str, int] | None = None
        #: The OpenAI endpoint and the page over HTTP (:mod:`.http`), once started.
        self.http: Any = None
        self._stopped = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, host: str | None = None, port: int | None = None, *,
                    http_port: int | None = None, reuse_port: bool = False) -> ChatServer:
        """Load the model, then listen (``host``/``port`` default to ``[server]``), and
        serve HTTP on ``http_port`` (default ``server.http_port``; -1: not at all).
        ``reuse_port`` shares both ports with other processes that set it (SO_REUSEPORT:
        the workers of ``mmchat serve --workers``)."""
        s = self.settings
        await self.engine.start()
        kinds = getattr(self.engine.model, "kind_index", None)
        self.modality_info = tuple(
            ModalityInfo(m.name, tuple(m.mime_types), m.max_bytes)
            for name, m in sorted(self.engine.modalities.items())
            if kinds is None or name in kinds)
        try:
            await self.store.ping()
        except StoreUnavailable as exc:
            logger.warning("starting without the session store (not ready until it "
                           "answers): %s", exc)
        self._ws = await serve(
            self._handle, host or s.host, s.port if port is None else port,
            process_request=self._process_request,
            process_response=None if self.worker is None else self._name_worker,
            reuse_port=reuse_port or None,
            origins=[*s.origins, None] if s.origins else None,
            compression=None,
            create_connection=_ServerConnection,
            max_size=2 * max(s.max_event_bytes, s.max_attachment_bytes),
            ping_interval=s.ping_interval_seconds or None,
            ping_timeout=s.ping_timeout_seconds,
            logger=logging.getLogger("mmchat.server.websockets"))
        self._address = self._ws.sockets[0].getsockname()[:2]
        http_port = s.http_port if http_port is None else http_port
        if http_port >= 0:
            from .http import HttpServer

            self.http = HttpServer(self)
            try:
                await self.http.start(host or s.host, http_port, reuse_port=reuse_port)
            except BaseException:
                self.http = None
                self._ws.close()
                await self._ws.wait_closed()
                raise
            logger.info("OpenAI-compatible endpoint on %s/v1", self.http_url)
        if self.worker is not None:  # the supervisor says "ready" once all listen
            logger.info("listening on %s (%s)", self.url, self.engine.model_description)
            return self
        logger.info("mmchat ready on %s (%s)", self.url, self.engine.model_description)
        if self.web is not None:
            logger.info("chat page on %s", self.url.replace("ws://", "http://", 1))
        return self

    @property
    def port(self) -> int:
        """The port listened on (known once started)."""
        assert self._address is not None, "the server is not started"
        return self._address[1]

    @property
    def url(self) -> str:
        assert self._address is not None, "the server is not started"
        host, port = self._address
        host = f"[{host}]" if ":" in host else host
        return f"ws://{host}:{port}{CHAT_PATH}"

    @property
    def http_url(self) -> str:
        """``http://host:port`` of the HTTP layer (known once started with it)."""
        assert self._address is not None and self.http is not None, "no HTTP server"
        host = self._address[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.http.port}"

    async def shutdown(self, drain_seconds: float | None = None) -> None:
        """Stop accepting connections, let replies in flight finish (up to
        ``drain_seconds``, default ``server.drain_seconds``), cancel the rest (they stay
        resumable), then close every connection with 1001 and release the engine."""
        if self.draining:
            await self._stopped.wait()
            return
        drain = self.settings.drain_seconds if drain_seconds is None else drain_seconds
        self.draining = True
        try:
            await self._drain(drain)
        finally:
            self._stopped.set()

    async def _drain(self, drain: float) -> None:
        logger.info("draining: %d replies in flight, %d connections", self.turns.active,
                    len(self.connections))
        if self._ws is not None:
            self._ws.close(close_connections=False)
        # the HTTP port stops listening too; its requests get up to the same drain time
        http_closed = (asyncio.create_task(self.http.close(drain)) if self.http is not None
                       else None)
        if not await self.turns.wait_idle(drain):
            logger.warning("cancelling %d replies still running after %gs",
                           self.turns.active, drain)
            self.turns.cancel_all()
            await self.turns.wait_idle(drain + 5)
        await asyncio.gather(*(c.shutdown(timeout=5) for c in list(self.connections)))
        if self._ws is not None:
            await self._ws.wait_closed()
        if http_closed is not None:
            await http_closed
        if self._owns_engine:
            await self.engine.close()
        logger.info("mmchat stopped")

    async def __aenter__(self) -> ChatServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # -- bookkeeping for connections --------------------------------------------------

    def session_joined(self, session_id: str) -> None:
        self._sessions[session_id] += 1
        self.metrics.sessions.set(len(self._sessions))

    def session_left(self, session_id: str) -> None:
        self._sessions[session_id] -= 1
        if self._sessions[session_id] <= 0:
            del self._sessions[session_id]
        self.metrics.sessions.set(len(self._sessions))

    async def ready(self) -> tuple[bool, str]:
        """Whether this process should get traffic, and why not. The store must take a
        write (a key of this node's own, with a TTL): a full Redis that refuses writes
        answers pings but fails every turn."""
        if self.draining:
            return False, "shutting down"
        if self.engine.model is None:
            return False, "model not loaded"
        try:
            await asyncio.wait_for(self.store.probe(self.node_id), READY_PING_SECONDS)
        except (StoreUnavailable, TimeoutError) as exc:
            self.metrics.store_up.set(0)
            return False, f"session store unreachable or refusing writes: {exc or 'no answer'}"
        self.metrics.store_up.set(1)
        down = [h for h in self.engine.plugin_health() if h["state"] != "closed"]
        if down:  # still ready: every node has the same plugins, and the rest works
            return True, "ready; degraded: " + "; ".join(
                f"modality {h['modality']!r} (plugin {h['plugin']!r}) is out of service, "
                f"tried again in {h['retry_in']:.0f}s" for h in down)
        return True, "ready"

    # -- HTTP ------------------------------------------------------------------------

    async def _process_request(self, ws: ServerConnection, request: Request
                               ) -> Response | None:
        path = request.path.partition("?")[0]
        if path == "/healthz":
            return ws.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            ok, why = await self.ready()
            return ws.respond(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                              why + "\n")
        if path == "/metrics":
            self.metrics.observe_plugins(self.engine.plugin_health())
            response = ws.respond(HTTPStatus.OK, "")
            response.body = self.metrics.render()
            del response.headers["Content-Type"]
            del response.headers["Content-Length"]
            response.headers["Content-Type"] = self.metrics.content_type
            response.headers["Content-Length"] = str(len(response.body))
            return response
        if path.startswith(ADMIN_PREFIX):
            return await self._admin(request)
        if self.web is not None and self.web.wants(request.path, request.headers):
            page = self.web.respond(request.path, request.headers)
            return Response(page.status, page.status.phrase, Headers(page.headers), page.body)
        if path != CHAT_PATH:
            return ws.respond(HTTPStatus.NOT_FOUND, f"no such path: {path}\n")
        if self.web is not None and ws.protocol.origins is not None:
            # the page served here may connect even when [server] origins lists others
            ws.protocol.origins = [*ws.protocol.origins, *own_origins(request.headers)]
            if self.http is not None:  # the page as the HTTP port serves it
                ws.protocol.origins += own_origins(request.headers, self.http.port)
        if self.draining:
            return ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
        return None

    async def _admin(self, request: Request) -> Response:
        """The admin endpoint (:mod:`mmchat.admin`). websockets parses only ``GET``."""
        answer = await handle_admin(self.store, self.auth.secret, "GET", request.path,
                                    request.headers.get("Authorization"), now=time.time())
        assert answer is not None
        headers = Headers(answer.headers)
        headers["Content-Length"] = str(len(answer.body))
        return Response(answer.status, answer.status.phrase, headers, answer.body)

    def worker_header(self) -> tuple[str, str] | None:
        """The header that names this worker (``X-Mmchat-Worker: 1 pid 4242``) on every
        response of both ports under ``--workers``; ``None`` for a lone process."""
        if self.worker is None:
            return None
        return WORKER_HEADER, f"{self.worker} pid {os.getpid()}"

    def _name_worker(self, ws: ServerConnection, request: Request, response: Response
                     ) -> None:
        name = self.worker_header()
        if name is not None:
            response.headers[name[0]] = name[1]

    # -- WebSocket -------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        if len(self.connections) >= self.settings.max_connections:
            self.metrics.error("too_many_connections")
            self.episodes.failed(CONNECTION_TROUBLE, f"refused a connection: "
                                 f"{len(self.connections)} open, the limit "
                                 f"(server.max_connections)")
            with contextlib.suppress(ConnectionClosed):
                await ws.send(serialize(Error(
                    "too_many_connections", f"this server takes at most "
                    f"{self.settings.max_connections} connections", fatal=True)))
                await ws.close(CLOSE_TRY_AGAIN_LATER, "too many connections")
            return
        self.episodes.succeeded(CONNECTION_TROUBLE)
        connection = Connection(self)
        self.connections.add(connection)
        self.metrics.connections.inc()
        self.metrics.connections_opened.inc()
        writer = asyncio.create_task(self._write(ws, connection))
        try:
            async for frame in ws:
                if frame is _INVALID_TEXT:
                    connection.receive_invalid_text()
                else:
                    await connection.receive(frame)
        except ConnectionClosed:
            pass
        finally:
            connection.finish()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            self.connections.discard(connection)
            self.metrics.connections.dec()

    @staticmethod
    async def _write(ws: _ServerConnection, connection: Connection) -> None:
        """Send the outbox, everything waiting in it at once: no task switch per event,
        and the frames in one write to the socket (one system call, not one a frame)."""
        outbox = connection.outbox
        while True:
            items = [await outbox.get()]
            while not outbox.empty():
                items.append(outbox.get_nowait())
            try:
                texts = [item for item in items if not isinstance(item, Close)]
                if texts:
                    await ws.send_texts(texts)
                if len(texts) < len(items):
                    close = next(item for item in items if isinstance(item, Close))
                    await ws.close(close.code, close.reason)
                    return
            except ConnectionClosed:
                return
            finally:
                for _ in items:
                    outbox.task_done()


#: What a text frame that is not valid UTF-8 reads as (see :class:`_ServerConnection`).
_INVALID_TEXT: Any = object()


class _LenientAssembler(Assembler):
    """websockets' message assembler, except that a text frame that is not valid UTF-8
    reads as :data:`_INVALID_TEXT` instead of failing the connection with 1007."""

    async def get(self, decode: bool | None = None) -> Any:
        try:
            return await super().get(decode)
        except UnicodeDecodeError:  # the frame was consumed whole
            return _INVALID_TEXT


class _ServerConnection(ServerConnection):
    """A server connection whose invalid UTF-8 text frames are refused one by one
    (``malformed_json``, as for any other bad frame) instead of closing the socket."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.recv_messages.__class__ = _LenientAssembler

    async def send_texts(self, messages: list[str]) -> None:
        """Send text messages, each in its own frame, written to the socket together."""
        while self.send_in_progress is not None:  # as send() waits for a fragmented one
            await asyncio.shield(self.send_in_progress)
        async with self.send_context():
            for message in messages:
                self.protocol.send_text(message.encode())

    def send_data(self) -> None:
        """As websockets sends outgoing data, except that the frames waiting together go
        in one write: a system call per frame was the event loop's largest single cost."""
        frames: list[bytes] = []
        for data in self.protocol.data_to_send():
            if data:
                frames.append(data)
                continue
            if frames:
                self.transport.write(b"".join(frames))
                frames = []
            if self.transport.can_write_eof():  # half-close, as websockets does
                with contextlib.suppress(Exception):
                    self.transport.write_eof()
            else:
                self.transport.close()
        if frames:
            self.transport.write(b"".join(frames))
