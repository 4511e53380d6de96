"""``mmchat train --init-from``: a trained model learns a new modality; several datasets."""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mmchat import Attachment, Engine, checkpoint
from mmchat.config import from_dict
from mmchat.errors import MMChatError
from mmchat.plugins import PluginHost
from mmchat.tokenizer import Tokenizer
from mmchat.training.data import load_train_data
from mmchat.training.init import Base
from mmchat.training.trainer import Trainer

HERE = Path(__file__).parent

PULSE = '''
from mmchat import hookimpl
from toy_plugin import ToyModality


class Pulse(ToyModality):
    name = "pulse"
    mime_types = ("application/x-pulse",)


@hookimpl
def register_modalities(register):
    register(Pulse())
'''

MODEL = {"n_layer": 1, "n_embd": 16, "n_hidden": 24, "d_model": 16, "vocab_size": 64,
         "dropout": 0.0}
TRAIN = {"batch_size": 4, "steps": 3, "eval_every": 3, "eval_batches": 1,
         "checkpoint_every": 3, "warmup_steps": 1, "max_tokens": 64, "threads": 1,
         "augment": False}


def write_dataset(folder: Path, modality: str, mime: str, *, as_files: bool) -> Path:
    """16 dialogues: an attachment whose bytes say hot or cold, and the answer."""
    (folder / "media").mkdir(parents=True)
    lines = []
    for i in range(16):
        hot = i % 2 == 0
        payload = bytes([200 if hot else 20] * 8)
        if as_files:
            (folder / "media" / f"{i}.bin").write_bytes(payload)
            ref = {"path": f"media/{i}.bin"}
        else:
            ref = {"data": base64.b64encode(payload).decode()}
        word = "hot" if hot else "cold"
        lines.append(json.dumps({"id": f"{modality}-{i}", "category": modality, "turns": [
            {"role": "user", "text": "is it hot or cold?",
             "attachments": [{"modality": modality, "mime_type": mime, **ref}]},
            {"role": "assistant", "text": f"it is {word}", "answer": word}]}))
    (folder / "train.jsonl").write_text("\n".join(lines[:12]) + "\n")
    (folder / "valid.jsonl").write_text("\n".join(lines[12:]) + "\n")
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Plugin folder (toy + pulse), config, a toy dataset, a pulse dataset with media
    files, and a model trained on the toy one."""
    root = tmp_path_factory.mktemp("init")
    (root / "plugins").mkdir()
    (root / "plugins" / "pulse.py").write_text(PULSE)
    (root / "plugins" / "toy.py").write_text((HERE / "toy_plugin.py").read_text())
    (root / "config.toml").write_text(
        '[plugins]\npaths = ["plugins"]\n' + _table("model", MODEL) + _table("train", TRAIN))
    toy_data = write_dataset(root / "toy", "toy", "application/x-toy", as_files=False)
    write_dataset(root / "pulse", "pulse", "application/x-pulse", as_files=True)
    config = from_dict({"model": MODEL, "train": TRAIN}, env={})
    host = PluginHost(paths=[root / "plugins"], entry_points=False)
    data = load_train_data(toy_data, host.modalities, vocab_size=64, max_tokens=64)
    Trainer(config, data, root / "base", progress=False).run()
    return root


def _table(name, values):
    lines = [f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"
             for k, v in values.items()]
    return f"[{name}]\n" + "\n".join(lines) + "\n"


def train(work, *args):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MMCHAT_")},
           "PYTHONPATH": os.pathsep.join(
               [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "mmchat", "train", *args, "--no-progress"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)


def test_init_from_adds_the_new_modality_and_freeze_keeps_the_rest(work):
    out = train(work, "pulse", "--init-from", "base/model", "--freeze", "--out", "frozen")
    assert out.returncode == 0, out.stderr
    base, new = work / "base" / "model", work / "frozen" / "model"
    meta = checkpoint.read_meta(new)
    assert meta["config"]["modalities"] == ["toy", "pulse"]  # old ids kept, new appended
    assert (new / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    old, now = load_file(base / "model.safetensors"), load_file(new / "model.safetensors")
    for name, weight in old.items():
        if name == "kind_emb.weight":
            assert now[name][:2].equal(weight) and now[name].shape[0] == 3
        elif name.startswith("select.score."):  # (2 halves, kinds, 8 places): kinds grow
            assert now[name].view(2, 2, 8, -1)[:, :1].equal(weight.view(2, 1, 8, -1))
        else:
            assert now[name].equal(weight), name  # frozen
    assert any(n.startswith("encoders.pulse.") for n in now)


async def test_the_fine_tuned_model_serves_both_modalities(work):
    assert train(work, "pulse", "--init-from", "base/model", "--out", "tuned").returncode == 0
    old = load_file(work / "base" / "model" / "model.safetensors")
    now = load_file(work / "tuned" / "model" / "model.safetensors")
    assert not now["lm_head.weight"].equal(old["lm_head.weight"])  # not frozen: trained on
    host = PluginHost(paths=[work / "plugins"], entry_points=False)
    c = from_dict({"model": {"checkpoint": str(work / "tuned" / "model")},
                   "generation": {"max_new_tokens": 3}}, env={})
    async with Engine(c, plugins=host) as engine:
        assert set(engine.served_modalities) == {"toy", "pulse"}
        for name in ("toy", "pulse"):
            await engine.reply(name, "is it hot or cold?",
                               [Attachment(b"\xc8" * 8, f"application/x-{name}")])
            [sent] = (await engine.history(name))[0]["attachments"]
            assert sent["modality"] == name


def test_several_datasets_train_together_with_media_relative_to_each(work):
    out = train(work, "toy", "pulse", "--out", "both")
    assert out.returncode == 0, out.stderr
    assert "on 24 dialogues (8 for validation)" in out.stderr
    assert checkpoint.read_meta(work / "both" / "model")["config"]["modalities"] == [
        "pulse", "toy"]


def test_freeze_needs_init_from_and_init_from_refuses_another_tokenizer(work, tmp_path):
    out = train(work, "pulse", "--freeze", "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and "--freeze needs --init-from" in out.stderr
    host = PluginHost(paths=[work / "plugins"], entry_points=False)
    base = Base.load(work / "base" / "model", host.modalities)
    config = from_dict({"model": MODEL, "train": TRAIN}, env={})
    data = load_train_data(work / "pulse", host.modalities, vocab_size=64, max_tokens=64,
                           tokenizer=base.tokenizer)
    with pytest.raises(MMChatError, match=r"needs modalities \['toy'\]"):
        Trainer(config, data, tmp_path, progress=False, init_from=base)
    other = Tokenizer.train(["a different corpus of words entirely"] * 20, vocab_size=40)
    data = load_train_data(work / "pulse", host.modalities, vocab_size=40, max_tokens=64,
                           tokenizer=other, modality_names=["toy"])
    with pytest.raises(MMChatError, match="train with its tokenizer"):
        Trainer(config, data, tmp_path, progress=False, init_from=base)


LEARNS = {**MODEL, "n_embd": 32, "n_hidden": 64, "d_model": 32}
LEVELS = [200, 205, 195, 210, 190, 20, 25, 15, 30, 10]  # near the trained 200 and 20


async def accuracy(checkpoint_dir, host, modality):
    """Share of hot/cold readings answered right, in percent."""
    c = from_dict({"model": {"checkpoint": str(checkpoint_dir)},
                   "generation": {"max_new_tokens": 6}}, env={})
    right = 0
    async with Engine(c, plugins=host) as engine:
        for i, level in enumerate(LEVELS):
            reply = await engine.reply(f"{modality}{i}", "is it hot or cold?",
                                       [Attachment(bytes([level] * 8),
                                                   f"application/x-{modality}")])
            right += ("hot" if level > 128 else "cold") in reply.text
    return 100 * right / len(LEVELS)


async def test_after_fine_tuning_the_new_modality_is_answered_and_the_old_kept(work, tmp_path):
    """End to end, tiny: a model that learned toy readings learns pulse readings from
    them plus toy data, and answers toy ones as well as before (within 2 points)."""
    host = PluginHost(paths=[work / "plugins"], entry_points=False)
    config = from_dict({"model": LEARNS, "train": {**TRAIN, "steps": 300, "eval_every": 300,
                                                    "checkpoint_every": 300, "lr": 0.01}},
                       env={})
    toy = load_train_data(work / "toy", host.modalities, vocab_size=64, max_tokens=64)
    Trainer(config, toy, tmp_path / "base", progress=False).run()
    base = Base.load(tmp_path / "base" / "model", host.modalities)
    both = load_train_data([work / "toy", work / "pulse"], host.modalities, vocab_size=64,
                           max_tokens=64, tokenizer=base.tokenizer,
                           modality_names=base.config.modalities, answers=base.config.answers)
    Trainer(config, both, tmp_path / "tuned", progress=False, init_from=base).run()
    before = await accuracy(tmp_path / "base" / "model", host, "toy")
    assert before >= 90  # the base model did learn its modality
    assert await accuracy(tmp_path / "tuned" / "model", host, "toy") >= before - 2
    assert await accuracy(tmp_path / "tuned" / "model", host, "pulse") >= 90


async def test_the_bundled_model_learns_a_new_modality_as_the_docs_say(work, tmp_path,
                                                                       image_dir):
    """docs/training-a-modality.md's command on the real bundled model (two steps: the
    mechanics, not the accuracy), then the result serves all three modalities."""
    bundled = HERE.parent / "mmchat" / "bundled_model"
    out = train(work, "pulse", "--init-from", str(bundled), "--steps", "2", "--batch-size",
                "4", "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    tuned = tmp_path / "run" / "model"
    meta = checkpoint.read_meta(tuned)
    assert meta["config"]["modalities"] == ["image", "voice", "pulse"]
    old = checkpoint.read_meta(bundled)["config"]["answers"]  # kept, with the new appended
    assert meta["config"]["answers"] == [*old, "cold", "hot"]
    host = PluginHost(paths=[work / "plugins"])
    c = from_dict({"model": {"checkpoint": str(tuned)}, "generation": {"max_new_tokens": 8}},
                  env={})
    async with Engine(c, plugins=host) as engine:
        assert set(engine.served_modalities) == {"image", "voice", "pulse"}
        await engine.reply("p", "is it hot or cold?",
                           [Attachment(bytes([200] * 8), "application/x-pulse")])
        picture = await engine.reply("i", "what colour is the circle?",
                                     [image_dir / "circle.png"])
        assert picture.attention["image"] > 0


def test_a_warm_start_takes_the_runs_memory_settings_and_learns_new_answer_classes(work,
                                                                                   tmp_path):
    """A checkpoint trained without entry tags, carried query, entry selection, summary
    slots or a second read and answer classes hot/cold, warm-started on data whose cold
    answers say "freezing": the new model has the run's memory settings, and "freezing" is
    appended after the checkpoint's classes, whose answer-head rows are kept."""
    host = PluginHost(paths=[work / "plugins"], entry_points=False)
    plain = {"entry_tags": 0, "carry_query": False, "select_entries": False,
             "summaries": False}
    toy = load_train_data(work / "toy", host.modalities, vocab_size=64, max_tokens=64)
    Trainer(from_dict({"model": MODEL, "train": TRAIN, "fusion": plain}, env={}), toy,
            tmp_path / "plain", progress=False).run()
    base = Base.load(tmp_path / "plain" / "model", host.modalities)
    assert (base.config.entry_tags, base.config.answers) == (0, ["cold", "hot"])
    colder = tmp_path / "colder"
    colder.mkdir()
    for split in ("train", "valid"):
        text = (work / "toy" / f"{split}.jsonl").read_text()
        (colder / f"{split}.jsonl").write_text(text.replace(
            '"it is cold", "answer": "cold"', '"it is freezing", "answer": "freezing"'))
    data = load_train_data(colder, host.modalities, vocab_size=64, max_tokens=64,
                           tokenizer=base.tokenizer, modality_names=base.config.modalities,
                           answers=base.config.answers, more_answers=True)
    assert data.answers == ["cold", "hot", "freezing"]
    trainer = Trainer(from_dict({"model": MODEL, "train": TRAIN, "fusion": {"reread": True}},
                                env={}), data, tmp_path / "grown", progress=False,
                      init_from=base)
    c = trainer.model.config
    assert (c.entry_tags, c.carry_query, c.select_entries, c.reread) == (8, True, True, True)
    assert trainer.model.reread is not None
    assert c.summaries  # the run's default, not the checkpoint's
    assert c.answers == ["cold", "hot", "freezing"]
    head = trainer.model.answer_head[2].weight
    assert head.shape[0] == 3 and head[:2].equal(base.state["answer_head.2.weight"])


