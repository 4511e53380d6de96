"""The HTTP layer (Starlette, served by uvicorn): the OpenAI-compatible endpoint
(``/v1/chat/completions``, ``/v1/models``), the chat page's files, ``/healthz``,
``/readyz``, ``/metrics`` and the admin endpoint (``/admin/``, :mod:`mmchat.admin`, with
``DELETE`` as well as ``GET``), on ``[server] http_port`` of the ``mmchat serve`` process.

This module and :mod:`.app` are the only ones that import an HTTP library. It shares
the :class:`~.app.ChatServer`'s engine, store, metrics, access tokens (``Authorization:
Bearer <token>``, checked as ``hello`` tokens are) and limits: the request body is at
most ``server.max_message_bytes``, each attachment ``server.max_attachment_bytes``, and
each caller (its token's subject, or its address without authentication) sends at most
``server.messages_per_second`` requests a second with bursts of ``server.burst``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import socket
import time
from collections.abc import Iterator
from http import HTTPStatus
from typing import TYPE_CHECKING

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..admin import handle_admin
from ..errors import ConfigError
from ..protocol import ProtocolError, TokenBucket
from .auth import owner_for
from .openai import OpenAIService
from .openai_wire import OpenAIError, models_list, parse_chat_request
from .web import PATHS

if TYPE_CHECKING:
    from .app import ChatServer

logger = logging.getLogger(__name__)

#: Callers whose rate buckets are remembered (the least recently seen are forgotten).
MAX_CALLERS = 10_000
#: Methods the admin routes take to :func:`~mmchat.admin.handle_admin` (which refuses
#: all but ``GET`` and ``DELETE`` with a 405 naming the right one).
ADMIN_METHODS = ("GET", "DELETE", "POST", "PUT", "PATCH")
#: Request bodies up to this size are read on the event loop; larger ones in a thread.
INLINE_PARSE_BYTES = 64 * 1024


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, leaving signals to ``mmchat serve`` (which drains both ports)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _NameWorker:
    """ASGI middleware: each response names the worker that made it (``header``, as the
    WebSocket port's handshake does), so a client or a test can tell the workers apart."""

    def __init__(self, app: ASGIApp, header: tuple[str, str]) -> None:
        self.app = app
        self.header = (header[0].lower().encode("latin-1"), header[1].encode("latin-1"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, named)


class RateLimits:
    """A token bucket per caller, for the most recent :data:`MAX_CALLERS` callers."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()

    def wait(self, caller: str, now: float) -> float:
        """0 if ``caller`` may send now (and it is counted), else seconds to wait."""
        bucket = self._buckets.pop(caller, None) or TokenBucket(self.rate, self.burst, now=now)
        self._buckets[caller] = bucket
        while len(self._buckets) > MAX_CALLERS:
            self._buckets.popitem(last=False)
        return 0.0 if bucket.try_acquire(now) else bucket.retry_after(now)


class HttpServer:
    """Serves ``server``'s engine over HTTP; :meth:`start` listens, :meth:`close` drains."""

    def __init__(self, server: ChatServer) -> None:
        self.server = server
        s = server.settings
        self.openai = OpenAIService(server.engine, server.store, server.metrics,
                                    model_name=s.openai_model,
                                    max_attachment_bytes=s.max_attachment_bytes,
                                    allow_remote_urls=s.openai_remote_urls)
        self.rates = RateLimits(s.openai_requests_per_second, s.openai_burst)
        self.created = int(time.time())
        routes = [Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{name:path}", self.model, methods=["GET"]),
                  Route("/healthz", self.healthz, methods=["GET"]),
                  Route("/readyz", self.readyz, methods=["GET"]),
                  Route("/metrics", self.metrics, methods=["GET"]),
                  # every method: handle_admin answers the wrong one with 405 and Allow
                  Route("/admin/{rest:path}", self.admin, methods=list(ADMIN_METHODS))]
        if server.web is not None:
            routes += [Route(path, self.page, methods=["GET", "HEAD"]) for path in PATHS]
        # browsers on the origins of [server] origins may call the API from their pages
        cors = [Middleware(CORSMiddleware, allow_origins=list(s.origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])] if s.origins else []
        worker = server.worker_header()
        named = [Middleware(_NameWorker, header=worker)] if worker is not None else []
        self.app = Starlette(routes=routes, middleware=named + cors, exception_handlers={
            OpenAIError: self._error_response, 404: _not_found, 405: _not_allowed,
            500: _server_error})
        self._uvicorn: _Uvicorn | None = None
        self._socket: socket.socket | None = None
        self._loop_task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named, so asyncio sets TCP_NODELAY on the connections accepted (it
        # skips sockets of protocol 0: keep-alive requests then waited 40 ms for an ACK)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # the workers of `mmchat serve --workers` share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot serve HTTP on {host}:{port} (server.http_port): "
                              f"{exc.strerror or exc}") from None
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False,
                                server_header=False)
        server = _Uvicorn(config)
        config.load()
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
        self._uvicorn, self._socket = server, sock
        self._loop_task = asyncio.create_task(server.main_loop())

    @property
    def port(self) -> int:
        assert self._socket is not None, "the HTTP server is not started"
        return int(self._socket.getsockname()[1])

    async def close(self, drain_seconds: float) -> None:
        """Stop listening and let requests in flight finish (up to ``drain_seconds``;
        then they are cancelled, and so are their replies)."""
        server = self._uvicorn
        if server is None:
            return
        self._uvicorn = None
        server.config.timeout_graceful_shutdown = drain_seconds
        server.should_exit = True
        if self._loop_task is not None:
            await self._loop_task
        await server.shutdown(sockets=[self._socket] if self._socket else None)

    # -- endpoints ----------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        owner = self._owner(request)
        caller = owner if self.server.auth.required else (
            request.client.host if request.client else "unknown")
        wait = self.rates.wait(caller, time.monotonic())
        if wait:
            raise OpenAIError(HTTPStatus.TOO_MANY_REQUESTS,
                              f"rate limit: at most {self.rates.rate:g} requests a second "
                              f"(bursts of {self.rates.burst}); try again in {wait:.1f} s",
                              type="rate_limit_error", code="rate_limit_exceeded",
                              headers={"Retry-After": str(math.ceil(wait))})
        if self.server.draining:
            raise OpenAIError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down",
                              type="server_error", code="shutting_down")
        body = await self._body(request)
        parse = functools.partial(parse_chat_request, body, max_attachment_bytes=self.server
                                  .settings.max_attachment_bytes)
        # a body with media (JSON, base64 and hashes of megabytes) is read off the loop
        chat = await asyncio.to_thread(parse) if len(body) > INLINE_PARSE_BYTES else parse()
        if not chat.stream:
            return JSONResponse(await self.openai.complete(chat, owner))
        events = await self.openai.stream(chat, owner)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    async def models(self, request: Request) -> Response:
        self._owner(request)
        return JSONResponse(models_list([self.openai.model_name], self.created))

    async def model(self, request: Request) -> Response:
        self._owner(request)
        name = request.path_params["name"]
        if name != self.openai.model_name:
            raise OpenAIError(HTTPStatus.NOT_FOUND, f"no model {name!r} here; this server "
                              f"serves {self.openai.model_name!r}", param="model",
                              code="model_not_found")
        return JSONResponse(models_list([name], self.created)["data"][0])

    async def healthz(self, request: Request) -> Response:
        return Response("ok\n", media_type="text/plain")

    async def readyz(self, request: Request) -> Response:
        ok, why = await self.server.ready()
        return Response(why + "\n", HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                        media_type="text/plain")

    async def metrics(self, request: Request) -> Response:
        metrics = self.server.metrics
        metrics.observe_plugins(self.server.engine.plugin_health())
        return Response(metrics.render(), headers={"Content-Type": metrics.content_type})

    async def admin(self, request: Request) -> Response:
        """The admin endpoint (:mod:`mmchat.admin`), as the WebSocket port serves it but
        with ``DELETE /admin/subjects/{subject}`` too. The path goes to it as sent (still
        percent-encoded: a subject may hold a ``/``)."""
        raw = request.scope.get("raw_path") or request.url.path.encode()
        target = raw.decode("latin-1")
        answer = await handle_admin(self.server.store, self.server.auth.secret,
                                    request.method, target,
                                    request.headers.get("Authorization"), now=time.time())
        assert answer is not None  # the route matched /admin/
        return Response(answer.body, answer.status, headers=answer.headers)

    async def page(self, request: Request) -> Response:
        web = self.server.web
        assert web is not None
        host = request.url.hostname or self.server.settings.host
        host = f"[{host}]" if ":" in host else host
        answer = web.respond(request.url.path, request.headers,
                             websocket_url=f"ws://{host}:{self.server.port}/")
        return Response(answer.body, answer.status, headers=dict(answer.headers))

    # -- helpers ------------------------------------------------------------------------

    def _owner(self, request: Request) -> str:
        """The session owner of the request's bearer token (anonymous without
        authentication); 401 in OpenAI's shape for a missing or bad token."""
        auth = self.server.auth
        if not auth.required:
            return owner_for(None)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(HTTPStatus.UNAUTHORIZED, "this server needs an access token: "
                              "Authorization: Bearer <token> (mmchat token NAME makes one)",
                              code="invalid_api_key")
        try:
            return owner_for(auth.subject(token.strip()))
        except ProtocolError as exc:
            raise OpenAIError(HTTPStatus.UNAUTHORIZED, str(exc),
                              code="invalid_api_key") from None

    async def _body(self, request: Request) -> bytes:
        limit = self.server.settings.max_message_bytes
        too_large = OpenAIError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                f"the request body is over {limit} bytes "
                                "(server.max_message_bytes)", code="request_too_large")
        length = request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _error_response(self, request: Request, exc: Exception) -> Response:
        """An :class:`OpenAIError` as its response, counted in ``mmchat_errors``."""
        assert isinstance(exc, OpenAIError)
        self.server.metrics.errors.labels(exc.code or "error").inc()
        return _error_json(exc)


def _error_json(exc: OpenAIError) -> Response:
    headers = dict(exc.headers)
    if exc.status == HTTPStatus.UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(exc.body(), exc.status, headers=headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    """Anything unexpected: logged, and a 500 in OpenAI's shape."""
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse(OpenAIError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (the "
                                    "server logged why)", type="server_error",
                                    code="internal_error").body(),
                        HTTPStatus.INTERNAL_SERVER_ERROR)


async def _not_found(request: Request, exc: Exception | None) -> Response:
    return JSONResponse(OpenAIError(HTTPStatus.NOT_FOUND, f"no such path: {request.url.path}",
                                    code="not_found").body(), HTTPStatus.NOT_FOUND)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return JSONResponse(OpenAIError(HTTPStatus.METHOD_NOT_ALLOWED,
                                    f"{request.method} is not allowed on {request.url.path}",
                                    code="method_not_allowed").body(),
                        HTTPStatus.METHOD_NOT_ALLOWED)
