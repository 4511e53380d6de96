"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path

import click

from .. import config as config_module
from ..config import Config

DEFAULT_CONFIG = "config.toml"


def config_option(fn):
    return click.option(
        "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
        default=None, help="Config file (default: ./config.toml if present, else built-in "
        "defaults). MMCHAT_<SECTION>__<KEY> variables override it.")(fn)


def load_config(path: Path | None) -> Config:
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = Path(DEFAULT_CONFIG)
    return config_module.load(path)
