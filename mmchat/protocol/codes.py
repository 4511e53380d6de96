"""The protocol's WebSocket close codes and the error codes a client can see."""

from __future__ import annotations

from collections.abc import Mapping

from .. import errors

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


def close_code_for(code: str) -> int:
    """The WebSocket close code that goes with a fatal error ``code``."""
    return _FATAL_CLOSE_CODES.get(code, CLOSE_POLICY_VIOLATION)
