"""The mmchat WebSocket event protocol, version 1, with no I/O at all.

Every text frame is one JSON object whose ``"type"`` names the event. This module turns
frames into typed, frozen events (:func:`parse_client_event`, :func:`parse_server_event`)
and back (:func:`serialize`), pairs a ``message`` with the binary frames that carry its
attachments (:class:`FrameAssembler`), limits message rates (:class:`TokenBucket`) and
signs and checks access tokens (:func:`make_token`, :func:`verify_token`). The server
does the sockets; ``docs/protocol.md`` is the reference for clients and
``docs/asyncapi.yaml`` the machine-readable schema.

Resume is folded into ``hello``: a ``hello`` with ``session_id`` reattaches a session,
and with ``last_seq`` too it asks for the reply events after that seq to be replayed.
Absent and ``null`` fields mean the same; unknown fields are refused.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import hmac
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from . import errors
from .modality import Attachment as MediaAttachment
from .sessions import StreamEntry

PROTOCOL_VERSION = "1"

#: WebSocket close codes the server uses.
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013

#: Every error code a client can see in an ``error`` event, with its meaning.
ERROR_CODES: Mapping[str, str] = {
    # Raised by this module while reading client frames.
    "malformed_json": "The text frame is not UTF-8 JSON, or has NaN, duplicate keys or "
                      "nesting too deep.",
    "bad_type": "The frame is not a JSON object, or a field has the wrong JSON type.",
    "unknown_event": "\"type\" names no client event.",
    "missing_field": "A required field is absent or null.",
    "unknown_field": "The event has a field the protocol does not define.",
    "bad_value": "A field has the right type but a value that is not allowed.",
    "invalid_base64": "An attachment's \"data\" is not valid base64.",
    "unsupported_version": "The hello asks for a protocol version the server does not speak.",
    "frame_too_large": "A frame, or a message's attachments together, exceed the limits.",
    "too_many_attachments": "A message has more attachments than allowed.",
    "unexpected_frame": "A binary frame arrived that no message announced.",
    "frames_pending": "A message arrived before the binary frames of the previous one.",
    "unauthorized": "The token is missing, malformed, wrongly signed or expired.",
    "rate_limited": "Messages arrive faster than the connection's rate limit.",
    # Sent by the server.
    "hello_required": "The first event of a connection must be hello.",
    "forbidden": "The session belongs to another subject.",
    "duplicate_message": "A message with this id was already taken in this session; its "
                         "reply can be replayed by resuming.",
    "resume_unavailable": "The reply events after last_seq are no longer kept.",
    "going_away": "The server is shutting down; reconnect and resume.",
    "unknown_session": "The hello named a session that does not exist (or expired); a new "
                       "session was opened instead.",
    "reply_lost": "The process generating the reply stopped; the reply ends with what was "
                  "streamed.",
    "too_many_connections": "The server has as many connections as it allows; try again "
                            "later.",
    errors.SessionBusy.code: "Another turn of the session is running; try again.",
    errors.MediaBusy.code: "The connection used its allowance of attachment decode time; "
                           "send attachments again after the time the message names.",
    errors.SessionExpired.code: "The session expired or the store lost it; it is not "
                                "re-created: start a new session (hello without "
                                "session_id).",
    errors.SessionLost.code: "The store lost part of the session (evicted under memory "
                             "pressure, or restarted between writes): what was left is "
                             "deleted. On hello a new session was opened instead; on a "
                             "message, start a new session (hello without session_id).",
    errors.StoreUnavailable.code: "The session store cannot be reached; try again later.",
    errors.Cancelled.code: "The reply was cancelled.",
    errors.MMChatError.code: "The server failed; the error is logged there.",
    # Input checks of the core, before any model work.
    errors.InputError.code: "The message was rejected.",
    errors.EmptyMessage.code: "The message has neither text nor attachments.",
    errors.MessageTooLong.code: "The text is longer than the server allows.",
    errors.UnsupportedMedia.code: "No modality accepts the attachment's MIME type.",
    errors.MediaTooLarge.code: "An attachment is over its modality's size limits.",
    errors.CorruptMedia.code: "An attachment could not be decoded as its MIME type.",
    errors.PluginError.code: "A plugin failed while handling the message.",
    errors.PluginTimeout.code: "A plugin's decode or encoder ran past its time limit.",
    errors.PluginUnavailable.code: "The plugin that would take an attachment is out of "
                                   "service after repeated failures; try again later.",
    errors.Refused.code: "A plugin (moderation) refused the message.",
}

_FATAL_CLOSE_CODES = {
    "frame_too_large": CLOSE_MESSAGE_TOO_BIG,
    "going_away": CLOSE_GOING_AWAY,
    "too_many_connections": CLOSE_TRY_AGAIN_LATER,
    errors.MMChatError.code: CLOSE_INTERNAL_ERROR,
}

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_MIME = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
_MAX_INT = 2**53 - 1
_MAX_TOKEN_CHARS = 4096
_MAX_NONCE_CHARS = 128
#: The most tokens a client may ask one ``delta`` to carry.
MAX_COALESCE = 256
FINISH_REASONS = ("stop", "length", "loop", "cancelled", "error")


def close_code_for(code: str) -> int:
    """The WebSocket close code that goes with a fatal error ``code``."""
    return _FATAL_CLOSE_CODES.get(code, CLOSE_POLICY_VIOLATION)


class ProtocolError(errors.MMChatError):
    """A client broke the protocol. ``ref`` names the message id (or event type) it is
    about; ``fatal`` errors close the connection with :attr:`close_code`."""

    def __init__(self, code: str, message: str, ref: str | None = None,
                 fatal: bool = False) -> None:
        super().__init__(message, code=code)
        self.ref = ref
        self.fatal = fatal

    @property
    def close_code(self) -> int | None:
        return close_code_for(self.code) if self.fatal else None

    def to_event(self) -> Error:
        return Error(self.code, self.message, self.ref, self.fatal)


@dataclass(frozen=True)
class Limits:
    """What one connection may send. The server announces its limits in ``ready``."""

    #: Largest text frame, in bytes of UTF-8.
    max_event_bytes: int = 1024 * 1024
    #: Most attachments in one message.
    max_attachments: int = 4
    #: Largest binary frame (one attachment), in bytes.
    max_attachment_bytes: int = 16 * 1024 * 1024
    #: Largest total of one message's binary frames, in bytes.
    max_message_bytes: int = 32 * 1024 * 1024
    #: Sustained messages per second per connection.
    messages_per_second: float = 1.0
    #: Messages allowed in a burst above the sustained rate.
    burst: int = 5


DEFAULT_LIMITS = Limits()


# Client events.

@dataclass(frozen=True)
class Hello:
    """First event of a connection. ``session_id`` reattaches a session; with
    ``last_seq`` the server replays reply events after that seq. ``coalesce`` (1 to
    :data:`MAX_COALESCE`) lets a ``delta`` carry up to that many tokens after a reply's
    first; absent, the server's default (``server.coalesce``) holds."""

    type: ClassVar[str] = "hello"
    version: str
    token: str | None = None
    session_id: str | None = None
    last_seq: int | None = None
    coalesce: int | None = None


