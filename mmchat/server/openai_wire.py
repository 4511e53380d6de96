"""OpenAI's chat-completions shapes: a request read into mmchat's terms, and the
responses, stream chunks and errors written back. Sans-I/O: no HTTP library, no engine.

A request's messages become a :class:`Conversation`: the exchanges before the last user
message (each a user turn and the reply it got: what a session has seen) and that last
message, whose reply is wanted. The ``system`` and ``developer`` messages before the
first user or assistant message are the conversation's system text (joined by new
lines): a session starts with it (:meth:`mmchat.Engine.seed`'s ``system``); later ones
are left out. Consecutive messages of one role join into one turn.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from ..errors import MMChatError
from ..modality import Attachment

#: ``input_audio`` formats and the MIME type each is decoded as.
AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg"}
#: Roles whose messages are the system text when they lead the conversation, and are
#: read but left out anywhere else.
SYSTEM_ROLES = ("system", "developer")
#: Request fields accepted and ignored (docs/openai.md says why).
IGNORED_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "functions",
                  "function_call", "logprobs", "top_logprobs", "presence_penalty",
                  "frequency_penalty", "logit_bias", "user", "response_format", "metadata",
                  "store", "service_tier", "reasoning_effort", "modalities", "audio",
                  "prediction", "web_search_options", "safety_identifier",
                  "prompt_cache_key", "verbosity")


class OpenAIError(Exception):
    """An error answered in OpenAI's shape, ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None,
                code: str = "bad_input") -> OpenAIError:
    return OpenAIError(HTTPStatus.BAD_REQUEST, message, param=param, code=code)


#: mmchat error codes that are not a 400, and the status and OpenAI type they get.
_STATUSES: dict[str, tuple[int, str]] = {
    "media_too_large": (HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "invalid_request_error"),
    "unsupported_media": (HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "invalid_request_error"),
    "session_busy": (HTTPStatus.CONFLICT, "server_error"),
    "store_unavailable": (HTTPStatus.SERVICE_UNAVAILABLE, "server_error"),
    "plugin_unavailable": (HTTPStatus.SERVICE_UNAVAILABLE, "server_error"),
    "engine_closed": (HTTPStatus.SERVICE_UNAVAILABLE, "server_error"),
    "plugin_error": (HTTPStatus.INTERNAL_SERVER_ERROR, "server_error"),
    "plugin_timeout": (HTTPStatus.GATEWAY_TIMEOUT, "server_error"),
    "timeout": (HTTPStatus.GATEWAY_TIMEOUT, "server_error"),
    "bad_state": (HTTPStatus.INTERNAL_SERVER_ERROR, "server_error"),
    "reply_lost": (HTTPStatus.INTERNAL_SERVER_ERROR, "server_error"),
}


def from_mmchat(exc: MMChatError) -> OpenAIError:
    """The OpenAI error for one of mmchat's: input errors are 400s (413 and 415 for media
    too large or of an unknown type), the server's own troubles 5xx."""
    from ..errors import InputError

    if exc.code in _STATUSES:
        status, kind = _STATUSES[exc.code]
    elif isinstance(exc, InputError):
        status, kind = HTTPStatus.BAD_REQUEST, "invalid_request_error"
    else:
        status, kind = HTTPStatus.INTERNAL_SERVER_ERROR, "server_error"
    return OpenAIError(status, str(exc), type=kind, code=exc.code)


# -- requests ---------------------------------------------------------------------------

@dataclass
class Part:
    """An attachment as a request gives it: bytes, or a remote URL still to fetch."""

    param: str  # where it is in the request, for errors
    attachment: Attachment | None = None
    url: str | None = None
    #: What the conversation's key counts: the bytes' content hash (computed once, where
    #: the request is read), or the remote URL
    key: str = ""

    def __post_init__(self) -> None:
        self.key = self.url or (self.attachment.id if self.attachment is not None else "")


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str = ""
    parts: list[Part] = field(default_factory=list)

    @property
    def attachments(self) -> list[Attachment]:
        return [p.attachment for p in self.parts if p.attachment is not None]


@dataclass
class Conversation:
    """The exchanges the session must have seen, then the message to answer."""

    history: list[Turn]  # user, assistant, user, assistant, ...
    message: Turn  # a user turn
    system: str | None = None  # the leading system and developer messages' text


