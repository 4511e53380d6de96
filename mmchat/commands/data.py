"""``mmchat data``: check a dataset, and build one with a plugin's builder."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..errors import MMChatError, PluginError
from .options import config_option, load_config

logger = logging.getLogger(__name__)

#: Modalities ``data check`` accepts even when their plugin is not installed.
FALLBACK_MODALITIES = ("image", "voice")
#: The plugin that provides a well-known dataset builder, for the error when it is missing.
KNOWN_BUILDERS = {"demo": "mmchat-demo (pip install -e plugins/demo)"}

Builder = Callable[..., dict[str, Path]]


def register(cli: click.Group) -> None:
    cli.add_command(data)


@click.group()
def data() -> None:
    """Check datasets and build the demo corpus."""


@data.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--modalities", metavar="NAMES",
              help="Comma-separated modality names to accept (default: the registered "
                   f"ones plus {', '.join(FALLBACK_MODALITIES)}).")
@config_option
def check(file: Path, modalities: str | None, config_path: Path | None) -> None:
    """Validate a JSONL dataset; print every problem as FILE:LINE: reason.

    Exits with status 1 when there are problems.
    """
    from ..dataset import check_dataset

    if modalities is not None:
        allowed: Any = {m.strip() for m in modalities.split(",") if m.strip()}
    else:
        registered = _host(config_path).modalities
        allowed = {name: registered.get(name) for name in {*registered, *FALLBACK_MODALITIES}}
    problems = check_dataset(file, allowed)
    for p in problems:
        click.echo(f"{file}:{p.line}: {p.reason}" if p.line else f"{file}: {p.reason}")
    if problems:
        lines = len({p.line for p in problems})
        click.echo(f"{len(problems)} problem(s) on {lines} line(s)", err=True)
        raise SystemExit(1)
    click.echo(f"{file}: ok", err=True)


def _build_options(fn: Callable) -> Callable:
    fn = click.option("--seed", type=int, default=0, show_default=True,
                      help="Seed; the same seed builds the same files.")(fn)
    fn = click.option("--small", is_flag=True,
                      help="A small corpus that builds in seconds (for tests).")(fn)
    fn = click.option("--force", is_flag=True,
                      help="Write into OUTDIR even if it is not empty.")(fn)
    fn = click.option("--progress/--no-progress", default=True,
                      help="Show a progress bar on stderr.")(fn)
    return config_option(fn)


@data.command("build")
@click.argument("name")
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@_build_options
def build(name: str, outdir: Path, seed: int, small: bool, force: bool, progress: bool,
          config_path: Path | None) -> None:
    """Build the dataset that a plugin registered as NAME into OUTDIR."""
    _run_builder(name, outdir, seed=seed, small=small, force=force, progress=progress,
                 config_path=config_path)


@data.command("demo")
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@_build_options
def demo(outdir: Path, seed: int, small: bool, force: bool, progress: bool,
         config_path: Path | None) -> None:
    """Build the demo corpus into OUTDIR (the same as: data build demo OUTDIR)."""
    _run_builder("demo", outdir, seed=seed, small=small, force=force, progress=progress,
                 config_path=config_path)


def _host(config_path: Path | None):
    from ..plugins import PluginHost

    c = load_config(config_path)
    return PluginHost.from_config(c)


def dataset_builders(host) -> dict[str, Builder]:
    """Every builder registered through the ``register_datasets`` hook, by name."""
    found: dict[str, Builder] = {}

    def register(name: str, build: Builder) -> None:
        if not isinstance(name, str) or not name or not callable(build):
            raise TypeError("register_datasets: call register(name: str, build: callable)")
        if name in found:
            logger.warning("dataset %r registered twice; %s wins", name, _origin(build))
        found[name] = build

    host.call_each("register_datasets", register=register)
    return found


def _run_builder(name: str, outdir: Path, *, seed: int, small: bool, force: bool,
                 progress: bool, config_path: Path | None) -> None:
    host = _host(config_path)
    builders = dataset_builders(host)
    if name not in builders:
        available = ", ".join(sorted(builders)) or "none"
        hint = f"; install the plugin {KNOWN_BUILDERS[name]}" if name in KNOWN_BUILDERS else ""
        failed = "".join(f"; plugin {f.plugin!r} failed to load: {f.error}"
                         for f in host.failures)
        raise MMChatError(f"no dataset builder named {name!r} (available: {available}){hint}"
                          f"{failed}", code="unknown_dataset")
    if outdir.exists() and any(outdir.iterdir()) and not force:
        raise MMChatError(f"{outdir} is not empty; choose a new folder or pass --force",
                          code="bad_input")
    build = builders[name]
    try:
        paths = build(outdir, seed=seed, small=small, progress=progress)
    except MMChatError:
        raise
    except Exception as exc:
        logger.exception("dataset builder %r failed", name)
        raise PluginError(_origin(build),
                          f"building {name!r} raised {type(exc).__name__}: {exc}") from exc
    for split, path in paths.items():
        with open(path, "rb") as fh:
            lines = sum(1 for line in fh if line.strip())
        click.echo(f"{split}: {path} ({lines} dialogues)")


def _origin(build: Builder) -> str:
    """The top-level package a builder comes from, to name the plugin in messages."""
    return (getattr(build, "__module__", None) or repr(build)).split(".")[0]
