"""mmchat's benchmarks: ``python -m bench [--quick] [names...]``.

Each ``bench/bench_<name>.py`` module has ``main(quick: bool = False)``, prints its
results as Markdown tables, and measures every ratio against a baseline timed in
the same run (machines are shared and noisy; absolute numbers drift, ratios less).

The helpers below are shared by the benches: the repository's config, the model at
its default size, machine notes and table formatting.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_config():
    """The repository's ``config.toml`` (its ``[model]`` section is the default size)."""
    from mmchat import config as config_module

    path = ROOT / "config.toml"
    return config_module.load(path if path.exists() else None, env={})


def load_plugins(config):
    from mmchat.plugins import PluginHost

    return PluginHost.from_config(config)


def default_model(config, modalities, *, checkpoint_first: bool = True):
    """``(model, tokenizer, source)``: the configured checkpoint when there is one (and
    ``checkpoint_first``), else an untrained model with the ``[model]`` sizes and
    ``vocab_size`` (the tokenizer is trained on made-up words so it really has that many
    pieces)."""
    import torch

    from mmchat import checkpoint
    from mmchat.loading import checkpoint_path, dialogue_config

    m = config.model
    path = checkpoint_path(config) if checkpoint_first else None
    if path is not None and path.exists():
        model, tokenizer, _ = checkpoint.load(path, modalities)
        source = "the bundled model" if m.checkpoint == "bundled" else m.checkpoint
        return model.eval(), tokenizer, source
    tokenizer = synthetic_tokenizer(m.vocab_size)
    torch.manual_seed(0)
    dcfg = dialogue_config(config, modalities, tokenizer.vocab_size)
    return checkpoint.build_untrained(dcfg, modalities).eval(), tokenizer, "untrained"


def synthetic_tokenizer(vocab_size: int):
    """A tokenizer with ``vocab_size`` pieces, trained on seeded made-up words."""
    from mmchat.tokenizer import Tokenizer

    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
             for _ in range(5 * vocab_size)]
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2 * vocab_size)]
    return Tokenizer.train(texts, vocab_size=vocab_size)


def machine_notes(threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # The vector instructions torch's kernels use; int8 and oneDNN speeds hinge on them.
    cpu += f" ({torch.backends.cpu.get_cpu_capability()})"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{time.strftime('%Y-%m-%d %H:%M')}; {cpu}, {os.cpu_count()} logical CPUs, "
            f"load average {load} at the start; torch {torch.__version__}, "
            f"torch.set_num_threads({threads}); Python {platform.python_version()}")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linearly interpolated."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def write_section(name: str, section: str) -> None:
    """Put ``section`` into docs/benchmarks.md between ``<!-- name:begin -->`` and
    ``<!-- name:end -->``, in place of what was there (at the end the first time)."""
    doc = ROOT / "docs" / "benchmarks.md"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{section}{end}\n"
    text = doc.read_text() if doc.exists() else (
        "# Benchmarks\n\nEach section is written by the benchmark it names "
        "(`python -m bench`, or `make bench`).\n\n")
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    doc.write_text(text)


def run_probe(script: str, path: os.PathLike | str, *args: object) -> dict:
    """Run ``bench/<script>`` (a probe that prints its result as JSON, with the file
    ``mmchat`` came from) in a fresh process whose ``mmchat`` is the one in ``path`` (a
    baseline revision's worktree, or this checkout)."""
    env = {**os.environ, "PYTHONPATH": str(path)}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)],
                          env=env, cwd=path, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result.pop("mmchat").startswith(str(path)):
        raise RuntimeError(f"{script} did not import mmchat from {path}")
    return result


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
