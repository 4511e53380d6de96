"""The exceptions mmchat raises, each with a stable machine-readable code."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .replies import Reply


class MMChatError(Exception):
    """Base class. ``code`` is stable and is what clients see in error events."""

    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(MMChatError):
    """A setting has a value that is not allowed."""

    code = "bad_config"


class InputError(MMChatError):
    """A message or attachment was rejected before any model work ran."""

    code = "bad_input"


class EmptyMessage(InputError):
    code = "empty_message"


class MessageTooLong(InputError):
    code = "message_too_long"


class UnsupportedMedia(InputError):
    """No registered modality accepts the attachment's MIME type or name."""

    code = "unsupported_media"


class MediaTooLarge(InputError):
    """The payload, pixel count or duration is over a configured limit."""

    code = "media_too_large"


class CorruptMedia(InputError):
    """The payload could not be decoded as the type it claims to be."""

    code = "corrupt_media"


class PluginError(MMChatError):
    """A plugin raised. ``plugin`` names it, so the report points at the culprit."""

    code = "plugin_error"

    def __init__(self, plugin: str, message: str) -> None:
        super().__init__(f"plugin {plugin!r} failed: {message}")
        self.plugin = plugin


class PluginTimeout(PluginError):
    """A plugin's ``decode`` or encoder ran past its time limit."""

    code = "plugin_timeout"


class PluginUnavailable(PluginError):
    """A plugin failed too often in a row and is out of service until its cool-down ends."""

    code = "plugin_unavailable"


class Refused(InputError):
    """A ``prepare_turn`` hook refused the message (moderation). Raise it from the hook."""

    code = "refused"


class CheckpointError(MMChatError):
    code = "bad_checkpoint"


class DatasetError(MMChatError):
    """A dataset file is missing or holds a bad record."""

    code = "bad_dataset"


class StateError(MMChatError):
    """Serialised session state is unreadable or of an unknown version."""

    code = "bad_state"


class StoreUnavailable(MMChatError):
    """The session store cannot be reached (Redis down, say)."""

    code = "store_unavailable"


class SessionBusy(MMChatError):
    code = "session_busy"


class MediaBusy(MMChatError):
    """The client spent its allowance of media decode time (CPU seconds, regained over
    time): the message is refused before anything is stored, and may be sent again
    after ``retry_after`` seconds."""

    code = "media_busy"

    def __init__(self, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SessionExpired(MMChatError):
    """A turn found its session gone (its TTL ran out, or the store lost it): it is not
    re-created under the connection that had it; the client starts a new session."""

    code = "session_expired"


class SessionLost(SessionExpired):
    """The store lost part of the session (evicted under memory pressure, or a restart
    between writes): what was left of it is deleted, and it is never served again as
    the same session; the client starts a new session."""

    code = "session_lost"


class TurnLost(MMChatError):
    """A turn's hold on its session passed to another turn (its lease ran out while it
    stalled, say): the store refused its write whole, so it cannot overwrite newer
    state. Its reply ends there."""

    code = "reply_lost"


class SessionForbidden(MMChatError):
    """The session belongs to another owner."""

    code = "forbidden"


class DuplicateMessage(MMChatError):
    """A client message id was already taken in its session, so it is not processed again."""

    code = "duplicate_message"


class Cancelled(MMChatError):
    code = "cancelled"


class EngineClosed(MMChatError):
    """The engine was closed; it does not start again. Make a new one."""

    code = "engine_closed"


class ReplyTimeout(MMChatError, TimeoutError):
    """A reply's ``timeout`` passed, so its turn was cancelled.

    ``reply`` is the cancelled reply as it was saved, or ``None`` when the turn had
    not reached its session yet (it is then saved with an empty reply once it does).
    """

    code = "timeout"

    def __init__(self, message: str, *, reply: Reply | None = None) -> None:
        super().__init__(message)
        self.reply = reply
