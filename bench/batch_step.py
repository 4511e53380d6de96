"""One batch-64 decode step against a plain batch-64 loop and the machine's matmul peak.

Part of ``python -m bench batch``. For the ``[model]`` default size (untrained weights:
speed does not depend on them) and the bundled model, with 64 rows of either a text
turn's memory or a memory of one picture and a 2 s voice clip per row, it times:

* the plain loop: ``nn.Embedding`` + ``nn.LSTM`` + ``nn.Linear`` + argmax at the same
  sizes on ``(64, 1)`` tokens under ``torch.no_grad()`` (oneDNN on, as torch ships; then
  off), and the same modules through ``quantize_dynamic`` (int8);
* ``FastDecoder.step`` on 64 rows in fp32, fp16 and int8, as the engine's scheduler calls
  it (rows stacked, memories padded to the longest);
* the machine's peak: a 1024^3 fp32 GEMM (``torch.mm``) and the same shape through
  fbgemm's int8 ``linear_dynamic``.

Every variant runs in each round, in a rotating order, so load from other jobs hits all
alike; the table gives medians (the peak: the fastest round). A step's share of the
peak counts the model's own matmul FLOPs (RNN, attention, combine, head; 2 per
multiply-add) over its time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench import default_model, load_config, load_plugins, machine_notes, table

BATCH = 64
PEAK = 1024  # the square GEMM that measures the peak


def step_flops(model, n_memory: int, batch: int = BATCH) -> float:
    """Matmul FLOPs of one fast decode step: layer 0's recurrent matmul (its input
    projection is a table lookup), later layers on [x; h], attention (query, scores,
    context), combine and the head."""
    c = model.config
    gates = 4 if c.rnn == "lstm" else 3
    H, d = c.n_hidden, c.d_model
    macs = H * gates * H + (c.n_layer - 1) * 2 * H * gates * H
    if c.fusion == "attention":
        macs += H * d + 2 * n_memory * d + d * H
    macs += H * H + H * c.vocab_size
    return 2.0 * batch * macs


def plain_flops(model, batch: int = BATCH) -> float:
    """Matmul FLOPs of one step of the plain loop (no memory, no combine)."""
    c = model.config
    gates = 4 if c.rnn == "lstm" else 3
    H = c.n_hidden
    macs = (c.n_embd + H) * gates * H + (c.n_layer - 1) * 2 * H * gates * H
    return 2.0 * batch * (macs + H * c.vocab_size)


def plain_loop(model, int8: bool) -> Callable[[int], None]:
    """``n`` steps of the plain batch-64 loop, feeding back its own argmax."""
    c = model.config
    torch.manual_seed(0)
    emb = nn.Embedding(c.vocab_size, c.n_embd)
    rnn_cls = nn.LSTM if c.rnn == "lstm" else nn.GRU
    rnn: nn.Module = rnn_cls(c.n_embd, c.n_hidden, num_layers=c.n_layer, batch_first=True)
    head: nn.Module = nn.Linear(c.n_hidden, c.vocab_size)
    if int8:
        from torch.ao.quantization import quantize_dynamic

        rnn, head = (quantize_dynamic(nn.Sequential(m), {type(m)}, dtype=torch.qint8)[0]
                     for m in (rnn, head))
    tokens = torch.randint(0, c.vocab_size, (BATCH, 1), generator=torch.Generator().manual_seed(1))

    def steps(n: int) -> None:
        token, state = tokens, None
        with torch.no_grad():
            for _ in range(n):
                h, state = rnn(emb(token), state)  # (B, 1, H)
                token = head(h[:, -1]).argmax(-1, keepdim=True)  # (B, 1)

    return steps


def fast_steps(model, tokenizer, memory, precision: str) -> Callable[[int], None]:
    """``n`` batch-64 ``FastDecoder.step`` calls with ``memory`` in every row."""
    from bench.bench_decode import fresh_state
    from mmchat.fastpath import FastDecoder
    from mmchat.generate import GenerationParams
    from mmchat.runtime import start_turn

    decoder = FastDecoder(model, precision)
    runs = [start_turn(model, tokenizer, fresh_state(model, tokenizer), memory, "hello there",
                       GenerationParams(), decoder=decoder) for _ in range(BATCH)]
    mem = decoder.stack([r.step_memory for r in runs])
    state0 = torch.cat([r.prompt_state for r in runs], dim=2)  # (S, L, B, H)
    tokens = torch.randint(0, model.config.vocab_size, (BATCH,),
                           generator=torch.Generator().manual_seed(1))

    def steps(n: int) -> None:
        state = state0
        with torch.inference_mode():
            for _ in range(n):
                _, _, state = decoder.step(tokens, state, mem)

    return steps


def peak_fp32() -> Callable[[int], None]:
    a, b = torch.randn(PEAK, PEAK), torch.randn(PEAK, PEAK)

    def gemm(n: int) -> None:
        for _ in range(n):
            torch.mm(a, b)

    return gemm


def peak_int8() -> Callable[[int], None]:
    from mmchat.fastpath import pack_int8

    a, packed = torch.randn(PEAK, PEAK), pack_int8(torch.randn(PEAK, PEAK), None)

    def gemm(n: int) -> None:
        for _ in range(n):
            torch.ops.quantized.linear_dynamic(a, packed, True)

    return gemm


def timed_rounds(variants: dict[str, tuple[Callable[[int], None], int]], rounds: int
                 ) -> dict[str, float]:
    """Seconds per call of each variant (``fn(n)`` runs ``n`` calls), rounds interleaved
    in a rotating order; oneDNN off for names that say so. The median round, except for
    the peak GEMMs: their fastest round (a peak is the best the machine did)."""
    for fn, _ in variants.values():
        fn(2)  # warm-up: first-call allocations, TorchScript's profiling runs
    names = list(variants)
    seconds: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, n = variants[name]
            with torch.backends.mkldnn.flags(enabled="oneDNN off" not in name):
                t0 = time.perf_counter()
                fn(n)
                seconds[name].append((time.perf_counter() - t0) / n)
    return {k: min(v) if k.startswith("GEMM") else sorted(v)[len(v) // 2]
            for k, v in seconds.items()}


def size_rows(model, tokenizer, modalities, quick: bool) -> tuple[list[list[Any]], dict]:
    from bench.bench_decode import bench_memory

    n, rounds = (3, 3) if quick else (10, 7)
    picture = bench_memory(model, modalities)
    variants = {
        "GEMM 1024^3, fp32 (peak)": (peak_fp32(), 2),
        "GEMM 1024^3, int8 (peak)": (peak_int8(), 2),
        "plain nn.LSTM loop (baseline)": (plain_loop(model, False), n),
        "plain loop, oneDNN off": (plain_loop(model, False), n),
        "plain loop, int8 (quantize_dynamic)": (plain_loop(model, True), n),
    }
    for label, memory in (("text", []), ("picture + voice", picture)):
        for precision in ("fp32", "fp16", "int8"):
            variants[f"fast step, {precision}, {label}"] = (
                fast_steps(model, tokenizer, memory, precision), n)
    t = timed_rounds(variants, rounds)
    peak = {"fp32": 2 * PEAK ** 3 / t["GEMM 1024^3, fp32 (peak)"],
            "int8": 2 * PEAK ** 3 / t["GEMM 1024^3, int8 (peak)"]}
    base = t["plain nn.LSTM loop (baseline)"]
    n_memory = {"text": memory_slots(model, tokenizer, []),
                "picture + voice": memory_slots(model, tokenizer, picture)}
    rows, summary = [], {"peak": peak}
    for name, seconds in t.items():
        if name.startswith("GEMM"):
            continue
        if name.startswith("plain"):
            flops, kind = plain_flops(model), "int8" if "int8" in name else "fp32"
        else:
            label = name.split(", ", 2)[2]
            flops = step_flops(model, n_memory[label])
            kind = "int8" if "int8" in name else "fp32"
        share = flops / seconds / peak[kind]
        summary[name] = (base / seconds, share)
        rows.append([name, f"{seconds * 1e3:.2f}", f"{base / seconds:.2f}x",
                     f"{flops / seconds / 1e9:.0f}", f"{share:.0%} of {kind}"])
    summary["slots"] = n_memory
    return rows, summary


def memory_slots(model, tokenizer, memory) -> int:
    from bench.bench_decode import fresh_state
    from mmchat.generate import GenerationParams
    from mmchat.runtime import start_turn

    return start_turn(model, tokenizer, fresh_state(model, tokenizer), memory, "hello there",
                      GenerationParams()).memory_size


def run_steps(quick: bool = False, threads: int = 1) -> str:
    torch.set_num_threads(threads)
    config = load_config()
    modalities = load_plugins(config).modalities
    out = ["## Batch-64 decode step against the machine's peak", "",
           f"Command: `python -m bench {'--quick ' if quick else ''}batch`", "",
           f"Machine: {machine_notes(threads)}.", ""]
    sizes = [default_model(config, modalities, checkpoint_first=False),
             default_model(config, modalities)]
    for model, tokenizer, source in sizes:
        c = model.config
        rows, summary = size_rows(model, tokenizer, modalities, quick)
        peak = summary["peak"]
        fp32 = summary["fast step, fp32, text"]
        int8 = summary["fast step, int8, text"]
        out += [
            f"### {c.rnn} {c.n_layer}x{c.n_hidden}, embedding {c.n_embd}, vocab "
            f"{c.vocab_size}, d_model {c.d_model} ({source})", "",
            f"Peak measured in this run: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, int8 "
            f"{peak['int8'] / 1e9:.0f} GOP/s. Memory slots per row: "
            f"{summary['slots']['text']} for a text turn, {summary['slots']['picture + voice']} "
            "with a picture and a 2 s voice clip.", "",
            table(["path (64 rows)", "ms/step p50", "vs baseline", "GFLOP/s",
                   "share of peak"], rows), "",
            f"Text turns: fp32 step {fp32[0]:.2f}x the baseline, {fp32[1]:.0%} of the fp32 "
            f"peak (target >= 2x or >= 60%); int8 step {int8[0]:.2f}x the baseline, "
            f"{int8[1]:.0%} of the int8 peak (target >= 3x or >= 60%).", ""]
    return "\n".join(out)
