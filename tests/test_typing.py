"""The public API is typed: py.typed ships, every public name has its real type, the
generation settings are checked, and mypy --strict passes over mmchat and
docs/examples/ (which run here too)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mmchat

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.py"))

USER_CODE = """
    from mmchat import Engine, GenerationSettings, Reply, SyncEngine

    async def use(engine: Engine, sync: SyncEngine) -> Reply:
        reveal_type(engine)
        reveal_type(sync.reply("s", "hi"))
        settings: GenerationSettings = {"temperature": 0.5}
        sync.reply("s", "hi", **settings)
        sync.reply("s", txt="hi")  # misspelled: line 8
        engine.reply_sync("s", "hi", temprature=0.5)  # line 9
        return await engine.reply("s", "hi", strategy="beem")  # line 10
"""


def test_every_public_name_is_exported_with_its_type():
    assert (Path(mmchat.__file__).parent / "py.typed").is_file()
    for name in mmchat.__all__:
        value = getattr(mmchat, name)
        assert value is not None, name
    for name in ("Engine", "SyncEngine", "Reply", "Delta", "ReplyStream", "Config",
                 "SessionStore", "MemoryStore", "RedisStore", "MMChatError", "EngineClosed",
                 "ReplyTimeout", "GenerationSettings", "PluginHost"):
        assert name in mmchat.__all__, name


def test_mypy_strict_passes_on_mmchat_and_the_examples_and_catches_misuse(tmp_path):
    user = tmp_path / "user_code.py"
    user.write_text(textwrap.dedent(USER_CODE).lstrip("\n"))
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "mmchat", *map(str, EXAMPLES), str(user)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if ": " in line]
    # (mypy may replay a cached report of the unchanged file under its earlier path)
    elsewhere = [line for line in lines if not line.split(":")[0].endswith(user.name)]
    assert not elsewhere, done.stdout  # mmchat and the examples are clean
    found = {(int(line.split(":")[1]), line.split(": ", 1)[1].split(":")[0]) for line in lines}
    assert (4, "note") in found and '"mmchat.engine.Engine"' in done.stdout
    assert '"mmchat.replies.Reply"' in done.stdout
    assert {(8, "error"), (9, "error"), (10, "error")} <= found, done.stdout
    assert not {n for n, kind in found if kind == "error"} - {8, 9, 10}, done.stdout


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_the_examples_run(example, tmp_path):
    env = {**os.environ, "MMCHAT_GENERATION__MAX_NEW_TOKENS": "16"}
    done = subprocess.run([sys.executable, str(example)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if example.name == "subjects.py":
        assert "erased: {'sessions': 2, 'messages': 5" in done.stdout, done.stdout
        assert "another subject's session is refused" in done.stdout, done.stdout
    else:
        assert "cancelled" in done.stdout or "timed out" in done.stdout, done.stdout
