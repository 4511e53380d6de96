"""Other words for what the corpus's typed questions say one way.

People call a picture an image, a photo or a pic, and "the previous one" "the one
before". A share of the typed user turns of picture dialogues has such a word swapped
in, drawn from a generator of its own, so the dialogues, their pictures and their
replies are the same as without it.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

#: (pattern, what may replace it), tried in this order on lower-case text.
_SWAPS = (
    (re.compile(r"\bthe previous picture\b"), ("the picture before",)),
    (re.compile(r"\bthe previous one\b"), ("the one before",)),
    (re.compile(r"\bpictures\b"), ("images", "photos", "pics")),
    (re.compile(r"\bpicture\b"), ("image", "photo", "pic")),
)
#: The share of matching texts that get each swap.
SHARE = 0.3


def vary(text: str, rng: np.random.Generator, share: float = SHARE) -> str:
    """``text`` with each swappable phrase replaced, a ``share`` of the time, by another."""
    for pattern, others in _SWAPS:
        if pattern.search(text) and rng.random() < share:
            text = pattern.sub(others[int(rng.integers(len(others)))], text)
    return text


def vary_turns(turns: list[dict[str, Any]], rng: np.random.Generator) -> list[dict[str, Any]]:
    """The turns with their typed user text varied (spoken and assistant turns as given)."""
    return [{**t, "text": vary(t["text"], rng)} if t["role"] == "user" and t["text"] else t
            for t in turns]
