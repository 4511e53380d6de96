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
            "plugins": {
                name: {"plugin": modalities[name].plugin_name or name,
                       "version": modalities[name].version}
                for name in model.config.modalities
            },
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


def load_matching(model: nn.Module, path: str | Path) -> list[str]:
    """Copy every weight of the checkpoint at ``path`` whose name and shape ``model`` has
    (a warm start); returns the names of ``model``'s weights left as they were."""
    try:
        state = load_file(Path(path) / "model.safetensors")
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no model.safetensors") from None
    own = model.state_dict()
    taken = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(taken, strict=False)
    return sorted(set(own) - set(taken))


def build_untrained(config: DialogueConfig, modalities: Mapping[str, Modality]) -> DialogueLM:
    encoders: dict[str, nn.Module] = {
        m: modalities[m].build_encoder(config.d_model) for m in config.modalities}
    return DialogueLM(config, encoders)
