"""Handwritten digits: scikit-learn's 8x8 ``load_digits`` images, upscaled and restyled.

Splits take disjoint index ranges of the 1,797 images, so test digits are images the
model never saw in training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Half-open ranges of ``load_digits`` indices for each split.
INDEX_RANGES = {"train": (0, 1440), "valid": (1440, 1618), "test": (1618, 1797)}
_RESAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC}

QUESTIONS = ("what digit is this?", "which digit is this?", "what number is written here?",
             "what number is this?", "can you read this digit?", "which number do you see?",
             "what digit is written in the picture?")


@dataclass(frozen=True)
class DigitStyle:
    index: int
    label: int
    size: int
    #: Empty 8x8 cells added on each side before upscaling.
    pad: int
    resample: str
    rotation: float
    ink: tuple[int, int, int]
    paper: tuple[int, int, int]

    def to_meta(self) -> dict[str, Any]:
        out = asdict(self)
        out["rotation"] = round(self.rotation, 1)
        return out


@lru_cache(maxsize=1)
def load() -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: float images in [0, 1] of shape (1797, 8, 8), int labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def answer_sentence(label: int) -> str:
    word = WORDS[label]
    return f"it is an {word}" if word == "eight" else f"it is a {word}"


def sample_style(rng: np.random.Generator, index: int) -> DigitStyle:
    _, labels = load()
    if rng.random() < 0.8:  # dark ink on light paper
        ink = tuple(int(v) for v in rng.integers(0, 70, 3))
        paper = tuple(int(v) for v in rng.integers(215, 256, 3))
    else:  # light ink on a dark ground, like the original data
        ink = tuple(int(v) for v in rng.integers(215, 256, 3))
        paper = tuple(int(v) for v in rng.integers(0, 50, 3))
    return DigitStyle(
        index=index, label=int(labels[index]), size=int(rng.integers(48, 97)),
        pad=int(rng.integers(0, 3)), resample=str(rng.choice(list(_RESAMPLING))),
        rotation=float(rng.uniform(-12, 12)) if rng.random() < 0.5 else 0.0,
        ink=ink, paper=paper)  # type: ignore[arg-type]


def render(style: DigitStyle) -> Image.Image:
    images, _ = load()
    cells = np.pad(images[style.index], style.pad)
    alpha = Image.fromarray((cells * 255).round().astype(np.uint8), "L")
    alpha = alpha.resize((style.size, style.size), _RESAMPLING[style.resample])
    if style.rotation:
        alpha = alpha.rotate(style.rotation, Image.Resampling.BILINEAR, fillcolor=0)
    a = np.asarray(alpha, np.float32)[..., None] / 255.0
    pixels = np.asarray(style.paper, np.float32) * (1 - a) + np.asarray(style.ink, np.float32) * a
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


# -- digits typeset in TrueType fonts ---------------------------------------------------

#: Folders searched for fonts when ``fc-list`` is not installed.
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")


@lru_cache(maxsize=1)
def fonts() -> tuple[str, ...]:
    """Paths of the TrueType/OpenType fonts on this machine that draw all ten digits,
    sorted by file name; empty when there are none (the corpus then has no font digits)."""
    import shutil
    import subprocess
    from pathlib import Path

    paths: set[str] = set()
    if shutil.which("fc-list"):
        done = subprocess.run(["fc-list", "--format", "%{file}\n"], capture_output=True,
                              text=True, timeout=60, check=False)
        paths.update(line.strip() for line in done.stdout.splitlines())
    for folder in FONT_DIRS:
        paths.update(str(p) for p in Path(folder).rglob("*") if p.is_file())
    usable = [p for p in paths if p.lower().endswith((".ttf", ".otf")) and _draws_digits(p)]
    return tuple(sorted(usable, key=lambda p: (Path(p).name, p)))


def _draws_digits(path: str) -> bool:
    from PIL import ImageFont

    try:
        font = ImageFont.truetype(path, 24)
        masks = {bytes(font.getmask(str(d))) for d in range(10)}
    except OSError:
        return False
    return len(masks) == 10 and all(any(m) for m in masks)


def split_fonts(split: str) -> tuple[str, ...]:
    """The fonts a split draws with: every fifth font (by name) is held out for test and
    the next one for valid; a held-out split with none of its own uses training's."""
    every = fonts()
    train = tuple(f for i, f in enumerate(every) if i % 5 not in (3, 4))
    if split == "train":
        return train
    return {"test": every[4::5], "valid": every[3::5]}.get(split) or train


@dataclass(frozen=True)
class FontDigitStyle:
    font: str
    label: int
    size: int
    #: The glyph is drawn at this resolution (pixels on a side), then scaled to ``size``.
    resolution: int
    resample: str
    rotation: float
    #: Offset of the glyph's centre, as a fraction of the side.
    dx: float
    dy: float
    ink: tuple[int, int, int]
    paper: tuple[int, int, int]

    def to_meta(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(font=self.font.rsplit("/", 1)[-1], rotation=round(self.rotation, 1),
                   dx=round(self.dx, 3), dy=round(self.dy, 3))
        return out


def sample_font_style(rng: np.random.Generator, split: str) -> FontDigitStyle | None:
    """A digit typeset in one of the split's fonts, or None when the machine has none."""
    pool = split_fonts(split)
    if not pool:
        return None
    dark_ink = rng.random() < 0.6
    ink = tuple(int(v) for v in rng.integers(0, 80, 3))
    paper = tuple(int(v) for v in rng.integers(190, 256, 3))
    if not dark_ink:
        ink, paper = tuple(int(v) for v in rng.integers(200, 256, 3)), \
            tuple(int(v) for v in rng.integers(0, 70, 3))
    size = int(rng.integers(40, 97))
    return FontDigitStyle(
        font=str(pool[int(rng.integers(len(pool)))]), label=int(rng.integers(10)), size=size,
        resolution=int(rng.choice([12, 16, 24, 32, size])),
        resample=str(rng.choice(list(_RESAMPLING))),
        rotation=float(rng.uniform(-12, 12)) if rng.random() < 0.5 else 0.0,
        dx=float(rng.uniform(-0.1, 0.1)), dy=float(rng.uniform(-0.1, 0.1)),
        ink=ink, paper=paper)  # type: ignore[arg-type]


def render_font(style: FontDigitStyle) -> Image.Image:
    from PIL import ImageDraw, ImageFont

    res = style.resolution
    font = ImageFont.truetype(style.font, max(6, round(res * 0.8)))
    alpha = Image.new("L", (res, res), 0)
    draw = ImageDraw.Draw(alpha)
    x0, y0, x1, y1 = draw.textbbox((0, 0), str(style.label), font=font)
    x = (res - (x1 - x0)) / 2 - x0 + style.dx * res
    y = (res - (y1 - y0)) / 2 - y0 + style.dy * res
    draw.text((x, y), str(style.label), fill=255, font=font)
    if style.rotation:
        alpha = alpha.rotate(style.rotation, Image.Resampling.BILINEAR, fillcolor=0)
    alpha = alpha.resize((style.size, style.size), _RESAMPLING[style.resample])
    a = np.asarray(alpha, np.float32)[..., None] / 255.0
    pixels = np.asarray(style.paper, np.float32) * (1 - a) + np.asarray(style.ink, np.float32) * a
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")