def test_train_freeze_holds_the_named_parts_of_the_model_it_starts_from(work, tmp_path):
    host = PluginHost(paths=[work / "plugins"], entry_points=False)
    base = Base.load(work / "base" / "model", host.modalities)
    config = from_dict({"model": MODEL, "train": {**TRAIN, "freeze": ["encoders.toy", "rnn"]}},
                       env={})
    data = load_train_data(work / "toy", host.modalities, vocab_size=64, max_tokens=64,
                           tokenizer=base.tokenizer, modality_names=base.config.modalities,
                           answers=base.config.answers, more_answers=True)
    Trainer(config, data, tmp_path, progress=False, init_from=base).run()
    old = load_file(work / "base" / "model" / "model.safetensors")
    now = load_file(tmp_path / "model" / "model.safetensors")
    held = [n for n in old if n.startswith(("encoders.toy.", "rnn."))]
    assert len(held) == 6 and all(now[n].equal(old[n]) for n in held)
    assert not now["lm_head.weight"].equal(old["lm_head.weight"])  # the rest trains
    bad = from_dict({"model": MODEL, "train": {**TRAIN, "freeze": ["encoder.toy"]}}, env={})
    with pytest.raises(MMChatError, match="train.freeze names 'encoder.toy'.*encoders.toy"):
        Trainer(bad, data, tmp_path / "bad", progress=False, init_from=base)


