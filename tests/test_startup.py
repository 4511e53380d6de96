"""Start-up: the bundled model ships in the package and is what Engine() serves; an
untrained model needs saying so; every modality is warmed up before the engine is ready."""

import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import mmchat
from mmchat import CheckpointError, Engine, bundled_model_path
from mmchat.config import Config

TINY = {"n_layer": 1, "n_embd": 32, "n_hidden": 48, "d_model": 32, "dropout": 0.0}
ROOT = Path(__file__).resolve().parents[1]


def test_the_bundled_model_is_in_the_package():
    path = bundled_model_path()
    assert path.parent == Path(mmchat.__file__).parent
    assert {p.name for p in path.iterdir()} >= {"config.json", "model.safetensors",
                                                "tokenizer.model"}


async def test_engine_without_settings_serves_the_bundled_model_warmed_up(caplog):
    caplog.set_level(logging.INFO, logger="mmchat")
    async with Engine(Config()) as engine:  # default plugins, default config
        assert str(bundled_model_path()) in engine.model_description
        warmed = {r.args[0] for r in caplog.records if r.msg.startswith("warmed up")}
        assert warmed == {"image", "voice"}  # before start() returned
        reply = await engine.reply("s", "hello")
    assert reply.text.strip() and "untrained" not in engine.model_description
    assert not [r for r in caplog.records if "UNTRAINED" in r.getMessage()]


async def test_an_untrained_model_needs_an_explicit_setting(toy_host):
    for empty in ("", "  "):
        config = Config().replace(model={**TINY, "checkpoint": empty})
        with pytest.raises(CheckpointError, match='"untrained"'):
            await Engine(config, plugins=toy_host).start()
    config = Config().replace(model={**TINY, "checkpoint": "untrained"})
    async with Engine(config, plugins=toy_host) as engine:
        assert "untrained" in engine.model_description


async def test_start_decodes_and_encodes_each_modality_once(tiny_config, toy_host):
    toy = toy_host.modalities["toy"]
    async with Engine(tiny_config, plugins=toy_host):
        assert toy.decoded == 1  # the warm-up's example, before any reply


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to copy the checkout")
def test_a_wheel_carries_the_model_and_the_type_marker(tmp_path):
    # Built from a copy of the tracked files, as a release would be.
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "mmchat",
                            "pyproject.toml", "README.md"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=600)
    wheel, = (tmp_path / "dist").glob("mmchat-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"mmchat/py.typed", "mmchat/bundled_model/model.safetensors",
            "mmchat/bundled_model/config.json", "mmchat/bundled_model/tokenizer.model"} <= names
