"""Batch-1 greedy decode speed of the default-size and the bundled model, against a
naive baseline.

The baseline is what one would write first: ``nn.Embedding`` + ``nn.LSTM`` (``nn.GRU``
when ``[model] rnn = "gru"``) + ``nn.Linear`` at the same sizes, fed ``(1, 1)``
tensors under ``torch.no_grad()`` with default torch settings (oneDNN on), taking the
argmax; it is timed again with oneDNN off. mmchat's paths decode through
``start_turn`` and ``TurnRun.next_token`` with a memory of one image and a 2 s voice
clip: the reference step (the model's modules), the reference step on
``model.quantize = "dynamic-int8"``, and the fused fast step in fp32 (a token per call,
as the engine's batched scheduler calls it, and several greedy tokens per call, as
``TurnRun`` runs a greedy reply), fp16 and int8. Every reply runs its full length: the
end-of-reply logit is pushed down by 1e4 and the loop guard is off (speed does not
depend on the weights; the replies are still compared with the reference's). Every
row's speed-up is against the baselines timed in the same run; rounds interleave the
variants so load from other jobs hits all of them alike.

    python -m bench decode            python -m bench.bench_decode --threads 2
    python -m bench.bench_decode --baseline 5a4ea39 --rounds 6

With ``--baseline`` the bundled model's fast step (fp32, fp16, int8; several greedy
tokens per call) is timed with the given revision's ``mmchat`` (a ``git worktree``) and
with the current code's, in fresh processes that alternate round after round on this
checkout's weights (:mod:`bench.decode_probe`); the table gives each round's ratio and
whether the two greedy replies are the same tokens.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench import (
    ROOT,
    default_model,
    load_config,
    load_plugins,
    machine_notes,
    percentile,
    run_probe,
    table,
)

PROMPT = "what colour is the circle on the left?"


def naive_decoder(model) -> Callable[[int], list[int]]:
    """The baseline: plain modules at the model's sizes, a (1, 1) tensor per token."""
    c = model.config
    torch.manual_seed(0)
    emb = nn.Embedding(c.vocab_size, c.n_embd)
    rnn_cls = nn.LSTM if c.rnn == "lstm" else nn.GRU
    rnn = rnn_cls(c.n_embd, c.n_hidden, num_layers=c.n_layer, batch_first=True)
    head = nn.Linear(c.n_hidden, c.vocab_size)
    for m in (emb, rnn, head):
        m.eval()

    def decode(n: int) -> list[int]:
        out = []
        with torch.no_grad():
            token, state = torch.tensor([[4]]), None
            for _ in range(n):
                h, state = rnn(emb(token), state)  # (1, 1, H)
                token = head(h[:, -1]).argmax(-1, keepdim=True)  # (1, 1)
                out.append(int(token))
        return out

    return decode


def bench_memory(model, modalities):
    """Memory entries for one image and a 2 s voice clip, from the model's own encoders."""
    from mmchat.state import MemoryEntry

    g = torch.Generator().manual_seed(0)
    entries = []
    with torch.inference_mode():
        if "image" in model.kind_index:
            size = modalities["image"].size
            x = torch.randn(1, 3, size, size, generator=g)
            entries.append(MemoryEntry("image", model.encode("image", x, torch.tensor([1]))[0]))
        if "voice" in model.kind_index:
            x = torch.randn(1, modalities["voice"].n_mels, 201, generator=g)
            entries.append(MemoryEntry("voice", model.encode("voice", x, torch.tensor([201]))[0]))
    return entries


class TokenAtATime:
    """A decoder without ``greedy``: ``TurnRun`` then calls ``step`` once per token."""

    def __init__(self, decoder) -> None:
        self.decoder = decoder

    def __getattr__(self, name: str) -> Any:
        if name == "greedy":
            raise AttributeError(name)
        return getattr(self.decoder, name)


