"""The OpenAI endpoint's sessions: whole-history requests onto mmchat's RNN sessions,
over the public :class:`~mmchat.Engine` API only.

OpenAI clients send the whole conversation with every request; an mmchat session keeps
the RNN state of what it has seen. After each reply the session is named, in the store
(so any node can continue it), by the key of the conversation it has now seen
(:func:`~.openai_wire.conversation_key`: the owner, the system text, each turn's text
and attachments' hashes). A request whose history has that key takes the name (one
taker: the store's ``take_alias``) and continues the session with its last message
alone: **continued**. A request whose history has no such session (a conversation from
another server, an edited or regenerated turn, a changed system text, an expired or
erased session) gets a new session seeded with its system text and history
(:meth:`~mmchat.Engine.seed`, no generating): **rebuilt**. A request with neither opens
a new session: **new**. ``mmchat_openai_sessions_total{how}`` counts them.

A request made with an access token makes and continues sessions of the token's
subject (:mod:`mmchat.subjects`), so ``mmchat sessions`` and the admin endpoint list,
export and erase them. A name is taken only for a session that is still there and still
the same owner's (:meth:`~mmchat.sessions.SessionStore.head`): a name that outlived its
session (expired, or its subject erased) rebuilds, so it never reaches what was erased.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from ..errors import MMChatError, SessionLost
from ..modality import Attachment
from ..replies import ReplyStream
from ..subjects import subject_of
from .openai_wire import (
    ChatRequest,
    Completion,
    OpenAIError,
    StopTrimmer,
    Turn,
    bad_request,
    conversation_key,
    from_mmchat,
    sse,
    usage,
)

logger = logging.getLogger(__name__)

#: Seconds a remote image URL may take (only with ``server.openai_remote_urls``).
FETCH_TIMEOUT_S = 10.0


@dataclass
class _Run:
    """A reply being generated for one request, and how to name its session after."""

    stream: ReplyStream
    session_id: str
    owner: str
    system: str | None
    seen: list[Turn]  # the conversation the session had seen, and the message answered
    key: str  # the key of the history the session had seen ("" for a new one)
    streamed: list[str] = field(default_factory=list)


class OpenAIService:
    """Runs chat completions on ``engine``, with sessions in ``store`` (the engine's,
    perhaps wrapped for metrics), counting sessions in ``metrics``."""

    def __init__(self, engine: Any, store: Any, metrics: Any, *, model_name: str,
                 max_attachment_bytes: int, allow_remote_urls: bool = False) -> None:
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.model_name = model_name
        self.max_attachment_bytes = max_attachment_bytes
        self.allow_remote_urls = allow_remote_urls

    async def complete(self, request: ChatRequest, owner: str) -> dict[str, Any]:
        """A whole (not streamed) completion."""
        run = await self._start(request, owner)
        try:
            reply = await run.stream.wait()
        except Exception as exc:
            await self._failed(run)
            raise _error(exc) from None
        await self._finished(run, reply.text, reply.finish_reason)
        response = Completion(self.model_name).response(
            reply.text, reply.finish_reason, usage(reply.prompt_tokens, reply.completion_tokens))
        response["mmchat"] = {"session_id": run.session_id, "attention": reply.attention,
                              "confidence": reply.confidence, "fallback": reply.fallback}
        return response

    async def stream(self, request: ChatRequest, owner: str) -> AsyncIterator[bytes]:
        """The server-sent events of a streamed completion. The reply's first deltas
        (or its error) are awaited here, so an error before the first token is raised
        as :class:`OpenAIError` before any event (a proper HTTP status); one after it
        becomes an error event. Closing the iterator early cancels the reply."""
        run = await self._start(request, owner)
        try:
            deltas, end = await run.stream.take()
        except BaseException:
            run.stream.cancel()
            raise
        if isinstance(end, Exception):
            await self._failed(run)
            raise _error(end)
        return self._events(run, request, deltas, end)

    async def _events(self, run: _Run, request: ChatRequest, deltas: list[Any],
                      end: Any) -> AsyncIterator[bytes]:
        completion = Completion(self.model_name)
        trimmer = StopTrimmer(request.generation.get("stop", self.engine.config.generation.stop))
        finished = False
        try:
            first = completion.chunk({"role": "assistant", "content": ""})
            first["mmchat"] = {"session_id": run.session_id}
            yield sse(first)
            while True:
                text = trimmer.feed("".join(d.text for d in deltas))
                if end is not None:
                    text += trimmer.end()
                if text:
                    run.streamed.append(text)
                    yield sse(completion.chunk({"content": text}))
                if end is not None:
                    break
                deltas, end = await run.stream.take()
            finished = True
            if isinstance(end, Exception):
                await self._failed(run)
                yield sse(_error(end).body())
            else:
                await self._finished(run, "".join(run.streamed), end.finish_reason)
                yield sse(completion.chunk({}, end.finish_reason))
                if request.include_usage:
                    yield sse(completion.usage_chunk(
                        usage(end.prompt_tokens, end.completion_tokens)))
            yield sse("[DONE]")
        finally:
            if not finished:  # the client left: stop the reply (it is saved as cancelled)
                run.stream.cancel()

    # -- sessions ---------------------------------------------------------------------

    async def _start(self, request: ChatRequest, owner: str) -> _Run:
        conversation = request.conversation
        message, history, system = (conversation.message, conversation.history,
                                    conversation.system)
        subject = subject_of(owner)
        self._check_message(message)
        await self._fetch_remote([message])
        key = conversation_key(owner, history, system) if history else ""
        session_id = await self._take(key, owner if subject is not None else None)
        how = "continued" if session_id else "rebuilt" if history else "new"
        if session_id is None:
            session_id = "oai-" + uuid.uuid4().hex
            if history or system is not None:
                await self._fetch_remote(history)
                try:
                    await self.engine.seed(session_id, [
                        {"role": t.role, "text": t.text, "attachments": t.attachments}
                        for t in history], system=system, subject=subject)
                except MMChatError as exc:
                    raise from_mmchat(exc) from None
        try:
            stream = await self.engine.stream(session_id, message.text, message.attachments,
                                              subject=subject, **request.generation)
        except MMChatError as exc:
            if key:  # nothing ran: the session is still where it was
                await self.store.set_alias(key, session_id)
            raise from_mmchat(exc) from None
        self.metrics.openai_sessions.labels(how).inc()
        return _Run(stream, session_id, owner, system, [*history, message], key)

    async def _take(self, key: str, owner: str | None) -> str | None:
        """The session named ``key`` (taking the name), if it is still there with the
        owner it was made with (``None``: no subject); else ``None``, to rebuild."""
        session_id = await self.store.take_alias(key) if key else None
        if session_id is None:
            return None
        try:
            head = await self.store.head(session_id)
        except SessionLost:  # lost in part (and deleted by the store): rebuild it
            return None
        if head is None or head.owner != owner:
            logger.info("the OpenAI session %s is gone; the conversation is rebuilt",
                        session_id)
            return None
        return session_id

    async def _finished(self, run: _Run, text: str, finish_reason: str) -> None:
        """Name the session by the conversation it has now seen (the reply as the client
        got it), unless the reply was cancelled (saved in part: nobody has that text)."""
        self.metrics.turns.labels(finish_reason).inc()
        if finish_reason == "cancelled":
            return
        seen = [*run.seen, Turn("assistant", text)]
        await self.store.set_alias(conversation_key(run.owner, seen, run.system),
                                   run.session_id)

    async def _failed(self, run: _Run) -> None:
        """A turn that failed saved nothing: the session is where it was (a rebuilt one
        included: a retry continues it)."""
        self.metrics.turns.labels("error").inc()
        if run.key:
            await self.store.set_alias(run.key, run.session_id)

    def _check_message(self, message: Turn) -> None:
        if not message.text.strip() and not message.parts:
            raise bad_request("the last user message is empty: send text, an image or "
                              "audio", "messages", code="empty_message")

    async def _fetch_remote(self, turns: list[Turn]) -> None:
        for turn in turns:
            for part in turn.parts:
                if part.url is None or part.attachment is not None:
                    continue
                if not self.allow_remote_urls:
                    raise bad_request(
                        f"{part.param}: remote image URLs are refused by this server "
                        "(server.openai_remote_urls); send a data: URL", part.param,
                        code="remote_url_refused")
                part.attachment = await asyncio.to_thread(
                    _fetch, part.url, part.param, self.max_attachment_bytes)


def _error(exc: Exception) -> OpenAIError:
    if isinstance(exc, MMChatError):
        return from_mmchat(exc)
    logger.error("an OpenAI request's reply failed", exc_info=exc)
    return OpenAIError(HTTPStatus.INTERNAL_SERVER_ERROR, "the reply failed (the server "
                       "logged why)", type="server_error", code="internal_error")


def _fetch(url: str, param: str, max_bytes: int) -> Attachment:
    """Fetch a remote image (in a worker thread), at most ``max_bytes``."""
    request = urllib.request.Request(url, headers={"User-Agent": "mmchat"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(max_bytes + 1)
            mime = response.headers.get_content_type()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise bad_request(f"{param}: could not fetch {url}: {exc}", param,
                          code="fetch_failed") from None
    if len(data) > max_bytes:
        raise OpenAIError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          f"{param}: the image at {url} is over {max_bytes} bytes "
                          "(server.max_attachment_bytes)", param=param, code="media_too_large")
    return Attachment(data, mime)