def test_init_parts_loads_only_the_named_parts_and_starts_the_rest_fresh(work, tmp_path):
    host = PluginHost(paths=[work / "plugins"], entry_points=False)
    base = Base.load(work / "base" / "model", host.modalities)
    data = load_train_data(work / "toy", host.modalities, vocab_size=64, max_tokens=64,
                           tokenizer=base.tokenizer, modality_names=base.config.modalities,
                           answers=base.config.answers, more_answers=True)
    train = {**TRAIN, "init_parts": ["encoders.toy"]}
    model = Trainer(from_dict({"model": MODEL, "train": train}, env={}), data,
                    tmp_path / "parts", progress=False, init_from=base).model
    now = model.state_dict()
    loaded = [n for n in base.state if n.startswith("encoders.toy.")]
    assert loaded and all(now[n].equal(base.state[n]) for n in loaded)
    assert not now["lm_head.weight"].equal(base.state["lm_head.weight"])  # fresh
    assert not now["rnn.weight_hh_l0"].equal(base.state["rnn.weight_hh_l0"])
    bad = from_dict({"model": MODEL, "train": {**TRAIN, "init_parts": ["encoder.toy"]}},
                    env={})
    with pytest.raises(MMChatError, match="init_parts names 'encoder.toy'"):
        Trainer(bad, data, tmp_path / "bad", progress=False, init_from=base)
    with pytest.raises(MMChatError, match="needs a model to start from"):
        Trainer(from_dict({"model": MODEL, "train": train}, env={}), data,
                tmp_path / "none", progress=False)
