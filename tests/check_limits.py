"""Measure mmchat dialogue checkpoints on pictures and speech "as people make them", and
on questions across several pictures.

Usage: python tests/check_limits.py CHECKPOINT [CHECKPOINT ...]
(CHECKPOINT: `bundled` or a checkpoint directory; one column each in the table printed)
       LIMITS_ONLY=backgrounds,font-digits python tests/check_limits.py bundled
(runs only some conditions; LIMITS_VERBOSE=1 prints every question and reply)

docs/model-card.md's "Limits" table comes from this script.

Conditions follow tests/test_bundled_model_v2.py (pictures from tests/alt_renderer.py,
speech from espeak-ng voices training never heard, scored as `mmchat eval` scores exact
answers: the key word must appear in the reply). Everything is seeded.
"""

import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alt_renderer import font_digit, in_a_row, noisy_speech, picture  # noqa: E402
from test_bundled_model import UNHEARD  # noqa: E402
from test_bundled_model_v2 import COLOURS, FONTS, KINDS, LEFT, RIGHT, has  # noqa: E402

from mmchat import Attachment  # noqa: E402
from mmchat.config import from_dict  # noqa: E402
from mmchat.sync import SyncEngine  # noqa: E402

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# all 180 ordered pairs of two shapes differing in kind and colour; 40 drawn with seed 0
ALL_PAIRS = [((k1, c1), (k2, c2))
             for k1, k2 in itertools.permutations(KINDS, 2)
             for c1, c2 in itertools.permutations(COLOURS, 2)]
PAIRS = [ALL_PAIRS[i] for i in np.random.default_rng(0).choice(len(ALL_PAIRS), 40, replace=False)]

# seven backgrounds; the gradient, noise and JPEG ones on the bundled tests' base colours
BACKGROUNDS = {"grey": dict(background=(115, 115, 115)),
               "black": dict(background=(0, 0, 0)),
               "white": dict(background=(255, 255, 255)),
               "blue-grey": dict(background=(40, 48, 60)),
               "gradient": dict(background=(250, 235, 215), fade_to=(90, 90, 90)),
               "noise30": dict(background=(200, 200, 200), noise=30, seed=3),
               "jpeg40": dict(background=(140, 150, 140), jpeg=40)}


def att(shapes, **style) -> Attachment:
    return Attachment(*picture(shapes, **style))


# -- conditions: each yields (condition name, text, attachments, key words any of which is
# right) and, optionally, the (text, attachments) turns said before it in the same session


def backgrounds():
    for name, style in BACKGROUNDS.items():
        for (k1, c1), (k2, c2) in PAIRS[:30]:
            pic = [att([(k1, c1, 0.25, 0.5, 0.12), (k2, c2, 0.75, 0.5, 0.12)], **style)]
            yield f"bg-{name}", f"what colour is the {k1}?", pic, [c1]
            yield f"bg-{name}", "how many shapes are there?", pic, ["two"]


def aspect(name, size, places):
    (x1, y1), (x2, y2) = places
    for i, ((k1, c1), (k2, c2)) in enumerate(PAIRS):
        pic = [att([(k1, c1, x1, y1, 0.09), (k2, c2, x2, y2, 0.09)], size=size)]
        if i % 2:
            yield name, f"what shape is the {c1} one?", pic, [k1]
        else:
            yield name, f"what colour is the {k1}?", pic, [c1]


def font_digits():
    fonts = FONTS[:3]
    cases = itertools.product(fonts, (56, 72, 90), (False, True), range(5))
    for i, (font, side, light, _) in enumerate(cases):
        digit = i % 10
        data = font_digit(digit, font, side=side, light_on_dark=light)
        yield "font-digits", "what digit is this?", [Attachment(data, "image/png")], \
            [WORDS[digit], str(digit)]


def three_in_a_row():
    rng = np.random.default_rng(1)
    triples = set()
    while len(triples) < 20:  # three different kinds, three different colours
        kinds = tuple(rng.permutation(KINDS))
        colours = tuple(rng.choice(COLOURS, 3, replace=False))
        triples.add(tuple(zip(kinds, colours)))
    for triple in sorted(triples):
        data = in_a_row(list(triple), gap=0.02)
        yield "three-2%-apart", "how many shapes are there?", [Attachment(data, "image/png")], \
            ["three"]


def spoken(tmp: Path):
    clean = []
    for i, ((k1, _), _) in enumerate(PAIRS):  # one clean recording per pair, reused per SNR
        wav = tmp / f"{i}.wav"
        voice, wpm = UNHEARD[i % len(UNHEARD)], 110 + 30 * (i % 6)  # 110..260 wpm
        subprocess.run(["/usr/bin/espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(wav),
                        f"what colour is the {k1}"], check=True)
        clean.append(wav)
    for snr in (20, 10, 5):
        for i, ((k1, c1), (k2, c2)) in enumerate(PAIRS):
            noisy = tmp / f"{i}-{snr}dB.wav"
            if not noisy.exists():
                noisy_speech(clean[i], noisy, snr, seed=i)
            pic = att([(k1, c1, *LEFT, 0.12), (k2, c2, *RIGHT, 0.12)])
            yield f"spoken-{snr}dB", "", [pic, Attachment.from_path(noisy)], [c1]


COUNTED = ("no", "one", *WORDS[2:], "ten", "eleven", "twelve")


def _pictures(rng, n_pictures, without=None):
    """``n_pictures`` pictures, each of one to three shapes of different kinds (never the
    kind ``without``) as (kind, colour, x, y, half-width)."""
    spots = [(0.22, 0.3), (0.75, 0.28), (0.5, 0.75)]
    pictures = []
    for _ in range(n_pictures):
        kinds = [k for k in rng.permutation(KINDS) if k != without][:int(rng.integers(1, 4))]
        pictures.append([(str(k), str(rng.choice(COLOURS)), *spots[i], 0.11)
                         for i, k in enumerate(kinds)])
    return pictures


