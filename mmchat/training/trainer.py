"""The training loop: single process, or DistributedDataParallel under ``torchrun``.

Kept apart from the model (minGPT's trainer is the model): it samples batches, steps
the optimiser, evaluates, stops early and writes resumable checkpoints.

Output folder::

    OUT/last/      resumable checkpoint (model + tokenizer + optimiser state)
    OUT/model/     best checkpoint by validation loss: serve this one
    OUT/metrics.jsonl, OUT/metrics.csv, OUT/tensorboard/ (if tensorboard is installed)

Reproducibility: batch order comes from ``seed`` and the epoch, and dropout is reseeded
from ``seed`` and the step, so training to step 2N equals training to N then resuming.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import checkpoint
from ..config import Config
from ..errors import MMChatError
from ..loading import dialogue_config
from ..modality import Modality
from ..tokenizer import Tokenizer
from .examples import Batch, Example, FeatureCache, collate
from .freeze import freeze_named, hold_frozen
from .init import Base
from .state import dump_optimizer, load_optimizer

logger = logging.getLogger(__name__)

CSV_FIELDS = ["step", "loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"]


@dataclass
class TrainData:
    """Encoded training and validation examples with their decoded media."""

    train: list[Example]
    valid: list[Example]
    cache: FeatureCache
    tokenizer: Tokenizer
    modalities: dict[str, Modality]
    answers: list[str] = field(default_factory=list)  # auxiliary answer classes


@dataclass
class TrainResult:
    step: int
    best_val_loss: float | None
    stopped_early: bool
    out_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)


class Distributed:
    """torchrun's environment: rank, world size, and a process group when world > 1."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def setup(self, device: str) -> str:
        if not self.enabled:
            return device
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        if device.startswith("cuda"):
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        return device

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def teardown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    def __init__(self, config: Config, data: TrainData, out_dir: str | Path, *,
                 resume: bool = False, progress: bool = True,
                 on_eval: Callable[[dict[str, Any]], None] | None = None,
                 init_from: Base | None = None, freeze: bool = False) -> None:
        """``init_from``: a trained model to start from (its tokenizer must be the
        data's), adding the modalities it lacks; ``freeze`` trains only what is new."""
        self.config = config
        self.data = data
        self.out = Path(out_dir)
        self.resume = resume
        self.progress = progress
        self.on_eval = on_eval
        self.dist = Distributed()
        self.device = self.dist.setup(config.model.device)
        t = config.train
        if t.batch_size % self.dist.world:
            raise MMChatError(f"train.batch_size = {t.batch_size} must divide evenly across "
                              f"{self.dist.world} processes")
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)
        dcfg = dialogue_config(config, data.modalities, data.tokenizer.vocab_size)
        dcfg.modalities = sorted(data.modalities)
        dcfg.answers = list(data.answers) if t.aux_weight > 0 else []
        if t.transcript_weight > 0:
            dcfg.heard = sorted({m for e in data.train
                                 for (m, _, _), words in zip(e.media, e.words) if words})
        dcfg.transcripts = bool(dcfg.heard)
        if dcfg.object_slots:
            dcfg.objects_for = sorted({m for e in data.train
                                       for (m, _, _), shown in zip(e.media, e.objects) if shown})
            if not dcfg.objects_for:
                logger.warning("fusion.object_slots = %d, but no training attachment names "
                               "its objects: the model gets no object slots",
                               dcfg.object_slots)
        if init_from is not None:
            if init_from.tokenizer.proto != data.tokenizer.proto:
                raise MMChatError(f"--init-from {init_from.path}: train with its tokenizer")
            lacking = sorted(set(init_from.config.modalities) - set(data.modalities))
            if lacking:
                raise MMChatError(f"--init-from {init_from.path} needs modalities {lacking} "
                                  "in the data's (load_train_data(modality_names=...))")
            dcfg = init_from.grown(dcfg)
        self.model = checkpoint.build_untrained(dcfg, data.modalities)
        if init_from is not None:
            init_from.load_into(self.model, freeze=freeze, parts=t.init_parts)
        elif t.init_parts:
            raise MMChatError("train.init_parts needs a model to start from (--init-from)")
        if t.freeze:
            held = freeze_named(self.model, t.freeze)
            logger.info("train.freeze holds %d weights fixed (%s)", len(held),
                        ", ".join(t.freeze))
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=t.lr,
            weight_decay=t.weight_decay)
        self.ddp = None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.model, find_unused_parameters=True)
        self.step = 0
        self.best_val: float | None = None
        self.bad_evals = 0
        self.history: list[dict[str, Any]] = []

    # -- schedule and batches ----------------------------------------------------------

    def lr_at(self, step: int) -> float:
        t = self.config.train
        if step < t.warmup_steps:
            return t.lr * (step + 1) / t.warmup_steps
        span = max(1, t.steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        floor = t.lr * t.min_lr_ratio
        return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def batch_indices(self, step: int) -> list[int]:
        """This process's share of global batch ``step``: a pure function of seed and step."""
        pool = self.epoch_pool
        n = len(pool)
        size = self.config.train.batch_size
        start = step * size
        out: list[int] = []
        while len(out) < size:
            epoch, offset = divmod(start + len(out), n)
            g = torch.Generator().manual_seed(self.config.train.seed * 7919 + epoch)
            perm = torch.randperm(n, generator=g).tolist()
            out += [pool[i] for i in perm[offset: offset + size - len(out)]]
        return out[self.dist.rank:: self.dist.world]

    @functools.cached_property
    def epoch_pool(self) -> list[int]:
        """The training examples one epoch draws: each repeated by its category's weight.

        A weight of 1.5 puts every example of the category in once and a seeded half of
        them in twice; 0 leaves the category out.
        """
        weights = self.config.train.category_weights
        examples = self.data.train
        if not weights:
            return list(range(len(examples)))
        present = {e.category for e in examples}
        unknown = sorted(set(weights) - present)
        if unknown:
            raise MMChatError(f"train.category_weights names {unknown}, which no training "
                              f"dialogue has; categories: {sorted(present)}")
        g = torch.Generator().manual_seed(self.config.train.seed * 104_729)
        extra = torch.rand(len(examples), generator=g).tolist()
        pool = []
        for i, e in enumerate(examples):
            w = weights.get(e.category, 1.0)
            pool += [i] * (int(w) + (extra[i] < w - int(w)))
        if not pool:
            raise MMChatError("train.category_weights leaves no training dialogue")
        return pool

    def make_batch(self, examples: Sequence[Example],
                   augment: torch.Generator | None = None) -> Batch:
        return collate(examples, self.data.cache, self.data.modalities,
                       self.data.tokenizer.pad_id, augment=augment).to(self.device)

    def augmenter(self, step: int) -> torch.Generator | None:
        """The generator that perturbs batch ``step``'s media (``None`` with augment off)."""
        if not self.config.train.augment:
            return None
        seed = self.config.train.seed * 1_000_033 + step * self.dist.world + self.dist.rank
        return torch.Generator().manual_seed(seed)

    # -- the loop ------------------------------------------------------------------------

    def train_step(self) -> tuple[float, int]:
        """One optimiser step on global batch ``self.step``, then advance the step.

        Returns this process's ``(loss, tokens)``: the batch loss and its token count.
        """
        t = self.config.train
        self.model.train()
        hold_frozen(self.model)
        torch.manual_seed(t.seed * 1_000_003 + self.step * self.dist.world + self.dist.rank)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        batch = self.make_batch([self.data.train[i] for i in self.batch_indices(self.step)],
                                self.augmenter(self.step))
        _, loss = (self.ddp or self.model)(batch.idx, batch.turns, batch.prompt_end,
                                           batch.media, batch.targets, batch.answers,
                                           t.aux_weight, t.transcript_weight,
                                           t.objects_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.step += 1
        return loss.item(), int((batch.turns >= 0).sum())

    def run(self) -> TrainResult:
        t = self.config.train
        last = self.out / "last"
        if self.resume:
            self._restore(last)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not self.resume:
                for name in ("metrics.jsonl", "metrics.csv"):
                    (self.out / name).unlink(missing_ok=True)
        writer = self._tensorboard()
        bar = None
        if self.progress and self.dist.main:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step",
                       dynamic_ncols=True)
        stopped_early = False
        started = time.perf_counter()
        tokens_seen = 0
        try:
            while self.step < t.steps:
                lr = self.lr_at(self.step)
                loss, tokens = self.train_step()
                tokens_seen += tokens * self.dist.world
                elapsed = time.perf_counter() - started
                record = {"step": self.step, "loss": round(loss, 5), "lr": lr,
                          "tokens_per_s": round(tokens_seen / max(elapsed, 1e-9), 1),
                          "elapsed_s": round(elapsed, 2)}
                if self.step % t.eval_every == 0 or self.step == t.steps:
                    record["val_loss"] = round(self.validate(), 5)
                    stopped_early = self._after_eval(record["val_loss"])
                if self.dist.main:
                    self._log(record, writer)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}",
                                        tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                        bar.update(1)
                if self.step % t.checkpoint_every == 0 or self.step == t.steps or stopped_early:
                    self._save(last)
                if stopped_early:
                    logger.info("early stop at step %d: no better validation loss in %d "
                                "evaluations", self.step, t.patience)
                    break
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        if not (self.out / "model").exists() and self.dist.main:
            self._save_model(self.out / "model")
        self.dist.barrier()
        return TrainResult(self.step, self.best_val, stopped_early, self.out, self.history)

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss per answer token over the first ``eval_batches`` validation batches."""
        if not self.data.valid:
            return float("nan")
        self.model.eval()
        t = self.config.train
        total, count = 0.0, 0
        size = max(1, t.batch_size // self.dist.world)
        for i in range(t.eval_batches):
            chunk = self.data.valid[i * size: (i + 1) * size]
            if not chunk:
                break
            batch = self.make_batch(chunk)
            _, loss = self.model(batch.idx, batch.turns, batch.prompt_end, batch.media,
                                 batch.targets)
            n = batch.n_target_tokens
            total += loss.item() * n
            count += n
        if self.dist.enabled:
            sums = torch.tensor([total, count], dtype=torch.float64)
            dist.all_reduce(sums)
            total, count = sums.tolist()
        return total / max(count, 1)

    def _after_eval(self, val: float) -> bool:
        if self.best_val is None or val < self.best_val:
            self.best_val = val
            self.bad_evals = 0
            if self.dist.main:
                self._save_model(self.out / "model")
            return False
        self.bad_evals += 1
        patience = self.config.train.patience
        return patience > 0 and self.bad_evals >= patience

    # -- checkpoints and logs --------------------------------------------------------------

    def _progress(self) -> dict[str, Any]:
        return {"step": self.step, "best_val": self.best_val, "bad_evals": self.bad_evals}

    def _save_model(self, path: Path, files: Mapping[str, bytes] | None = None) -> None:
        checkpoint.save(path, self.model, self.data.tokenizer, self.data.modalities,
                        extra={"train": {"step": self.step, "best_val_loss": self.best_val,
                                         "config": self.config.to_dict()["train"]}},
                        files=files)

    def _save(self, path: Path) -> None:
        if self.dist.main:
            self._save_model(path, files=dump_optimizer(self.optimizer, self._progress()))
        self.dist.barrier()

    def _restore(self, path: Path) -> None:
        if not (path / "trainer.json").exists():
            raise MMChatError(f"cannot resume: {path} holds no resumable checkpoint; "
                              "train without --resume first")
        model, tokenizer, _ = checkpoint.load(path, self.data.modalities)
        if tokenizer.proto != self.data.tokenizer.proto:
            raise MMChatError(f"cannot resume: the tokenizer in {path} differs from this run's")
        self.model.load_state_dict(model.state_dict())
        progress = load_optimizer(self.optimizer, path)
        self.step = progress["step"]
        self.best_val = progress["best_val"]
        self.bad_evals = progress["bad_evals"]
        logger.info("resumed from %s at step %d", path, self.step)

    def _log(self, record: dict[str, Any], writer) -> None:
        self.history.append(record)
        with (self.out / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        csv_path = self.out / "metrics.csv"
        new = not csv_path.exists()
        with csv_path.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(record)
        if writer is not None:
            for key in ("loss", "val_loss", "lr", "tokens_per_s"):
                if key in record:
                    writer.add_scalar(key, record[key], record["step"])
        if "val_loss" in record and self.on_eval is not None:
            self.on_eval(record)

    def _tensorboard(self):
        if not self.dist.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

