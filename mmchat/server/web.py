"""The chat page: the files of ``mmchat/web/`` served as they are, from ``process_request``.

A plain ``GET`` (no WebSocket upgrade) of ``/`` or of one of the page's files gets the
file, with a ``Content-Security-Policy`` that allows only the page's own scripts, styles
and WebSocket, a strong ``ETag`` (``304 Not Modified`` when it matches) and
``Cache-Control: no-cache`` (browsers keep the files and revalidate them). Nothing else
under ``mmchat/web/`` is reachable: the paths are a fixed list, read once at start-up.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

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


class WebPage:
    """The page's files, loaded once; :meth:`respond` answers a request for one."""

    def __init__(self) -> None:
        folder = resources.files("mmchat") / "web"
        self.files: dict[str, StaticFile] = {}
        for name in set(PATHS.values()):
            body = (folder / name).read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            self.files[name] = StaticFile(body, CONTENT_TYPES[name.rpartition(".")[2]], etag)

    @property
    def size(self) -> int:
        """Bytes of the whole page (HTML, CSS and JavaScript)."""
        return sum(len(f.body) for f in self.files.values())

    @staticmethod
    def is_upgrade(request: Request) -> bool:
        return request.headers.get("Upgrade", "").lower() == "websocket"

    def wants(self, request: Request) -> bool:
        """Whether ``request`` asks for a file of the page (not for a WebSocket)."""
        return request.path.partition("?")[0] in PATHS and not self.is_upgrade(request)

    def respond(self, request: Request) -> Response:
        file = self.files[PATHS[request.path.partition("?")[0]]]
        headers = Headers([("Content-Security-Policy", CSP),
                           ("X-Content-Type-Options", "nosniff"),
                           ("Referrer-Policy", "no-referrer"),
                           ("Cache-Control", "no-cache"), ("ETag", file.etag)])
        if file.etag in request.headers.get("If-None-Match", ""):
            return Response(HTTPStatus.NOT_MODIFIED, "Not Modified", headers, b"")
        headers["Content-Type"] = file.content_type
        headers["Content-Length"] = str(len(file.body))
        return Response(HTTPStatus.OK, "OK", headers, file.body)


def own_origins(request: Request) -> list[str]:
    """The origins of a page served by this server under the request's ``Host``."""
    host = request.headers.get("Host")
    return [f"http://{host}", f"https://{host}"] if host else []