@dataclass(frozen=True)
class WireAttachment:
    """An attachment as sent: inline ``data`` (base64 on the wire) or the index of a
    binary ``frame`` that follows the message. :class:`FrameAssembler` fills in ``data``."""

    mime_type: str
    modality: str | None = None
    data: bytes | None = field(default=None, repr=False)
    frame: int | None = None

    def to_attachment(self) -> MediaAttachment:
        """The core's :class:`mmchat.modality.Attachment`; needs ``data``."""
        if self.data is None:
            raise ValueError("attachment data has not arrived yet (binary frame pending)")
        return MediaAttachment(data=self.data, mime_type=self.mime_type, modality=self.modality)


@dataclass(frozen=True)
class Message:
    """A user message. ``id`` is chosen by the client and unique within the session:
    sending the same id twice is answered with ``duplicate_message``."""

    type: ClassVar[str] = "message"
    id: str
    text: str = ""
    attachments: tuple[WireAttachment, ...] = ()

    @property
    def frame_count(self) -> int:
        """How many binary frames must follow this message."""
        return sum(a.frame is not None for a in self.attachments)


@dataclass(frozen=True)
class Cancel:
    """Stop the reply to message ``id`` (to whatever is running when absent)."""

    type: ClassVar[str] = "cancel"
    id: str | None = None


