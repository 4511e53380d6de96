"""The shapes world: vocabulary, scene sampling, rendering, and questions with their answers.

A :class:`Scene` is plain data (recorded in each dialogue's ``meta``), :func:`render`
draws it with Pillow, and :func:`askable` lists the questions that have exactly one
right answer for it. Answers are one canonical sentence per question type.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
NUMBERS = ("zero", "one", "two", "three")
QUESTION_TYPES = ("colour", "shape", "count", "position")
DIRECTIONS = ("left", "right", "top", "bottom")

#: Canvas sides in pixels: the longer side, and the shorter one (aspect ratio up to 3:1).
MIN_SIDE, MAX_SIDE = 24, 160
MIN_LONG = 64
#: Aspect ratios (long side over short side) and their shares: near-square, photo-like
#: (4:3, 16:9), and strips up to 3:1. Either orientation, half and half.
_ASPECTS = (((1.0, 1.25), 0.45), ((1.25, 2.0), 0.35), ((2.0, 3.0), 0.20))
#: Smallest circumradius, as a fraction of the canvas's longer side.
MIN_RADIUS = 0.05
#: Shapes placed "close" sit this fraction of the canvas width apart, or touch.
CLOSE_GAP = 0.02
#: Hue centre and spread (degrees), saturation range and value range of each colour.
_PALETTE: dict[str, tuple[float, float, tuple[float, float], tuple[float, float]]] = {
    "red": (0.0, 7.0, (0.75, 1.0), (0.72, 0.95)),
    "orange": (28.0, 4.0, (0.85, 1.0), (0.92, 1.0)),
    "yellow": (54.0, 4.0, (0.8, 1.0), (0.9, 1.0)),
    "green": (125.0, 15.0, (0.6, 1.0), (0.5, 0.85)),
    "blue": (222.0, 12.0, (0.65, 1.0), (0.6, 0.95)),
    "purple": (282.0, 10.0, (0.5, 0.8), (0.45, 0.78)),
}
_LINE_GREYS = (0, 35, 70)
#: A shape counts as "in a half" when its whole extent is this far (fraction of the
#: canvas side) past the centre line.
EDGE_GAP = 0.04
#: "where is it?" is asked only when the shape's centre on the other axis is within
#: this fraction of the canvas side of the middle.
MIDDLE_BAND = 0.15


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    #: Circumradius in pixels.
    radius: float
    #: Degrees, counter-clockwise.
    rotation: float
    #: ``filled``, ``outlined`` (filled with a dark border) or ``hollow`` (coloured border).
    style: str
    line_width: int
    line_rgb: tuple[int, int, int]

    def points(self, scale: float = 1.0) -> list[tuple[float, float]]:
        """Polygon vertices (squares and triangles), scaled for supersampled drawing."""
        corners, start = (4, 45.0) if self.kind == "square" else (3, -90.0)
        out = []
        for k in range(corners):
            a = math.radians(start - self.rotation + k * 360.0 / corners)
            out.append(((self.cx + self.radius * math.cos(a)) * scale,
                        (self.cy + self.radius * math.sin(a)) * scale))
        return out

    def bbox(self) -> tuple[float, float, float, float]:
        if self.kind == "circle":
            r = self.radius
            return (self.cx - r, self.cy - r, self.cx + r, self.cy + r)
        xs, ys = zip(*self.points())
        return (min(xs), min(ys), max(xs), max(ys))


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    #: ``plain``, ``gradient`` (to ``background2``) or ``noise`` (grey noise of ``noise`` sigma).
    texture: str
    background2: tuple[int, int, int]
    noise: float
    texture_seed: int
    #: Drawn this many times larger, then downsampled (1 = hard, aliased edges).
    supersample: int
    shapes: tuple[Shape, ...]
    #: ``spread`` (at least 4% of the shorter side apart) or ``close`` (at most
    #: :data:`CLOSE_GAP` of the width apart, or touching).
    layout: str = "spread"
    #: Noise in each colour channel on its own (``True``) or grey noise.
    colour_noise: bool = False
    #: Stored as a JPEG of this quality (with its artefacts), or 0 for a PNG.
    jpeg: int = 0

    def horizontal(self, shape: Shape) -> str | None:
        """``left``/``right`` when the shape lies wholly and clearly in that half."""
        x0, _, x1, _ = shape.bbox()
        gap = EDGE_GAP * self.width
        if x1 <= self.width / 2 - gap:
            return "left"
        if x0 >= self.width / 2 + gap:
            return "right"
        return None

    def vertical(self, shape: Shape) -> str | None:
        """``top``/``bottom`` when the shape lies wholly and clearly in that half."""
        _, y0, _, y1 = shape.bbox()
        gap = EDGE_GAP * self.height
        if y1 <= self.height / 2 - gap:
            return "top"
        if y0 >= self.height / 2 + gap:
            return "bottom"
        return None

    def where(self, shape: Shape) -> str | None:
        """The one direction that describes the shape, or None when that is not clear-cut."""
        h, v = self.horizontal(shape), self.vertical(shape)
        if h and not v and abs(shape.cy - self.height / 2) <= MIDDLE_BAND * self.height:
            return h
        if v and not h and abs(shape.cx - self.width / 2) <= MIDDLE_BAND * self.width:
            return v
        return None

    def to_meta(self) -> dict[str, Any]:
        """JSON-ready description, with each shape's box and position classes."""
        shapes = []
        for s in self.shapes:
            d = asdict(s)
            d.update(cx=round(s.cx, 2), cy=round(s.cy, 2), radius=round(s.radius, 2),
                     rotation=round(s.rotation, 1),
                     bbox=[round(v, 2) for v in s.bbox()],
                     horizontal=self.horizontal(s), vertical=self.vertical(s),
                     where=self.where(s))
            shapes.append(d)
        out = asdict(self)
        out["shapes"] = shapes
        return out


