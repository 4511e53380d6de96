"""``mmchat plugin new NAME``: write a plugin package that installs and passes its tests."""

from __future__ import annotations

import re
import string
from importlib import resources
from pathlib import Path

import click

from ..errors import InputError

#: Template file (under ``mmchat/templates/plugin``) -> where it goes in the package.
FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "package/__init__.py.tmpl": "mmchat_{name}/__init__.py",
    "tests/conftest.py.tmpl": "tests/conftest.py",
    "tests/test_plugin.py.tmpl": "tests/test_{name}.py",
}


def register(cli: click.Group) -> None:
    cli.add_command(plugin_group)


@click.group("plugin")
def plugin_group() -> None:
    """Tools for plugin authors."""


@plugin_group.command("new")
@click.argument("name")
@click.option("--dir", "parent", type=click.Path(file_okay=False, path_type=Path),
              default=Path("."), show_default=True, help="Where to write mmchat-NAME/.")
def new_command(name: str, parent: Path) -> None:
    """Write mmchat-NAME/: a modality plugin package (entry point, modality, encoder,
    dataset builder, tests, README) that installs and passes its own tests."""
    out = write_plugin(name, parent)
    click.echo(f"wrote {out}; next: pip install -e '{out}[test]' && pytest {out}")


def write_plugin(name: str, parent: Path) -> Path:
    """The package folder ``parent/mmchat-NAME``, written from the templates."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name):
        raise InputError(f"plugin name {name!r}: use 1 to 32 of a-z, 0-9 and _, "
                         "starting with a letter (it names the modality too)")
    out = Path(parent) / f"mmchat-{name}"
    if out.exists():
        raise InputError(f"{out} already exists")
    values = {"name": name, "title": name.title().replace("_", "")}
    templates = resources.files("mmchat") / "templates" / "plugin"
    for source, target in FILES.items():
        path = out / target.format(name=name)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = (templates / source).read_text(encoding="utf-8")
        path.write_text(string.Template(text).substitute(values), encoding="utf-8")
    return out
