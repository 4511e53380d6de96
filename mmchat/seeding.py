"""Seeding a session from a transcript: its turns join the session's state, memory and
history as if they had been generated, without generating (:meth:`mmchat.Engine.seed`).

A new session may start with a *system text* (``system=``, or a transcript whose first
entry has role ``system``): it goes through the RNN before the first turn, as a
finished utterance (its text, then the end token), and is the session's first history
entry. It conditions every reply after it the way the turns before a reply do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .modality import Attachment


@dataclass
class Transcript:
    """What a session is seeded with: an optional system text, then turns."""

    system: str | None
    turns: list[SeedTurn]


@dataclass
class SeedTurn:
    """A user message and the reply it got, from a transcript."""

    text: str
    attachments: list[Attachment]
    reply: str


def read_transcript(turns: Sequence[Mapping[str, Any]], max_chars: int,
                    system: str | None = None) -> Transcript:
    """``turns`` alternate ``{"role": "user", "text": ..., "attachments": [...]}`` and
    ``{"role": "assistant", "text": ...}``, starting with a user turn and ending with a
    reply, after at most one ``{"role": "system", "text": ...}`` entry (or ``system``)
    (history() entries and exported records qualify; their other keys are ignored).
    Raises :class:`~mmchat.errors.InputError` naming the first bad turn."""
    if turns and isinstance(turns[0], Mapping) and turns[0].get("role") == "system":
        if system is not None:
            raise InputError("give the system text once: as system= or as the first turn")
        system = turns[0].get("text")
        if not isinstance(system, str):
            raise InputError("turn 0: the system text must be a string")
        turns = turns[1:]
    if system is not None:
        if not isinstance(system, str) or not system.strip():
            raise InputError("the system text must be a non-empty string")
        if len(system) > max_chars:
            raise InputError(f"the system text has {len(system)} characters; the limit "
                             f"is {max_chars} (limits.max_text_chars)")
    return Transcript(system, _read_turns(turns, max_chars, system is not None))


def _read_turns(turns: Sequence[Mapping[str, Any]], max_chars: int,
                has_system: bool) -> list[SeedTurn]:
    if not turns and not has_system:
        raise InputError("the transcript has no turns")
    if len(turns) % 2:
        raise InputError(f"the transcript has {len(turns)} turns; it must alternate user "
                         "and assistant turns and end with a reply")
    out = []
    for i in range(0, len(turns), 2):
        user, reply = turns[i], turns[i + 1]
        for k, (turn, role) in enumerate(((user, "user"), (reply, "assistant"))):
            where = f"turn {i + k}"
            if not isinstance(turn, Mapping) or turn.get("role") != role:
                raise InputError(f"{where} must be a mapping with role {role!r}")
            text = turn.get("text", "")
            if not isinstance(text, str):
                raise InputError(f"{where}: text must be a string")
            if len(text) > max_chars:
                raise InputError(f"{where} has {len(text)} characters; the limit is "
                                 f"{max_chars} (limits.max_text_chars)")
        attachments = user.get("attachments") or []
        if not all(isinstance(a, (Attachment, str, Path)) for a in attachments):
            raise InputError(f"turn {i}: attachments to seed must be Attachment objects or "
                             "paths (a transcript holds only their ids)")
        atts = [a if isinstance(a, Attachment) else Attachment.from_path(a) for a in attachments]
        out.append(SeedTurn(user.get("text", ""), atts, reply.get("text", "")))
    return out


def seeded_state(model: Any, tokenizer: Any, decoder: Any, state: bytes | None,
                 transcript: Transcript) -> bytes:
    """On the model thread: the session's stored state after the transcript, from
    ``state`` (``None`` for a new session). The system text and the end token go first;
    then each turn's ``<user> text <bot>``, its reply and the end token go through the
    RNN, as a generated reply that ended with the end token would have; that end token
    is left pending, as a generated turn leaves it."""
    import torch

    from .state import SessionState, dumps_state, loads_state

    before = (loads_state(state) if state else
              SessionState(rnn=model.initial_state(1), pending=[tokenizer.bos_id]))
    ids = list(before.pending)
    if transcript.system is not None:
        ids += [*tokenizer.encode(transcript.system), tokenizer.eos_id]
    turns = transcript.turns
    for turn in turns:
        ids += [*tokenizer.user_turn(turn.text), *tokenizer.encode(turn.reply),
                tokenizer.eos_id]
    fed = ids[:-1]
    with torch.inference_mode():
        rnn = decoder.prefill(torch.tensor([fed]), torch.tensor([len(fed)]), before.rnn)
    return dumps_state(SessionState(rnn=rnn.clone(), pending=[tokenizer.eos_id],
                                    turns=before.turns + len(turns)))