@dataclass(frozen=True)
class Question:
    """An unambiguous question about a scene, before it is phrased."""

    type: str
    #: The shape kind (colour questions), colour (shape questions) or the referent of a
    #: position question (a kind, or a colour when ``by_colour``).
    target: str = ""
    by_colour: bool = False
    #: Position questions: ``where``, ``x`` (left or right?) or ``y`` (top or bottom?).
    axis: str = ""
    #: The key word(s) of the answer.
    answer: str = ""

    @property
    def key(self) -> tuple[str, str, bool, str]:
        return (self.type, self.target, self.by_colour, self.axis)


def hsv_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((h % 360.0) / 360.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def sample_colour(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    hue, spread, (s0, s1), (v0, v1) = _PALETTE[name]
    return hsv_rgb(hue + rng.uniform(-spread, spread), rng.uniform(s0, s1), rng.uniform(v0, v1))


def _light_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    # Low saturation and high value: tinted whites and light greys, never one of the six.
    return hsv_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.12), rng.uniform(0.84, 1.0))


def _any_background(rng: np.random.Generator) -> tuple[int, int, int]:
    # Any grey from black to white, or a tint of it: saturation stays far below the
    # six colours' (0.5 and more), so a shape never melts into its background.
    return hsv_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.25) if rng.random() < 0.5 else 0.0,
                   rng.uniform(0.0, 1.0))