def without_end(model, eos_id: int):
    """A copy of ``model`` whose end-of-reply logit is 1e4 lower: replies run their
    full length, at the same cost per token."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.bias[eos_id] -= 1e4
    return model


def mmchat_decoder(model, tokenizer, memory, decoder) -> Callable[[int], list[int]]:
    from mmchat.generate import GenerationParams
    from mmchat.runtime import start_turn

    def decode(n: int) -> list[int]:
        params = GenerationParams(max_new_tokens=n, loop_ngram=0)
        run = start_turn(model, tokenizer, fresh_state(model, tokenizer), memory, PROMPT, params,
                         decoder=decoder)
        while run.next_token() is not None:
            pass
        return run.tokens

    return decode


def fresh_state(model, tokenizer):
    """A new session's state, built here because ``DialogueLM.initial_state`` reads
    ``lm_head.weight``, which a dynamically quantized model no longer has."""
    from mmchat.state import SessionState

    c = model.config
    rnn = torch.zeros(2 if c.rnn == "lstm" else 1, c.n_layer, 1, c.n_hidden)
    return SessionState(rnn=rnn, pending=[tokenizer.bos_id])


def timed(decode: Callable[[int], list[int]], n: int) -> tuple[float, int]:
    """Seconds per token for one greedy reply of up to ``n`` tokens (prefill excluded
    for mmchat paths by timing a 1-token reply too and subtracting it)."""
    t0 = time.perf_counter()
    tokens = decode(n)
    t1 = time.perf_counter()
    decode(1)
    t2 = time.perf_counter()
    return ((t1 - t0) - (t2 - t1)) / max(len(tokens) - 1, 1), len(tokens)


def agreement(model, tokenizer, memory, reference: list[int], precision: str
              ) -> tuple[float, float]:
    """Teacher-forced on the fp32 greedy reply: top-1 agreement of ``precision`` with fp32,
    and the relative change of the reply's mean negative log-likelihood."""
    from mmchat.fastpath import FastDecoder
    from mmchat.generate import GenerationParams
    from mmchat.runtime import start_turn

    fp32, int8 = FastDecoder(model), FastDecoder(model, precision=precision)
    run = start_turn(model, tokenizer, fresh_state(model, tokenizer), memory, PROMPT,
                     GenerationParams(loop_ngram=0), decoder=fp32)
    mem8 = int8.prepare(run.memory, run.generation.sampler.weights)
    same, nll32, nll8 = 0, 0.0, 0.0
    state32 = state8 = run.prompt_state
    logits32 = logits8 = run.prompt_logits
    with torch.inference_mode():
        for token in reference:
            same += int(logits32.argmax()) == int(logits8.argmax())
            nll32 -= float(logits32.log_softmax(-1)[0, token])
            nll8 -= float(logits8.log_softmax(-1)[0, token])
            t = torch.tensor([token])
            logits32, _, state32 = fp32.step(t, state32, run.step_memory)
            logits8, _, state8 = int8.step(t, state8, mem8)
    return same / len(reference), abs(nll8 - nll32) / nll32


def run(quick: bool = False, threads: int = 1) -> str:
    """Time the ``[model]`` default size (untrained: speed does not depend on the
    weights), then the configured checkpoint when there is one."""
    torch.set_num_threads(threads)
    config = load_config()
    modalities = load_plugins(config).modalities
    parts = [run_model(*default_model(config, modalities, checkpoint_first=False),
                       modalities, quick, threads, "## Decode, batch 1")]
    model, tokenizer, source = default_model(config, modalities)
    if source != "untrained":
        parts.append(run_model(model, tokenizer, source, modalities, quick, threads,
                               "### The same on the configured checkpoint"))
    return "\n".join(parts)


