"""Helpers and pytest fixtures for testing plugins against a real engine.

In a plugin's ``conftest.py``::

    pytest_plugins = ["mmchat.testing"]

then, in a test (with pytest-asyncio)::

    async def test_it_answers(mmchat_engine):
        async with mmchat_engine(my_plugin) as engine:
            reply = await engine.reply("s1", "what is it?", [Attachment(data, "image/gif")])

Engines get a tiny untrained model (quick to build; its replies are gibberish, but
every piece runs) unless given a checkpoint, such as one :func:`train_tiny` trained.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from .config import Config, from_dict
from .engine import Engine
from .plugins import PluginHost

#: The ``[model]`` section of a tiny model: builds and answers in well under a second.
TINY_MODEL: dict[str, Any] = {"checkpoint": "untrained", "n_layer": 1, "n_embd": 32, "n_hidden": 48,
                              "d_model": 32, "vocab_size": 200, "dropout": 0.0}


def tiny_config(checkpoint: str | Path | None = None, **sections: Mapping[str, Any]
                ) -> Config:
    """A config with the tiny model (or ``checkpoint``), short greedy replies without the
    loop guard (an untrained model repeats itself) and the in-process session store;
    ``sections`` add or change settings (``plugins={"gif": {"max_frames": 4}}``)."""
    data: dict[str, Any] = {"model": dict(TINY_MODEL), "generation": {"max_new_tokens": 8,
                                                                        "loop_ngram": 0}}
    if checkpoint is not None:
        data["model"]["checkpoint"] = str(checkpoint)
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return from_dict(data, env={})


def plugin_host(*plugins: object, entry_points: bool = False,
                settings: Mapping[str, Mapping[str, Any]] | None = None) -> PluginHost:
    """A host with ``plugins`` registered (modules or objects with ``@hookimpl``s), named
    after their module (or class); installed plugins too with ``entry_points=True``."""
    host = PluginHost(entry_points=entry_points, settings=settings)
    for plugin in plugins:
        name = getattr(plugin, "__name__", type(plugin).__name__).rsplit(".", 1)[-1]
        host.register(plugin, name, version=getattr(plugin, "__version__", None))
    return host


@contextlib.asynccontextmanager
async def engine_with(*plugins: object, config: Config | None = None,
                      checkpoint: str | Path | None = None,
                      entry_points: bool = False) -> AsyncIterator[Engine]:
    """A started engine over ``plugins``, closed on exit. ``config`` defaults to
    :func:`tiny_config` (with ``checkpoint`` if given); its ``[plugins.<name>]`` tables
    reach the plugins."""
    config = config or tiny_config(checkpoint)
    host = plugin_host(*plugins, entry_points=entry_points, settings=config.plugins.settings)
    async with Engine(config, plugins=host) as engine:
        yield engine


def train_tiny(data: str | Path | Iterable[str | Path], out: str | Path, *plugins: object,
               steps: int = 30, **train: Any) -> Path:
    """Train the tiny model on dataset folder(s) ``data`` with ``plugins`` for ``steps``
    steps; returns the checkpoint folder to serve (``out/model``)."""
    from .training.data import load_train_data
    from .training.trainer import Trainer

    settings = {"batch_size": 8, "steps": steps, "eval_every": steps, "eval_batches": 1,
                "checkpoint_every": steps, "warmup_steps": 1, "max_tokens": 96,
                "threads": 1, **train}
    config = from_dict({"model": TINY_MODEL, "train": settings}, env={})
    host = plugin_host(*plugins)
    dirs = [data] if isinstance(data, (str, Path)) else list(data)
    loaded = load_train_data(dirs, host.modalities, vocab_size=TINY_MODEL["vocab_size"],
                             max_tokens=settings["max_tokens"])
    Trainer(config, loaded, out, progress=False).run()
    return Path(out) / "model"


@pytest.fixture
def mmchat_engine() -> Callable[..., contextlib.AbstractAsyncContextManager[Engine]]:
    """:func:`engine_with`: ``async with mmchat_engine(plugin, ...) as engine``."""
    return engine_with


@pytest.fixture
def mmchat_trained(tmp_path: Path) -> Callable[..., Path]:
    """:func:`train_tiny` writing into the test's ``tmp_path``:
    ``checkpoint = mmchat_trained(data_dir, plugin, steps=30)``."""
    def train(data: str | Path | Iterable[str | Path], *plugins: object, **kwargs: Any
              ) -> Path:
        return train_tiny(data, tmp_path / "trained", *plugins, **kwargs)
    return train
