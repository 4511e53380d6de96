"""Training end to end on a mini demo corpus: train, resume, evaluate, serve, DDP."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from mmchat import Attachment, Engine
from mmchat.config import from_dict
from mmchat.errors import MMChatError
from mmchat.plugins import PluginHost
from mmchat.training.data import load_train_data
from mmchat.training.trainer import Trainer

TINY = {"n_layer": 1, "n_embd": 24, "n_hidden": 32, "d_model": 24, "vocab_size": 200,
        "dropout": 0.1}


def tiny_config(**train):
    return from_dict({"model": TINY, "train": {"batch_size": 8, "steps": 6, "eval_every": 3,
                                               "eval_batches": 2, "checkpoint_every": 3,
                                               "warmup_steps": 2, "max_tokens": 96,
                                               "threads": 1, **train}}, env={})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A --small demo corpus, built by our own command."""
    out = tmp_path_factory.mktemp("corpus")
    subprocess.run([sys.executable, "-m", "mmchat", "data", "demo", str(out), "--small"],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def data(corpus):
    host = PluginHost()
    return load_train_data(corpus, host.modalities, vocab_size=TINY["vocab_size"],
                           max_tokens=96)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_lowers_validation_loss_and_writes_checkpoints(data, tmp_path):
    trainer = Trainer(tiny_config(steps=12, eval_every=6, lr=0.01), data, tmp_path,
                      progress=False)
    first = trainer.validate()
    result = trainer.run()
    assert result.step == 12 and result.best_val_loss < first
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "last" / "trainer.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"loss", "lr", "tokens_per_s"} <= set(rows[0]) and "val_loss" in rows[5]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,loss,val_loss,lr,tokens_per_s,elapsed_s"


def test_training_is_seeded_and_reproducible(data, tmp_path):
    a = Trainer(tiny_config(), data, tmp_path / "a", progress=False)
    a.run()
    b = Trainer(tiny_config(), data, tmp_path / "b", progress=False)
    b.run()
    for key, value in weights(a.model).items():
        assert torch.equal(value, b.model.state_dict()[key]), key


def test_resume_continues_exactly(data, tmp_path):
    straight = Trainer(tiny_config(steps=6), data, tmp_path / "straight", progress=False)
    straight.run()
    first = Trainer(tiny_config(steps=6, checkpoint_every=3), data, tmp_path / "split",
                    progress=False)
    first.config = first.config.replace(train={"steps": 3})
    first.run()
    resumed = Trainer(tiny_config(steps=6), data, tmp_path / "split", resume=True,
                      progress=False)
    assert resumed.step == 0
    resumed.run()
    assert resumed.step == 6
    for key, value in weights(straight.model).items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_category_weights_change_how_often_each_category_is_drawn(data, tmp_path):
    plain = Trainer(tiny_config(), data, tmp_path / "plain", progress=False)
    assert plain.epoch_pool == list(range(len(data.train)))
    weighted = Trainer(tiny_config(category_weights={"digit": 2.5, "greeting": 0}), data,
                       tmp_path / "weighted", progress=False)
    counts = Counter(data.train[i].category for i in weighted.epoch_pool)
    before = Counter(e.category for e in data.train)
    assert counts["greeting"] == 0 < before["greeting"]
    assert 2 * before["digit"] < counts["digit"] < 3 * before["digit"]
    assert counts["colour"] == before["colour"]
    drawn = [i for step in range(20) for i in weighted.batch_indices(step)]
    assert all(data.train[i].category != "greeting" for i in drawn)
    again = Trainer(tiny_config(category_weights={"digit": 2.5, "greeting": 0}), data,
                    tmp_path / "again", progress=False)
    assert again.batch_indices(7) == weighted.batch_indices(7)


def test_category_weights_naming_no_category_are_an_error(data, tmp_path):
    trainer = Trainer(tiny_config(category_weights={"digits": 2}), data, tmp_path,
                      progress=False)
    with pytest.raises(MMChatError, match=r"names \['digits'\], which no training dialogue"):
        trainer.run()


def test_resume_without_a_checkpoint_is_a_clear_error(data, tmp_path):
    with pytest.raises(MMChatError, match="no resumable checkpoint"):
        Trainer(tiny_config(), data, tmp_path, resume=True, progress=False).run()


def test_early_stopping(data, tmp_path):
    trainer = Trainer(tiny_config(steps=50, eval_every=1, patience=2, lr=0.0), data,
                      tmp_path, progress=False)
    result = trainer.run()
    assert result.stopped_early and result.step < 50
    vals = [r["val_loss"] for r in result.history]
    # it stopped after exactly `patience` evaluations that did not beat the best
    assert min(vals[:-2]) <= min(vals[-2:]) and min(vals[:-3] or [float("inf")]) > vals[-3]


def run_cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "mmchat", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=cwd)


