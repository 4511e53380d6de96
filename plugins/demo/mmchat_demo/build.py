"""Assemble the demo corpus: plan every dialogue, render the media, write the splits.

Planning is sequential and seeded per dialogue; rendering (Pillow and espeak-ng) runs in
worker processes and depends only on each job's own data, so the output is byte-for-byte
the same for the same seed, whatever the number of workers.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from . import __version__, chitchat, digits, questions, scenes, sessions, speech, wording
from .scenes import Question, Scene

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
_SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}
#: Picture dialogues whose typed questions may be asked another way or say "image" or
#: "photo" (module wording), each with the code of its generator.
_VARIED = {"shapes": 0, "multi": 1, "refer-back": 2, "pronoun": 3, "yes-no": 4,
           "not-there": 5, "caption": 6, "no-picture": 7}
_VARY_CODE = 41
#: Image seeds of a split lie in ``[base, base + 10_000_000)``; the three ranges are disjoint.
IMAGE_SEED_BASE = {"train": 0, "valid": 10_000_000, "test": 20_000_000}
_SEED_OFFSET = {"shapes": 0, "spoken": 1_000_000, "digits": 2_000_000, "multi": 3_000_000,
                "pronoun": 4_000_000, "yes-no": 5_000_000, "caption": 6_000_000,
                "not-there": 7_000_000, "font-digits": 8_000_000,
                "refer-back": 9_000_000, "ood": 9_500_000,
                "social": 9_700_000}
#: Questions in a shapes dialogue, cycled by dialogue number: 40% ask one, the rest add
#: one or two follow-ups about the same picture.
_TURN_PATTERN = (1, 1, 1, 1, 2, 2, 2, 3, 3, 3)
_SPOKEN_TYPES = ("colour", "shape", "count", "position", "digit")
_SPOKEN_FOLLOWUP = 0.3  # share of spoken shape questions that get a written follow-up


@dataclass(frozen=True)
class Counts:
    """Dialogues of each kind in one split; ``chitchat=None`` means every conversation."""

    shapes: int
    digits: int
    spoken: int
    greetings: int
    typed_greetings: int
    chitchat: int | None
    # corpus v2 (sessions.py)
    multi: int = 0
    pronoun: int = 0
    yes_no: int = 0
    captions: int = 0
    not_there: int = 0
    no_picture: int = 0
    goodbyes: int = 0
    font_digits: int = 0
    out_of_domain: int = 0
    refer_back: int = 0
    social: int = 0

    @property
    def planned(self) -> int:
        """Dialogues planned one at a time (all but chit-chat and out-of-domain)."""
        return sum(n for name, n in asdict(self).items()
                   if name not in ("chitchat", "out_of_domain"))


_HELD_OUT = dict(shapes=600, digits=150, spoken=200, greetings=40, typed_greetings=40,
                 chitchat=100, multi=300, pronoun=200, yes_no=200, captions=150, not_there=100,
                 no_picture=60, goodbyes=45, font_digits=150, refer_back=100, social=100)
DEFAULT_COUNTS = {
    "train": Counts(shapes=10_000, digits=4_000, spoken=2_200, greetings=600,
                    typed_greetings=400, chitchat=None, multi=3_000, pronoun=2_500,
                    yes_no=2_500, captions=1_500, not_there=1_000, no_picture=600,
                    goodbyes=450, font_digits=2_000, out_of_domain=1_200, refer_back=1_000,
                    social=1_200),
    "valid": Counts(**_HELD_OUT, out_of_domain=60),
    "test": Counts(**_HELD_OUT, out_of_domain=100),
}
_SMALL_HELD_OUT = dict(shapes=20, digits=10, spoken=5, greetings=2, typed_greetings=2,
                       chitchat=5, multi=8, pronoun=6, yes_no=6, captions=5, not_there=4,
                       no_picture=4, goodbyes=4, font_digits=5, out_of_domain=5,
                       refer_back=3, social=8)
SMALL_COUNTS = {
    "train": Counts(shapes=100, digits=30, spoken=10, greetings=4, typed_greetings=4,
                    chitchat=30, multi=20, pronoun=15, yes_no=15, captions=10, not_there=10,
                    no_picture=6, goodbyes=6, font_digits=10, out_of_domain=6,
                    refer_back=6, social=8),
    "valid": Counts(**_SMALL_HELD_OUT),
    "test": Counts(**_SMALL_HELD_OUT),
}

# A rendering job: ("scene", key, Scene) | ("digit", key, DigitStyle) | ("speech", path,
# text, Voice). Images come back as PNG bytes and go inline into the JSONL (a small PNG
# costs a whole disk block as a file); speech is written to ``path``, relative to outdir.
Job = tuple


def build(outdir: str | Path, *, seed: int = 0, small: bool = False, progress: bool = False,
          workers: int | None = None) -> dict[str, Path]:
    """Write the demo corpus into ``outdir``; returns split name -> JSONL path.

    ``workers`` processes render media (default: up to 2, or 1 with ``small``).
    """
    speech.require_espeak()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if (outdir / "demo.json").exists():  # an earlier demo build: its media may be stale
        shutil.rmtree(outdir / "media", ignore_errors=True)
    counts = SMALL_COUNTS if small else DEFAULT_COUNTS
    records: dict[str, list[dict[str, Any]]] = {}
    jobs: dict[str, Job] = {}
    inline: dict[str, list[dict[str, Any]]] = {}
    total = sum(c.planned for c in counts.values())
    with tqdm(total=total, desc="planning", unit="dialogue", disable=not progress,
              file=sys.stderr) as bar:
        for split in SPLITS:
            planner = _Planner(split, seed)
            records[split] = planner.plan(counts[split], tick=bar.update)
            jobs.update(planner.jobs)
            inline.update(planner.inline)
    if workers is None:
        workers = 1 if small else min(2, os.cpu_count() or 1)
    for key, png in _render_all(outdir, list(jobs.values()), workers=workers,
                                progress=progress):
        data = base64.b64encode(png).decode("ascii")
        for attachment in inline[key]:
            attachment["data"] = data
    paths = {}
    for split in SPLITS:
        paths[split] = outdir / f"{split}.jsonl"
        with paths[split].open("w", encoding="utf-8", newline="\n") as fh:
            for record in records[split]:
                fh.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
    info = _describe(seed, small, counts, records, list(jobs.values()))
    (outdir / "demo.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    logger.info("demo corpus in %s: %s dialogues, %d images, %d voice clips", outdir,
                {s: len(r) for s, r in records.items()}, info["images"], info["voice_clips"])
    return paths


def _describe(seed: int, small: bool, counts: dict[str, Counts],
              records: dict[str, list[dict[str, Any]]], jobs: list[Job]) -> dict[str, Any]:
    splits = {}
    for split, recs in records.items():
        categories: dict[str, int] = {}
        for rec in recs:
            for turn in rec["turns"]:
                if turn["role"] == "assistant":
                    categories[turn["category"]] = categories.get(turn["category"], 0) + 1
        splits[split] = {"file": f"{split}.jsonl", "dialogues": len(recs),
                         "counts": asdict(counts[split]),
                         "answers_per_category": dict(sorted(categories.items()))}
    return {
        "generator": f"mmchat-demo {__version__}", "seed": seed, "small": small,
        "images": sum(job[0] != "speech" for job in jobs),
        "voice_clips": sum(job[0] == "speech" for job in jobs), "splits": splits,
        "held_out": {
            "image_seed_ranges": {s: [b, b + 10_000_000] for s, b in IMAGE_SEED_BASE.items()},
            "digit_index_ranges": {s: list(r) for s, r in digits.INDEX_RANGES.items()},
            "voices": {s: list(v) for s, v in speech.VOICES.items()},
            "variants": {s: list(v) for s, v in speech.VARIANTS.items()},
            "fonts": {s: [f.rsplit("/", 1)[-1] for f in digits.split_fonts(s)] for s in SPLITS},
        },
    }


# -- planning ----------------------------------------------------------------------------


def _attachment(modality: str, mime_type: str, **where: str) -> dict[str, str]:
    return {"modality": modality, "mime_type": mime_type, **where}


def _user(text: str, attachments: Iterable[dict[str, str]] = ()) -> dict[str, Any]:
    return {"role": "user", "text": text, "attachments": list(attachments)}


def _assistant(text: str, answer: str, category: str) -> dict[str, Any]:
    return {"role": "assistant", "text": text, "answer": answer, "category": category}


def _question_meta(turn: int, q: Question) -> dict[str, Any]:
    return {"turn": turn, "type": q.type, "target": q.target, "by_colour": q.by_colour,
            "axis": q.axis, "answer": q.answer}


class _Planner:
    """Plans the dialogues of one split and collects the media they need."""

    def __init__(self, split: str, seed: int) -> None:
        self.split = split
        self.seed = seed
        self.jobs: dict[str, Job] = {}
        #: Image job key -> the attachments whose ``data`` its PNG fills in.
        self.inline: dict[str, list[dict[str, Any]]] = {}

    def rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_CODE[self.split], *key])

    def plan(self, counts: Counts, tick: Callable[[], object] = lambda: None,
             ) -> list[dict[str, Any]]:
        """Every dialogue of the split, shuffled; ``tick()`` after each one but chit-chat."""
        out = []
        for make, n in ((self.shapes, counts.shapes), (self.digit, counts.digits),
                        (self.spoken, counts.spoken), (self.greeting, counts.greetings),
                        (self.typed_greeting, counts.typed_greetings),
                        (functools.partial(sessions.multi_picture, self), counts.multi),
                        (functools.partial(sessions.pronoun, self), counts.pronoun),
                        (functools.partial(sessions.yes_no, self), counts.yes_no),
                        (functools.partial(sessions.caption, self), counts.captions),
                        (functools.partial(sessions.not_there, self), counts.not_there),
                        (functools.partial(sessions.no_picture, self), counts.no_picture),
                        (functools.partial(sessions.goodbye, self), counts.goodbyes),
                        (functools.partial(sessions.font_digit, self), counts.font_digits),
                        (functools.partial(sessions.refer_back, self), counts.refer_back),
                        (functools.partial(sessions.social, self), counts.social)):
            for i in range(n):
                record = make(i)
                if record is not None:  # None: no fonts, or an unaskable refer-back
                    out.append(record)
                tick()
        out += self.chitchat(counts.chitchat)
        prompts = {_words(u) for c in chitchat.conversations() for u in c.utterances[::2]}
        out += sessions.out_of_domain(self, counts.out_of_domain, prompts)
        order = self.rng(9).permutation(len(out))
        return [out[i] for i in order]

    def record(self, kind: str, i: int, category: str, turns: list[dict[str, Any]],
               meta: dict[str, Any]) -> dict[str, Any]:
        if kind in _VARIED:  # other wordings, from a generator of their own
            turns = wording.vary_turns(turns, self.rng(_VARY_CODE, _VARIED[kind], i))
        return {"id": f"{self.split}-{kind}-{i:06d}", "split": self.split, "category": category,
                "turns": turns, "meta": meta}

    # media

    def image_seed(self, kind: str, i: int) -> int:
        return IMAGE_SEED_BASE[self.split] + _SEED_OFFSET[kind] + i

    def image(self, kind: str, spec: Any, image_seed: int) -> dict[str, str]:
        key = f"{kind}:{image_seed}"
        self.jobs[key] = (kind, key, spec)
        mime = "image/jpeg" if getattr(spec, "jpeg", 0) else "image/png"
        attachment = _attachment("image", mime, data="")
        if kind == "scene":  # the shapes it shows, for the model's object slots
            attachment["objects"] = questions.objects(spec)
        self.inline.setdefault(key, []).append(attachment)
        return attachment

    def clip(self, text: str, voice: speech.Voice) -> dict[str, str]:
        path = f"media/{self.split}/voice/{speech.clip_name(text, voice)}"
        self.jobs[path] = ("speech", path, text, voice)
        return _attachment("voice", "audio/ogg", path=path, text=text)

    # dialogues

    def scene_for(self, image_seed: int, want: str | Callable[[Scene, list[Question]], bool],
                  ) -> tuple[Scene, list[Question]]:
        """The first scene drawn from the image seed that can be asked a ``want`` question
        (a question type, ``caption``, or a test of the scene and its questions)."""
        rng = np.random.default_rng([self.seed, image_seed])
        while True:
            scene = scenes.sample_scene(rng)
            asked = scenes.askable(scene)
            if callable(want):
                ok = want(scene, asked)
            elif want == "caption":
                ok = questions.captionable(scene)
            elif want in scenes.QUESTION_TYPES:
                ok = any(q.type == want for q in asked)
            else:
                ok = True
            if ok:
                return scene, asked

    @staticmethod
    def pick(rng: np.random.Generator, questions: list[Question], qtype: str) -> Question:
        of_type = [q for q in questions if q.type == qtype]
        if qtype == "position":  # spread over where / left-right / top-bottom
            axes = sorted({q.axis for q in of_type})
            axis = axes[int(rng.integers(len(axes)))]
            of_type = [q for q in of_type if q.axis == axis]
        return of_type[int(rng.integers(len(of_type)))]

    def followups(self, rng: np.random.Generator, questions: list[Question],
                  asked: list[Question], n: int) -> list[Question]:
        out: list[Question] = []
        for _ in range(n):
            seen = {q.key for q in asked + out}
            left = [q for q in questions if q.key not in seen]
            types = sorted({q.type for q in left})
            if not types:
                break
            out.append(self.pick(rng, left, types[int(rng.integers(len(types)))]))
        return out

    def shapes(self, i: int) -> dict[str, Any]:
        rng = self.rng(1, i)
        image_seed = self.image_seed("shapes", i)
        want = scenes.QUESTION_TYPES[i % len(scenes.QUESTION_TYPES)]
        scene, questions = self.scene_for(image_seed, want)
        first = self.pick(rng, questions, want)
        turns = [_user(scenes.phrase(first, rng), [self.image("scene", scene, image_seed)]),
                 _assistant(scenes.answer_sentence(first), first.answer, first.type)]
        asked = [_question_meta(1, first)]
        for q in self.followups(rng, questions, [first], _TURN_PATTERN[i % 10] - 1):
            turns += [_user(scenes.phrase(q, rng, followup=True)),
                      _assistant(scenes.answer_sentence(q), q.answer, "followup")]
            asked.append(_question_meta(len(turns) - 1, q))
        meta = {"source": "shapes", "image_seed": image_seed, "scene": scene.to_meta(),
                "questions": asked}
        return self.record("shapes", i, first.type, turns, meta)

    def digit_style(self, rng: np.random.Generator, image_seed: int) -> digits.DigitStyle:
        lo, hi = digits.INDEX_RANGES[self.split]
        index = lo + int(rng.integers(hi - lo))
        return digits.sample_style(np.random.default_rng([self.seed, image_seed]), index)

    def digit(self, i: int) -> dict[str, Any]:
        rng = self.rng(2, i)
        image_seed = self.image_seed("digits", i)
        style = self.digit_style(rng, image_seed)
        turns = [_user(str(rng.choice(digits.QUESTIONS)), [self.image("digit", style, image_seed)]),
                 _assistant(digits.answer_sentence(style.label), digits.WORDS[style.label],
                            "digit")]
        meta = {"source": "digits", "image_seed": image_seed, "digit": style.label,
                "style": style.to_meta()}
        return self.record("digits", i, "digit", turns, meta)

    def spoken(self, i: int) -> dict[str, Any]:
        rng = self.rng(3, i)
        image_seed = self.image_seed("spoken", i)
        voice = speech.sample_voice(rng, self.split)
        kind = _SPOKEN_TYPES[i % len(_SPOKEN_TYPES)]
        meta: dict[str, Any] = {"source": "spoken", "image_seed": image_seed}
        if kind == "digit":
            style = self.digit_style(rng, image_seed)
            text = scenes.spoken(str(rng.choice(digits.QUESTIONS)))
            image = self.image("digit", style, image_seed)
            reply, answer = digits.answer_sentence(style.label), digits.WORDS[style.label]
            meta.update(digit=style.label, style=style.to_meta())
            followups: list[Question] = []
        else:
            scene, questions = self.scene_for(image_seed, kind)
            first = self.pick(rng, questions, kind)
            text = scenes.spoken(scenes.phrase(first, rng))
            image = self.image("scene", scene, image_seed)
            reply, answer = scenes.answer_sentence(first), first.answer
            meta.update(scene=scene.to_meta(), questions=[_question_meta(1, first)])
            n = 1 if rng.random() < _SPOKEN_FOLLOWUP else 0
            followups = self.followups(rng, questions, [first], n)
        meta["voice"] = {**voice.to_meta(), "text": text}
        turns = [_user("", [image, self.clip(text, voice)]),
                 _assistant(reply, answer, "spoken")]
        for q in followups:
            turns += [_user(scenes.phrase(q, rng, followup=True)),
                      _assistant(scenes.answer_sentence(q), q.answer, "followup")]
            meta["questions"].append(_question_meta(len(turns) - 1, q))
        return self.record("spoken", i, "spoken", turns, meta)

    def greeting(self, i: int) -> dict[str, Any]:
        rng = self.rng(4, i)
        voice = speech.sample_voice(rng, self.split)
        text = list(speech.GREETINGS)[i % len(speech.GREETINGS)]
        reply, answer = speech.greeting_reply(text)
        turns = [_user("", [self.clip(text, voice)]), _assistant(reply, answer, "greeting")]
        meta = {"source": "greeting", "voice": {**voice.to_meta(), "text": text}}
        return self.record("greeting", i, "greeting", turns, meta)

    def typed_greeting(self, i: int) -> dict[str, Any]:
        """A greeting typed, as people type it: the spoken greetings' words and reply."""
        rng = self.rng(6, i)
        words = list(speech.GREETINGS)[i % len(speech.GREETINGS)]
        text = str(rng.choice(_typed_forms(words)))
        reply, answer = speech.greeting_reply(words)
        turns = [_user(text), _assistant(reply, answer, "greeting")]
        return self.record("typed-greeting", i, "greeting", turns, {"source": "typed-greeting"})

    def chitchat(self, count: int | None) -> list[dict[str, Any]]:
        convs = chitchat.conversations()
        if count is None:
            chosen = list(range(len(convs)))
        else:
            # a conversation that opens with a greeting now has two replies in the corpus
            greetings = set(speech.GREETINGS)
            pool = [c for c in chitchat.unambiguous(convs)
                    if _words(convs[c].utterances[0]) not in greetings]
            picks = self.rng(5).choice(len(pool), size=min(count, len(pool)), replace=False)
            chosen = sorted(pool[int(p)] for p in picks)
        out = []
        for n, c in enumerate(chosen):
            conv = convs[c]
            turns = []
            for k, utterance in enumerate(conv.utterances):
                if k % 2 == 0:
                    turns.append(_user(utterance))
                else:
                    turns.append(_assistant(utterance, chitchat.normalise(utterance), "chitchat"))
            meta = {"source": "chatterbot", "file": conv.file, "index": conv.index}
            out.append(self.record("chitchat", n, "chitchat", turns, meta))
        return out


