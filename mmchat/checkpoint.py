"""Checkpoints: one folder with the weights, the tokenizer and the config.

Layout::

    checkpoint/
      config.json        {"format", "version", "config": DialogueConfig, "plugins": {...}, ...}
      model.safetensors  the state dict (no pickle)
      tokenizer.model    the sentencepiece model

Writes are atomic: everything goes to a temporary sibling folder that is renamed
into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError
from .modality import Modality
from .model import DialogueConfig, DialogueLM
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

FORMAT = "mmchat-checkpoint"
VERSION = 1


def save(path: str | Path, model: DialogueLM, tokenizer: Tokenizer,
         modalities: Mapping[str, Modality], extra: Mapping[str, Any] | None = None,
         files: Mapping[str, bytes] | None = None) -> Path:
    """Write a checkpoint folder atomically.

    ``extra`` is stored in config.json; ``files`` are more files (name -> bytes) written
    into the same folder, such as resumable training state.
    """
    from . import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        tokenizer.save(tmp / "tokenizer.model")
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "mmchat_version": __version__,
            "config": model.config.to_dict(),
            "plugins": {name: plugin_record(modalities[name])
                        for name in model.config.modalities},
            **dict(extra or {}),
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        meta = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not an mmchat checkpoint (no config.json)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}/config.json is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has format {meta.get('format')!r} version "
                              f"{meta.get('version')!r}; expected {FORMAT!r} version {VERSION}")
    return meta


def load(path: str | Path, modalities: Mapping[str, Modality]
         ) -> tuple[DialogueLM, Tokenizer, dict[str, Any]]:
    """Rebuild the model from a checkpoint. A missing modality plugin is named."""
    path = Path(path)
    meta = read_meta(path)
    config = DialogueConfig.from_dict(meta["config"])
    missing = [m for m in config.modalities if m not in modalities]
    if missing:
        plugins = meta.get("plugins", {})
        names = ", ".join(
            f"{m!r} (plugin {plugins.get(m, {}).get('plugin', '?')!r}, "
            f"version {plugins.get(m, {}).get('version', '?')})" for m in missing)
        raise CheckpointError(f"checkpoint {path} needs modality {names}, but no loaded "
                              "plugin provides it; install or enable that plugin")
    for m in config.modalities:
        check_plugin(path, m, meta.get("plugins", {}).get(m, {}), modalities[m])
    encoders = {m: modalities[m].build_encoder(config.d_model) for m in config.modalities}
    model = DialogueLM(config, encoders)
    try:
        state = load_file(path / "model.safetensors")
        model.load_state_dict(state)
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no model.safetensors") from None
    except (RuntimeError, OSError) as exc:
        raise CheckpointError(f"cannot load weights from {path}: {exc}") from None
    try:
        tokenizer = Tokenizer.load(path / "tokenizer.model")
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load tokenizer from {path}: {exc}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tokenizer.vocab_size} pieces but the "
                              f"model expects {config.vocab_size}")
    model.eval()
    return model, tokenizer, meta


def plugin_record(modality: Modality) -> dict[str, Any]:
    """What a checkpoint records of the plugin behind a modality."""
    return {"plugin": modality.plugin_name or modality.name, "version": modality.version,
            "plugin_version": modality.plugin_version, "settings": dict(modality.settings)}


def check_plugin(path: Path, name: str, recorded: Mapping[str, Any],
                 modality: Modality) -> None:
    """Refuse a modality whose encoder's major version differs from the one the checkpoint
    was trained with; warn, naming each key, when its settings changed."""
    plugin = modality.plugin_name or name
    trained = str(recorded.get("version", modality.version))
    if _major(trained) != _major(modality.version):
        raise CheckpointError(
            f"checkpoint {path} was trained with modality {name!r} version {trained} (plugin "
            f"{recorded.get('plugin', plugin)!r} {recorded.get('plugin_version') or ''}), but "
            f"plugin {plugin!r} {modality.plugin_version or ''} provides version "
            f"{modality.version}: install the plugin version it was trained with, or train "
            "again")
    if "settings" not in recorded:
        return  # recorded before checkpoints kept settings
    # A key the record lacks was the plugin's default then, whose value the record does
    # not say (a plugin that keeps only the keys it was given): not compared. Limits
    # change what is accepted, not what the encoder sees: not compared either.
    was, now = dict(recorded["settings"]), dict(modality.settings)
    changed = [f"{key} (trained with {was[key]!r}, now {now.get(key, 'the default')!r})"
               for key in sorted(set(was) - set(modality.limits))
               if was[key] != now.get(key)]
    if changed:
        logger.warning("checkpoint %s: the settings of modality %r (plugin %r) changed since "
                       "training: %s; accuracy may suffer", path, name, plugin,
                       ", ".join(changed))


def _major(version: str) -> str:
    return version.split(".", 1)[0]


def build_untrained(config: DialogueConfig, modalities: Mapping[str, Modality]) -> DialogueLM:
    encoders: dict[str, nn.Module] = {
        m: modalities[m].build_encoder(config.d_model) for m in config.modalities}
    return DialogueLM(config, encoders)
