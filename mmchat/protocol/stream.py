"""Reply events in the session store's stream, kept for resume."""

from __future__ import annotations

import json

from ..sessions import StreamEntry
from .events import Delta, Done, Started
from .reading import parse_server_event
from .writing import done_fields, to_json


def to_stream_entry(event: Started | Delta | Done) -> StreamEntry:
    """The :class:`mmchat.sessions.StreamEntry` that keeps a reply event for resume."""
    cls = type(event)
    if cls is Delta and event.first_seq is None:
        return StreamEntry(event.seq, event.response_id, "delta", event.text, {})
    if cls is Started:
        return StreamEntry(event.seq, event.response_id, "started", "", {"id": event.id})
    if cls is Done:
        return StreamEntry(event.seq, event.response_id, "done", event.text,
                           done_fields(event))
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
