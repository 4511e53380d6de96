"""Writing events: the JSON object and the text frame of an event."""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from typing import Any

from .events import CLIENT_EVENTS, SERVER_EVENTS, ClientEvent, Delta, Done, ServerEvent, Started

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


def done_fields(done: Done) -> dict[str, Any]:
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
                           "seq": event.seq, "text": event.text, **done_fields(event)},
                          ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return json.dumps(to_json(event), ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False)
