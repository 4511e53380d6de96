"""The mmchat WebSocket event protocol, version 1, with no I/O at all.

Every text frame is one JSON object whose ``"type"`` names the event. This package turns
frames into typed, frozen events (:func:`parse_client_event`, :func:`parse_server_event`)
and back (:func:`serialize`), pairs a ``message`` with the binary frames that carry its
attachments (:class:`FrameAssembler`), limits message rates (:class:`TokenBucket`) and
signs and checks access tokens (:func:`make_token`, :func:`verify_token`). The server
does the sockets; ``docs/protocol.md`` is the reference for clients and
``docs/asyncapi.yaml`` the machine-readable schema.

Resume is folded into ``hello``: a ``hello`` with ``session_id`` reattaches a session,
and with ``last_seq`` too it asks for the reply events after that seq to be replayed.
Absent and ``null`` fields mean the same; unknown fields are refused.

Its modules, one job each: :mod:`~mmchat.protocol.codes` (close and error codes),
:mod:`~mmchat.protocol.events` (the events, limits and :class:`ProtocolError`),
:mod:`~mmchat.protocol.reading` (frames into events), :mod:`~mmchat.protocol.writing`
(events into frames), :mod:`~mmchat.protocol.stream` (reply events kept for resume),
:mod:`~mmchat.protocol.frames` (binary frames), :mod:`~mmchat.protocol.ratelimit`
and :mod:`~mmchat.protocol.tokens` (access tokens). Import the names from here.
"""

from .codes import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    ERROR_CODES,
    close_code_for,
)
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
from .frames import FrameAssembler
from .ratelimit import TokenBucket
from .reading import parse_client_event, parse_server_event
from .stream import from_stream_entry, to_stream_entry
from .tokens import make_token, verify_token
from .writing import serialize, to_json

__all__ = [
    "CLIENT_EVENTS", "CLOSE_GOING_AWAY", "CLOSE_INTERNAL_ERROR", "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_POLICY_VIOLATION", "CLOSE_TRY_AGAIN_LATER", "DEFAULT_LIMITS", "ERROR_CODES",
    "FINISH_REASONS", "MAX_COALESCE", "PROTOCOL_VERSION", "SERVER_EVENTS", "Cancel",
    "ClientEvent", "Delta", "Done", "Error", "FrameAssembler", "Hello", "Limits", "Message",
    "ModalityInfo", "Ping", "Pong", "ProtocolError", "Ready", "ServerEvent", "Started",
    "TokenBucket", "Usage", "WireAttachment", "close_code_for", "from_stream_entry",
    "make_token", "parse_client_event", "parse_server_event", "serialize", "to_json",
    "to_stream_entry", "verify_token",
]
