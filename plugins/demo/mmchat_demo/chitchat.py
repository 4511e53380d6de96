"""Chit-chat: every English conversation in ``chatterbot-corpus``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml


@dataclass(frozen=True)
class Conversation:
    #: The corpus file (``greetings.yml``) and the conversation's position in it.
    file: str
    index: int
    #: Alternating user and assistant utterances, starting with the user's, ending with
    #: the assistant's (a trailing unanswered utterance is dropped).
    utterances: tuple[str, ...]


def normalise(text: str) -> str:
    """The exact-answer form of a reply: lower-case, single spaces."""
    return " ".join(text.lower().split())


@lru_cache(maxsize=1)
def conversations() -> tuple[Conversation, ...]:
    """Every English conversation, in file-name order."""
    folder = resources.files("chatterbot_corpus") / "data" / "english"
    out = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith((".yml", ".yaml")):
            continue
        doc = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
        for index, conv in enumerate(doc.get("conversations") or []):
            if not isinstance(conv, list):  # one malformed entry in trivia.yml is a string
                continue
            lines = tuple(" ".join(str(u).split()) for u in conv if u is not None)
            lines = lines[: len(lines) // 2 * 2]
            if lines and all(lines):
                out.append(Conversation(entry.name, index, lines))
    return tuple(out)


def unambiguous(convs: tuple[Conversation, ...]) -> list[int]:
    """Indices of conversations in which every reply is the only one the corpus gives
    after that same history, so an exact-answer score is fair."""
    replies: dict[tuple[str, ...], set[str]] = {}
    for conv in convs:
        for i in range(1, len(conv.utterances), 2):
            history = tuple(normalise(u) for u in conv.utterances[:i])
            replies.setdefault(history, set()).add(normalise(conv.utterances[i]))
    return [
        n for n, conv in enumerate(convs)
        if all(len(replies[tuple(normalise(u) for u in conv.utterances[:i])]) == 1
               for i in range(1, len(conv.utterances), 2))
    ]