@dataclass(frozen=True)
class Ping:
    type: ClassVar[str] = "ping"
    nonce: str | None = None


# Server events.

@dataclass(frozen=True)
class ModalityInfo:
    name: str
    mime_types: tuple[str, ...]
    max_bytes: int


@dataclass(frozen=True)
class Ready:
    """Answer to ``hello``. ``resumed`` is true when an existing session was reattached;
    ``coalesce`` is the most tokens one ``delta`` carries on this connection."""

    type: ClassVar[str] = "ready"
    session_id: str
    version: str = PROTOCOL_VERSION
    modalities: tuple[ModalityInfo, ...] = ()
    resumed: bool = False
    limits: Limits = DEFAULT_LIMITS
    coalesce: int = 1


@dataclass(frozen=True)
class Started:
    """A reply to message ``id`` began. ``seq`` numbers reply events in the session."""

    type: ClassVar[str] = "started"
    id: str
    response_id: str
    seq: int


@dataclass(frozen=True)
class Delta:
    """Reply text. A delta that carries several tokens (``coalesce``) numbers them
    ``first_seq`` to ``seq``; a one-token delta has no ``first_seq``."""

    type: ClassVar[str] = "delta"
    response_id: str
    seq: int
    text: str
    first_seq: int | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Done:
    """The reply ended. ``text`` is all of it; ``attention`` maps each modality in the
    session's memory to the share of memory attention it got (no ``"text"``, and not
    summing to 1); ``timings`` are in milliseconds (docs/protocol.md lists them).
    ``confidence`` is the lowest probability the model gave a token of its reply; with
    ``fallback``, ``text`` is the configured fallback sent in place of the streamed
    deltas (the model was unsure, or looped)."""

    type: ClassVar[str] = "done"
    response_id: str
    seq: int
    text: str
    finish_reason: str
    usage: Usage
    attention: Mapping[str, float] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    #: Ids of the attachments that this turn pushed out of the session's memory bank
    #: (oldest first; left out when none): later turns no longer see them.
    dropped: tuple[str, ...] | None = None
    confidence: float | None = None
    fallback: bool = False


@dataclass(frozen=True)
class Error:
    type: ClassVar[str] = "error"
    code: str
    message: str
    ref: str | None = None
    fatal: bool = False


@dataclass(frozen=True)
class Pong:
    type: ClassVar[str] = "pong"
    nonce: str | None = None


ClientEvent = Hello | Message | Cancel | Ping
ServerEvent = Ready | Started | Delta | Done | Error | Pong
CLIENT_EVENTS: Mapping[str, type] = {cls.type: cls for cls in (Hello, Message, Cancel, Ping)}
SERVER_EVENTS: Mapping[str, type] = {
    cls.type: cls for cls in (Ready, Started, Delta, Done, Error, Pong)}


# Reading.

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
    hello = Hello(version, r.string("token", required=False, max_chars=_MAX_TOKEN_CHARS),
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


# Writing.

_PLAIN = frozenset((str, int, bool))


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _to_json(value: Any) -> Any:
    if type(value) in _PLAIN:  # most fields (and a delta's every field): as they are
        return value
    if hasattr(type(value), "__dataclass_fields__"):
        return {name: _to_json(v) for name in _field_names(type(value))
                if (v := getattr(value, name)) is not None}
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} cannot be sent as JSON")
    return value


def to_json(event: ClientEvent | ServerEvent) -> dict[str, Any]:
    """The JSON object of an event, ``type`` first, ``None`` fields left out."""
    if type(event) not in CLIENT_EVENTS.values() and type(event) not in SERVER_EVENTS.values():
        raise TypeError(f"{type(event).__name__} is not a protocol event")
    return {"type": event.type, **_to_json(event)}


#: JSON string literal of a ``str`` (the C encoder ``json.dumps`` uses for strings).
_quote = json.encoder.encode_basestring


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} cannot be sent as JSON")
    return value


