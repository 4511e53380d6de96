"""The kit for plugin authors: ``mmchat plugin new``, ``mmchat.testing`` and the
docs/plugins.md examples, run as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmchat.commands.plugin import write_plugin
from mmchat.errors import InputError

ROOT = Path(__file__).parent.parent
DOCS = (ROOT / "docs" / "plugins.md").read_text()


def python_block_after(heading: str) -> str:
    """The first ```python block after ``heading`` in docs/plugins.md."""
    start = DOCS.index(heading)
    return re.search(r"```python\n(.*?)```", DOCS[start:], re.S).group(1)


def pytest_in(folder: Path, *extra_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [*map(str, extra_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-o", "asyncio_mode=auto", str(folder)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)


def test_plugin_new_writes_a_package_that_installs_and_passes_its_tests(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mmchat", "plugin", "new", "pulse", "--dir",
                          str(tmp_path)], capture_output=True, text=True, check=True)
    package = tmp_path / "mmchat-pulse"
    assert str(package) in out.stdout
    assert {p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()} == {
        "pyproject.toml", "README.md", "mmchat_pulse/__init__.py", "tests/conftest.py",
        "tests/test_pulse.py"}
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(package)],
                   check=True, capture_output=True, timeout=300)
    result = pytest_in(package, site)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout


def test_plugin_new_checks_the_name_and_never_overwrites(tmp_path):
    with pytest.raises(InputError, match="use 1 to 32 of a-z"):
        write_plugin("Bad-Name", tmp_path)
    write_plugin("gif", tmp_path)
    with pytest.raises(InputError, match="already exists"):
        write_plugin("gif", tmp_path)


def test_the_docs_testing_snippet_runs_as_written(tmp_path):
    (tmp_path / "mmchat_sensor.py").write_text(python_block_after("A whole plugin can be"))
    (tmp_path / "test_sensor.py").write_text(python_block_after("## Testing a plugin"))
    result = pytest_in(tmp_path, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
