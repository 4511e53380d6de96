"""Seeding a session from a transcript: its turns join the session's state, memory and
history as if they had been generated, without generating (:meth:`mmchat.Engine.seed`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .modality import Attachment


@dataclass
class SeedTurn:
    """A user message and the reply it got, from a transcript."""

    text: str
    attachments: list[Attachment]
    reply: str


def read_transcript(turns: Sequence[Mapping[str, Any]], max_chars: int) -> list[SeedTurn]:
    """``turns`` alternate ``{"role": "user", "text": ..., "attachments": [...]}`` and
    ``{"role": "assistant", "text": ...}``, starting with a user turn and ending with a
    reply (history() entries qualify; their other keys are ignored). Raises
    :class:`~mmchat.errors.InputError` naming the first bad turn."""
    if not turns:
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
                 turns: Sequence[SeedTurn]) -> bytes:
    """On the model thread: the session's stored state after ``turns``, from ``state``
    (``None`` for a new session). Each turn's ``<user> text <bot>``, its reply and the
    end token go through the RNN, as a generated reply that ended with the end token
    would have; that end token is left pending, as a generated turn leaves it."""
    import torch

    from .state import SessionState, dumps_state, loads_state

    before = (loads_state(state) if state else
              SessionState(rnn=model.initial_state(1), pending=[tokenizer.bos_id]))
    ids = list(before.pending)
    for turn in turns:
        ids += [*tokenizer.user_turn(turn.text), *tokenizer.encode(turn.reply),
                tokenizer.eos_id]
    fed = ids[:-1]
    with torch.inference_mode():
        rnn = decoder.prefill(torch.tensor([fed]), torch.tensor([len(fed)]), before.rnn)
    return dumps_state(SessionState(rnn=rnn.clone(), pending=[tokenizer.eos_id],
                                    turns=before.turns + len(turns)))
