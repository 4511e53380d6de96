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
