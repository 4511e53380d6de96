"""A second scene renderer, written apart from the demo generator.

It draws with other conventions: a fixed 120 px canvas, thick outlines, shapes placed
on a 3x3 grid, axis-aligned triangles, flat grey-blue backgrounds. The colours are the
named colours of the demo world (docs/data.md), picked from the middle of each range.
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