def model_env():
    return {f"MMCHAT_MODEL__{k.upper()}": str(v) for k, v in TINY.items()} | {
        "MMCHAT_TRAIN__THREADS": "1", "MMCHAT_TRAIN__EVAL_BATCHES": "2",
        "MMCHAT_TRAIN__MAX_TOKENS": "96", "MMCHAT_TRAIN__WARMUP_STEPS": "2"}


def test_train_eval_and_serve_through_the_cli(corpus, tmp_path, image_dir):
    out = tmp_path / "run"
    trained = run_cli("train", str(corpus), "--out", str(out), "--steps", "4",
                      "--batch-size", "8", "--no-progress", env=model_env(), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "mmchat chat --checkpoint" in trained.stdout
    evaluated = run_cli("eval", str(corpus), "--checkpoint", str(out / "model"), "--out",
                        str(tmp_path / "eval"), "--limit", "12", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "| full |" in evaluated.stdout and "| no image |" in evaluated.stdout
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "BLEU-4" in report and "## Exact-answer accuracy by category" in report
    assert (tmp_path / "eval" / "attention.png").stat().st_size > 0
    assert (tmp_path / "eval" / "training_curves.png").stat().st_size > 0
    assert "## Calibration" in report and "Expected calibration error" in report
    assert "## Fallback" in report and "| threshold | fallback rate |" in report
    assert (tmp_path / "eval" / "calibration.png").stat().st_size > 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["full"]
    assert 0.0 <= results["calibration"]["ece"] <= 1.0
    assert set(results["fallback_rate"]) == set(results["categories"])
    turns = [json.loads(line) for line in (tmp_path / "eval" / "turns.jsonl").open()]
    full = [t for t in turns if t["run"] == "full"]
    assert full and {t["category"] for t in full} == set(results["categories"])
    assert sum(t["exact"] for t in full) / len(full) == pytest.approx(
        results["summary"]["exact"])

    config = from_dict({"model": {"checkpoint": str(out / "model")}}, env={})

    async def ask():
        async with Engine(config) as engine:
            reply = await engine.reply("s", "what colour is the circle?",
                                       [Attachment.from_path(image_dir / "circle.png")])
            return engine.model_description, reply

    import asyncio

    description, reply = asyncio.run(ask())
    assert str(out / "model") in description
    assert reply.finish_reason in ("stop", "length", "loop") and reply.prompt_tokens > 3


def test_bad_data_is_reported_before_training(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"id": "x", "turns": [\n')
    out = run_cli("train", str(tmp_path), "--out", str(tmp_path / "run"), "--no-progress")
    assert out.returncode != 0 and "train.jsonl:1: invalid JSON" in out.stderr


def test_ddp_with_two_cpu_processes(corpus, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "mmchat", "train", str(corpus), "--out", str(out),
           "--steps", "3", "--batch-size", "8", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **model_env(), "OMP_NUM_THREADS": "1"},
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stderr
    assert (out / "model" / "model.safetensors").is_file()
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3
