"""Where the files that ship inside the package are."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def bundled_model_path() -> Path:
    """The folder of the bundled model (a checkpoint, docs/model-card.md), inside the
    installed package: ``mmchat/bundled_model/``. ``model.checkpoint = "bundled"`` (the
    default) serves it."""
    return Path(str(resources.files("mmchat") / "bundled_model"))
