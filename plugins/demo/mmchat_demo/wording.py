"""Other words for what the corpus's typed questions say one way.

People ask the same thing in many ways: politely or indirectly ("could you tell me what
colour the circle is?", "i'd like to know the colour of the circle."), and they call a
picture an image, a photo or a pic, and "the previous one" "the one before". A share of
the typed user turns of picture dialogues is reworded in these ways, drawn from a
generator of its own, so the dialogues, their pictures and their replies are the same as
without it.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .scenes import COLOURS, KINDS

_COLOURS = "|".join(COLOURS)
_KINDS = "|".join(KINDS)
#: What may come before the question itself: "in the first picture, ", "what about the
#: previous one? " (kept as it is).
_LEAD = r"(?P<lead>(?:.*[,?] )?)"

#: (pattern of a whole question, other ways to ask it), tried in this order. The
#: templates name the pattern's groups; ``lead`` is put back in front. A pattern with
#: several forms names the same slot ``t``, ``t2``, ``t3`` (a regex group name must be
#: unique): the templates say ``{t}`` for each.
_REPHRASINGS: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = tuple(
    (re.compile(f"{_LEAD}(?:{pattern})"), templates) for pattern, templates in (
        (rf"is the (?P<k>{_KINDS}) (?:coloured )?(?P<c>{_COLOURS})(?: or not)?\?",
         ("could you tell me if the {k} is {c}?", "i'd like to know if the {k} is {c}.",
          "is the {k} {c}, yes or no?", "do you know if the {k} is {c}?",
          "is the colour of the {k} {c}?", "can you tell me whether the {k} is {c}?")),
        (rf"is the (?P<c>{_COLOURS}) (?:one|shape) an? (?P<k>{_KINDS})\?",
         ("could you tell me if the {c} one is a {k}?",
          "i'd like to know if the {c} shape is a {k}.", "is the {c} one a {k}, yes or no?",
          "do you know if the {c} shape is a {k}?")),
        (rf"is the (?P<k>{_KINDS}) on the (?P<d>left|right)(?: side)?\?",
         ("could you tell me if the {k} is on the {d}?",
          "i'd like to know if the {k} is on the {d}.", "is the {k} on the {d}, yes or no?",
          "is the {k} on the {d} of the picture?", "do you know if the {k} is on the {d}?")),
        (r"(?:is there|do you see|can you see|does the picture have) (?P<t>an? [a-z ]+?)"
         r"(?: in the picture)?\?",
         ("could you tell me if there is {t}?", "can you tell me whether there is {t}?",
          "i'd like to know if there is {t}.", "is there {t} anywhere?",
          "do you know if there is {t}?", "is there {t} here?")),
        (r"(?:what|which) colou?r is the (?P<t>[a-z ]+)\?"
         r"|what is the colou?r of the (?P<t2>[a-z ]+)\?"
         r"|tell me the colou?r of the (?P<t3>[a-z ]+)\.",
         ("could you tell me what colour the {t} is?", "can you tell me the colour of the {t}?",
          "i'd like to know the colour of the {t}.", "i want to know what colour the {t} is.",
          "do you know what colour the {t} is?", "what's the colour of the {t}?",
          "please tell me what color the {t} is.", "what colour is the {t}, please?")),
        (rf"what (?:kind of )?shape is the (?P<c>{_COLOURS}) one\?"
         rf"|what is the (?P<c2>{_COLOURS}) shape\?|which shape is (?P<c3>{_COLOURS})\?",
         ("could you tell me what shape the {c} one is?",
          "can you tell me the shape of the {c} one?",
          "i'd like to know the shape of the {c} one.", "do you know what shape the {c} one is?",
          "what's the shape of the {c} one?", "please tell me which shape is {c}.")),
        (r"how many shapes are (?:there )?in (?P<r>the [a-z ]+)\?",
         ("could you count the shapes in {r}?", "can you count the shapes in {r} for me?",
          "tell me how many shapes are in {r}.", "i'd like to know how many shapes are in {r}.",
          "what's the number of shapes in {r}?", "how many shapes can you see in {r}?")),
        (r"how many shapes are there\?|how many shapes do you see\?|count the shapes\.",
         ("could you count the shapes for me?", "can you count the shapes?",
          "please count the shapes.", "how many shapes can you see?",
          "tell me how many shapes there are.", "i'd like to know how many shapes there are.",
          "what's the number of shapes?", "do you know how many shapes there are?")),
        (r"where is the (?P<t>[a-z ]+)\?|where can you see the (?P<t2>[a-z ]+)\?",
         ("could you tell me where the {t} is?", "can you tell me where the {t} is?",
          "i'd like to know where the {t} is.", "do you know where the {t} is?",
          "where's the {t}?", "please tell me where the {t} is.", "where is the {t} located?")),
        (r"is the (?P<t>[a-z ]+) on the left or (?:on )?the right(?: side)?\?",
         ("could you tell me if the {t} is on the left or on the right?",
          "tell me whether the {t} is on the left or the right.",
          "is the {t} on the left side or the right side?")),
        (r"is the (?P<t>[a-z ]+) at the top or (?:at )?the bottom\?",
         ("could you tell me if the {t} is at the top or at the bottom?",
          "tell me whether the {t} is at the top or the bottom.",
          "is the {t} in the upper or the lower part?")),
        (r"describe the picture\.|describe this image\.|what do you see\?"
         r"|what is in the picture\?|tell me what is in the picture\.",
         ("could you describe the picture for me?", "please describe the picture.",
          "can you tell me what you see?", "what does the picture show?",
          "give me a description of the picture.", "what's in the picture?",
          "describe what you see, please.")),
    )
)

#: (pattern, what may replace it), tried in this order on lower-case text.
_SWAPS = (
    (re.compile(r"\bthe previous picture\b"), ("the picture before",)),
    (re.compile(r"\bthe previous one\b"), ("the one before",)),
    (re.compile(r"\bpictures\b"), ("images", "photos", "pics")),
    (re.compile(r"\bpicture\b"), ("image", "photo", "pic")),
)
#: The share of matching texts that get each swap.
SHARE = 0.3
#: The share of questions one of :data:`_REPHRASINGS` matches that are asked another way.
REPHRASE_SHARE = 0.25


def rephrase(text: str, rng: np.random.Generator, share: float = REPHRASE_SHARE) -> str:
    """``text`` asked another way, a ``share`` of the time, when it is a question that
    :data:`_REPHRASINGS` knows."""
    for pattern, templates in _REPHRASINGS:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        if rng.random() >= share:
            return text
        slots = {name.rstrip("23"): value for name, value in match.groupdict().items()
                 if value is not None and name != "lead"}  # "t2" fills "{t}"
        template = templates[int(rng.integers(len(templates)))]
        return match["lead"] + template.format(**slots)
    return text


def vary(text: str, rng: np.random.Generator, share: float = SHARE) -> str:
    """``text`` with each swappable phrase replaced, a ``share`` of the time, by another."""
    for pattern, others in _SWAPS:
        if pattern.search(text) and rng.random() < share:
            text = pattern.sub(others[int(rng.integers(len(others)))], text)
    return text


def vary_turns(turns: list[dict[str, Any]], rng: np.random.Generator) -> list[dict[str, Any]]:
    """The turns with their typed user text varied (spoken and assistant turns as given):
    first asked another way (:func:`rephrase`), then with other words for a picture."""
    return [{**t, "text": vary(rephrase(t["text"], rng), rng)}
            if t["role"] == "user" and t["text"] else t for t in turns]
