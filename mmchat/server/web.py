"""The chat page: the files of ``mmchat/web/`` served as they are, from ``process_request``.

A plain ``GET`` (no WebSocket upgrade) of ``/`` or of one of the page's files gets the
file, with a ``Content-Security-Policy`` that allows only the page's own scripts, styles
and WebSocket, a strong ``ETag`` (``304 Not Modified`` when it matches) and
``Cache-Control: no-cache`` (browsers keep the files and revalidate them). Nothing else
under ``mmchat/web/`` is reachable: the paths are a fixed list, read once at start-up.

This module knows no HTTP library: it reads a path and headers and answers a status,
headers and a body, which :mod:`mmchat.server.app` turns into the ``websockets``
response (``websockets`` stays in that one module).
"""

from __future__ import annotations

import hashlib
import html
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources

#: URL path -> file in mmchat/web/.
PATHS = {"/": "index.html", "/index.html": "index.html", "/mmchat.js": "mmchat.js",
         "/app.js": "app.js", "/style.css": "style.css"}
CONTENT_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
                 "css": "text/css; charset=utf-8"}
#: Only the page's own files and WebSocket; pictures shown from blob: URLs the page made.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


@dataclass(frozen=True)
class Answer:
    """An HTTP response, for the server to send."""

    status: HTTPStatus
    headers: list[tuple[str, str]]
    body: bytes


class WebPage:
    """The page's files, loaded once; :meth:`respond` answers a request for one."""

    def __init__(self) -> None:
        folder = resources.files("mmchat") / "web"
        self.files: dict[str, StaticFile] = {}
        for name in set(PATHS.values()):
            body = (folder / name).read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            self.files[name] = StaticFile(body, CONTENT_TYPES[name.rpartition(".")[2]], etag)

    @staticmethod
    def _pointed_at(file: StaticFile, websocket_url: str) -> StaticFile:
        meta = f'<meta name="mmchat-websocket" content="{html.escape(websocket_url)}">\n'
        body = file.body.replace(b"<title>", meta.encode() + b"<title>", 1)
        return StaticFile(body, file.content_type,
                          '"' + hashlib.sha256(body).hexdigest()[:32] + '"')

    @property
    def size(self) -> int:
        """Bytes of the whole page (HTML, CSS and JavaScript)."""
        return sum(len(f.body) for f in self.files.values())

    def wants(self, path: str, headers: Mapping[str, str]) -> bool:
        """Whether a GET of ``path`` asks for a file of the page (not for a WebSocket)."""
        upgrade = headers.get("Upgrade", "").lower() == "websocket"
        return path.partition("?")[0] in PATHS and not upgrade

    def respond(self, path: str, headers: Mapping[str, str],
                websocket_url: str | None = None) -> Answer:
        """The file; with ``websocket_url`` (the page served from another port than the
        WebSocket's: the HTTP layer's) the page is told to connect there, in a ``<meta
        name="mmchat-websocket">``, and its CSP allows it."""
        name = PATHS[path.partition("?")[0]]
        file = self.files[name]
        csp = CSP
        if websocket_url is not None:
            csp = CSP.replace("connect-src 'self'", f"connect-src 'self' {websocket_url}")
            if name == "index.html":
                file = self._pointed_at(file, websocket_url)
        out = [("Content-Security-Policy", csp), ("X-Content-Type-Options", "nosniff"),
               ("Referrer-Policy", "no-referrer"), ("Cache-Control", "no-cache"),
               ("ETag", file.etag)]
        if file.etag in headers.get("If-None-Match", ""):
            return Answer(HTTPStatus.NOT_MODIFIED, out, b"")
        out += [("Content-Type", file.content_type), ("Content-Length", str(len(file.body)))]
        return Answer(HTTPStatus.OK, out, file.body)


def own_origins(headers: Mapping[str, str], port: int | None = None) -> list[str]:
    """The origins of a page served by this server under the request's ``Host``; with
    ``port``, of one served under that host on that port (the HTTP layer's)."""
    host = headers.get("Host")
    if host and port is not None:
        name, colon, tail = host.rpartition(":")
        host = f"{name if colon and tail.isdigit() else host}:{port}"
    return [f"http://{host}", f"https://{host}"] if host else []
