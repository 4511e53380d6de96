"""A second scene renderer, written apart from the demo generator.

It draws with other conventions: a fixed 120 px canvas, thick outlines, shapes placed
on a 3x3 grid, axis-aligned triangles, flat grey-blue backgrounds. The colours are the
named colours of the demo world (docs/data.md), picked from the middle of each range.

For corpus v2 it also draws pictures of any size and background (left-to-right
gradients, uniform per-pixel noise, JPEG), shapes in a row a given gap apart, digits
typeset in a font with Pillow's anchor (the demo builder centres a bounding box), and
mixes white noise into speech with the standard library's ``wave``.
"""

from __future__ import annotations

import colorsys
import io

from PIL import Image, ImageDraw

RGB = {name: tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h / 360, s, v))
       for name, (h, s, v) in {"red": (0, 0.9, 0.85), "orange": (28, 0.95, 0.97),
                               "yellow": (54, 0.9, 0.95), "green": (125, 0.8, 0.65),
                               "blue": (222, 0.85, 0.8), "purple": (282, 0.65, 0.62)}.items()}
SIDE = 120
CELLS = {(col, row): ((col + 0.5) * SIDE / 3, (row + 0.5) * SIDE / 3)
         for col in range(3) for row in range(3)}


def draw_scene(shapes: list[tuple[str, str, tuple[int, int]]], *, outline: int = 4,
               background=(214, 220, 228)) -> bytes:
    """``shapes`` are (kind, colour, (col, row)) on a 3x3 grid; returns PNG bytes."""
    img = Image.new("RGB", (SIDE, SIDE), background)
    d = ImageDraw.Draw(img)
    r = SIDE / 7
    for kind, colour, cell in shapes:
        x, y = CELLS[cell]
        box = (x - r, y - r, x + r, y + r)
        if kind == "circle":
            d.ellipse(box, fill=RGB[colour], outline=(20, 20, 20), width=outline)
        elif kind == "square":
            d.rectangle(box, fill=RGB[colour], outline=(20, 20, 20), width=outline)
        else:
            d.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=RGB[colour],
                      outline=(20, 20, 20), width=outline)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# -- corpus v2: pictures as people take them, font digits, noisy speech ------------------


def picture(shapes: list[tuple[str, str, float, float, float]], *, size=(120, 120),
            background=(214, 220, 228), fade_to=None, noise: float = 0.0, seed: int = 0,
            jpeg: int = 0, outline: int = 0) -> tuple[bytes, str]:
    """A picture of any size and background. ``shapes`` are (kind, colour, x, y, r) with
    the centre and half-width as fractions of the width (x, r) and height (y); triangles
    point up, squares are axis-aligned. ``fade_to`` makes a left-to-right gradient,
    ``noise`` adds seeded per-pixel noise of that spread (in grey levels, uniform),
    ``jpeg`` saves a JPEG of that quality. Returns (bytes, MIME type)."""
    import random

    w, h = size
    img = Image.new("RGB", size, background)
    if fade_to is not None:
        px = img.load()
        for x in range(w):
            t = x / max(1, w - 1)
            c = tuple(round(a + (b - a) * t) for a, b in zip(background, fade_to))
            for y in range(h):
                px[x, y] = c
    d = ImageDraw.Draw(img)
    for kind, colour, x, y, r in shapes:
        cx, cy, rad = x * w, y * h, r * w
        box = (cx - rad, cy - rad, cx + rad, cy + rad)
        line = {"outline": (20, 20, 20), "width": outline} if outline else {}
        if kind == "circle":
            d.ellipse(box, fill=RGB[colour], **line)
        elif kind == "square":
            d.rectangle(box, fill=RGB[colour], **line)
        else:
            d.polygon([(cx, cy - rad), (cx + rad, cy + rad), (cx - rad, cy + rad)],
                      fill=RGB[colour], **line)
    if noise:
        rnd = random.Random(seed)
        px = img.load()
        for yy in range(h):
            for xx in range(w):
                jitter = rnd.uniform(-noise, noise)
                px[xx, yy] = tuple(max(0, min(255, round(v + jitter))) for v in px[xx, yy])
    buf = io.BytesIO()
    if jpeg:
        img.save(buf, "JPEG", quality=jpeg)
        return buf.getvalue(), "image/jpeg"
    img.save(buf, "PNG")
    return buf.getvalue(), "image/png"


def in_a_row(kinds_colours: list[tuple[str, str]], *, gap: float = 0.02, size=(160, 120),
             background=(235, 235, 235)) -> bytes:
    """Shapes side by side across the middle, ``gap`` of the width apart (edge to edge)."""
    n = len(kinds_colours)
    r = (0.8 - gap * (n - 1)) / (2 * n)  # half-widths, as a fraction of the width
    x = 0.1 + r
    shapes = []
    for kind, colour in kinds_colours:
        shapes.append((kind, colour, x, 0.5, r))
        x += 2 * r + gap
    return picture(shapes, size=size, background=background)[0]


def font_digit(digit: int, font_path: str, *, side: int = 72, light_on_dark: bool = False,
               points: int | None = None) -> bytes:
    """A digit typeset in a TrueType font, centred on a square page; PNG bytes."""
    from PIL import ImageFont

    ink, paper = (240, 240, 240), (25, 25, 25)
    if not light_on_dark:
        ink, paper = (15, 15, 15), (250, 250, 245)
    img = Image.new("RGB", (side, side), paper)
    d = ImageDraw.Draw(img)
    font = ImageFont.truetype(font_path, points or int(side * 0.7))
    d.text((side / 2, side / 2), str(digit), fill=ink, font=font, anchor="mm")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def noisy_speech(wav_in, wav_out, snr_db: float, seed: int = 0) -> None:
    """Mix white noise into a 16-bit mono WAV at ``snr_db`` (speech power over noise
    power), with Python's ``wave`` module; the mix is scaled down if it would clip."""
    import array
    import math
    import random
    import wave

    with wave.open(str(wav_in), "rb") as f:
        params = f.getparams()
        samples = array.array("h", f.readframes(f.getnframes()))
    power = sum(s * s for s in samples) / max(1, len(samples))
    sigma = math.sqrt(power / (10 ** (snr_db / 10)))
    rnd = random.Random(seed)
    mixed = [s + rnd.gauss(0.0, sigma) for s in samples]
    peak = max(1.0, max(abs(m) for m in mixed) / 32000)
    out = array.array("h", (round(m / peak) for m in mixed))
    with wave.open(str(wav_out), "wb") as f:
        f.setparams(params)
        f.writeframes(out.tobytes())
