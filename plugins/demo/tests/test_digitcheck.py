"""``mmchat data build demo-digits``: every held-out digit image, in seeded renderings."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import mmchat_demo.digitcheck as digitcheck
from mmchat_demo import digits
from PIL import Image


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_held_out_image_in_each_rendering_with_its_label(tmp_path, monkeypatch):
    monkeypatch.setattr(digitcheck, "RENDERINGS", 2)
    paths = digitcheck.build(tmp_path)
    assert set(paths) == {"valid", "test"}
    _, labels = digits.load()
    for split, path in paths.items():
        records = read(path)
        lo, hi = digits.INDEX_RANGES[split]
        assert len(records) == 2 * (hi - lo)
        assert {r["meta"]["style"]["index"] for r in records} == set(range(lo, hi))
        for r in records[:40]:
            user, reply = r["turns"]
            label = int(labels[r["meta"]["style"]["index"]])
            assert r["meta"]["digit"] == label and reply["answer"] == digits.WORDS[label]
            assert reply["category"] == r["category"] == "digit"
            assert reply["text"] == digits.answer_sentence(label)
            assert user["text"] in digits.QUESTIONS
            png = base64.b64decode(user["attachments"][0]["data"])
            assert Image.open(io.BytesIO(png)).size[0] in range(48, 97)
        styles = [json.dumps(r["meta"]["style"]) for r in records]
        assert len(set(styles)) == len(styles)  # two renderings of an image differ


def test_the_first_rendering_is_the_same_for_every_count(tmp_path):
    small = read(digitcheck.build(tmp_path / "small", small=True)["test"])
    assert len(small) == 179 and all(r["id"].endswith("-0") for r in small)
    again = digitcheck._records("test", 0, 3)[0::3]
    assert [r["turns"] for r in again[:20]] == [r["turns"] for r in small[:20]]
    other = digitcheck._records("test", 1, 1)[:20]
    assert [r["meta"]["style"] for r in other] != [r["meta"]["style"] for r in small[:20]]


def test_it_is_a_dataset_of_the_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mmchat", "data", "build", "demo-digits",
                          str(tmp_path / "d"), "--small"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(read(tmp_path / "d" / "valid.jsonl")) == 178
    assert json.loads((tmp_path / "d" / "digits.json").read_text())["renderings"] == 1
    assert len(read(tmp_path / "d" / "test.jsonl")) == 179