def _canvas(rng: np.random.Generator) -> tuple[int, int]:
    (lo, hi), _ = _ASPECTS[int(rng.choice(len(_ASPECTS), p=[p for _, p in _ASPECTS]))]
    ratio = rng.uniform(lo, hi)
    long = int(rng.integers(MIN_LONG, MAX_SIDE + 1))
    short = max(MIN_SIDE, round(long / ratio))
    return (long, short) if rng.random() < 0.5 else (short, long)


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene of 1 to 3 non-overlapping shapes, on any background and canvas."""
    width, height = _canvas(rng)
    side = min(width, height)
    layout = "close" if rng.random() < 0.25 else "spread"
    n = int(rng.integers(1, 4))
    if layout == "close" and n == 1:
        n = int(rng.integers(2, 4))
    shapes: list[Shape] = []
    floor = max(4.0, 0.8 * MIN_RADIUS * max(width, height))
    for _ in range(n):
        kind = str(rng.choice(KINDS))
        colour = str(rng.choice(COLOURS))
        # at least 5% of the longer side: still 3 px once the picture is letterboxed to 64
        radius = min(max(5.0, MIN_RADIUS * max(width, height), side * rng.uniform(0.07, 0.3)),
                     side / 2 - 2)
        spot, mode = None, layout
        while spot is None:
            spot = _place(rng, width, height, radius, shapes, side, mode)
            radius = max(floor, radius * 0.85) if spot is None else radius
            if spot is None and radius <= floor:
                mode = "spread"  # no room next to the others: anywhere will do
        style = str(rng.choice(["filled", "filled", "outlined", "hollow"], p=[0.3, 0.3, 0.3, 0.1]))
        if style == "hollow":
            line_width = int(max(2, round(radius * rng.uniform(0.2, 0.35))))
        elif style == "outlined":
            line_width = int(rng.integers(1, max(2, round(radius / 5)) + 1))
        else:
            line_width = 0
        grey = int(rng.choice(_LINE_GREYS))
        if kind == "square":
            rotation = rng.uniform(-20, 20) if rng.random() < 0.5 else 0.0
        elif kind == "triangle":
            rotation = rng.uniform(0, 360) if rng.random() < 0.5 else 0.0
        else:
            rotation = 0.0
        shapes.append(Shape(kind, colour, sample_colour(rng, colour), spot[0], spot[1],
                            radius, float(rotation), style, line_width, (grey, grey, grey)))
    background = _light_colour if rng.random() < 0.5 else _any_background
    texture = str(rng.choice(["plain", "gradient", "noise"], p=[0.45, 0.35, 0.2]))
    noise = float(rng.uniform(1.5, 4.0) if rng.random() < 0.4 else rng.uniform(4.0, 20.0))
    # Noise makes a PNG ten times larger; as a JPEG it costs little.
    jpeg_share = 0.7 if texture == "noise" else 0.2
    jpeg = int(rng.integers(30, 91)) if rng.random() < jpeg_share else 0
    return Scene(width=width, height=height, background=background(rng), texture=texture,
                 background2=background(rng), noise=round(noise, 2),
                 texture_seed=int(rng.integers(0, 2**31)),
                 supersample=int(rng.choice([1, 2, 4])), shapes=tuple(shapes), layout=layout,
                 colour_noise=bool(rng.random() < 0.3), jpeg=jpeg)


def _place(rng: np.random.Generator, width: int, height: int, radius: float,
           others: list[Shape], side: int, layout: str = "spread",
           ) -> tuple[float, float] | None:
    margin = radius + 1
    if 2 * margin >= min(width, height):
        return None
    if layout == "close" and others:
        # next to one shape already placed: touching, or up to 2% of the width apart
        for _ in range(60):
            near = others[int(rng.integers(len(others)))]
            gap = rng.uniform(0.0, CLOSE_GAP * width)
            angle = rng.uniform(0, 2 * math.pi)
            d = radius + near.radius + gap
            x, y = near.cx + d * math.cos(angle), near.cy + d * math.sin(angle)
            if not (margin <= x <= width - margin and margin <= y <= height - margin):
                continue
            if all(math.hypot(x - o.cx, y - o.cy) >= radius + o.radius + min(gap, 0.0)
                   for o in others if o is not near):
                return (x, y)
        return None
    gap = max(2.0, 0.04 * side)
    for _ in range(60):
        x = rng.uniform(margin, width - margin)
        y = rng.uniform(margin, height - margin)
        if all(math.hypot(x - o.cx, y - o.cy) >= radius + o.radius + gap for o in others):
            return (x, y)
    return None


def render(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB image of ``scene.width`` x ``scene.height`` pixels."""
    k = scene.supersample
    w, h = scene.width * k, scene.height * k
    if scene.texture == "gradient":
        t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
        a = np.asarray(scene.background, np.float32)
        b = np.asarray(scene.background2, np.float32)
        rows = a * (1 - t) + b * t
        image = Image.fromarray(np.repeat(rows, w, axis=1).round().astype(np.uint8), "RGB")
    else:
        image = Image.new("RGB", (w, h), scene.background)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        fill = None if s.style == "hollow" else s.rgb
        line = s.rgb if s.style == "hollow" else s.line_rgb
        width = s.line_width * k
        if s.kind == "circle":
            r = s.radius * k
            box = (s.cx * k - r, s.cy * k - r, s.cx * k + r, s.cy * k + r)
            draw.ellipse(box, fill=fill, outline=line if width else None, width=width)
        else:
            draw.polygon(s.points(k), fill=fill, outline=line if width else None, width=width)
    if k > 1:
        image = image.resize((scene.width, scene.height), Image.Resampling.BOX)
    if scene.texture == "noise":
        noise = np.random.default_rng(scene.texture_seed).normal(
            0.0, scene.noise, (scene.height, scene.width, 3 if scene.colour_noise else 1))
        pixels = np.asarray(image, np.float32) + noise
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
    return image