@dataclass
class ChatRequest:
    model: str
    conversation: Conversation
    stream: bool
    include_usage: bool
    generation: dict[str, Any]  # GenerationSettings


def parse_chat_request(body: bytes, *, max_attachment_bytes: int) -> ChatRequest:
    """Read a ``POST /v1/chat/completions`` body; :class:`OpenAIError` (400) names the
    first thing wrong with it. Data URLs and ``input_audio`` are decoded here; remote
    image URLs are left in their :class:`Part` for the caller to refuse or fetch."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the body is not JSON: {exc}", code="malformed_json") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model must be a non-empty string", "model")
    n = data.get("n", 1)
    if n is not None and n != 1:
        raise bad_request(f"n must be 1 (one reply per request), not {n!r}", "n")
    stream = _bool(data, "stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    return ChatRequest(model, read_messages(data.get("messages"), max_attachment_bytes),
                       stream, bool(stream and options.get("include_usage")),
                       generation_settings(data))


def _bool(data: Mapping[str, Any], name: str) -> bool:
    value = data.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false", name)
    return value


def _number(data: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            low <= value <= high):
        raise bad_request(f"{name} must be a number from {low:g} to {high:g}", name)
    return float(value)


def generation_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """``temperature`` (0: greedy; above 0: sampling at it), ``top_p``, ``max_tokens``
    or ``max_completion_tokens``, ``stop`` and ``seed``, as engine keywords."""
    out: dict[str, Any] = {}
    temperature = _number(data, "temperature", 0, 2)
    if temperature is not None:
        out.update({"strategy": "greedy"} if temperature == 0 else
                   {"strategy": "sample", "temperature": temperature})
    top_p = _number(data, "top_p", 0, 1)
    if top_p is not None and top_p > 0:
        out["top_p"] = top_p
    for name in ("max_completion_tokens", "max_tokens"):
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad_request(f"{name} must be a whole number above 0", name)
        out["max_new_tokens"] = value
        break
    stop = data.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if (not isinstance(stop, list) or len(stop) > 4
                or not all(isinstance(s, str) and s for s in stop)):
            raise bad_request("stop must be a string or a list of up to 4 strings", "stop")
        out["stop"] = stop
    seed = data.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise bad_request("seed must be a whole number", "seed")
        out["seed"] = seed
    return out


def read_messages(messages: Any, max_attachment_bytes: int) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    turns: list[Turn] = []
    system: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object", where)
        role = message.get("role")
        if role in SYSTEM_ROLES:
            if not turns:  # leading: the system text; later ones are left out
                text = _read_content(message.get("content"), role, where,
                                     max_attachment_bytes).text
                system += [text] if text.strip() else []
            continue
        if role not in ("user", "assistant"):
            raise bad_request(f"{where}.role {role!r} is not supported: use user, "
                              "assistant, system or developer (no tools)", f"{where}.role")
        turn = _read_content(message.get("content"), role, where, max_attachment_bytes)
        if turns and turns[-1].role == role:  # one turn of each role at a time
            last = turns[-1]
            last.text = "\n".join(t for t in (last.text, turn.text) if t)
            last.parts += turn.parts
        else:
            turns.append(turn)
    if not turns or turns[-1].role != "user":
        raise bad_request("the last message (system messages aside) must be the user's: "
                          "it is the one answered", "messages")
    if turns[0].role == "assistant":  # the conversation opened with the assistant
        turns.insert(0, Turn("user"))
    return Conversation(turns[:-1], turns[-1], "\n".join(system) or None)


def _read_content(content: Any, role: str, where: str, max_bytes: int) -> Turn:
    if content is None and role == "assistant":
        return Turn(role)
    if isinstance(content, str):
        return Turn(role, content)
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts",
                          f"{where}.content")
    turn = Turn(role)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal"):
            text = part.get(kind)
            if not isinstance(text, str):
                raise bad_request(f"{at}.{kind} must be a string", f"{at}.{kind}")
            texts.append(text)
        elif kind == "image_url" and role == "user":
            turn.parts.append(_image_part(part.get("image_url"), at, max_bytes))
        elif kind == "input_audio" and role == "user":
            turn.parts.append(_audio_part(part.get("input_audio"), at, max_bytes))
        else:
            raise bad_request(f"{at}: part type {kind!r} is not supported in a {role} "
                              "message (text, image_url and input_audio are)", f"{at}.type",
                              code="unsupported_part")
    turn.text = "\n".join(texts)
    return turn


def _image_part(image: Any, at: str, max_bytes: int) -> Part:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise bad_request(f"{at}.image_url.url must be a URL", f"{at}.image_url.url")
    if not url.startswith("data:"):
        if not url.startswith(("http://", "https://")):
            raise bad_request(f"{at}.image_url.url must be a data: URL or an http(s) URL",
                              f"{at}.image_url.url")
        return Part(f"{at}.image_url.url", url=url)
    head, comma, payload = url[5:].partition(",")
    mime, _, params = head.partition(";")
    if not comma or params.split(";")[-1] != "base64" or not mime:
        raise bad_request(f"{at}.image_url.url must be a base64 data URL "
                          "(data:image/png;base64,...)", f"{at}.image_url.url")
    return Part(f"{at}.image_url.url",
                Attachment(_base64(payload, f"{at}.image_url.url", max_bytes), mime.lower()))


def _audio_part(audio: Any, at: str, max_bytes: int) -> Part:
    if not isinstance(audio, dict):
        raise bad_request(f"{at}.input_audio must be an object", f"{at}.input_audio")
    fmt = audio.get("format")
    if fmt not in AUDIO_FORMATS:
        raise bad_request(f"{at}.input_audio.format must be one of "
                          f"{', '.join(AUDIO_FORMATS)}, not {fmt!r}", f"{at}.input_audio.format")
    return Part(f"{at}.input_audio.data", Attachment(
        _base64(audio.get("data"), f"{at}.input_audio.data", max_bytes), AUDIO_FORMATS[fmt]))


def _base64(payload: Any, param: str, max_bytes: int) -> bytes:
    if not isinstance(payload, str):
        raise bad_request(f"{param} must be base64 text", param)
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise OpenAIError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          f"{param} is over {max_bytes} bytes (server.max_attachment_bytes)",
                          param=param, code="media_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param} is not valid base64", param) from None
    if len(data) > max_bytes:
        raise OpenAIError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          f"{param} is {len(data)} bytes; the limit is {max_bytes} "
                          "(server.max_attachment_bytes)", param=param, code="media_too_large")
    return data


def conversation_key(owner: str, turns: Sequence[Turn], system: str | None = None) -> str:
    """The key of what a session has seen: ``owner``, its ``system`` text (if any) and
    each turn's role, text (spaces around it do not count: clients trim replies) and
    attachments (their content hashes; a remote picture's URL, so it is fetched again
    only to rebuild a session)."""
    lead = [] if system is None else [["system", system, []]]
    canonical = [owner, *lead, *([t.role, t.text.strip(), [p.key for p in t.parts]]
                                 for t in turns)]
    encoded = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()


# -- responses --------------------------------------------------------------------------

#: mmchat finish reasons in OpenAI's words (a loop or a cancel ended the reply: "stop").
FINISH_REASONS = {"length": "length"}


@dataclass
class Completion:
    """What every response and chunk of one completion shares."""

    model: str
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _base(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def response(self, text: str, finish_reason: str, usage: dict[str, int]
                 ) -> dict[str, Any]:
        return {**self._base("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                                     "refusal": None},
                             "logprobs": None,
                             "finish_reason": FINISH_REASONS.get(finish_reason, "stop")}],
                "usage": usage}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None
              ) -> dict[str, Any]:
        reason = None if finish_reason is None else FINISH_REASONS.get(finish_reason, "stop")
        return {**self._base("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": reason}]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._base("chat.completion.chunk"), "choices": [], "usage": usage}


class StopTrimmer:
    """Streamed text up to the first stop string, as OpenAI sends it: the engine stops
    generating once a stop string shows (and its reply text ends before it), but its
    deltas carry it. :meth:`feed` returns what may be sent now, holding back a tail that
    could begin a stop string; :meth:`end` the rest."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = self.text[:cut]
            return self._send(cut)
        held = max((n for s in self.stops for n in range(len(s) - 1, 0, -1)
                    if self.text.endswith(s[:n])), default=0)
        return self._send(len(self.text) - held)

    def end(self) -> str:
        return self._send(len(self.text))

    def _send(self, upto: int) -> str:
        out = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: Mapping[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False,
                                                         separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def models_list(names: Sequence[str], created: int) -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "mmchat"}
                     for name in names]}
