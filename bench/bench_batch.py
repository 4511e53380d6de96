"""Batched decoding: the batch-64 decode step against the machine's matmul peak, and
the aggregate throughput of N concurrent sessions through the real Engine.

First (:mod:`bench.batch_step`), one batch-64 decode step at the ``[model]`` default
size and the bundled model's, timed against a plain batch-64 ``nn.LSTM`` loop and
against the machine's fp32 and int8 matmul peak, all measured in the same run.

Then the same N greedy replies are generated twice in each round, on one engine
serving the bundled model: one at a time (each reply awaited before the next starts),
and all at once, when the engine's scheduler decodes them together in one batched step
per token. Throughput is completion tokens over wall time, prefill included.

    python -m bench batch
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench import default_model, load_config, load_plugins, machine_notes, table
from bench.batch_step import run_steps

PROMPTS = ["hello there", "what colour is the circle?", "where is the blue square?",
           "how many shapes are there?", "tell me about the picture", "good morning"]


async def timed_replies(engine, tag: str, n: int, together: bool, max_new_tokens: int
                        ) -> tuple[float, float]:
    """(completion tokens per second, median time to first token in ms) over groups of
    n sessions, repeated until at least 16 replies are timed."""
    replies = []
    t0 = time.perf_counter()
    for group in range(max(1, 16 // n)):
        calls = [(f"{tag}-{group}-{i}", PROMPTS[i % len(PROMPTS)]) for i in range(n)]
        if together:
            replies += await asyncio.gather(*(
                engine.reply(s, text, max_new_tokens=max_new_tokens) for s, text in calls))
        else:
            replies += [await engine.reply(s, text, max_new_tokens=max_new_tokens)
                        for s, text in calls]
    wall = time.perf_counter() - t0
    tokens = sum(r.completion_tokens for r in replies)
    return tokens / wall, statistics.median(r.timings["first_token"] for r in replies)


async def measure(config, plugins, sizes: list[int], rounds: int, max_new_tokens: int
                  ) -> dict[tuple[int, bool], list[tuple[float, float]]]:
    from mmchat import Engine

    results: dict[tuple[int, bool], list[tuple[float, float]]] = {}
    async with Engine(config, plugins=plugins) as engine:
        await timed_replies(engine, "warm", 4, True, 8)
        for r in range(rounds):
            for n in sizes:
                for together in (False, True) if r % 2 == 0 else (True, False):
                    tag = f"r{r}-n{n}-{'b' if together else 's'}"
                    results.setdefault((n, together), []).append(
                        await timed_replies(engine, tag, n, together, max_new_tokens))
    return results


def run(quick: bool = False, threads: int = 1) -> str:
    from mmchat import checkpoint

    base = load_config()
    notes = machine_notes(threads)
    plugins = load_plugins(base)
    modalities = plugins.modalities
    model, tokenizer, source = default_model(base, modalities)
    sizes = [1, 8, 32] if quick else [1, 8, 32, 64]
    rounds, max_new_tokens = (1, 16) if quick else (3, 48)
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint.save(Path(tmp) / "model", model, tokenizer, modalities)
        config = base.replace(model={"checkpoint": str(path), "threads": threads},
                              generation={"strategy": "greedy"})
        results = asyncio.run(measure(config, plugins, sizes, rounds, max_new_tokens))
    rows = []
    for n in sizes:
        one = statistics.median(t for t, _ in results[(n, False)])
        together = statistics.median(t for t, _ in results[(n, True)])
        ttft = statistics.median(f for _, f in results[(n, True)])
        rows.append([n, f"{one:,.0f}", f"{together:,.0f}", f"{together / one:.1f}x",
                     f"{ttft:.0f}"])
    c = model.config
    decoder = "fast (fp32)" if config.model.fast_decode else "reference"
    out = [
        "## Concurrent sessions: batched decoding",
        "",
        f"Command: `python -m bench {'--quick ' if quick else ''}batch`",
        "",
        f"Machine: {notes}.",
        "",
        f"Model ({source}): {c.rnn} {c.n_layer}x{c.n_hidden}, vocab {c.vocab_size}, fusion "
        f"{c.fusion}; {decoder} decode step; text-only turns, greedy, {max_new_tokens} new "
        f"tokens each; median of {rounds} round(s). First token: median over the N "
        f"concurrent replies of the time from the call to its first token.",
        "",
        table(["sessions", "one at a time, tokens/s", "batched, tokens/s", "speed-up",
               "first token when batched, ms"], rows),
        "",
    ]
    return "\n".join(out)


def main(quick: bool = False) -> None:
    print(run_steps(quick))
    print(run(quick))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(run_steps(args.quick, args.threads))
    print(run(args.quick, args.threads))
