"""The admin HTTP endpoint, Sans-I/O: :func:`handle_admin` maps a request's method,
target and ``Authorization`` header to an :class:`AdminResponse`, over a session store.
It reads no socket, so the WebSocket server's ``process_request`` serves it and any HTTP
layer (Starlette, say) can mount it the same way.

Routes (``{subject}`` is the subject id, percent-encoded UTF-8):

=========================================  =============================================
``GET /admin/subjects/{subject}/sessions``  ``{"subject": ..., "sessions": [ids]}``
``GET /admin/subjects/{subject}/export``    the transcripts, JSON Lines (one message a line)
``DELETE /admin/subjects/{subject}``        erase the subject: ``{"subject": ..., "erased":
                                            {"sessions": n, "messages": n, ...}}``
``GET /admin/subjects/{subject}/erase``     the same, for servers that take only ``GET``
=========================================  =============================================

websockets' HTTP parser accepts only ``GET`` (anything else is refused before
``process_request`` runs), so on the WebSocket port erasing is ``GET .../erase``. That
request does nothing without the admin token in its ``Authorization`` header, which
browsers' prefetchers and crawlers never send, and every answer is ``Cache-Control:
no-store``.

Every request needs ``Authorization: Bearer <admin token>``: a token of
:func:`make_admin_token`, signed with a key derived from the server's auth secret
(``server.auth_secret_env``), so no user's token is ever an admin token. Without a
secret the endpoint is off (404).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from .errors import MMChatError, SessionBusy, StoreUnavailable
from .protocol import make_token, verify_token
from .subjects import (
    erase_subject,
    export_lines,
    export_records,
    subject_sessions,
    validate_subject,
)

if TYPE_CHECKING:
    from .sessions import SessionStore

__all__ = ["ADMIN_PREFIX", "AdminResponse", "handle_admin", "make_admin_token"]

#: Requests whose path starts with this are the admin endpoint's.
ADMIN_PREFIX = "/admin/"
_ADMIN_SUBJECT = "admin"
_KEY_LABEL = b"mmchat admin token v1"
_ROUTE = re.compile(r"/admin/subjects/([^/]+)(/sessions|/export|/erase)?")
_JSON = "application/json"
_JSONL = "application/jsonl; charset=utf-8"


@dataclass(frozen=True)
class AdminResponse:
    """An HTTP response: status, headers (``Content-Type`` among them) and body."""

    status: HTTPStatus
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def _admin_key(secret: bytes) -> bytes:
    return hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()


def make_admin_token(secret: bytes | str, expires_at: int) -> str:
    """An admin token for the server whose auth secret is ``secret``, valid until
    ``expires_at`` (Unix seconds). ``mmchat sessions admin-token`` prints one."""
    raw = secret.encode() if isinstance(secret, str) else secret
    if len(raw) < 16:
        raise ValueError("the token secret must be at least 16 bytes")
    return make_token(_admin_key(raw), _ADMIN_SUBJECT, expires_at)


def _answer(status: HTTPStatus, body: bytes, content_type: str,
            **headers: str) -> AdminResponse:
    return AdminResponse(status, body, {"Content-Type": content_type,
                                        "Cache-Control": "no-store", **headers})


def _json(status: HTTPStatus, value: Any, **headers: str) -> AdminResponse:
    body = json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n"
    return _answer(status, body.encode(), _JSON, **headers)


def _error(status: HTTPStatus, code: str, message: str, **headers: str) -> AdminResponse:
    return _json(status, {"error": code, "message": message}, **headers)


def _authorized(secret: bytes, authorization: str | None, now: float) -> str | None:
    """Why the request is not authorized, or ``None`` when it is."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "send Authorization: Bearer <admin token>"
    try:
        if verify_token(_admin_key(secret), token.strip(), now) == _ADMIN_SUBJECT:
            return None
    except MMChatError as exc:
        return str(exc)
    return "token refused: not an admin token"


async def handle_admin(store: SessionStore, secret: bytes | None, method: str,
                       target: str, authorization: str | None, *,
                       now: float) -> AdminResponse | None:
    """The answer to a request for ``target`` (path and query), or ``None`` when the
    path is not the admin endpoint's. ``secret`` is the server's auth secret (``None``:
    the endpoint is off); ``now`` is the time in Unix seconds, for token expiry."""
    path = target.partition("?")[0]
    if not path.startswith(ADMIN_PREFIX):
        return None
    if secret is None:
        return _error(HTTPStatus.NOT_FOUND, "admin_off", "the admin endpoint is off: "
                      "the server has no auth secret (server.auth_secret_env)")
    why = _authorized(secret, authorization, now)
    if why is not None:
        return _error(HTTPStatus.UNAUTHORIZED, "unauthorized", why,
                      **{"WWW-Authenticate": 'Bearer realm="mmchat admin"'})
    found = _ROUTE.fullmatch(path)
    if found is None:
        return _error(HTTPStatus.NOT_FOUND, "no_such_path", f"no admin path {path!r}")
    try:
        subject = validate_subject(urllib.parse.unquote(found.group(1), errors="strict"))
    except (ValueError, UnicodeDecodeError) as exc:
        return _error(HTTPStatus.BAD_REQUEST, "bad_subject",
                      f"the subject must be percent-encoded UTF-8: {exc}")
    action = found.group(2) or ""
    allowed = "DELETE" if action == "" else "GET"
    if method != allowed:
        return _error(HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed",
                      f"use {allowed} for {path}", Allow=allowed)
    try:
        return await _run(store, action, subject)
    except StoreUnavailable as exc:
        return _error(HTTPStatus.SERVICE_UNAVAILABLE, "store_unavailable", str(exc))
    except SessionBusy as exc:
        return _error(HTTPStatus.CONFLICT, "session_busy", f"{exc}; try again")


async def _run(store: SessionStore, action: str, subject: str) -> AdminResponse:
    if action == "/sessions":
        return _json(HTTPStatus.OK, {"subject": subject,
                                     "sessions": await subject_sessions(store, subject)})
    if action == "/export":
        lines = export_lines(await export_records(store, subject=subject))
        return _answer(HTTPStatus.OK, lines.encode(), _JSONL)
    erased = await erase_subject(store, subject)
    return _json(HTTPStatus.OK, {"subject": subject, "erased": erased.as_dict()})
