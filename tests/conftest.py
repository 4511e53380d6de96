import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mmchat.config import from_dict  # noqa: E402
from mmchat.plugins import PluginHost  # noqa: E402

TINY_MODEL = {"checkpoint": "untrained", "n_layer": 1, "n_embd": 32, "n_hidden": 48, "d_model": 32,
              "dropout": 0.0}


@pytest.fixture
def toy_host():
    """A plugin host with only the throwaway toy modality (no entry points)."""
    import toy_plugin

    host = PluginHost(entry_points=False)
    host.register(toy_plugin, "toy", version=toy_plugin.__version__)
    return host


@pytest.fixture
def tiny_config():
    # An untrained model repeats itself ("circle circle ..."): the loop guard, tested on
    # its own (test_generation.py, test_engine.py), would replace every reply here.
    return from_dict({"model": TINY_MODEL,
                      "generation": {"max_new_tokens": 6, "loop_ngram": 0}}, env={})


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory):
    """Real speech: WAV files spoken by espeak-ng."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is required for the voice tests (make system-deps installs it)")
    out = tmp_path_factory.mktemp("speech")
    for name, text, voice in [("hello", "hello there", "en"),
                              ("question", "what colour is the circle", "en-us")]:
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(out / f"{name}.wav"), text],
                       check=True)
    return out


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    """Real images drawn with Pillow."""
    from PIL import Image, ImageDraw

    out = tmp_path_factory.mktemp("images")
    img = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(img).ellipse((10, 10, 50, 50), fill="red")
    img.save(out / "circle.png")
    img.save(out / "circle.jpg", quality=90)
    png = (out / "circle.png").read_bytes()
    (out / "corrupt.png").write_bytes(png[: len(png) // 2])
    Image.new("1", (9000, 9000)).save(out / "huge.png")
    return out


@pytest.fixture
def redis_url(request) -> str:
    """The Redis that test_redis_store starts for the session, on a free port (for
    modules that import its ``redis_server`` fixture)."""
    return request.getfixturevalue("redis_server").url


@pytest.fixture
def prefix() -> str:
    """A key prefix of the test's own."""
    return f"t{uuid.uuid4().hex[:8]}"
