"""The plugin host: what the configuration loads, for every command; hook names checked;
tracing; what checkpoints record of each plugin."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL
from toy_plugin import ToyModality

from mmchat import checkpoint, hookimpl
from mmchat.config import from_dict
from mmchat.errors import CheckpointError, PluginError
from mmchat.loading import load_model
from mmchat.plugins import PluginHost

ROOT = Path(__file__).parent.parent

PROBE = '''
import sys
from pathlib import Path

import click
from mmchat import hookimpl

Path("imported-probe").touch()


@hookimpl
def register_commands(cli):
    @cli.command("probe")
    def probe():
        "Say which plugin packages are imported."
        click.echo("image imported: %s" % ("mmchat_image" in sys.modules))
'''

TYPO = '''
from mmchat import hookimpl


@hookimpl
def register_modality(register):
    pass
'''


def mmchat(*args, cwd, env=None, check=False):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MMCHAT_")}
    return subprocess.run([sys.executable, "-m", "mmchat", *args], capture_output=True,
                          text=True, cwd=cwd, env={**environ, **(env or {})}, check=check)


def project(tmp_path, plugins="", **files):
    """A folder with a config.toml (``[plugins]`` lines) and plugin files in plugins/."""
    (tmp_path / "plugins").mkdir()
    for name, text in files.items():
        (tmp_path / "plugins" / f"{name}.py").write_text(text)
    (tmp_path / "config.toml").write_text(f'[plugins]\npaths = ["plugins"]\n{plugins}\n')
    return tmp_path


def test_folder_plugins_add_commands_and_disabled_plugins_are_never_imported(tmp_path):
    cwd = project(tmp_path, 'disabled = ["image"]', probe=PROBE)
    out = mmchat("probe", cwd=cwd, check=True)
    assert out.stdout.strip() == "image imported: False"
    assert mmchat("probe", cwd=cwd, env={"MMCHAT_LOAD_PLUGINS": "probe,voice"},
                  check=True).stdout.strip() == "image imported: False"
    (cwd / "config.toml").write_text('[plugins]\npaths = ["plugins"]\n')
    assert mmchat("probe", cwd=cwd, check=True).stdout.strip() == "image imported: True"


def test_a_disabled_folder_plugin_is_not_imported_and_its_commands_do_not_run(tmp_path):
    cwd = project(tmp_path, 'disabled = ["probe"]', probe=PROBE)
    out = mmchat("probe", cwd=cwd)
    assert out.returncode != 0 and "No such command 'probe'" in out.stderr
    assert "probe" not in mmchat("--help", cwd=cwd, check=True).stdout
    assert not (cwd / "imported-probe").exists()
    assert "probe" not in mmchat("plugins", "--json", cwd=cwd, check=True).stdout


def test_the_config_named_on_the_command_line_decides_too(tmp_path):
    cwd = project(tmp_path, probe=PROBE)
    (cwd / "other.toml").write_text('[plugins]\npaths = ["plugins"]\ndisabled = ["probe"]\n')
    out = mmchat("plugins", "--config", "other.toml", "--json", cwd=cwd, check=True)
    assert "probe" not in {p["name"] for p in json.loads(out.stdout)["plugins"]}
    assert not (cwd / "imported-probe").exists()
    mmchat("plugins", "--config=config.toml", cwd=cwd, check=True)
    assert (cwd / "imported-probe").exists()


def test_an_unknown_hook_name_names_the_nearest_real_hook():
    class Typo:
        @hookimpl
        def register_modality(self, register):
            pass

    host = PluginHost(entry_points=False)
    with pytest.raises(PluginError, match=r"plugin 'typo' failed: unknown hook "
                       r"'register_modality'.*did you mean 'register_modalities'\?"):
        host.register(Typo(), "typo")
    assert not host.pm.has_plugin("typo")


def test_a_loaded_plugin_with_an_unknown_hook_fails_and_mmchat_plugins_says_so(tmp_path):
    cwd = project(tmp_path, typo=TYPO)
    host = PluginHost(paths=[cwd / "plugins"], entry_points=False)
    host.load()
    assert not host.pm.has_plugin("typo")
    [failure] = host.failures
    assert (failure.plugin, failure.stage) == ("typo", "load")
    assert "did you mean 'register_modalities'?" in failure.error
    out = mmchat("plugins", cwd=cwd)
    assert out.returncode == 1 and "FAILED typo (load)" in out.stderr
    assert "register_modality" not in out.stdout


def test_an_allow_list_that_names_no_installed_plugin_is_an_error(tmp_path):
    host = PluginHost(allow=["image", "imgae"])
    assert set(host.modalities) == {"image"}
    assert [(f.plugin, f.stage) for f in host.failures] == [("imgae", "enabled")]
    out = mmchat("plugins", cwd=tmp_path, env={"MMCHAT_LOAD_PLUGINS": "imgae"})
    assert out.returncode == 1
    assert "FAILED imgae (enabled)" in out.stderr and "no installed plugin" in out.stderr
    assert mmchat("plugins", cwd=tmp_path).returncode == 0


def test_hook_calls_are_traced_through_pluggy(monkeypatch, caplog, toy_host):
    monkeypatch.setenv("MMCHAT_TRACE_PLUGINS", "1")
    import toy_plugin

    host = PluginHost(entry_points=False)
    host.register(toy_plugin, "toy")
    with caplog.at_level(logging.INFO, logger="mmchat.plugins"):
        assert set(host.modalities) == {"toy"}
    assert any("register_modalities" in r.getMessage() for r in caplog.records)


def test_mmchat_plugins_traces_with_the_variable_set(tmp_path):
    out = mmchat("plugins", cwd=tmp_path, env={"MMCHAT_TRACE_PLUGINS": "1"}, check=True)
    assert "register_modalities [hook]" in out.stderr
    assert "register_modalities" not in mmchat("plugins", cwd=tmp_path).stderr


class Toy2(ToyModality):
    version = "2.0"


class Toy11(ToyModality):
    version = "1.1"


@pytest.fixture
def trained(tmp_path):
    """A checkpoint of a tiny model with toy modality version 1, max_frames = 8."""
    config = from_dict({"model": TINY_MODEL}, env={})
    toy = ToyModality({"max_frames": 8})
    toy.plugin_name, toy.plugin_version = "toy", "9.9"
    model, tokenizer, _ = load_model(config, {"toy": toy})
    return checkpoint.save(tmp_path / "ckpt", model, tokenizer, {"toy": toy})


def test_checkpoints_record_each_plugin_name_version_and_settings(trained):
    meta = json.loads((trained / "config.json").read_text())
    assert meta["plugins"] == {"toy": {"plugin": "toy", "version": "1", "plugin_version": "9.9",
                                       "settings": {"max_frames": 8}}}


def test_a_different_major_version_is_refused(trained):
    toy = Toy2({"max_frames": 8})
    toy.plugin_name = "toy"
    with pytest.raises(CheckpointError, match=r"trained with modality 'toy' version 1 "
                       r"\(plugin 'toy' 9.9\), but plugin 'toy' .*provides version 2.0"):
        checkpoint.load(trained, {"toy": toy})
    checkpoint.load(trained, {"toy": Toy11({"max_frames": 8})})  # a minor change loads


def test_changed_settings_load_with_a_warning_naming_them(trained, caplog):
    with caplog.at_level(logging.WARNING, logger="mmchat.checkpoint"):
        checkpoint.load(trained, {"toy": ToyModality({"max_frames": 8})})
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="mmchat.checkpoint"):
        checkpoint.load(trained, {"toy": ToyModality({"max_frames": 3, "size": 2})})
    [record] = caplog.records
    # size was the default then, a value the record does not hold: not compared
    assert record.getMessage().endswith(
        "changed since training: max_frames (trained with 8, now 3); accuracy may suffer")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmchat.checkpoint"):
        checkpoint.load(trained, {"toy": ToyModality({"size": 2})})
    [record] = caplog.records
    assert "max_frames (trained with 8, now 'the default')" in record.getMessage()


class LimitedToy(ToyModality):
    limits = ("max_frames",)


def test_limits_are_not_compared_with_the_checkpoint(trained, caplog):
    with caplog.at_level(logging.WARNING, logger="mmchat.checkpoint"):
        checkpoint.load(trained, {"toy": LimitedToy({"max_frames": 3})})
    assert not caplog.records


def test_the_bundled_model_loads_with_the_shipped_config_and_no_warning(caplog):
    from mmchat.config import load

    host = PluginHost.from_config(load(ROOT / "config.toml", env={}))
    with caplog.at_level(logging.WARNING, logger="mmchat.checkpoint"):
        checkpoint.load(ROOT / "mmchat" / "bundled_model", host.modalities)
    assert not caplog.records


def test_a_bundled_plugin_records_every_setting_with_its_default():
    host = PluginHost()
    assert checkpoint.plugin_record(host.modalities["image"])["settings"] == {
        "size": 64, "max_bytes": 10 * 1024 * 1024, "max_pixels": 40_000_000,
        "costly_pixels": 4_000_000}


class Served(ToyModality):
    """A toy modality whose served encoder is a marked copy of the trained one."""

    def inference_encoder(self, encoder):
        import copy

        served = copy.deepcopy(encoder)
        served.served = True
        return served


class BrokenServing(ToyModality):
    def inference_encoder(self, encoder):
        raise RuntimeError("no fused kernels here")


class NotAModule(ToyModality):
    def inference_encoder(self, encoder):
        return "an encoder"


def test_the_engine_serves_each_modalitys_inference_encoder(trained):
    config = from_dict({"model": {**TINY_MODEL, "checkpoint": str(trained)}}, env={})
    model, _, _ = load_model(config, {"toy": Served({"max_frames": 8})})
    assert getattr(model.encoders["toy"], "served", False)
    assert not model.encoders["toy"].training


@pytest.mark.parametrize("modality, problem", [
    (BrokenServing, "failed (RuntimeError: no fused kernels here)"),
    (NotAModule, "returned str, not a torch.nn.Module"),
], ids=["raises", "not-a-module"])
def test_a_failing_inference_encoder_serves_the_trained_one(trained, caplog, modality, problem):
    config = from_dict({"model": {**TINY_MODEL, "checkpoint": str(trained)}}, env={})
    toy = modality({"max_frames": 8})
    toy.plugin_name = "toy"
    trained_encoder = checkpoint.load(trained, {"toy": toy})[0].encoders["toy"]
    with caplog.at_level(logging.WARNING, logger="mmchat.loading"):
        model, _, _ = load_model(config, {"toy": toy})
    [record] = caplog.records
    assert "plugin toy: inference_encoder of modality 'toy'" in record.getMessage()
    assert problem in record.getMessage()
    assert "serving its encoder as trained" in record.getMessage()
    for name, weight in trained_encoder.state_dict().items():
        assert torch.equal(model.encoders["toy"].state_dict()[name], weight)