def _shown(pictures):
    """Each picture sent with a question about it: the turns before the one measured."""
    return [(f"what colour is the {p[0][0]}?" if i % 2 else "how many shapes are there?",
             [att(p)]) for i, p in enumerate(pictures)]


def across():
    """Two or three pictures, then a question about all of them (issue 12's examples);
    right only when the reply is the whole sentence the demo corpus answers with."""
    rng = np.random.default_rng(2)
    for i in range(30):  # "which picture has the ...?": one picture has that kind
        kind, n = str(rng.choice(KINDS)), 2 + i % 2
        pictures = _pictures(rng, n, without=kind)
        j = int(rng.integers(n))
        pictures[j][0] = (kind, *pictures[j][0][1:])
        ordinal = ("first", "second", "third")[j]
        yield ("across-which", f"which picture has the {kind}?", [],
               [f"the {ordinal} picture has the {kind}"], _shown(pictures))
    for i in range(30):  # "how many squares in all?"
        kind = str(rng.choice(KINDS))
        pictures = _pictures(rng, 2 + i % 2)
        n = sum(s[0] == kind for p in pictures for s in p)
        want = (f"there are no {kind}s in the pictures" if n == 0 else
                f"there is one {kind} in all" if n == 1 else
                f"there are {COUNTED[n]} {kind}s in all")
        yield "across-count-kind", f"how many {kind}s in all?", [], [want], _shown(pictures)
    for i in range(30):  # "how many shapes in all the pictures?"
        pictures = _pictures(rng, 2 + i % 2)
        n = sum(len(p) for p in pictures)
        yield ("across-count-shapes", "how many shapes in all the pictures?", [],
               [f"there are {COUNTED[n]} shapes in all"], _shown(pictures))
    for i in range(30):  # "are the circles the same colour?": one in each of two pictures
        kind = str(rng.choice(KINDS))
        a, b = (str(c) for c in rng.choice(COLOURS, 2, replace=False))
        if i % 2:
            b = a
        pictures = _pictures(rng, 2, without=kind)
        for p, colour in zip(pictures, (a, b)):
            p[0] = (kind, colour, *p[0][2:])
        want = (f"yes, both {kind}s are {a}" if a == b
                else f"no, one {kind} is {a} and the other is {b}")
        yield ("across-same-colour", f"are the {kind}s the same colour?", [], [want],
               [(f"what colour is the {kind}?", [att(p)]) for p in pictures])


CONDITIONS = {
    "backgrounds": lambda tmp: backgrounds(),
    "16:9": lambda tmp: aspect("16:9", (192, 108), ((0.3, 0.5), (0.7, 0.5))),
    "9:16": lambda tmp: aspect("9:16", (108, 192), ((0.5, 0.3), (0.5, 0.7))),
    "font-digits": lambda tmp: font_digits(),
    "three-2%-apart": lambda tmp: three_in_a_row(),
    "spoken": spoken,
    "across": lambda tmp: across(),
}


def measure(checkpoint: str, only, tmp: Path) -> dict:
    """{condition: [right, total]} for one checkpoint, in order of first appearance."""
    engine = SyncEngine(from_dict({"model": {"checkpoint": checkpoint}}, env={}))
    scores, n = {}, 0
    try:
        for group, make in CONDITIONS.items():
            if only and group not in only:
                continue
            for cond, text, attachments, keys, *before in make(tmp):
                n += 1
                for said, shown in (before[0] if before else ()):
                    engine.reply(f"limits-{n}", said, shown)
                reply = engine.reply(f"limits-{n}", text, attachments).text
                score = scores.setdefault(cond, [0, 0])
                score[0] += any(has(reply, k) for k in keys)
                score[1] += 1
                if os.environ.get("LIMITS_VERBOSE"):
                    print(f"  {cond} {text!r} -> {reply!r} (want {keys})", file=sys.stderr)
    finally:
        engine.close()
    # a total line per group that has several conditions
    for prefix in ("bg-", "spoken-", "across-"):
        parts = [v for k, v in scores.items() if k.startswith(prefix)]
        if len(parts) > 1:
            scores[prefix + "all"] = [sum(p[0] for p in parts), sum(p[1] for p in parts)]
    return scores


def main(argv) -> None:
    if not argv:
        sys.exit(__doc__)
    only = set(filter(None, os.environ.get("LIMITS_ONLY", "").split(",")))
    if only - set(CONDITIONS):
        sys.exit(f"unknown condition(s) {sorted(only - set(CONDITIONS))}; "
                 f"known: {list(CONDITIONS)}")
    results, start = {}, time.monotonic()
    with tempfile.TemporaryDirectory(prefix="limits-") as tmp:
        for checkpoint in argv:
            t0 = time.monotonic()
            results[checkpoint] = measure(checkpoint, only, Path(tmp))
            print(f"## {checkpoint} ({time.monotonic() - t0:.0f} s)")
            for cond, (right, total) in results[checkpoint].items():
                print(f"{cond}: {right}/{total}")
            print(flush=True)
    conds = list(dict.fromkeys(c for r in results.values() for c in r))
    print("| condition | " + " | ".join(argv) + " |")
    print("|---" * (len(argv) + 1) + "|")
    for cond in conds:
        cells = []
        for ckpt in argv:
            right, total = results[ckpt].get(cond, (0, 0))
            cells.append(f"{right}/{total} ({right / total:.0%})" if total else "-")
        print(f"| {cond} | " + " | ".join(cells) + " |")
    print(f"\nwall time: {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
