"""The demo corpus that the tests check: one ``--small`` build through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mmchat.commands import data as data_command

SPLITS = ("train", "valid", "test")


def _cli_build(outdir: Path, *extra: str) -> None:
    group = click.Group()
    data_command.register(group)
    result = CliRunner().invoke(group, ["data", "demo", str(outdir), "--small",
                                        "--no-progress", *extra])
    assert result.exit_code == 0, result.output
    for split in SPLITS:
        assert f"{split}: {outdir / f'{split}.jsonl'}" in result.stdout


@pytest.fixture(scope="session")
def cli_build():
    """``cli_build(outdir, *options)``: ``mmchat data demo outdir --small ...``."""
    return _cli_build


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "a"
    _cli_build(out)
    return out


@pytest.fixture(scope="session")
def records(corpus) -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in (corpus / f"{s}.jsonl").open(encoding="utf-8")]
            for s in SPLITS}
