"""The hooks around every reply: ``prepare_turn``, ``redact_text`` and ``record_turn``.

The engine calls them for every turn, whatever the entry (``Engine.reply``,
``Engine.stream``, WebSocket). With no plugin implementing them, a turn pays for one
look-up per hook. A hook that raises fails only its turn (``prepare_turn``,
``redact_text``: a :class:`~mmchat.errors.PluginError` naming the plugin, nothing
stored), or is logged and ignored (``record_turn``: the reply is already made).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import MMChatError, PluginError
from .modality import Attachment

if TYPE_CHECKING:
    from .plugins import PluginHost

logger = logging.getLogger(__name__)


class TurnHooks:
    """Calls the reply hooks of a :class:`~mmchat.plugins.PluginHost`."""

    def __init__(self, host: PluginHost) -> None:
        self.host = host

    async def prepare(self, session_id: str, text: str, attachments: list[Attachment]
                      ) -> tuple[str, list[Attachment]]:
        """The message after every ``prepare_turn`` hook, each seeing the one before's
        change. :class:`~mmchat.errors.Refused` (or another MMChatError) from a hook
        passes through; any other failure is a PluginError naming the plugin."""
        for plugin, call in self.host.callers("prepare_turn"):
            try:
                changed = await _maybe_await(call(session_id=session_id, text=text,
                                                  attachments=list(attachments)))
            except MMChatError:
                raise
            except Exception as exc:
                raise _failed(plugin, "prepare_turn", exc) from exc
            if changed is None:
                continue
            if not (isinstance(changed, tuple) and len(changed) == 2
                    and isinstance(changed[0], str) and isinstance(changed[1], Sequence)
                    and all(isinstance(a, Attachment) for a in changed[1])):
                raise PluginError(plugin, "prepare_turn must return None or (text, "
                                          f"[Attachment, ...]), not {changed!r:.80}")
            text, attachments = changed[0], list(changed[1])
        return text, attachments

    def redactor(self, session_id: str) -> Redactor | None:
        """A :class:`Redactor` for one reply, or ``None`` when no plugin redacts."""
        callers = self.host.callers("redact_text")
        return Redactor(session_id, callers) if callers else None

    async def record(self, session_id: str, text: str, attachments: list[Attachment],
                     reply: Any) -> None:
        """Every ``record_turn`` hook; a failure is logged, never raised."""
        for plugin, call in self.host.callers("record_turn"):
            try:
                await _maybe_await(call(session_id=session_id, text=text,
                                        attachments=attachments, reply=reply))
            except Exception:
                logger.exception("plugin %r failed in record_turn", plugin)


class Redactor:
    """One reply's ``redact_text`` hooks. :meth:`delta` rewrites streamed text; the first
    failure is kept in :attr:`error` (later deltas are dropped) for the engine to end
    the turn with."""

    def __init__(self, session_id: str, callers: list[tuple[str, Callable[..., Any]]]) -> None:
        self.session_id = session_id
        self.callers = callers
        self.error: PluginError | None = None

    def text(self, text: str, *, final: bool) -> str:
        """``text`` after every hook; raises PluginError naming a hook that failed."""
        for plugin, call in self.callers:
            try:
                changed = call(session_id=self.session_id, text=text, final=final)
            except Exception as exc:
                raise _failed(plugin, "redact_text", exc) from exc
            if changed is None:
                continue
            if not isinstance(changed, str):
                raise PluginError(plugin, "redact_text must return None or a str, not "
                                          f"{type(changed).__name__}")
            text = changed
        return text

    def wrap(self, put: Callable[[Any], None], fail: Callable[[], None]
             ) -> Callable[[Any], None]:
        """``put`` for deltas, with their text redacted; on a failure ``fail()`` is called
        (to stop the reply) and nothing more is put."""
        def redacted(delta: Any) -> None:
            if self.error is not None:
                return
            try:
                text = self.text(delta.text, final=False)
            except PluginError as exc:
                self.error = exc
                fail()
                return
            put(type(delta)(text, delta.index, delta.token_id))
        return redacted


def _failed(plugin: str, hook: str, exc: Exception) -> PluginError:
    """Log a hook's exception; the PluginError that ends its turn."""
    logger.error("plugin %r failed in %s", plugin, hook, exc_info=exc)
    return PluginError(plugin, f"{hook} raised {type(exc).__name__}: {exc}")


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
