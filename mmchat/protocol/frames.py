"""Binary frames: pairing a ``message`` with the frames that carry its attachments."""

from __future__ import annotations

import dataclasses

from .events import DEFAULT_LIMITS, Limits, Message, ProtocolError


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
