"""Corpus v2 questions about one scene: yes/no, captions, shapes that are not there,
pronoun and ellipsis follow-ups, and the refusal when no picture was sent.

Each function returns an :class:`Ask`: the user's words, the one canonical reply, its
key words (``answer``, contiguous in the reply, so exact-answer scoring can find them)
and the ground truth for ``meta``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .scenes import COLOURS, KINDS, Question, Scene, Shape, answer_sentence, askable, phrase

#: Caption positions: a shape's centre is in a third of the canvas on each axis, at
#: least this fraction of the side away from the lines between thirds.
THIRD_GAP = 0.04
NO_PICTURE = "there is no picture in this chat yet. attach a picture to your message and ask again."
NO_PICTURE_ANSWER = "no picture"


@dataclass(frozen=True)
class Ask:
    text: str
    reply: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def _pick(rng: np.random.Generator, options: list | tuple) -> Any:
    return options[int(rng.integers(len(options)))]


def a(phrase: str) -> str:
    """``phrase`` with its indefinite article: "a red circle", "an orange shape"."""
    return f"{'an' if phrase[:1] in 'aeiou' else 'a'} {phrase}"


def _words(reply: str) -> str:
    """The reply as exact-answer key words: lower case, no punctuation."""
    return " ".join("".join(c if c.isalnum() or c == "'" else " " for c in reply).split())


# -- captions --------------------------------------------------------------------------


def _third(centre: float, size: int, names: tuple[str, str, str]) -> str | None:
    gap = THIRD_GAP * size
    for k, name in enumerate(names):
        if (k * size / 3 + (gap if k else 0) <= centre
                <= (k + 1) * size / 3 - (gap if k < 2 else 0)):
            return name
    return None


def place(scene: Scene, shape: Shape) -> str | None:
    """Where a caption says the shape is ("at the top left", "in the middle"), or None
    when its centre is too near the line between two thirds."""
    h = _third(shape.cx, scene.width, ("left", "centre", "right"))
    v = _third(shape.cy, scene.height, ("top", "middle", "bottom"))
    if h is None or v is None:
        return None
    if h == "centre":
        return "in the middle" if v == "middle" else f"at the {v}"
    return f"on the {h}" if v == "middle" else f"at the {v} {h}"


def captionable(scene: Scene) -> bool:
    return all(place(scene, s) is not None for s in scene.shapes)


def objects(scene: Scene) -> list[str]:
    """What the picture shows, a phrase per shape, left to right as a caption names them
    ("red circle at the top left"; without the place where :func:`place` has none): the
    image attachment's ``objects``, which trains the model's object slots."""
    phrases = []
    for s in sorted(scene.shapes, key=lambda s: (s.cx, s.cy)):
        where = place(scene, s)
        phrases.append(f"{s.colour} {s.kind}" + (f" {where}" if where else ""))
    return phrases


CAPTION_ASK = ("describe the picture.", "what do you see?", "what is in the picture?",
               "describe this image.", "what can you see in this picture?",
               "tell me what is in the picture.", "can you describe it?")


def caption(scene: Scene) -> str:
    """One sentence naming every shape, left to right, with its colour and place."""
    parts = [f"{a(f'{s.colour} {s.kind}')} {place(scene, s)}"
             for s in sorted(scene.shapes, key=lambda s: (s.cx, s.cy))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def ask_caption(scene: Scene, rng: np.random.Generator) -> Ask:
    text = caption(scene)
    return Ask(str(_pick(rng, CAPTION_ASK)), text, text, {"type": "caption"})


# -- yes/no ----------------------------------------------------------------------------

_EXISTS = ("is there {t}?", "is there {t} in the picture?", "do you see {t}?",
           "can you see {t}?", "does the picture have {t}?")  # {t}: "a circle", "an orange shape"
_IS_COLOUR = ("is the {k} {c}?", "is the {k} coloured {c}?", "is the {k} {c} or not?")
_IS_KIND = ("is the {c} one a {k}?", "is the {c} shape a {k}?")
_IS_SIDE = ("is the {k} on the {d}?", "is the {k} on the {d} side?")


def ask_yes_no(scene: Scene, rng: np.random.Generator) -> Ask:
    """A yes/no question: existence of a kind, a colour or both, or one attribute of a
    unique shape. ``yes`` about half the time."""
    want_yes = bool(rng.random() < 0.5)
    kinds = [s.kind for s in scene.shapes]
    colours = [s.colour for s in scene.shapes]
    form = _pick(rng, ("kind", "colour", "both", "attribute", "attribute"))
    options = [q for q in askable(scene) if q.type in ("colour", "shape")
               or (q.type == "position" and q.axis == "x" and not q.by_colour)]
    if form == "attribute" and not options:
        form = "kind"  # no shape is the only one of its kind or colour
    if form == "attribute":  # the kind of attribute first, so a rare one is asked as often
        asked = _pick(rng, sorted({o.type for o in options}))
        q = _pick(rng, [o for o in options if o.type == asked])
        if q.type == "colour":
            c = q.answer if want_yes else _pick(rng, [c for c in COLOURS if c != q.answer])
            text = str(_pick(rng, _IS_COLOUR)).format(k=q.target, c=c)
        elif q.type == "shape":
            k = q.answer if want_yes else _pick(rng, [k for k in KINDS if k != q.answer])
            text = str(_pick(rng, _IS_KIND)).format(c=q.target, k=k)
        else:
            d = q.answer if want_yes else {"left": "right", "right": "left"}[q.answer]
            text = str(_pick(rng, _IS_SIDE)).format(k=q.target, d=d)
        reply = ("yes, " if want_yes else "no, ") + answer_sentence(q)
        return Ask(text, reply, _words(reply), {"type": "yes_no", "form": "attribute",
                                               "question": q.type, "target": q.target,
                                               "truth": q.answer, "yes": want_yes})
    if form == "kind":
        present = sorted(set(kinds))
        pool = present if want_yes else [k for k in KINDS if k not in present]
    elif form == "colour":
        present = sorted(set(colours))
        pool = present if want_yes else [c for c in COLOURS if c not in present]
        pool = [f"{c} shape" for c in pool]
    else:
        present = sorted({f"{s.colour} {s.kind}" for s in scene.shapes})
        pool = present if want_yes else [f"{c} {k}" for c in COLOURS for k in KINDS
                                         if f"{c} {k}" not in present]
    if not pool:  # every kind is there: ask for one that is
        want_yes, pool = True, present if form != "colour" else [f"{c} shape" for c in present]
    target = str(_pick(rng, pool))
    text = str(_pick(rng, _EXISTS)).format(t=a(target))
    reply = _exists_sentence(target, want_yes)
    return Ask(text, reply, _words(reply), {"type": "yes_no", "form": form, "target": target,
                                            "yes": want_yes})


def _exists_sentence(target: str, present: bool) -> str:
    return f"yes, there is {a(target)}" if present else f"no, there is no {target}"


# -- shapes that are not there ------------------------------------------------------------


def exists_reply(scene: Scene, target: str) -> tuple[str, str]:
    """The reply and answer to "is there ``target``?" (a kind, "orange shape" or "red
    circle", as :func:`ask_yes_no` asks it) about ``scene``."""
    words = target.split()
    if len(words) == 1:
        present = any(s.kind == target for s in scene.shapes)
    elif words[1] == "shape":
        present = any(s.colour == words[0] for s in scene.shapes)
    else:
        present = any((s.colour, s.kind) == (words[0], words[1]) for s in scene.shapes)
    reply = _exists_sentence(target, present)
    return reply, _words(reply)


def ask_not_there(scene: Scene, rng: np.random.Generator) -> Ask | None:
    """A colour, shape or position question about a kind or colour the scene lacks."""
    kinds = {s.kind for s in scene.shapes}
    colours = {s.colour for s in scene.shapes}
    missing_kinds = [k for k in KINDS if k not in kinds]
    missing_colours = [c for c in COLOURS if c not in colours]
    choices = [("colour", k) for k in missing_kinds] + [("shape", c) for c in missing_colours]
    choices += [("where", k) for k in missing_kinds]
    if not choices:
        return None
    qtype, target = _pick(rng, choices)
    if qtype == "where":
        q = Question("position", target, False, "where")
    else:
        q = Question(qtype, target)
    missing = f"{target} shape" if qtype == "shape" else target
    reply = f"there is no {missing} in the picture"
    return Ask(phrase(q, rng), reply, f"no {missing}",
               {"type": "not_there", "question": qtype, "target": target})


# -- pronouns and ellipsis --------------------------------------------------------------

PRONOUN_FORMS = {
    "colour": ("what colour is it?", "and its colour?", "and what colour is it?",
               "which colour is it?"),
    "shape": ("what shape is it?", "and what shape is it?", "which shape is it?",
              "and its shape?"),
    "where": ("where is it?", "and where is it?", "where is it in the picture?"),
    "x": ("is it on the left or the right?", "and is it on the left or on the right?"),
    "y": ("is it at the top or the bottom?", "and is it at the top or at the bottom?"),
}
_ELLIPSIS = ("what about the {t}?", "and the {t}?", "how about the {t}?", "and what about the {t}?")


def _referent(q: Question) -> tuple[bool, str] | None:
    """``(by_colour, target)`` of the shape a question was about, or None (count)."""
    if q.type == "colour":
        return False, q.target
    if q.type == "shape":
        return True, q.target
    if q.type == "position":
        return q.by_colour, q.target
    return None


def pronoun_followup(questions: list[Question], prev: Question, rng: np.random.Generator,
                     asked: frozenset[tuple] = frozenset()) -> tuple[str, Question] | None:
    """A follow-up that names no shape: a pronoun for the previous turn's referent
    ("where is it?") or an ellipsis that asks the previous question of another shape
    ("what about the square?"). Returns the words and the question they resolve to."""
    ref = _referent(prev)
    if ref is None:
        return None
    options: list[tuple[str, Question]] = []
    for q in questions:
        if q.key == prev.key or q.key in asked or _referent(q) is None:
            continue
        if _referent(q) == ref:  # same shape, named the same way: a pronoun
            slot = q.axis if q.type == "position" else q.type
            options.append((str(_pick(rng, PRONOUN_FORMS[slot])), q))
        elif (q.type, q.axis, q.by_colour) == (prev.type, prev.axis, prev.by_colour):
            # same question, another shape: an ellipsis
            t = f"{q.target} one" if q.type == "shape" or q.by_colour else q.target
            options.append((str(_pick(rng, _ELLIPSIS)).format(t=t), q))
    return _pick(rng, options) if options else None


def referent_of(q: Question) -> str:
    """The words that name a question's shape in its answer ("circle", "red one")."""
    ref = _referent(q)
    if ref is None:
        return ""
    return f"{ref[1]} one" if ref[0] else ref[1]


# -- no picture -------------------------------------------------------------------------


def ask_without_picture(rng: np.random.Generator, scene: Scene) -> Ask:
    """A picture question asked when no picture was sent: the reply says so and how to
    send one. ``scene`` only supplies a plausible question."""
    q = _pick(rng, askable(scene))
    text = str(_pick(rng, (phrase(q, rng), _pick(rng, CAPTION_ASK), _pick(rng, _EXISTS).format(
        t=a(_pick(rng, KINDS))), "what digit is this?", "what is in this image?")))
    return Ask(text, NO_PICTURE, NO_PICTURE_ANSWER, {"type": "no_picture"})
