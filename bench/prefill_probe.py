"""One timing of :mod:`bench.bench_prefill`, runnable as a script so that the ``mmchat``
it times is whichever ``PYTHONPATH`` names (a baseline revision's worktree):

    PYTHONPATH=path/to/worktree python bench/prefill_probe.py REPS [CHECKPOINT]

prints the result as JSON, with the file ``mmchat`` was imported from. It imports
nothing from the ``bench`` package for that reason.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time

PICTURES = (1, 2, 3)
TURNS = 64


def measure(reps: int = 10, checkpoint_dir: str | None = None
            ) -> dict[str, dict[str, float | str]]:
    """Per number of pictures: ms per turn (median over ``reps`` batches) and the
    checksum of the first logits, on ``checkpoint_dir`` (default: the bundled model)."""
    import torch
    from PIL import Image, ImageDraw

    from mmchat import bundled_model_path, checkpoint
    from mmchat.config import from_dict
    from mmchat.fastpath import FastDecoder
    from mmchat.generate import GenerationParams
    from mmchat.plugins import PluginHost
    from mmchat.runtime import TurnRequest, start_turns
    from mmchat.state import MemoryEntry

    torch.set_num_threads(1)
    host = PluginHost.from_config(from_dict({}, env={})).load()
    model, tokenizer, _ = checkpoint.load(checkpoint_dir or bundled_model_path(),
                                          host.modalities)
    decoder = FastDecoder(model)
    image = host.modalities["image"]
    vectors = []
    for colour in ("red", "blue", "green"):
        picture = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(picture).ellipse((10, 10, 50, 50), fill=colour)
        x, lengths = image.collate([_features(image, picture)])
        with torch.inference_mode():
            vectors.append(model.encode("image", x, lengths)[0])
    params = GenerationParams()
    out: dict[str, dict[str, float | str]] = {}
    for k in PICTURES:
        requests = [TurnRequest(None, [MemoryEntry("image", vectors[j].clone(), f"p{j}")
                                       for j in range(k)],
                                "what colour is the circle?", params, 1)
                    for _ in range(TURNS)]
        runs = start_turns(model, tokenizer, requests, decoder)  # warm-up and checksum
        logits = torch.cat([run.prompt_logits for run in runs]).contiguous()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            start_turns(model, tokenizer, requests, decoder)
            times.append((time.perf_counter() - start) / TURNS * 1e3)
        out[str(k)] = {"ms": statistics.median(times),
                       "checksum": hashlib.sha256(logits.numpy().tobytes()).hexdigest()[:12]}
    return out


def _features(image, picture):
    """The image plugin's features of a Pillow picture, as a PNG upload gives them."""
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return image.decode(buffer.getvalue(), "image/png")


if __name__ == "__main__":
    import mmchat

    result = measure(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
    print(json.dumps({"mmchat": mmchat.__file__, **result}))
