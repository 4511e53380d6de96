import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from toy_plugin import ToyModality

from mmchat import Attachment, Engine, Modality, hookimpl, hookspecs
from mmchat.errors import PluginError
from mmchat.plugins import PluginHost

ROOT = Path(__file__).parent.parent

FOLDER_PLUGIN = '''
from mmchat import hookimpl
from toy_plugin import ToyModality


class Folded(ToyModality):
    name = "folded"
    mime_types = ("application/x-folded",)


@hookimpl
def register_modalities(register):
    register(Folded())
'''


def test_bundled_plugins_load_through_entry_points():
    host = PluginHost()
    assert {"image", "voice"} <= set(host.modalities)
    infos = {i.name: i for i in host.describe()}
    assert infos["image"].source == "entry point (mmchat-image)"
    assert infos["image"].version and infos["image"].modalities == ["image"]
    assert "register_modalities" in infos["voice"].hooks
    assert infos["builtins"].source == "builtin"


def test_loading_is_idempotent_and_lazy():
    host = PluginHost()
    assert host.pm.get_plugins() == set()  # nothing happens before load()
    host.load()
    first = set(host.pm.get_plugins())
    host.load()
    assert set(host.pm.get_plugins()) == first


def test_plugins_load_from_a_folder(tmp_path):
    (tmp_path / "folded.py").write_text(FOLDER_PLUGIN)
    (tmp_path / "_private.py").write_text("raise RuntimeError('never imported')")
    host = PluginHost(paths=[tmp_path], entry_points=False)
    assert set(host.modalities) == {"folded"}
    assert {i.name: i.source for i in host.describe()}["folded"].startswith("path ")


def test_allow_list_from_the_environment(monkeypatch):
    monkeypatch.setenv("MMCHAT_LOAD_PLUGINS", "image")
    assert set(PluginHost().modalities) == {"image"}
    monkeypatch.setenv("MMCHAT_LOAD_PLUGINS", "")
    assert PluginHost().modalities == {}


def test_allow_and_block_lists_from_config():
    assert set(PluginHost(allow=["voice"]).modalities) == {"voice"}
    assert "voice" not in PluginHost(block=["voice"]).modalities


def test_a_throwaway_plugin_registers_and_unregisters():
    class Plugin:
        @hookimpl
        def register_modalities(self, register):
            register(ToyModality())

    host = PluginHost(entry_points=False)
    host.register(Plugin(), "throwaway")
    assert "toy" in host.modalities
    host.unregister("throwaway")
    assert "toy" not in host.modalities


def test_failing_plugins_are_isolated_and_reported(tmp_path):
    class Raises:
        @hookimpl
        def register_modalities(self, register):
            raise RuntimeError("boom")

    class WrongType:
        @hookimpl
        def register_modalities(self, register):
            register("not a modality")

    (tmp_path / "broken.py").write_text("import does_not_exist\n")
    host = PluginHost(paths=[tmp_path], entry_points=False)
    host.register(Raises(), "raises")
    host.register(WrongType(), "wrongtype")
    host.register(sys.modules["toy_plugin"], "toy")
    assert set(host.modalities) == {"toy"}
    failed = {(f.plugin, f.stage) for f in host.failures}
    assert failed == {("broken", "load"), ("raises", "register_modalities"),
                      ("wrongtype", "register_modalities")}
    assert any("boom" in f.error for f in host.failures)


class Exploding(ToyModality):
    name = "exploding"
    mime_types = ("application/x-exploding",)

    def decode(self, data, mime_type):
        raise ValueError("bad plugin code")


async def test_a_plugin_that_raises_fails_only_that_turn(tiny_config, toy_host):
    class Plugin:
        @hookimpl
        def register_modalities(self, register):
            register(Exploding())

    toy_host.register(Plugin(), "explosive")
    async with Engine(tiny_config, plugins=toy_host) as engine:
        stream = await engine.stream("s", "hi", [Attachment(b"abcd", "application/x-exploding")])
        with pytest.raises(PluginError, match="plugin 'explosive' failed: decode raised "
                                              "ValueError: bad plugin code") as info:
            await stream.wait()
        assert info.value.plugin == "explosive"
        ok = await engine.reply("s", "hi", [Attachment(b"abcd", "application/x-toy")])
        assert ok.attention["toy"] > 0


def test_every_hook_is_documented():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    hooks = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(f, "mmchat_spec")]
    assert hooks, "no hookspecs found"
    for name in hooks:
        assert f"`{name}(" in docs, f"hook {name} is not documented in docs/plugins.md"


def test_hookspecs_are_docstring_only_stubs():
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if hasattr(fn, "mmchat_spec"):
            body = inspect.getsource(fn).split('"""')[-1].strip()
            assert fn.__doc__ and body == "", name


def test_modality_contract_is_enforced():
    class Nameless(Modality):
        def decode(self, data, mime_type):
            return None

        def build_encoder(self, d_model):
            return None

    class Plugin:
        @hookimpl
        def register_modalities(self, register):
            register(Nameless())

    host = PluginHost(entry_points=False)
    host.register(Plugin(), "nameless")
    assert host.modalities == {}
    assert "must be a Python identifier" in host.failures[0].error


def test_mmchat_plugins_command_lists_everything(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mmchat", "plugins", "--json"],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    listing = {p["name"]: p for p in json.loads(out.stdout)["plugins"]}
    assert listing["image"]["modalities"] == ["image"]
    assert listing["voice"]["source"] == "entry point (mmchat-voice)"
    assert listing["builtins"]["hooks"] == ["startup"]
    text = subprocess.run([sys.executable, "-m", "mmchat", "plugins"], capture_output=True,
                          text=True, check=True, cwd=tmp_path).stdout
    assert "modalities: voice" in text
