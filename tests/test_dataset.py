"""The dataset format: reading, the validator and ``mmchat data check``."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from jsonschema import Draft202012Validator

from mmchat import Modality
from mmchat.commands import data as data_command
from mmchat.dataset import (
    AttachmentRef,
    DatasetError,
    Problem,
    check_dataset,
    read_dataset,
    schema,
)

PNG = base64.b64decode(  # a 1x1 red PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


def record(ident: str = "d1", **changes) -> dict:
    rec = {
        "id": ident, "split": "train", "category": "colour",
        "turns": [
            {"role": "user", "text": "what colour is the circle?",
             "attachments": [{"modality": "image", "path": "media/red.png"}]},
            {"role": "assistant", "text": "the circle is red", "answer": "red",
             "category": "colour"},
        ],
        "meta": {"shapes": [{"kind": "circle", "colour": "red"}]},
    }
    rec.update(changes)
    return rec


def write(tmp_path: Path, lines: list, name: str = "data.jsonl") -> Path:
    media = tmp_path / "media"
    media.mkdir(exist_ok=True)
    (media / "red.png").write_bytes(PNG)
    path = tmp_path / name
    text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
    path.write_text(text, encoding="utf-8")
    return path


def reasons(problems: list[Problem], line: int) -> list[str]:
    return [p.reason for p in problems if p.line == line]


def test_schema_is_valid_draft_2020_12():
    Draft202012Validator.check_schema(schema())
    assert schema()["$schema"].endswith("2020-12/schema")


def test_a_valid_file_passes(tmp_path):
    inline = record("d2")
    inline["turns"][0]["attachments"] = [
        {"modality": "image", "mime_type": "image/png", "data": base64.b64encode(PNG).decode()}]
    path = write(tmp_path, [record(), "", inline])
    assert check_dataset(path, {"image", "voice"}) == []


def test_every_broken_record_is_reported_with_its_line(tmp_path):
    both = record("both")
    both["turns"][0]["attachments"][0]["data"] = base64.b64encode(PNG).decode()
    bad_b64 = record("b64")
    bad_b64["turns"][0]["attachments"] = [{"modality": "image", "data": "not*base64!"}]
    missing = record("missing")
    missing["turns"][0]["attachments"][0]["path"] = "media/nope.png"
    unknown = record("unknown")
    unknown["turns"][0]["attachments"][0]["modality"] = "smell"
    bad_role = record("role")
    bad_role["turns"][1]["role"] = "bot"
    lines = [
        record("ok"),                       # 1
        '{"id": "x", "turns": [',           # 2 bad JSON
        missing,                            # 3
        unknown,                            # 4
        record("empty", turns=[]),          # 5
        bad_role,                           # 6
        both,                               # 7
        bad_b64,                            # 8
        "[1, 2, 3]",                        # 9 not an object
        record("ok"),                       # 10 duplicate id
    ]
    problems = check_dataset(write(tmp_path, lines), {"image", "voice"})
    assert reasons(problems, 1) == []
    assert any("invalid JSON" in r for r in reasons(problems, 2))
    assert reasons(problems, 3) == ["turns[0].attachments[0]: media file not found: "
                                    "media/nope.png"]
    assert any("unknown modality 'smell'" in r for r in reasons(problems, 4))
    assert reasons(problems, 5) == ["empty dialogue: no turns"]
    assert any("'bot' is not one of" in r and r.startswith("turns[1].role")
               for r in reasons(problems, 6))
    assert any("exactly one of 'path' or 'data'" in r for r in reasons(problems, 7))
    assert any("bad base64" in r for r in reasons(problems, 8))
    assert any("must be a JSON object" in r for r in reasons(problems, 9))
    assert any("duplicate id 'ok' (first on line 1)" in r for r in reasons(problems, 10))
    assert [p.line for p in problems] == sorted(p.line for p in problems)


@pytest.mark.parametrize("turns, expected", [
    ([{"role": "user", "text": "hi"}], "no assistant turn"),
    ([{"role": "user", "text": ""}, {"role": "assistant", "text": "hello"}],
     "neither text nor attachments"),
    ([{"role": "user", "text": "hi"}, {"role": "assistant", "text": " "}], "empty text"),
    ([{"role": "user", "text": "hi"}, {"role": "assistant", "text": "a", "answer": "A"}],
     "must be lower-case"),
    ([{"role": "user", "text": "hi", "answer": "x"}, {"role": "assistant", "text": "a"}],
     "assistant turns only"),
    ([{"role": "user", "text": "hi"},
      {"role": "assistant", "text": "a", "attachments": [{"modality": "image", "data": "AA=="}]}],
     "cannot carry attachments"),
    ([{"role": "user", "text": "hi", "attachments": [{"modality": "image"}]},
      {"role": "assistant", "text": "a"}], "exactly one of 'path' or 'data'"),
    ([{"role": "user", "text": "hi", "atachments": []}, {"role": "assistant", "text": "a"}],
     "'atachments' was unexpected"),
    ([{"role": "user"}, {"role": "assistant", "text": "a"}], "'text' is a required property"),
])
def test_semantic_problems(tmp_path, turns, expected):
    problems = check_dataset(write(tmp_path, [{"id": "d", "turns": turns}]))
    assert any(expected in p.reason for p in problems), problems
    assert {p.line for p in problems} == {1}


@pytest.mark.parametrize("content", [
    b"", b"\n\n", b"\xff\xfe garbage\n", b"null\n", b'"text"\n', b"{}\n", b"[" * 100_000 + b"\n",
    b'{"id": 5, "turns": {"role": "user"}}\n', b'{"id": "a", "turns": [null, 3, "x", []]}\n',
    b'{"id": "a", "turns": [{"role": "user", "text": 1, "attachments": [null, {"path": 3}]}]}\n',
    b'{"id": "a", "turns": [{"role": "user", "text": "x", "attachments": '
    b'[{"modality": "image", "path": "\\u0000bad"}]}, {"role": "assistant", "text": "y"}]}\n',
    b"NaN\n", b'{"id": "a", "turns": [], "meta": 1e999}\n',
])
def test_never_crashes(tmp_path, content):
    path = tmp_path / "weird.jsonl"
    path.write_bytes(content)
    problems = check_dataset(path, {"image"})
    assert problems and all(isinstance(p, Problem) for p in problems)


def test_missing_file_and_folder_are_problems_not_crashes(tmp_path):
    assert check_dataset(tmp_path / "nope.jsonl")[0].reason.startswith("file not found")
    assert check_dataset(tmp_path)[0].line == 0


def test_any_modality_when_none_are_given(tmp_path):
    rec = record()
    rec["turns"][0]["attachments"][0]["modality"] = "smell"
    assert check_dataset(write(tmp_path, [rec])) == []


class PngOnly(Modality):
    name = "image"
    mime_types = ("image/png",)

    def decode(self, data, mime_type):
        raise AssertionError("the checker must not decode media")

    def build_encoder(self, d_model):
        raise AssertionError("the checker must not build encoders")


def test_mime_types_are_checked_against_registered_modalities(tmp_path):
    flac = record("d2")
    flac["turns"][0]["attachments"][0]["mime_type"] = "audio/flac"
    untyped = record("d3")
    untyped["turns"][0]["attachments"] = [{"modality": "image", "data": "AAAA"}]
    path = write(tmp_path, [record(), flac, untyped])
    problems = check_dataset(path, {"image": PngOnly(), "voice": None})
    assert [(p.line, p.reason) for p in problems] == [
        (2, "turns[0].attachments[0]: the image modality does not accept 'audio/flac' "
            "(accepts: image/png)")]


def test_read_dataset_resolves_paths_and_base64(tmp_path):
    inline = record("d2")
    flac = base64.b64encode(b"fLaC").decode()
    inline["turns"][0]["attachments"] = [
        {"modality": "voice", "mime_type": "audio/flac", "data": flac, "text": "hello"}]
    path = write(tmp_path, [record(), inline])
    first, second = read_dataset(path)
    ref = first.turns[0].attachments[0]
    assert ref.path == (tmp_path / "media" / "red.png").resolve()
    assert ref.read() == PNG
    attachment = ref.to_attachment()
    assert (attachment.mime_type, attachment.modality) == ("image/png", "image")
    assert first.turns[1].answer == "red" and first.turns[1].category == "colour"
    assert (first.id, first.split, first.category, first.line) == ("d1", "train", "colour", 1)
    assert first.meta["shapes"][0]["kind"] == "circle"
    assert second.turns[0].attachments[0] == AttachmentRef("voice", "audio/flac", data=b"fLaC",
                                                           text="hello")
    assert ref.text is None
    assert second.turns[1].attachments == ()


def test_read_dataset_stops_at_the_first_bad_record(tmp_path):
    missing = record("d2")
    missing["turns"][0]["attachments"][0]["path"] = "media/gone.png"
    path = write(tmp_path, [record(), missing])
    reader = read_dataset(path)
    assert next(reader).id == "d1"
    with pytest.raises(DatasetError, match=r"data\.jsonl:2: .*media file not found"):
        next(reader)


def test_read_dataset_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        list(read_dataset(tmp_path / "nope.jsonl"))


def cli() -> click.Group:
    group = click.Group()
    data_command.register(group)
    return group


def test_cli_check_prints_file_line_reason(tmp_path):
    bad = record("d2", turns=[])
    path = write(tmp_path, [record(), bad, "{oops"])
    result = CliRunner().invoke(cli(), ["data", "check", str(path), "--modalities", "image"])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert f"{path}:2: empty dialogue: no turns" in lines
    assert any(line.startswith(f"{path}:3: invalid JSON") for line in lines)


def test_cli_check_ok_and_modalities_override(tmp_path):
    path = write(tmp_path, [record()])
    assert CliRunner().invoke(cli(), ["data", "check", str(path)]).exit_code == 0
    result = CliRunner().invoke(cli(), ["data", "check", str(path), "--modalities", "voice"])
    assert result.exit_code == 1
    assert "unknown modality 'image' (known: voice)" in result.stdout


def test_cli_build_names_the_missing_plugin(tmp_path, monkeypatch):
    monkeypatch.setenv("MMCHAT_LOAD_PLUGINS", "none-at-all")
    from mmchat.cli import _Group

    group = _Group()
    data_command.register(group)
    result = CliRunner().invoke(group, ["data", "demo", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "no dataset builder named 'demo'" in result.output
    assert "mmchat-demo" in result.output


def test_cli_build_uses_a_registered_builder(tmp_path, monkeypatch):
    calls = []

    def fake_build(outdir, *, seed, small, progress):
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / "train.jsonl").write_text(json.dumps(record()) + "\n")
        calls.append((seed, small, progress))
        return {"train": outdir / "train.jsonl"}

    class Plugin:
        @staticmethod
        def register_datasets(register):
            register("fake", fake_build)

    from mmchat.hookspecs import hookimpl
    from mmchat.plugins import PluginHost

    Plugin.register_datasets = hookimpl(Plugin.register_datasets)
    host = PluginHost(entry_points=False)
    host.register(Plugin, "fake")
    monkeypatch.setattr(data_command, "_host", lambda config_path: host)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli(), ["data", "build", "fake", str(out), "--seed", "7",
                                        "--small", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert calls == [(7, True, False)]
    assert "train:" in result.stdout and "(1 dialogues)" in result.stdout
    again = CliRunner().invoke(cli(), ["data", "build", "fake", str(out)])
    assert again.exit_code != 0 and "not empty" in str(again.exception or again.output)
