"""The protocol's typed, frozen events, its limits and :class:`ProtocolError`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from .. import errors
from ..modality import Attachment as MediaAttachment
from .codes import close_code_for

PROTOCOL_VERSION = "1"

#: The most tokens a client may ask one ``delta`` to carry.
MAX_COALESCE = 256
FINISH_REASONS = ("stop", "length", "loop", "cancelled", "error")


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
