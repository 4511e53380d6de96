"""Prefill of picture turns: what the model thread spends to start a batch of turns.

A burst of 64 turns, each asking about the pictures of its session (1, 2 or 3 of them in
its memory), goes through :func:`mmchat.runtime.start_turns` as one batch on the bundled
model with the fast decoder, one thread, as the server's model thread runs it: the
prompt's RNN pass, the memory bank, the entry tags, FiLM and the summaries, the first
token's logits. Reported as milliseconds per turn (the median of the repetitions), and
a checksum of every turn's first logits, which must not change when the code only gets
faster.

    python -m bench prefill
    python -m bench.bench_prefill --baseline 5a4ea39 --rounds 6

With ``--baseline`` the given revision's ``mmchat`` (a ``git worktree``) is timed in its
own process, alternating with the current code's, round after round, and the table gives
each round's ratio; the two processes run one at a time, so both see the same machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

from bench import ROOT, table

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


def _run(path: os.PathLike | str, reps: int) -> dict:
    """:func:`measure` in a fresh process whose ``mmchat`` comes from ``path``, on this
    checkout's bundled model (both revisions run the same weights)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), str(ROOT)])}
    weights = str(ROOT / "mmchat" / "bundled_model")
    code = ("import json, bench.bench_prefill as b; "
            f"print(json.dumps(b.measure({reps}, {weights!r})))")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(baseline: str, rounds: int, reps: int) -> str:
    from bench.compare_server import checkouts

    rows = []
    with checkouts([baseline]) as (path,):
        for r in range(rounds):
            old, new = _run(path, reps), _run(ROOT, reps)
            for k in map(str, PICTURES):
                rows.append([r + 1, k, f"{old[k]['ms']:.3f}", f"{new[k]['ms']:.3f}",
                             f"{old[k]['ms'] / new[k]['ms']:.2f}x",
                             "yes" if old[k]["checksum"] == new[k]["checksum"] else "NO"])
    return table(["round", "pictures per turn", f"{baseline} ms per turn", "now ms per turn",
                  "speed-up", "first logits identical"], rows)


def main(quick: bool = False) -> None:
    result = measure(3 if quick else 10)
    print(table(["pictures per turn", "ms per turn", "first logits checksum"],
                [[k, f"{v['ms']:.3f}", v["checksum"]] for k, v in result.items()]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="REV", help="a git revision to compare with")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    if args.baseline:
        print(compare(args.baseline, args.rounds, args.reps))
    else:
        main()