def _typed_forms(words: str) -> list[str]:
    """How ``words`` may be typed: either case of the first letter, with ``!``, ``.`` or
    nothing after."""
    return [f"{first}{end}" for first in (words, words.capitalize()) for end in ("", "!", ".")]


def _words(text: str) -> str:
    """``text`` in lower case, without punctuation, single-spaced."""
    return " ".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())


# -- rendering ---------------------------------------------------------------------------


def _render_all(outdir: Path, jobs: list[Job], *, workers: int,
                progress: bool) -> Iterator[tuple[str, bytes]]:
    """Run every job; yields ``(key, png)`` for the image jobs, in no particular order."""
    for folder in sorted({(outdir / job[1]).parent for job in jobs if job[0] == "speech"}):
        folder.mkdir(parents=True, exist_ok=True)
    run = functools.partial(_render, outdir)
    bar = tqdm(total=len(jobs), desc="rendering", unit="item", disable=not progress,
               file=sys.stderr)
    with bar:
        if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
            results: Iterable[tuple[str, bytes | None]] = map(run, jobs)
            for key, png in results:
                bar.update()
                if png is not None:
                    yield key, png
            return
        # fork: the children need nothing but the job list, and spawn would re-run __main__
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for key, png in pool.imap_unordered(run, jobs, chunksize=32):
                bar.update()
                if png is not None:
                    yield key, png


def _render(outdir: Path, job: Job) -> tuple[str, bytes | None]:
    kind, key = job[0], job[1]
    if kind == "speech":
        speech.write_clip(outdir / key, job[2], job[3])
        return key, None
    if kind == "scene":
        image = scenes.render(job[2])
    elif kind == "digit":
        image = digits.render(job[2])
    elif kind == "font-digit":
        image = digits.render_font(job[2])
    else:
        raise ValueError(f"unknown job kind {kind!r}")
    buffer = io.BytesIO()
    quality = getattr(job[2], "jpeg", 0)
    if quality:
        image.save(buffer, "JPEG", quality=quality)
    else:
        image.save(buffer, "PNG", optimize=True)  # lossless: 5% smaller, 1.5 ms more
    return key, buffer.getvalue()
