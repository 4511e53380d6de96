"""A turn's work on the model thread: the batched prefill of the turns that arrived
together, and the stored form of the turns that finished decoding.

:class:`~mmchat.turnrunner.TurnRunner` hands these to the decode scheduler
(:meth:`~mmchat.batching.DecodeScheduler.call_batched`), which runs them between two
decode steps with every item queued since the last one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .modality import Attachment, Modality

#: In place of a first token: the reply (beam search) chooses its own from the start.
UNSTARTED = object()


@dataclass
class Prefill:
    """A turn waiting for its prefill on the model thread."""

    attachments: list[tuple[Modality, Attachment]]
    vectors: list[Any]  # encoded, one per attachment, or the exception its encoding raised
    memory: list[bytes]  # the session's stored memory entries before this turn
    state: bytes | None  # the stored SessionState, or None for a new session
    text: str
    params: Any  # GenerationParams
    cancelled: Callable[[], bool] = lambda: False  # the reply was cancelled meanwhile


@dataclass
class Finish:
    """A decoded turn waiting on the model thread to become what the store keeps."""

    run: Any  # TurnRun
    cancelled: bool
    new_entries: list[Any]  # MemoryEntry of this turn's attachments


@dataclass
class Finished:
    state: bytes
    memory_added: list[bytes]
    finish_reason: str
    attention: dict[str, float]


def raise_if_error(value: Any) -> Any:
    """``value``, unless it is an exception (a batched job's failed item): raise it."""
    if isinstance(value, Exception):
        raise value
    return value


def finish_turns(items: list[Finish]) -> list[Any]:
    """On the model thread: each decoded turn's state, new memory entries and
    attention mass, serialised for the store (or the exception that item raised)."""
    from .state import dumps_entry, dumps_state

    out: list[Any] = []
    for item in items:
        try:
            state, reason = item.run.finish(cancelled=item.cancelled)
            out.append(Finished(dumps_state(state),
                                [dumps_entry(e) for e in item.new_entries], reason,
                                item.run.attention_by_modality()))
        except Exception as exc:
            out.append(exc)
    return out


def prefill_turns(model: Any, tokenizer: Any, decoder: Any, max_memory: int,
                  items: list[Prefill]) -> list[Any]:
    """On the model thread: read every turn's stored state, then prefill all the
    turns (their new attachments already encoded) in one batch and
    choose each sampled reply's first token, so it reaches the client without waiting
    for a decode step. One result per item, ``(new memory entries, run, first token
    or None at once at the end)``, :data:`UNSTARTED` in place of the token for beam
    search and cancelled replies, or the exception that item alone raises."""
    from .batching import first_token
    from .runtime import TurnRequest, start_turns
    from .state import MemoryEntry, loads_entry, loads_state

    out: list[Any] = [None] * len(items)
    todo: dict[int, tuple[list[Any], TurnRequest]] = {}
    for i, item in enumerate(items):
        try:
            state = loads_state(item.state) if item.state else None
            memory = [loads_entry(b) for b in item.memory]
            new = [MemoryEntry(m.name, raise_if_error(v), a.id)
                   for (m, a), v in zip(item.attachments, item.vectors)]
        except Exception as exc:
            out[i] = exc
            continue
        keep = (memory + new)[-max_memory:]
        todo[i] = new, TurnRequest(state, keep, item.text, item.params,
                                   min(len(new), len(keep)))
    requests = [request for _, request in todo.values()]
    runs: list[Any]
    try:
        runs = start_turns(model, tokenizer, requests, decoder)
    except Exception as exc:
        if len(requests) == 1:
            runs = [exc]
        else:  # one bad turn (a corrupt state, say) must not fail the others
            runs = []
            for request in requests:
                try:
                    runs += start_turns(model, tokenizer, [request], decoder)
                except Exception as one:
                    runs.append(one)
    for (i, (new, _)), run in zip(todo.items(), runs):
        if isinstance(run, Exception):
            out[i] = run
            continue
        try:
            first = (UNSTARTED if run.generation.sampler is None or items[i].cancelled()
                     else first_token(run))
        except Exception as exc:
            out[i] = exc
            continue
        out[i] = new, run, first
    return out
