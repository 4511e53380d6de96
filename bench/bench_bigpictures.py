"""Costly pictures: decode time and peak memory of 40-megapixel pictures (an RGB PNG, a
palette PNG and a JPEG), the image plugin's path against the path it replaced.

Baseline, measured in the same run: the plugin as it was before big pictures were
reduced right after decoding (JPEG ``draft``, then the whole picture oriented, converted
to RGB and resized). Each (picture, path) runs in a fresh process, so its peak RSS
(``VmHWM``) is its own; the memory column is the peak minus the RSS just before the
first decode.

    python -m bench bigpictures
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import machine_notes, table

WIDTH, HEIGHT = 7745, 5164  # 40.0 megapixels (just under max_pixels), 3:2


def make_picture(kind: str) -> tuple[bytes, str]:
    """A 40-megapixel drawing: shapes on a gradient (``png``, ``jpeg``) or on white with
    a palette (``png-palette``), and its MIME type."""
    from PIL import Image, ImageDraw

    if kind == "png-palette":
        img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    else:
        ramp = Image.linear_gradient("L").resize((WIDTH, HEIGHT))
        img = Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_180),
                                  Image.new("L", (WIDTH, HEIGHT), 128)))
    draw = ImageDraw.Draw(img)
    draw.ellipse((600, 800, 2600, 2800), fill=(220, 30, 30))
    draw.rectangle((3800, 1500, 5600, 3300), fill=(30, 60, 220))
    draw.polygon([(3000, 4200), (3800, 3000), (4600, 4200)], fill=(30, 180, 60))
    out = io.BytesIO()
    if kind == "png-palette":
        img.quantize(16).save(out, "PNG")
    elif kind == "png":
        img.save(out, "PNG")
    else:
        img.save(out, "JPEG", quality=85)
    return out.getvalue(), "image/jpeg" if kind == "jpeg" else "image/png"


def old_decode(data: bytes, size: int) -> object:
    """The plugin's decode before big pictures were reduced after decoding."""
    from mmchat_image.modality import _to_tensor, letterbox
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        ImageOps.exif_transpose(img, in_place=True)
        rgb = img.convert("RGB")
    return _to_tensor(letterbox(rgb, size))


def _status(key: str) -> int:
    """A ``/proc/self/status`` value, in bytes."""
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def child(path: str, mime_type: str, which: str, runs: int) -> dict[str, float]:
    """In a fresh process: decode the picture ``runs`` times; seconds and peak bytes."""
    from mmchat_image import ImageModality

    data = Path(path).read_bytes()
    modality = ImageModality()
    decode = ((lambda: modality.decode(data, mime_type)) if which == "plugin"
              else (lambda: old_decode(data, modality.size)))
    modality.decode(modality.example()[0], "image/png")  # imports
    before = _status("VmRSS")
    seconds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        decode()
        seconds.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(seconds), "peak": _status("VmHWM") - before}


def small_picture() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (96, 96), "blue").save(out, "PNG")
    return out.getvalue()


def crowd(path: str, which: str, runs: int) -> dict[str, float]:
    """In a fresh process: four decodes of the big picture started together (four
    connections), then a small picture, through the engine's decode lanes
    (:class:`~mmchat.isolation.PluginGuard`, ``decode_threads = 2``). The baseline's
    modality calls nothing costly, so all share one first-come queue, as before the
    lanes. Seconds until the small picture is decoded and until all are, and peak bytes.
    """
    import asyncio

    from mmchat_image import ImageModality

    from mmchat import Attachment
    from mmchat.config import PluginsConfig
    from mmchat.isolation import PluginGuard

    big = Attachment(Path(path).read_bytes(), "image/png")
    small = Attachment(small_picture(), "image/png")
    modality = ImageModality()
    if which == "baseline":
        modality.is_costly = lambda data, mime_type: False  # type: ignore[method-assign]

    async def one_round(guard: PluginGuard) -> tuple[float, float]:
        t0 = time.perf_counter()
        bigs = [asyncio.ensure_future(guard.decode(modality, big)) for _ in range(4)]
        await asyncio.sleep(0)  # the four are queued first
        await guard.decode(modality, small)
        t_small = time.perf_counter() - t0
        await asyncio.gather(*bigs)
        return t_small, time.perf_counter() - t0

    async def rounds() -> list[tuple[float, float]]:
        guard = PluginGuard({"image": modality}, {}, 8, PluginsConfig())
        try:
            return [await one_round(guard) for _ in range(runs)]
        finally:
            guard.close()

    modality.decode(small.data, small.mime_type)  # imports
    before = _status("VmRSS")
    results = asyncio.run(rounds())
    return {"small": statistics.median(r[0] for r in results),
            "all": statistics.median(r[1] for r in results),
            "peak": _status("VmHWM") - before}


