"""Object slots (``[fusion] object_slots``): vectors per attachment that each read one
object, trained from the data's ``objects`` and served like the attachment's own."""

import base64
import json
import logging

import pytest
import torch
from toy_plugin import ToyModality

from mmchat import Attachment, Engine, checkpoint
from mmchat.config import from_dict
from mmchat.dataset import check_dataset, read_dataset
from mmchat.model import DialogueConfig, DialogueLM, MediaBatch
from mmchat.objects import object_loss, object_targets
from mmchat.state import loads_entry
from mmchat.training.data import load_train_data
from mmchat.training.trainer import Trainer

V = 40


def slotted_model(slots=3, seed=0):
    torch.manual_seed(seed)
    cfg = DialogueConfig(vocab_size=V, n_layer=1, n_embd=16, n_hidden=24, d_model=16,
                         dropout=0.0, modalities=["toy"], object_slots=slots,
                         objects_for=["toy"])
    return DialogueLM(cfg, {"toy": ToyModality().build_encoder(16)})


def test_each_slot_targets_its_objects_pieces_and_the_rest_say_nothing():
    target = object_targets([[[5, 6, 6], [7]], [[8], [9], [10], [11]]], n_slots=3,
                            vocab_size=V)
    assert target.shape == (2, 3, V + 1)
    assert target[0, 0, 5] == target[0, 0, 6] == 0.5 and target[0, 0].sum() == 1
    assert target[0, 1, 7] == 1 and target[0, 2, V] == 1  # past the last object: nothing
    assert [int(target[1, i].argmax()) for i in range(3)] == [8, 9, 10]  # the 4th is left out


def test_with_any_order_each_slot_is_scored_against_the_object_it_matches_best():
    target = object_targets([[[5], [7]]], n_slots=3, vocab_size=V)  # (1, 3, V + 1)
    logits = torch.full((1, 3, V + 1), -5.0)
    logits[0, 0, 7] = logits[0, 1, V] = logits[0, 2, 5] = 5.0  # objects 2, none, 1
    in_order = object_loss(logits, target)
    matched = object_loss(logits, target, "any")
    best = object_loss(logits[:, [2, 0, 1]], target)  # the slots put in the objects' order
    assert matched.item() == pytest.approx(best.item()) and matched < in_order / 10
    logits.requires_grad_(True)
    object_loss(logits, target, "any").backward()
    assert logits.grad.abs().sum() > 0


def test_the_slots_follow_each_attachments_vectors_and_no_other_modality_gets_them():
    model = slotted_model(slots=3)
    x, lengths = torch.rand(2, 4, 5), torch.tensor([5, 2])
    vectors, mask = model.encode_batch("toy", x, lengths)
    assert vectors.shape == (2, 5 + 3, 16) and mask.tolist()[1] == [1, 1, 0, 0, 0, 1, 1, 1]
    own, _ = model.encoders["toy"](x, lengths)
    assert vectors[:, :5].equal(own)
    assert [v.shape[0] for v in model.encode("toy", x, lengths)] == [8, 5]
    plain = DialogueLM(DialogueConfig(vocab_size=V, n_layer=1, n_embd=16, n_hidden=24,
                                      d_model=16, modalities=["toy"], object_slots=3),
                       {"toy": ToyModality().build_encoder(16)})
    assert plain.objects is None  # no modality named: no slots, no head
    assert plain.encode_batch("toy", x, lengths)[0].shape == (2, 5, 16)


def _toy_batch(g: torch.Generator, n: int = 16):
    """Items of 1 to 3 steps; each step's level picks its word; the objects are the steps'
    words from the lowest level up (an order the encoder must find, as left to right)."""
    counts = torch.randint(1, 4, (n,), generator=g)
    levels = torch.randint(0, 8, (n, 3), generator=g)
    x = torch.zeros(n, 4, 3)
    objects = []
    for i in range(n):
        steps = levels[i, : counts[i]].tolist()
        x[i, 0, : counts[i]] = torch.tensor(steps, dtype=torch.float) / 8
        objects.append([[10 + s] for s in sorted(steps)])
    return x, counts, objects


