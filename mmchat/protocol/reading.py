"""Reading frames: JSON text frames into typed events, every field checked, or a
precise :class:`ProtocolError`."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from .events import (
    CLIENT_EVENTS,
    DEFAULT_LIMITS,
    FINISH_REASONS,
    MAX_COALESCE,
    PROTOCOL_VERSION,
    SERVER_EVENTS,
    Cancel,
    ClientEvent,
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
    Usage,
    WireAttachment,
)
from .tokens import MAX_TOKEN_CHARS

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_MIME = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
_MAX_INT = 2**53 - 1
_MAX_NONCE_CHARS = 128


class _Reader:
    """Reads fields of one JSON object, raising precise :class:`ProtocolError` s."""

    def __init__(self, obj: Any, where: str, ref: str | None, *, event: bool = False) -> None:
        if not isinstance(obj, dict):
            raise ProtocolError("bad_type", f"{where} must be a JSON object", ref)
        self.obj = obj
        self.where = where
        self.ref = ref
        self._seen = {"type"} if event else set()

    def fail(self, code: str, message: str, *, fatal: bool = False) -> ProtocolError:
        return ProtocolError(code, f"{self.where}: {message}", self.ref, fatal)

    def get(self, name: str, kind: type | tuple[type, ...], what: str,
            required: bool) -> Any:
        self._seen.add(name)
        value = self.obj.get(name)
        if value is None:
            if required:
                raise self.fail("missing_field", f"{name!r} is required")
            return None
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise self.fail("bad_type", f"{name!r} must be {what}, not {_json_kind(value)}")
        return value

    def string(self, name: str, *, required: bool = True, max_chars: int | None = None,
               pattern: re.Pattern[str] | None = None, what: str = "") -> str | None:
        value = self.get(name, str, "a string", required)
        if value is None:
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise self.fail("bad_value", f"{name!r} is not valid Unicode") from None
        if max_chars is not None and len(value) > max_chars:
            raise self.fail("bad_value", f"{name!r} is longer than {max_chars} characters")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail("bad_value", f"{name!r} must be {what}")
        return value

    def ident(self, name: str, *, required: bool = True) -> str | None:
        return self.string(name, required=required, pattern=_ID,
                           what="1 to 128 of A-Z a-z 0-9 . _ : -")

    def integer(self, name: str, *, required: bool = True, minimum: int = 0) -> int | None:
        value = self.get(name, int, "an integer", required)
        if value is not None and not minimum <= value <= _MAX_INT:
            raise self.fail("bad_value", f"{name!r} must be from {minimum} to {_MAX_INT}")
        return value

    def number(self, name: str, *, required: bool = True) -> float | None:
        value = self.get(name, (int, float), "a number", required)
        return None if value is None else float(value)

    def boolean(self, name: str, *, default: bool) -> bool:
        value = self.get(name, bool, "true or false", False)
        return default if value is None else value

    def array(self, name: str) -> list[Any]:
        return self.get(name, list, "an array", False) or []

    def child(self, name: str, *, required: bool = True) -> _Reader | None:
        value = self.get(name, dict, "an object", required)
        return None if value is None else _Reader(value, f"{self.where}.{name}", self.ref)

    def number_map(self, name: str) -> dict[str, float]:
        value = self.get(name, dict, "an object", False) or {}
        out = {}
        for key, number in value.items():
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise self.fail("bad_type", f"{name}.{key} must be a number")
            out[key] = float(number)
        return out

    def finish(self) -> None:
        extra = sorted(set(self.obj) - self._seen)
        if extra:
            raise self.fail("unknown_field", f"unknown field(s) {', '.join(map(repr, extra))}")


def _json_kind(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (str, "a string"), (int, "an integer"),
                       (float, "a number"), (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode_json(frame: str | bytes, max_bytes: int | None) -> Any:
    if isinstance(frame, (bytes, bytearray, memoryview)):
        size = len(frame)
    elif isinstance(frame, str):
        size = len(frame.encode("utf-8", "surrogatepass")) if max_bytes is not None else 0
    else:
        raise TypeError(f"a frame is str or bytes, not {type(frame).__name__}")
    if max_bytes is not None and size > max_bytes:
        raise ProtocolError("frame_too_large", f"text frame of {size} bytes is over the "
                            f"limit of {max_bytes}", fatal=True)
    if not isinstance(frame, str):
        try:
            frame = bytes(frame).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("malformed_json", f"frame is not UTF-8: {exc}") from None
    try:
        return json.loads(frame, object_pairs_hook=_no_duplicates,
                          parse_constant=_no_constants)
    except RecursionError:
        raise ProtocolError("malformed_json", "JSON nested too deep") from None
    except ValueError as exc:
        raise ProtocolError("malformed_json", f"not valid JSON: {exc}") from None


def _event_type(obj: Any, table: Mapping[str, type], side: str) -> type:
    if not isinstance(obj, dict):
        raise ProtocolError("bad_type", f"an event must be a JSON object, not {_json_kind(obj)}")
    name = obj.get("type")
    if name is None:
        raise ProtocolError("missing_field", "event: 'type' is required")
    if not isinstance(name, str):
        raise ProtocolError("bad_type", f"event: 'type' must be a string, not {_json_kind(name)}")
    cls = table.get(name)
    if cls is None:
        raise ProtocolError("unknown_event", f"{name[:64]!r} is not a {side} event; "
                            f"expected one of {', '.join(table)}")
    return cls


def parse_client_event(frame: str | bytes, limits: Limits = DEFAULT_LIMITS) -> ClientEvent:
    """Read one text frame from a client. Raises :class:`ProtocolError` and nothing else
    for any input (a non-``str``/``bytes`` argument is a :class:`TypeError`)."""
    obj = _decode_json(frame, limits.max_event_bytes)
    cls = _event_type(obj, CLIENT_EVENTS, "client")
    ref = obj.get("id") if cls in (Message, Cancel) else cls.type
    reader = _Reader(obj, cls.type, ref if isinstance(ref, str) and _ID.fullmatch(ref) else None,
                     event=True)
    event = _CLIENT_READERS[cls](reader, limits)
    reader.finish()
    return event


def parse_server_event(frame: str | bytes) -> ServerEvent:
    """Read one text frame from a server (for clients and tests)."""
    obj = _decode_json(frame, None)
    cls = _event_type(obj, SERVER_EVENTS, "server")
    reader = _Reader(obj, cls.type, None, event=True)
    event = _SERVER_READERS[cls](reader)
    reader.finish()
    return event


def _read_hello(r: _Reader, limits: Limits) -> Hello:
    version = r.string("version")
    if version != PROTOCOL_VERSION:
        raise r.fail("unsupported_version", f"version {version[:16]!r} is not supported; "
                     f"this server speaks {PROTOCOL_VERSION!r}", fatal=True)
    hello = Hello(version, r.string("token", required=False, max_chars=MAX_TOKEN_CHARS),
                  r.ident("session_id", required=False),
                  r.integer("last_seq", required=False), _read_coalesce(r))
    if hello.last_seq is not None and hello.session_id is None:
        raise r.fail("bad_value", "'last_seq' needs 'session_id'")
    return hello


def _read_coalesce(r: _Reader) -> int | None:
    coalesce = r.integer("coalesce", required=False, minimum=1)
    if coalesce is not None and coalesce > MAX_COALESCE:
        raise r.fail("bad_value", f"'coalesce' must be from 1 to {MAX_COALESCE}")
    return coalesce


def _read_message(r: _Reader, limits: Limits) -> Message:
    message_id = r.ident("id")
    text = r.string("text", required=False) or ""
    raw = r.array("attachments")
    if len(raw) > limits.max_attachments:
        raise r.fail("too_many_attachments", f"{len(raw)} attachments; at most "
                     f"{limits.max_attachments} are allowed")
    attachments = tuple(_read_attachment(_Reader(item, f"message.attachments[{i}]", r.ref))
                        for i, item in enumerate(raw))
    frames = sorted(a.frame for a in attachments if a.frame is not None)
    if frames != list(range(len(frames))):
        raise r.fail("bad_value", "attachment 'frame' indexes must be 0, 1, ... each used once")
    return Message(message_id, text, attachments)


def _read_attachment(r: _Reader) -> WireAttachment:
    mime_type = r.string("mime_type", pattern=_MIME, what="a MIME type such as image/png")
    modality = r.string("modality", required=False, pattern=_NAME,
                        what="a modality name such as image")
    encoded = r.string("data", required=False)
    frame = r.integer("frame", required=False)
    r.finish()
    if (encoded is None) == (frame is None):
        raise r.fail("bad_value", "give exactly one of 'data' (base64) and 'frame'")
    data = None
    if encoded is not None:
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise r.fail("invalid_base64", f"'data' is not base64: {exc}") from None
    return WireAttachment(mime_type, modality, data, frame)


def _read_cancel(r: _Reader, limits: Limits) -> Cancel:
    return Cancel(r.ident("id", required=False))


def _read_ping(r: _Reader, limits: Limits) -> Ping:
    return Ping(r.string("nonce", required=False, max_chars=_MAX_NONCE_CHARS))


_CLIENT_READERS = {Hello: _read_hello, Message: _read_message, Cancel: _read_cancel,
                   Ping: _read_ping}


def _read_ready(r: _Reader) -> Ready:
    modalities = []
    for i, item in enumerate(r.array("modalities")):
        m = _Reader(item, f"ready.modalities[{i}]", None)
        mime_types = m.array("mime_types")
        if not all(isinstance(t, str) for t in mime_types):
            raise m.fail("bad_type", "'mime_types' must be an array of strings")
        modalities.append(ModalityInfo(m.string("name"), tuple(mime_types),
                                       m.integer("max_bytes")))
        m.finish()
    limits = DEFAULT_LIMITS
    lr = r.child("limits", required=False)
    if lr is not None:
        defaults = dataclasses.asdict(DEFAULT_LIMITS)
        values = {}
        for name, default in defaults.items():
            if isinstance(default, float):
                values[name] = lr.number(name, required=False)
            else:
                values[name] = lr.integer(name, required=False)
        lr.finish()
        limits = Limits(**{k: defaults[k] if v is None else v for k, v in values.items()})
    return Ready(r.ident("session_id"), r.string("version"), tuple(modalities),
                 r.boolean("resumed", default=False), limits,
                 _read_coalesce(r) or 1)


def _read_delta(r: _Reader) -> Delta:
    delta = Delta(r.ident("response_id"), r.integer("seq", minimum=1), r.string("text"),
                  r.integer("first_seq", required=False, minimum=1))
    if delta.first_seq is not None and delta.first_seq >= delta.seq:
        raise r.fail("bad_value", "'first_seq' must be below 'seq' (a one-token delta "
                     "has none)")
    return delta


def _read_done(r: _Reader) -> Done:
    response_id, seq, text = r.ident("response_id"), r.integer("seq", minimum=1), r.string("text")
    finish_reason = r.string("finish_reason")
    if finish_reason not in FINISH_REASONS:
        raise r.fail("bad_value", f"'finish_reason' must be one of {', '.join(FINISH_REASONS)}")
    u = r.child("usage")
    usage = Usage(u.integer("prompt_tokens"), u.integer("completion_tokens"))
    u.finish()
    dropped = r.array("dropped")
    if not all(isinstance(i, str) and _ID.fullmatch(i) for i in dropped):
        raise r.fail("bad_value", "'dropped' must hold attachment ids")
    return Done(response_id, seq, text, finish_reason, usage,
                r.number_map("attention"), r.number_map("timings"),
                tuple(dropped) if dropped else None,
                r.number("confidence", required=False), r.boolean("fallback", default=False))


_SERVER_READERS = {
    Ready: _read_ready,
    Started: lambda r: Started(r.ident("id"), r.ident("response_id"),
                               r.integer("seq", minimum=1)),
    Delta: _read_delta,
    Done: _read_done,
    Error: lambda r: Error(r.string("code"), r.string("message"), r.string("ref", required=False),
                           r.boolean("fatal", default=False)),
    Pong: lambda r: Pong(r.string("nonce", required=False, max_chars=_MAX_NONCE_CHARS)),
}