#: glibc's setting that keeps freed big blocks from staying in a thread's heap (see
#: docs/deploy.md); without it each decode thread keeps the memory of its biggest picture.
MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "4194304"}


def _child(args: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "bench.bench_bigpictures", "--child", *args],
                         check=True, capture_output=True, text=True,
                         env=None if env is None else {**os.environ, **env})
    result: dict[str, float] = json.loads(out.stdout)
    return result


def run(quick: bool = False) -> str:
    notes = machine_notes(1)
    runs = 1 if quick else 3
    kinds = ["png", "png-palette", "jpeg"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            data, mime = make_picture(kind)
            path = Path(tmp) / kind
            path.write_bytes(data)
            base, new = (_child([str(path), mime, which, str(runs)])
                         for which in ("baseline", "plugin"))
            for which, r in (("before (baseline)", base), ("plugin", new)):
                rows.append([f"{kind}, {len(data) // 1024} KiB", which,
                             f"{r['seconds'] * 1000:.0f}", f"{r['peak'] / 2**20:.0f}",
                             f"{base['seconds'] / r['seconds']:.2f}x",
                             f"{base['peak'] / max(r['peak'], 1):.2f}x"])
            if kind == "png":
                crowded = {(which, malloc): _child([str(path), "crowd", which, str(runs)],
                                                   MMAP_THRESHOLD if malloc else None)
                           for malloc in (False, True) for which in ("baseline", "lanes")}
    crowd_rows = []
    base = crowded["baseline", False]
    for (which, malloc), r in crowded.items():
        crowd_rows.append([
            "one first-come queue (baseline)" if which == "baseline" else "costly lane",
            "MALLOC_MMAP_THRESHOLD_=4194304" if malloc else "default",
            f"{r['small'] * 1000:.0f}", f"{r['all'] * 1000:.0f}", f"{r['peak'] / 2**20:.0f}",
            f"{base['small'] / r['small']:.1f}x", f"{base['peak'] / max(r['peak'], 1):.2f}x"])
    out = [
        "## Costly pictures: 40-megapixel decode",
        "",
        f"Command: `python -m bench {'--quick ' if quick else ''}bigpictures`",
        "",
        f"Machine: {notes}.",
        "",
        f"Input: {WIDTH}x{HEIGHT} pictures made with Pillow (shapes on a gradient; the "
        f"palette PNG on white, 16 colours; JPEG quality 85), decoded to the encoder's "
        f"64x64. Median of {runs} decodes in a fresh process per row; peak = the process's "
        f"peak RSS minus its RSS before the first decode.",
        "",
        table(["picture", "path", "decode ms", "peak MiB", "time vs baseline",
               "memory vs baseline"], rows),
        "",
        "Four of the 40-megapixel PNGs (as from four connections) and then a small "
        "picture, decoded together through the engine's decode lanes (`PluginGuard`, "
        "`[plugins] decode_threads = 2`, plugin path). Baseline: every picture cheap, so "
        f"all share one first-come queue, as before the costly lane. Median of {runs} "
        "rounds in a fresh process per row, with glibc's default allocator settings and "
        "with a fixed mmap threshold (docs/deploy.md).",
        "",
        table(["decode queue", "glibc malloc", "small picture ms", "all five ms", "peak MiB",
               "small picture vs baseline", "memory vs baseline"], crowd_rows),
        "",
    ]
    return "\n".join(out)


def main(quick: bool = False) -> None:
    print(run(quick))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=4, metavar=("PATH", "MIME", "WHICH", "RUNS"))
    args = parser.parse_args()
    if args.child:
        path, mime, which, runs = args.child
        result = (crowd(path, which, int(runs)) if mime == "crowd"
                  else child(path, mime, which, int(runs)))
        print(json.dumps(result), flush=True)
        os._exit(0)  # the lanes' daemon threads are not joined (Engine.close would)
    else:
        print(run(args.quick))
