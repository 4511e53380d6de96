"""Corpus v2 dialogue kinds, planned on a :class:`~mmchat_demo.build.Planner`.

Several pictures in one session, pronoun and ellipsis follow-ups, yes/no questions,
captions, refusals (no picture; a shape that is not there), goodbyes, out-of-domain
prompts and font-typeset digits. docs/data.md describes each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import digits, questions, scenes, smalltalk, speech
from .scenes import NUMBERS, Question, Scene

if TYPE_CHECKING:
    from .build import _Planner as Planner

ORDINALS = ("first", "second", "third", "fourth")
COUNT_WORDS = (*NUMBERS, "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
               "twelve")
_SPOKEN_SHARE = 0.15  # share of picture turns in a multi-picture session asked out loud
_PICTURE_ONLY = 0.25  # share of picture turns sent with no words: the reply is a caption
#: After such a caption of a one-shape picture, the share asked about "it" next.
_CAPTION_FOLLOWUP = 0.7
#: Share of picture sessions (several pictures, pronouns) that end with a goodbye.
_CLOSING = 0.25
#: Share of pictures in a several-picture session asked a yes/no or not-there question
#: about the latest picture after its own turns ("is there a triangle?").
_CHECK_LATEST = 0.3
#: Share of out-of-domain prompts asked after a question about a picture.
_OOD_AFTER_PICTURE = 0.5


def _user(text: str, attachments: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"role": "user", "text": text, "attachments": list(attachments or [])}


def _assistant(text: str, answer: str, category: str) -> dict[str, Any]:
    return {"role": "assistant", "text": text, "answer": answer, "category": category}


def _pick(rng: np.random.Generator, options: list | tuple) -> Any:
    return options[int(rng.integers(len(options)))]


def _qmeta(turn: int, q: Question, **extra: Any) -> dict[str, Any]:
    return {"turn": turn, "type": q.type, "target": q.target, "by_colour": q.by_colour,
            "axis": q.axis, "answer": q.answer, **extra}


# -- several pictures --------------------------------------------------------------------

_REF_FORMS = ("in {r}, {q}", "{q_} in {r}?", "what about {r}? {q}", "looking at {r}, {q}")
_ELLIPSIS_FORMS = ("and {r}?", "what about {r}?", "and in {r}?", "how about {r}?")
_WHICH = ("which picture has the {t}?", "which picture has a {t}?",
          "in which picture is the {t}?", "which picture shows a {t}?")
_SAME = ("are the {k}s the same colour?", "are the {k}s the same color?",
         "do the {k}s have the same colour?", "is the {k} the same colour in both pictures?")
_HOW_MANY = ("how many {k}s in all?", "how many {k}s are there in all the pictures?",
             "how many {k}s did you see in total?", "how many {k}s in all the pictures?")


def _references(j: int, latest: int) -> list[tuple[str, str]]:
    """``(full, short)`` ways to name picture ``j`` when ``latest`` is the newest."""
    out = [(f"the {ORDINALS[j]} picture", f"the {ORDINALS[j]} one")]
    if j == latest - 1:
        out.append(("the previous picture", "the previous one"))
    if latest == 1:
        out.append(("the other picture", "the other one"))
    return out


def _find(questions: list[Question], key: tuple) -> Question | None:
    return next((q for q in questions if q.key == key), None)


def multi_picture(p: Planner, i: int) -> dict[str, Any]:
    """Two to four pictures in one session, each shown with a question (typed, spoken,
    or none: then it gets a caption). Between pictures, questions refer back to earlier
    ones ("is there a triangle?" may be asked again of one: "and the first one?"); the
    session may end with a question across all of them."""
    rng = p.rng(10, i)
    n = 2 + i % 3
    shown: list[tuple[Scene, list[Question]]] = []
    turns: list[dict[str, Any]] = []
    asked: list[dict[str, Any]] = []
    pictures = []
    last: Question | None = None
    it_slot: tuple[str, str | None] | None = None  # what the last "it" question asked
    back_rng = p.rng(22, i)  # its own, so the rest of the session is as it was without it
    for k in range(n):
        image_seed = p.image_seed("multi", i * 4 + k)
        want = str(_pick(rng, scenes.QUESTION_TYPES))
        picture_only = rng.random() < _PICTURE_ONLY
        scene, qs = p.scene_for(image_seed, "caption" if picture_only else want)
        shown.append((scene, qs))
        image = p.image("scene", scene, image_seed)
        pictures.append({"image_seed": image_seed, "scene": scene.to_meta()})
        category = "later_picture" if k else want
        if picture_only:
            text = questions.caption(scene)
            turns += [_user("", [image]), _assistant(text, text, "caption")]
            asked.append({"turn": len(turns) - 1, "picture": k, "type": "caption"})
            last, it_slot = None, None
            about = (_about_it(rng, qs) if len(scene.shapes) == 1
                     and rng.random() < _CAPTION_FOLLOWUP else None)
            if about is not None:
                words, last = about
                turns += [_user(words), _assistant(scenes.answer_sentence(last), last.answer,
                                                   "pronoun")]
                asked.append(_qmeta(len(turns) - 1, last, picture=k, form="after_caption"))
                it_slot = (last.type, last.axis)
        else:
            q = p.pick(rng, qs, want)
            words = scenes.phrase(q, rng)
            if rng.random() < _SPOKEN_SHARE:
                voice = speech.sample_voice(rng, p.split)
                said = scenes.spoken(words)
                user = _user("", [image, p.clip(said, voice)])
                asked_voice: dict[str, Any] = {"voice": {**voice.to_meta(), "text": said}}
            else:
                user, asked_voice = _user(words, [image]), {}
            turns += [user, _assistant(scenes.answer_sentence(q), q.answer, category)]
            asked.append(_qmeta(len(turns) - 1, q, picture=k, **asked_voice))
            last, it_slot = q, None
        if k and rng.random() < 0.6:
            turns, asked, last = _refer_back(rng, shown, turns, asked, last, it_slot)
            it_slot = None
        elif rng.random() < _CHECK_LATEST:
            check = (questions.ask_yes_no(scene, rng) if rng.random() < 0.7
                     else questions.ask_not_there(scene, rng))
            if check is not None:  # its meta's type is its category: yes_no or not_there
                turns += [_user(check.text), _assistant(check.reply, check.answer,
                                                        check.meta["type"])]
                asked.append({"turn": len(turns) - 1, "picture": k, **check.meta,
                              "answer": check.answer})
                last = None
                if (k and check.meta["type"] == "yes_no" and check.meta["form"] != "attribute"
                        and back_rng.random() < 0.5):
                    turns, asked = _exists_back(back_rng, shown, turns, asked,
                                                check.meta["target"])
    if rng.random() < 0.6:
        cross = _across(rng, [s for s, _ in shown])
        if cross:
            text, reply, answer, info = cross
            turns += [_user(text), _assistant(reply, answer, "across_pictures")]
            asked.append({"turn": len(turns) - 1, **info})
    turns += _closing(rng)
    meta = {"source": "multi-picture", "pictures": pictures, "questions": asked}
    return p.record("multi", i, "later_picture", turns, meta)


def _about_it(rng: np.random.Generator, qs: list[Question]) -> tuple[str, Question] | None:
    """A question about the one shape of a picture that was just captioned, naming it
    "it" ("what colour is it?"), and the question it resolves to (None if the picture
    has no such question)."""
    options = [q for q in qs if q.type in ("colour", "shape")
               or (q.type == "position" and q.axis == "where")]
    if not options:
        return None
    q = _pick(rng, options)
    slot = q.axis if q.type == "position" else q.type
    return str(_pick(rng, questions.PRONOUN_FORMS[slot])), q


def _typed(rng: np.random.Generator, words: str) -> str:
    """``words`` as people type them: lower case or capitalised, with "!", "." or nothing."""
    return str(_pick(rng, [f"{w}{end}" for w in (words, words.capitalize())
                           for end in ("", "!", ".")]))


def _closing(rng: np.random.Generator) -> list[dict[str, Any]]:
    """Now and then a goodbye at the end of a picture session: "bye" after pictures is
    still a goodbye, not a question about them."""
    if rng.random() >= _CLOSING:
        return []
    words = str(_pick(rng, smalltalk.GOODBYES))
    text = _typed(rng, words) if rng.random() < 0.7 else f"thanks, {words}"
    return [_user(text), _assistant(smalltalk.GOODBYE_REPLY, smalltalk.GOODBYE_ANSWER,
                                    "goodbye")]


def _refer_back(rng: np.random.Generator, shown: list[tuple[Scene, list[Question]]],
                turns: list[dict[str, Any]], asked: list[dict[str, Any]],
                last: Question | None, it_slot: tuple[str, str | None] | None = None,
                ) -> tuple[list, list, Question | None]:
    """One typed question about an earlier picture: the last question again ("and the
    first one?") when that picture can answer it, else a new one naming the picture.
    After a question about "it" (the one shape of the latest picture, ``it_slot`` its
    type and axis), "and the first one?" asks the same of an earlier one-shape
    picture's shape, whatever its kind."""
    latest = len(shown) - 1
    j = int(rng.integers(latest))
    full, short = _pick(rng, _references(j, latest))
    scene, qs = shown[j]
    q = _find(qs, last.key) if last is not None else None
    if q is None and it_slot is not None and len(scene.shapes) == 1:
        q = next((x for x in qs if (x.type, x.axis) == it_slot), None)
    if q is not None and rng.random() < 0.5:
        text = str(_pick(rng, _ELLIPSIS_FORMS)).format(r=_pick(rng, (full, short)))
        form = "ellipsis"
    else:
        q = _any_question(rng, qs)
        words = scenes.phrase(q, rng)
        text = str(_pick(rng, _REF_FORMS)).format(r=full, q=words, q_=words.rstrip("?.!"))
        form = "named"
    turns = turns + [_user(text), _assistant(scenes.answer_sentence(q), q.answer,
                                             "earlier_picture")]
    asked = asked + [_qmeta(len(turns) - 1, q, picture=j, form=form)]
    return turns, asked, q


def _exists_back(rng: np.random.Generator, shown: list[tuple[Scene, list[Question]]],
                 turns: list[dict[str, Any]], asked: list[dict[str, Any]], target: str
                 ) -> tuple[list, list]:
    """After "is there ``target``?" about the latest picture, "and the first one?": the
    same question about an earlier picture."""
    latest = len(shown) - 1
    j = int(rng.integers(latest))
    full, short = _pick(rng, _references(j, latest))
    text = str(_pick(rng, _ELLIPSIS_FORMS)).format(r=_pick(rng, (full, short)))
    reply, answer = questions.exists_reply(shown[j][0], target)
    turns = turns + [_user(text), _assistant(reply, answer, "earlier_picture")]
    asked = asked + [{"turn": len(turns) - 1, "picture": j, "type": "yes_no",
                      "form": "ellipsis", "target": target, "answer": answer}]
    return turns, asked


def refer_back(p: Planner, i: int) -> dict[str, Any] | None:
    """Two or three one-shape pictures, the latest followed by a question about "it",
    then "and the first one?" (or "the previous one", "the other one"): the same
    question about an earlier picture, whose shape is another kind two times in three.
    The reply names the earlier picture's own shape, not the one just talked about.
    Sometimes a yes/no question about the latest picture follows (after "is there ...?",
    half the time "and the first one?" asks it of an earlier one), and a goodbye. None when
    the earlier picture cannot be asked that question (its shape has no clear place)."""
    rng = p.rng(19, i)
    n = 2 + int(rng.random() < 0.4)
    shown: list[tuple[Scene, list[Question]]] = []
    turns: list[dict[str, Any]] = []
    asked: list[dict[str, Any]] = []
    pictures = []
    for k in range(n):
        image_seed = p.image_seed("refer-back", i * 3 + k)
        # one shape; two times in three, of a kind no earlier picture had
        other = {s.shapes[0].kind for s, _ in shown} if k and rng.random() < 2 / 3 else set()
        scene, qs = p.scene_for(image_seed, lambda sc, _qs, other=other: (
            len(sc.shapes) == 1 and sc.shapes[0].kind not in other))
        shown.append((scene, qs))
        image = p.image("scene", scene, image_seed)
        pictures.append({"image_seed": image_seed, "scene": scene.to_meta()})
        if rng.random() < 0.6 or not questions.captionable(scene):
            q = _any_question(rng, qs)
            turns += [_user(scenes.phrase(q, rng), [image]),
                      _assistant(scenes.answer_sentence(q), q.answer, "later_picture" if k
                                 else q.type)]
            asked.append(_qmeta(len(turns) - 1, q, picture=k))
        else:
            text = questions.caption(scene)
            turns += [_user("", [image]), _assistant(text, text, "caption")]
            asked.append({"turn": len(turns) - 1, "picture": k, "type": "caption"})
    latest = n - 1
    about = _about_it(rng, shown[latest][1])
    if about is None:
        return None
    words, q = about
    turns += [_user(words), _assistant(scenes.answer_sentence(q), q.answer, "pronoun")]
    asked.append(_qmeta(len(turns) - 1, q, picture=latest, form="it"))
    j = int(rng.integers(latest))
    full, short = _pick(rng, _references(j, latest))
    back = next((x for x in shown[j][1] if (x.type, x.axis) == (q.type, q.axis)), None)
    if back is None:
        return None
    text = str(_pick(rng, _ELLIPSIS_FORMS)).format(r=_pick(rng, (full, short)))
    turns += [_user(text), _assistant(scenes.answer_sentence(back), back.answer,
                                      "earlier_picture")]
    asked.append(_qmeta(len(turns) - 1, back, picture=j, form="ellipsis"))
    if rng.random() < 0.4:
        check = questions.ask_yes_no(shown[latest][0], rng)
        turns += [_user(check.text), _assistant(check.reply, check.answer, "yes_no")]
        asked.append({"turn": len(turns) - 1, "picture": latest, **check.meta,
                      "answer": check.answer})
        back_rng = p.rng(20, i)  # its own, so the sessions before it stay as they were
        if check.meta["form"] != "attribute" and back_rng.random() < 0.5:
            turns, asked = _exists_back(back_rng, shown, turns, asked, check.meta["target"])
    turns += _closing(rng)
    meta = {"source": "refer-back", "pictures": pictures, "questions": asked}
    return p.record("refer-back", i, "refer_back", turns, meta)


def _any_question(rng: np.random.Generator, qs: list[Question]) -> Question:
    types = sorted({q.type for q in qs})
    qtype = types[int(rng.integers(len(types)))]
    return _pick(rng, [q for q in qs if q.type == qtype])


def _across(rng: np.random.Generator, shown: list[Scene],
            ) -> tuple[str, str, str, dict[str, Any]] | None:
    """A question across all the pictures: which one has a kind, whether two shapes of a
    kind have the same colour, or how many of a kind (or shapes) there are in all."""
    options: list[tuple[str, str, str, dict[str, Any]]] = []
    for kind in scenes.KINDS:
        having = [k for k, s in enumerate(shown) if any(x.kind == kind for x in s.shapes)]
        if len(having) == 1:
            ordinal = ORDINALS[having[0]]
            options.append((str(_pick(rng, _WHICH)).format(t=kind),
                            f"the {ordinal} picture has the {kind}", ordinal,
                            {"type": "which", "target": kind, "answer": ordinal}))
        found = [x.colour for s in shown for x in s.shapes if x.kind == kind]
        per = [sum(x.kind == kind for x in s.shapes) for s in shown]
        if len(found) == 2 and max(per) == 1 and (len(shown) == 2 or rng.random() < 0.5):
            a, b = found
            reply = (f"yes, both {kind}s are {a}" if a == b
                     else f"no, one {kind} is {a} and the other is {b}")
            options.append((str(_pick(rng, _SAME[:3] if len(shown) > 2 else _SAME))
                            .format(k=kind), reply, questions._words(reply),
                            {"type": "same_colour", "target": kind, "answer": a == b}))
        total = len(found)
        reply = (f"there are no {kind}s in the pictures" if total == 0 else
                 f"there is one {kind} in all" if total == 1 else
                 f"there are {COUNT_WORDS[total]} {kind}s in all")
        options.append((str(_pick(rng, _HOW_MANY)).format(k=kind), reply,
                        f"no {kind}s" if total == 0 else COUNT_WORDS[total],
                        {"type": "count_all", "target": kind, "answer": total}))
    total = sum(len(s.shapes) for s in shown)
    options.append((str(_pick(rng, _HOW_MANY)).format(k="shape"),
                    f"there are {COUNT_WORDS[total]} shapes in all", COUNT_WORDS[total],
                    {"type": "count_all", "target": "shape", "answer": total}))
    # which/same-colour questions are rarer than counts: draw them more often
    weights = np.array([1.0 if o[3]["type"] == "count_all" else 3.0 for o in options])
    return options[int(rng.choice(len(options), p=weights / weights.sum()))]


# -- one picture: pronouns, yes/no, captions, refusals ----------------------------------------


def pronoun(p: Planner, i: int) -> dict[str, Any]:
    """A question about one shape, then one or two follow-ups that only say "it" or
    "what about the blue one?": each resolves to the previous turn's referent."""
    rng = p.rng(11, i)
    image_seed = p.image_seed("pronoun", i)
    want = ("colour", "shape", "position")[i % 3]
    scene, qs = p.scene_for(image_seed, lambda scene, qs: bool(_followed(qs, want)))
    first = _pick(rng, _followed(qs, want))
    turns = [_user(scenes.phrase(first, rng), [p.image("scene", scene, image_seed)]),
             _assistant(scenes.answer_sentence(first), first.answer, first.type)]
    asked = [_qmeta(1, first)]
    keys = {first.key}
    prev = first
    for _ in range(1 + int(rng.random() < 0.5)):
        nxt = questions.pronoun_followup(qs, prev, rng, frozenset(keys))
        if nxt is None:
            break
        text, q = nxt
        turns += [_user(text), _assistant(scenes.answer_sentence(q), q.answer, "pronoun")]
        asked.append(_qmeta(len(turns) - 1, q, referent=questions.referent_of(prev)))
        keys.add(q.key)
        prev = q
    turns += _closing(rng)
    meta = {"source": "pronoun", "image_seed": image_seed, "scene": scene.to_meta(),
            "questions": asked}
    return p.record("pronoun", i, "pronoun", turns, meta)


def _followed(qs: list[Question], want: str) -> list[Question]:
    """The ``want`` questions that some pronoun or ellipsis can follow up."""
    probe = np.random.default_rng(0)
    return [q for q in qs if q.type == want
            and questions.pronoun_followup(qs, q, probe) is not None]


def _one_picture(p: Planner, i: int, kind: str, code: int, want: str, ask, category: str,
                 repeat: float = 0.3) -> dict[str, Any]:
    rng = p.rng(code, i)
    image_seed = p.image_seed(kind, i)
    scene, _ = p.scene_for(image_seed, want)
    a = ask(scene, rng)
    turns = [_user(a.text, [p.image("scene", scene, image_seed)]),
             _assistant(a.reply, a.answer, category)]
    asked = [{"turn": 1, **a.meta, "answer": a.answer}]
    if rng.random() < repeat:
        b = ask(scene, rng)
        if b is not None and b.text != a.text:
            turns += [_user(b.text), _assistant(b.reply, b.answer, category)]
            asked.append({"turn": 3, **b.meta, "answer": b.answer})
    meta = {"source": kind, "image_seed": image_seed, "scene": scene.to_meta(),
            "questions": asked}
    return p.record(kind, i, category, turns, meta)


def yes_no(p: Planner, i: int) -> dict[str, Any]:
    return _one_picture(p, i, "yes-no", 12, "count", questions.ask_yes_no, "yes_no")


def caption(p: Planner, i: int) -> dict[str, Any]:
    return _one_picture(p, i, "caption", 13, "caption", questions.ask_caption, "caption",
                        repeat=0.0)


def not_there(p: Planner, i: int) -> dict[str, Any]:
    return _one_picture(p, i, "not-there", 14, "not_there", questions.ask_not_there,
                        "not_there")


def no_picture(p: Planner, i: int) -> dict[str, Any]:
    """A picture question in a session that has no picture, sometimes after a greeting."""
    rng = p.rng(15, i)
    scene = scenes.sample_scene(rng)
    turns: list[dict[str, Any]] = []
    if rng.random() < 0.3:
        words = str(_pick(rng, list(speech.GREETINGS)))
        reply, answer = speech.greeting_reply(words)
        turns += [_user(words), _assistant(reply, answer, "greeting")]
    a = questions.ask_without_picture(rng, scene)
    turns += [_user(a.text), _assistant(a.reply, a.answer, "no_picture")]
    return p.record("no-picture", i, "no_picture", turns, {"source": "no-picture"})


def goodbye(p: Planner, i: int) -> dict[str, Any]:
    """A goodbye, typed as people type it; sometimes at the end of a short chat."""
    rng = p.rng(16, i)
    words = smalltalk.GOODBYES[i % len(smalltalk.GOODBYES)]
    text = _typed(rng, words)
    turns: list[dict[str, Any]] = []
    if rng.random() < 0.3:
        hello = str(_pick(rng, list(speech.GREETINGS)))
        reply, answer = speech.greeting_reply(hello)
        turns += [_user(hello), _assistant(reply, answer, "greeting")]
    turns += [_user(text), _assistant(smalltalk.GOODBYE_REPLY, smalltalk.GOODBYE_ANSWER,
                                      "goodbye")]
    return p.record("goodbye", i, "goodbye", turns, {"source": "goodbye", "text": words})


def out_of_domain(p: Planner, count: int, exclude: set[str]) -> list[dict[str, Any]]:
    """Prompts the bot cannot help with; some come after a question about a picture, as
    "what's the capital of peru?" in a chat about shapes is still not about them."""
    prompts = smalltalk.out_of_domain(p.split, count, p.rng(17), exclude)
    out = []
    for n, text in enumerate(prompts):
        turns, meta = _picture_first(p, n)
        turns += [_user(text), _assistant(smalltalk.OUT_OF_DOMAIN_REPLY,
                                          smalltalk.OUT_OF_DOMAIN_ANSWER, "out_of_domain")]
        out.append(p.record("ood", n, "out_of_domain", turns,
                            {"source": "out-of-domain", **meta}))
    return out


def _picture_first(p: Planner, n: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """For :data:`_OOD_AFTER_PICTURE` of out-of-domain prompts: a picture and one question
    about it, answered, first (from generators of their own, so the prompts stay as
    they were)."""
    rng = p.rng(23, n)
    if rng.random() >= _OOD_AFTER_PICTURE:
        return [], {}
    turns, meta, _ = _a_picture(p, rng, "ood", n)
    return turns, meta


def _a_picture(p: Planner, rng: np.random.Generator, kind: str, n: int
               ) -> tuple[list[dict[str, Any]], dict[str, Any], tuple[Question, list[Question]]]:
    """A picture sent with one question, and its answer: the turns, the dialogue's
    meta, and the question with every question the picture can be asked."""
    image_seed = p.image_seed(kind, n)
    scene, qs = p.scene_for(image_seed, "any")
    q = _any_question(rng, qs)
    turns = [_user(scenes.phrase(q, rng), [p.image("scene", scene, image_seed)]),
             _assistant(scenes.answer_sentence(q), q.answer, q.type)]
    return turns, {"image_seed": image_seed, "scene": scene.to_meta(),
                   "questions": [_qmeta(1, q)]}, (q, qs)


def social(p: Planner, i: int) -> dict[str, Any]:
    """"thanks", "ok", "what can you do?" or a greeting, at the start of a chat or after
    a question about a picture; after a picture, half the time another question about
    it follows, answered from it as if nothing had come between."""
    rng = p.rng(24, i)
    turns: list[dict[str, Any]] = []
    meta: dict[str, Any] = {"source": "social"}
    asked = None
    if i % 2:
        first, picture_meta, asked = _a_picture(p, rng, "social", i)
        turns += first
        meta.update(picture_meta)
    kind = ("thanks", "ack", "help", "hello")[(i // 2) % 4]
    if kind == "hello":
        words = str(_pick(rng, list(speech.GREETINGS)))
        reply, answer = speech.greeting_reply(words)
        category = "greeting"
    else:
        said = smalltalk.SOCIAL[kind]
        reply, answer = said.reply, said.answer
        words, category = str(_pick(rng, smalltalk.social_phrases(kind))), "social"
    turns += [_user(_typed(rng, words) if not words.endswith(("?", ".")) else words),
              _assistant(reply, answer, category)]
    if asked is not None and rng.random() < 0.5:
        q, qs = asked
        left = [o for o in qs if o.key != q.key]
        if left:
            nxt = _any_question(rng, left)
            turns += [_user(scenes.phrase(nxt, rng, followup=True)),
                      _assistant(scenes.answer_sentence(nxt), nxt.answer, nxt.type)]
            meta["questions"].append(_qmeta(len(turns) - 1, nxt))
    meta["text"] = words
    return p.record("social", i, "social", turns, meta)


def font_digit(p: Planner, i: int) -> dict[str, Any] | None:
    """A digit typeset in a TrueType font (None when the machine has no fonts)."""
    rng = p.rng(18, i)
    image_seed = p.image_seed("font-digits", i)
    style = digits.sample_font_style(np.random.default_rng([p.seed, image_seed]), p.split)
    if style is None:
        return None
    turns = [_user(str(_pick(rng, digits.QUESTIONS)), [p.image("font-digit", style, image_seed)]),
             _assistant(digits.answer_sentence(style.label), digits.WORDS[style.label],
                        "digit_font")]
    meta = {"source": "font-digits", "image_seed": image_seed, "digit": style.label,
            "style": style.to_meta()}
    return p.record("font-digits", i, "digit_font", turns, meta)