def test_the_object_loss_trains_each_slot_to_name_its_object():
    model = slotted_model(slots=3)
    idx = torch.randint(6, V, (16, 6), generator=torch.Generator().manual_seed(0))
    turns = torch.zeros(16, 6, dtype=torch.long)
    prompt_end = torch.full((16, 1), 2)
    targets = idx.roll(-1, dims=1)
    g = torch.Generator().manual_seed(1)
    x, counts, objects = _toy_batch(g)
    media = [MediaBatch("toy", x, counts, torch.arange(16), torch.zeros(16, dtype=torch.long),
                        objects=objects)]
    shown, n = model.object_loss(model.encode("toy", x, counts), objects)
    assert n == 16 * 3
    _, with_objects = model(idx, turns, prompt_end, media, targets, objects_weight=0.5)
    _, without = model(idx, turns, prompt_end, media, targets)
    assert with_objects.item() == pytest.approx(without.item() + 0.5 * shown.item() / n,
                                                rel=1e-5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        x, counts, objects = _toy_batch(g, 32)
        loss, n = model.object_loss(model.encode("toy", x, counts), objects)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
    x, counts, objects = _toy_batch(torch.Generator().manual_seed(99), 200)
    with torch.no_grad():
        slots = torch.stack([v[-3:] for v in model.encode("toy", x, counts)])
        said = model.object_head(slots).argmax(dim=-1)  # (200, 3)
    want = object_targets(objects, 3, V).argmax(dim=-1)
    assert (said[:, 0] == want[:, 0]).float().mean() > 0.9  # the lowest level's word
    assert ((said == V) == (want == V)).float().mean() > 0.9  # how many there are
    assert (said == want).float().mean() > 0.6  # 1/40 by chance


def _dataset(folder, with_objects=True):
    folder.mkdir()
    lines = []
    for i in range(12):
        payload = bytes([40 * (i % 4 + 1)] * 4 + [30] * 4)
        att = {"modality": "toy", "mime_type": "application/x-toy",
               "data": base64.b64encode(payload).decode()}
        if with_objects:
            att["objects"] = ["hot thing", "cold thing"][: 1 + i % 2]
        lines.append(json.dumps({"id": f"d{i}", "turns": [
            {"role": "user", "text": "what is it?", "attachments": [att]},
            {"role": "assistant", "text": "a hot thing"}]}))
    (folder / "train.jsonl").write_text("\n".join(lines[:10]) + "\n")
    (folder / "valid.jsonl").write_text("\n".join(lines[10:]) + "\n")
    return folder


TINY = {"n_layer": 1, "n_embd": 16, "n_hidden": 24, "d_model": 16, "vocab_size": 48,
        "dropout": 0.0}
STEPS = {"batch_size": 4, "steps": 2, "eval_every": 2, "eval_batches": 1,
         "checkpoint_every": 2, "warmup_steps": 1, "max_tokens": 64, "threads": 1,
         "augment": False}


def test_the_data_names_objects_per_attachment_and_the_checker_reads_them(tmp_path):
    folder = _dataset(tmp_path / "d")
    [first, second] = [d.turns[0].attachments[0] for d in
                       list(read_dataset(folder / "train.jsonl"))[:2]]
    assert first.objects == ("hot thing",) and second.objects == ("hot thing", "cold thing")
    assert list(check_dataset(folder / "train.jsonl", {"toy"})) == []
    bad = json.loads((folder / "valid.jsonl").read_text().splitlines()[0])
    bad["turns"][0]["attachments"][0]["objects"] = ["fine", ""]
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    [problem] = list(check_dataset(tmp_path / "bad.jsonl", {"toy"}))
    assert "objects" in problem.reason


async def test_a_model_trained_with_object_slots_serves_them_in_the_session(
        tmp_path, toy_host, caplog):
    config = from_dict({"model": TINY, "train": STEPS, "fusion": {"object_slots": 2}}, env={})
    data = load_train_data(_dataset(tmp_path / "d"), toy_host.modalities, vocab_size=48,
                           max_tokens=64)
    Trainer(config, data, tmp_path / "run", progress=False).run()
    meta = checkpoint.read_meta(tmp_path / "run" / "model")
    assert meta["config"]["object_slots"] == 2 and meta["config"]["objects_for"] == ["toy"]
    served = from_dict({"model": {"checkpoint": str(tmp_path / "run" / "model")},
                        "generation": {"max_new_tokens": 3}}, env={})
    async with Engine(served, plugins=toy_host) as engine:
        await engine.reply("s", "what is it?", [Attachment(bytes(range(12)), "application/x-toy")])
        [entry] = (await engine.store.load("s")).memory
        assert loads_entry(entry).vectors.shape == (3 + 2, 16)  # 3 steps, then 2 slots

    plain = load_train_data(_dataset(tmp_path / "p", with_objects=False), toy_host.modalities,
                            vocab_size=48, max_tokens=64)
    with caplog.at_level(logging.WARNING, logger="mmchat.training.trainer"):
        trainer = Trainer(config, plain, tmp_path / "run2", progress=False)
    assert trainer.model.objects is None and "no training attachment names" in caplog.text