def run_model(model, tokenizer, source: str, modalities, quick: bool, threads: int,
              title: str) -> str:
    from mmchat.fastpath import FastDecoder
    from mmchat.generate import GenerationParams
    from mmchat.loading import quantize
    from mmchat.runtime import ReferenceDecoder, start_turn

    notes = machine_notes(threads)
    model = without_end(model, tokenizer.eos_id)
    memory = bench_memory(model, modalities)
    qmodel = quantize(model)
    n_tokens, rounds = (32, 3) if quick else (128, 7)
    naive = naive_decoder(model)
    variants: dict[str, Callable[[int], list[int]]] = {
        "naive nn.LSTM loop (baseline)": naive,
        "naive, oneDNN off": naive,
        "mmchat reference step": mmchat_decoder(model, tokenizer, memory,
                                                ReferenceDecoder(model)),
        'reference step, model.quantize = "dynamic-int8"': mmchat_decoder(
            qmodel, tokenizer, memory, ReferenceDecoder(qmodel)),
        "mmchat fast step, fp32, a token per call": mmchat_decoder(
            model, tokenizer, memory, TokenAtATime(FastDecoder(model))),
        "mmchat fast step, fp32": mmchat_decoder(model, tokenizer, memory, FastDecoder(model)),
        "mmchat fast step, fp16": mmchat_decoder(model, tokenizer, memory,
                                                 FastDecoder(model, precision="fp16")),
        "mmchat fast step, int8": mmchat_decoder(model, tokenizer, memory,
                                                 FastDecoder(model, precision="int8")),
    }
    if model.config.rnn == "gru":
        variants = {k.replace("nn.LSTM", "nn.GRU"): v for k, v in variants.items()}
    names = list(variants)
    per_token: dict[str, list[float]] = {k: [] for k in names}
    replies = {k: variants[k](n_tokens) for k in names}  # warm-up, and greedy replies
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            with torch.backends.mkldnn.flags(enabled="oneDNN off" not in name):
                seconds, _ = timed(variants[name], n_tokens)
            per_token[name].append(seconds)

    base = percentile(per_token[names[0]], 50)
    off = percentile(per_token[names[1]], 50)
    reference = replies["mmchat reference step"]
    rows = []
    for name in names:
        p50, p90 = percentile(per_token[name], 50), percentile(per_token[name], 90)
        if name.startswith("naive"):
            same = "-"
        else:
            agree = sum(a == b for a, b in zip(replies[name], reference)) / len(reference)
            same = "identical" if replies[name] == reference else f"{agree:.0%} of tokens"
        rows.append([name, f"{p50 * 1e3:.3f}", f"{p90 * 1e3:.3f}", f"{1 / p50:,.0f}",
                     f"{base / p50:.2f}x", f"{off / p50:.2f}x", same])
    agree = [(p, *agreement(model, tokenizer, memory, reference, p)) for p in ("fp16", "int8")]
    c = model.config
    n_memory = start_turn(model, tokenizer, fresh_state(model, tokenizer), memory, PROMPT,
                          GenerationParams()).memory_size
    fast = percentile(per_token["mmchat fast step, fp32"], 50)
    out = [
        title,
        "",
        f"Command: `python -m bench {'--quick ' if quick else ''}decode`" if threads == 1 else
        f"Command: `python -m bench.bench_decode {'--quick ' if quick else ''}--threads {threads}`",
        "",
        f"Machine: {notes}.",
        "",
        f"Model ({source}): {c.rnn} {c.n_layer}x{c.n_hidden}, embedding {c.n_embd}, "
        f"vocab {c.vocab_size}, d_model {c.d_model}, fusion {c.fusion}, memory of "
        f"{n_memory} slots (an image and a 2 s voice clip). {rounds} interleaved rounds of "
        f"a {n_tokens}-token greedy reply; per-token time excludes the prefill.",
        "",
        table(["path", "ms/token p50", "ms/token p90", "tokens/s", "vs baseline",
               "vs oneDNN off", "greedy reply vs reference"], rows),
        "",
        f"Fast step, fp32: {base / fast:.2f}x the baseline (target >= 3x at the bundled "
        f"size), {off / fast:.2f}x the baseline with oneDNN off (target >= 1.5x).",
        "",
        "Reduced precision against fp32, teacher-forced on the fp32 greedy reply: "
        + "; ".join(f"{p} top-1 agreement {top1:.1%}, mean NLL of the reply changed by "
                    f"{nll:.2%}" for p, top1, nll in agree) + ".",
        "",
    ]
    return "\n".join(out)


def compare(baseline: str, rounds: int, reps: int) -> str:
    """The bundled model's fast step at ``baseline`` against now, alternating processes."""
    from bench.compare_server import checkouts
    from bench.decode_probe import PRECISIONS

    bundled = ROOT / "mmchat" / "bundled_model"
    rows = []
    with checkouts([baseline]) as (path,):
        for r in range(rounds):
            order = (path, ROOT) if r % 2 == 0 else (ROOT, path)
            result = {p: run_probe("decode_probe.py", p, reps, bundled) for p in order}
            old, new = result[path], result[ROOT]
            for k in PRECISIONS:
                rows.append([r + 1, k, f"{old[k]['ms']:.4f}", f"{new[k]['ms']:.4f}",
                             f"{old[k]['ms'] / new[k]['ms']:.2f}x",
                             "yes" if old[k]["checksum"] == new[k]["checksum"] else "NO"])
    return "\n".join([
        f"Command: `python -m bench.bench_decode --baseline {baseline} --rounds {rounds} "
        f"--reps {reps}`", "", f"Machine: {machine_notes(1)}.", "",
        table(["round", "precision", f"{baseline} ms/token", "now ms/token", "speed-up",
               "same greedy reply"], rows), ""])


def main(quick: bool = False) -> None:
    print(run(quick))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", metavar="REV", help="a git revision to compare with")
    parser.add_argument("--rounds", type=int, default=6, help="with --baseline")
    parser.add_argument("--reps", type=int, default=7, help="with --baseline: replies a round")
    args = parser.parse_args()
    if args.baseline:
        print(compare(args.baseline, args.rounds, args.reps))
    else:
        print(run(args.quick, args.threads))
