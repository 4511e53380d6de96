"""Training throughput: tokens per second of ``mmchat train``'s step on this machine.

For the bundled model's configuration (``configs/bundled.toml``) and the default one
(``config.toml``), it times :meth:`Trainer.train_step` (batch assembly with media
augmentation, the forward pass over whole dialogues with their images and voice
clips, backward, clipping and AdamW) on the demo corpus: ``data/demo`` when it has
been built, else a ``--small`` corpus built for the run.

Baseline, timed in the same run and interleaved with it: a plain LSTM language model
of the same sizes (embedding, LSTM, vocabulary head, AdamW) on the same token batches,
with no media, no fusion and no auxiliary losses; its batches are assembled before it
is timed. The ratio is what grounding costs.

    python -m bench train
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench import ROOT, load_plugins, machine_notes, table

CONFIGS = (("bundled", ROOT / "configs" / "bundled.toml"), ("default", ROOT / "config.toml"))


class PlainLM(nn.Module):
    """Embedding -> LSTM -> vocabulary head: the cheapest model that reads the same tokens."""

    def __init__(self, vocab: int, n_embd: int, n_hidden: int, n_layer: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, n_embd)
        self.rnn = nn.LSTM(n_embd, n_hidden, num_layers=n_layer, batch_first=True)
        self.head = nn.Linear(n_hidden, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(idx))  # (B, T, H)
        logits = self.head(h)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


def corpus(tmp: Path) -> tuple[Path, str]:
    built = ROOT / "data" / "demo"
    if (built / "train.jsonl").is_file():
        return built, "data/demo (the default demo corpus)"
    from mmchat_demo import build_demo

    build_demo(tmp / "demo", small=True, progress=False)
    return tmp / "demo", "a --small demo corpus built for this run (data/demo is not built)"


def measure(name: str, path: Path, data_dir: Path, tmp: Path, steps: int,
            rounds: int) -> list[object]:
    from mmchat import config as config_module
    from mmchat.training.data import load_train_data
    from mmchat.training.trainer import Trainer

    config = config_module.load(path, env={})
    host = load_plugins(config)
    data = load_train_data(data_dir, host.modalities, vocab_size=config.model.vocab_size,
                           max_tokens=config.train.max_tokens)
    trainer = Trainer(config, data, tmp / name, progress=False)
    m = config.model
    plain = PlainLM(data.tokenizer.vocab_size, m.n_embd, m.n_hidden, m.n_layer)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=config.train.lr)

    def tokens_of(step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Batch ``step``'s token ids and targets, assembled before the baseline is timed."""
        batch = trainer.make_batch([data.train[i] for i in trainer.batch_indices(step)])
        return batch.idx, batch.targets, int((batch.turns >= 0).sum())

    def plain_step(idx: torch.Tensor, targets: torch.Tensor) -> None:
        loss = plain(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    trainer.train_step()  # warm-up: first-call allocations and kernel choices
    plain_step(*tokens_of(0)[:2])
    ours, base = [], []
    for _ in range(rounds):
        start, tokens = time.perf_counter(), 0
        for _ in range(steps):
            tokens += trainer.train_step()[1]
        ours.append((tokens, time.perf_counter() - start))
        batches = [tokens_of(step) for step in range(trainer.step - steps, trainer.step)]
        start = time.perf_counter()
        for idx, targets, _ in batches:
            plain_step(idx, targets)
        base.append((sum(n for _, _, n in batches), time.perf_counter() - start))
    ours_tps = statistics.median(t / s for t, s in ours)
    base_tps = statistics.median(t / s for t, s in base)
    per_step = statistics.median(s / steps for _, s in ours)
    schedule = config.train.steps
    return [name, f"{m.rnn} {m.n_layer}x{m.n_hidden}, vocab {data.tokenizer.vocab_size}, "
            f"batch {config.train.batch_size}", f"{per_step:.2f}", f"{ours_tps:,.0f}",
            f"{base_tps:,.0f}", f"{ours_tps / base_tps:.2f}",
            f"{schedule:,} steps: {schedule * per_step / 60:.0f} min"]


def main(quick: bool = False) -> None:
    steps, rounds = (2, 1) if quick else (10, 3)
    with tempfile.TemporaryDirectory(prefix="mmchat-bench-train-") as tmp_name:
        tmp = Path(tmp_name)
        data_dir, described = corpus(tmp)
        rows = [measure(name, path, data_dir, tmp, steps, rounds) for name, path in CONFIGS]
    threads = torch.get_num_threads()
    print("## Training throughput (`bench/bench_train.py`)\n")
    print(f"{machine_notes(threads)}. Corpus: {described}. {rounds} interleaved rounds of "
          f"{steps} steps each; medians.\n")
    print(table(["config", "model", "s/step", "tokens/s", "plain LSTM LM tokens/s",
                 "vs plain LM", "its schedule would take"], rows))
    print()