def _done_fields(done: Done) -> dict[str, Any]:
    """A ``done``'s JSON fields but its type, response id, seq and text (as
    :func:`to_json` gives them), built directly."""
    fields: dict[str, Any] = {
        "finish_reason": done.finish_reason,
        "usage": {"prompt_tokens": done.usage.prompt_tokens,
                  "completion_tokens": done.usage.completion_tokens},
        "attention": {str(k): _finite(v) for k, v in done.attention.items()},
        "timings": {str(k): _finite(v) for k, v in done.timings.items()}}
    if done.dropped is not None:
        fields["dropped"] = list(done.dropped)
    if done.confidence is not None:
        fields["confidence"] = _finite(done.confidence)
    fields["fallback"] = done.fallback
    return fields


def serialize(event: ClientEvent | ServerEvent) -> str:
    """The text frame for ``event``. Deltas and starts, most of the frames a server
    sends, are written directly: the same JSON as :func:`to_json` gives, built without
    it."""
    cls = type(event)
    if cls is Delta:
        first = "" if event.first_seq is None else f',"first_seq":{event.first_seq:d}'
        return (f'{{"type":"delta","response_id":{_quote(event.response_id)},'
                f'"seq":{event.seq:d},"text":{_quote(event.text)}{first}}}')
    if cls is Started:
        return (f'{{"type":"started","id":{_quote(event.id)},'
                f'"response_id":{_quote(event.response_id)},"seq":{event.seq:d}}}')
    if cls is Done:
        return json.dumps({"type": "done", "response_id": event.response_id,
                           "seq": event.seq, "text": event.text, **_done_fields(event)},
                          ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return json.dumps(to_json(event), ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False)


# Reply events in the session store's stream, for resume.

def to_stream_entry(event: Started | Delta | Done) -> StreamEntry:
    """The :class:`mmchat.sessions.StreamEntry` that keeps a reply event for resume."""
    cls = type(event)
    if cls is Delta and event.first_seq is None:
        return StreamEntry(event.seq, event.response_id, "delta", event.text, {})
    if cls is Started:
        return StreamEntry(event.seq, event.response_id, "started", "", {"id": event.id})
    if cls is Done:
        return StreamEntry(event.seq, event.response_id, "done", event.text,
                           _done_fields(event))
    if not isinstance(event, (Started, Delta, Done)):
        raise TypeError(f"only started, delta and done are kept, not {event.type}")
    data = to_json(event)
    for key in ("type", "response_id", "seq", "text"):
        data.pop(key, None)
    return StreamEntry(event.seq, event.response_id, event.type,
                       getattr(event, "text", ""), data)


def from_stream_entry(entry: StreamEntry) -> Started | Delta | Done:
    """The reply event a :class:`StreamEntry` keeps."""
    obj = {"type": entry.kind, "response_id": entry.response_id, "seq": entry.seq,
           **entry.data}
    if entry.kind != "started":
        obj["text"] = entry.text
    event = parse_server_event(json.dumps(obj))
    if not isinstance(event, (Started, Delta, Done)):
        raise TypeError(f"stream entry kind {entry.kind!r} is not a reply event")
    return event


# Binary frames.

class FrameAssembler:
    """Pairs a ``message`` with the binary frames announced by its attachments.

    Frames follow their message in index order; other events may come in between, but
    not another message. Sans-I/O: feed it events and frames, it returns complete
    messages, with every attachment's ``data`` filled and ``frame`` cleared.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._pending: Message | None = None
        self._frames: list[bytes] = []
        self._bytes = 0

    @property
    def pending(self) -> Message | None:
        """The message waiting for frames, if any."""
        return self._pending

    def reset(self) -> None:
        self._pending, self._frames, self._bytes = None, [], 0

    def add_message(self, message: Message) -> Message | None:
        """Return ``message`` if it needs no frames, else keep it and return ``None``."""
        if self._pending is not None:
            pending = self._pending
            self.reset()
            raise ProtocolError("frames_pending", f"message {message.id!r} arrived before "
                                f"the binary frames of message {pending.id!r}",
                                pending.id, fatal=True)
        count = message.frame_count
        if count > self.limits.max_attachments:
            raise ProtocolError("too_many_attachments", f"message {message.id!r} announces "
                                f"{count} frames; at most {self.limits.max_attachments}",
                                message.id)
        if count == 0:
            return message
        self._pending = message
        return None

    def add_frame(self, data: bytes) -> Message | None:
        """Take the next binary frame; return the message once its last frame arrived."""
        message = self._pending
        if message is None:
            raise ProtocolError("unexpected_frame", "a binary frame arrived but no message "
                                "announced one", fatal=True)
        limits = self.limits
        if len(data) > limits.max_attachment_bytes:
            self.reset()
            raise ProtocolError("frame_too_large", f"binary frame {len(self._frames)} of "
                                f"message {message.id!r} has {len(data)} bytes; at most "
                                f"{limits.max_attachment_bytes}", message.id, fatal=True)
        if self._bytes + len(data) > limits.max_message_bytes:
            self.reset()
            raise ProtocolError("frame_too_large", f"the binary frames of message "
                                f"{message.id!r} exceed {limits.max_message_bytes} bytes",
                                message.id, fatal=True)
        self._frames.append(bytes(data))
        self._bytes += len(data)
        if len(self._frames) < message.frame_count:
            return None
        frames = self._frames
        self.reset()
        return dataclasses.replace(message, attachments=tuple(
            a if a.frame is None else dataclasses.replace(a, data=frames[a.frame], frame=None)
            for a in message.attachments))


# Rate limiting.

class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` saved. Pure: the
    caller passes the time (``loop.time()``, say) to every call."""

    def __init__(self, rate: float, burst: float, *, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now

    def try_acquire(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are enough; ``False`` (and take none) if not."""
        if cost > self.burst:
            raise ValueError(f"cost {cost} can never fit a burst of {self.burst}")
        self._refill(now)
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    def retry_after(self, now: float, cost: float = 1.0) -> float:
        """Seconds from ``now`` until ``cost`` tokens are there."""
        self._refill(now)
        return max(0.0, (cost - self._tokens) / self.rate)


# Access tokens.

_TOKEN_VERSION = "v1"
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _signature(secret: bytes | str, payload: str) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return _b64url(hmac.new(key, payload.encode("ascii"), hashlib.sha256).digest())


def make_token(secret: bytes | str, subject: str, expires_at: int) -> str:
    """A token ``v1.<subject>.<expires_at>.<HMAC-SHA256>`` (base64url, no padding) that
    :func:`verify_token` accepts until ``expires_at`` (Unix seconds)."""
    if len(secret) < 16:
        raise ValueError("the token secret must be at least 16 bytes")
    if not subject or len(subject) > 256:
        raise ValueError("the subject must be 1 to 256 characters")
    if isinstance(expires_at, bool) or not isinstance(expires_at, int) or expires_at < 0:
        raise ValueError("expires_at must be a non-negative integer (Unix seconds)")
    payload = f"{_TOKEN_VERSION}.{_b64url(subject.encode('utf-8'))}.{expires_at}"
    return f"{payload}.{_signature(secret, payload)}"


def verify_token(secret: bytes | str, token: str, now: float) -> str:
    """Return the token's subject; :class:`ProtocolError` ``unauthorized`` (fatal) if the
    token is malformed, wrongly signed or expired at ``now`` (Unix seconds)."""

    def refuse(why: str) -> ProtocolError:
        return ProtocolError("unauthorized", f"token refused: {why}", "hello", fatal=True)

    if not isinstance(token, str) or not token.isascii() or len(token) > _MAX_TOKEN_CHARS:
        raise refuse("malformed")
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != _TOKEN_VERSION:
        raise refuse("malformed")
    _, subject_b64, expires, signature = parts
    if not (_B64URL.fullmatch(subject_b64) and expires.isdigit() and len(expires) < 16
            and _B64URL.fullmatch(signature)):
        raise refuse("malformed")
    expected = _signature(secret, f"{_TOKEN_VERSION}.{subject_b64}.{expires}")
    if not hmac.compare_digest(expected.encode("ascii"), signature.encode("ascii")):
        raise refuse("bad signature")
    if int(expires) <= now:
        raise refuse("expired")
    try:
        return base64.urlsafe_b64decode(subject_b64 + "=" * (-len(subject_b64) % 4)).decode()
    except (binascii.Error, ValueError):
        raise refuse("malformed") from None