# -- questions -------------------------------------------------------------------------


def askable(scene: Scene) -> list[Question]:
    """Every question about the scene that has exactly one right answer."""
    out = [Question("count", answer=NUMBERS[len(scene.shapes)])]
    kinds = [s.kind for s in scene.shapes]
    colours = [s.colour for s in scene.shapes]
    for s in scene.shapes:
        unique_kind = kinds.count(s.kind) == 1
        unique_colour = colours.count(s.colour) == 1
        if unique_kind:
            out.append(Question("colour", s.kind, answer=s.colour))
        if unique_colour:
            out.append(Question("shape", s.colour, answer=s.kind))
        for by_colour, unique in ((False, unique_kind), (True, unique_colour)):
            if not unique:
                continue
            target = s.colour if by_colour else s.kind
            for axis, direction in (("where", scene.where(s)), ("x", scene.horizontal(s)),
                                    ("y", scene.vertical(s))):
                if direction:
                    out.append(Question("position", target, by_colour, axis, direction))
    return out


def _referent(q: Question) -> str:
    return f"{q.target} one" if q.by_colour else q.target


def answer_sentence(q: Question) -> str:
    """The one canonical answer to a question."""
    if q.type == "colour":
        return f"the {q.target} is {q.answer}"
    if q.type == "shape":
        return f"the {q.target} one is a {q.answer}"
    if q.type == "count":
        return "there is one shape" if q.answer == "one" else f"there are {q.answer} shapes"
    if q.type == "position":
        where = "on the" if q.answer in ("left", "right") else "at the"
        return f"the {_referent(q)} is {where} {q.answer}"
    raise ValueError(f"unknown question type {q.type!r}")


_ASK = {
    "colour": ("what colour is the {t}?", "what color is the {t}?", "which colour is the {t}?",
               "what is the colour of the {t}?", "tell me the colour of the {t}.",
               "the {t}: what colour is it?"),
    "shape": ("what shape is the {t} one?", "which shape is {t}?", "what is the {t} shape?",
              "what kind of shape is the {t} one?", "name the {t} shape.",
              "the {t} one: what shape is it?"),
    "count": ("how many shapes are there?", "how many shapes do you see?",
              "how many shapes are in the picture?", "count the shapes.",
              "how many shapes are in this image?"),
    "where": ("where is the {t}?", "where is the {t} in the picture?",
              "in which part of the image is the {t}?", "where can you see the {t}?"),
    "x": ("is the {t} on the left or on the right?", "is the {t} on the left or the right side?",
          "is the {t} to the left or to the right?"),
    "y": ("is the {t} at the top or at the bottom?", "is the {t} near the top or the bottom?",
          "is the {t} in the top half or the bottom half?"),
}
_FOLLOW = {
    "colour": ("and what colour was the {t}?", "what about the {t}? what colour is it?",
               "and the {t}, what colour is that?", "and what color was the {t}?"),
    "shape": ("and what shape was the {t} one?", "and the {t} one, what shape is it?",
              "what about the {t} one? what shape is it?"),
    "count": ("and how many shapes were there?", "how many shapes were in that picture?",
              "and how many shapes did it have?"),
    "where": ("and where was the {t}?", "and where was the {t} in that picture?",
              "what about the {t}? where is it?"),
    "x": ("and was the {t} on the left or the right?",
          "what about the {t}, left or right?"),
    "y": ("and was the {t} at the top or the bottom?",
          "what about the {t}, top or bottom?"),
}


def phrase(q: Question, rng: np.random.Generator, *, followup: bool = False) -> str:
    """One of several wordings of the question, lower-case."""
    table = _FOLLOW if followup else _ASK
    templates = table[q.axis if q.type == "position" else q.type]
    target = f"{q.target} shape" if q.by_colour and q.type == "position" else q.target
    return str(rng.choice(templates)).format(t=target)


def spoken(text: str) -> str:
    """What is read aloud for a written question: the words, without final punctuation."""
    return text.rstrip("?.!").replace(":", ",")
