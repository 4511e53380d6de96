"""Build the model an engine serves: from a checkpoint, or untrained for trying things out."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import Config
from .errors import CheckpointError
from .modality import Modality
from .model import DialogueConfig, DialogueLM
from .paths import bundled_model_path
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

#: ``model.checkpoint`` values that are not paths.
BUNDLED = "bundled"
UNTRAINED = "untrained"

#: Text for the tokenizer of an untrained model: enough pieces to babble with.
SEED_TEXT = (
    "hello! how can i help you? what colour is the circle? the circle is red. "
    "what shape is the blue one? the blue one is a square. how many shapes are there? "
    "there are two shapes. where is the triangle? the triangle is on the left. "
    "what digit is this? it is a seven. good morning, nice to meet you."
).split(". ")


def dialogue_config(config: Config, modalities: Mapping[str, Modality],
                    vocab_size: int) -> DialogueConfig:
    m = config.model
    return DialogueConfig(
        vocab_size=vocab_size, rnn=m.rnn, n_layer=m.n_layer, n_embd=m.n_embd,
        n_hidden=m.n_hidden, d_model=m.d_model, dropout=m.dropout,
        fusion=config.fusion.method, condition=config.fusion.condition,
        entry_tags=config.fusion.entry_tags, carry_query=config.fusion.carry_query,
        select_entries=config.fusion.select_entries, summaries=config.fusion.summaries,
        reread=config.fusion.reread, object_slots=config.fusion.object_slots,
        object_order=config.fusion.object_order,
        modalities=sorted(modalities))


def checkpoint_path(config: Config) -> Path | None:
    """The folder ``model.checkpoint`` names: ``"bundled"`` (the default) is the model in
    the package, ``"untrained"`` (``None`` here) asks for an untrained model, anything
    else is a path. An empty value is refused, so an untrained model is never served
    by accident."""
    setting = config.model.checkpoint
    if setting == UNTRAINED:
        return None
    if setting == BUNDLED:
        return bundled_model_path()
    if not setting.strip():
        raise CheckpointError('model.checkpoint is empty: set it to "bundled" (the model in '
                              'the package), a checkpoint folder, or "untrained" for an '
                              "untrained model that answers gibberish")
    return config.resolve(setting)


def load_model(config: Config, modalities: Mapping[str, Modality]
               ) -> tuple[DialogueLM, Tokenizer, dict[str, Any]]:
    """The model named by ``model.checkpoint`` (:func:`checkpoint_path`)."""
    if config.model.threads:
        torch.set_num_threads(config.model.threads)
    path = checkpoint_path(config)
    if path is not None:
        if not path.exists():
            raise CheckpointError(f"model.checkpoint {path} does not exist; train one with "
                                  "`mmchat train`, or set model.checkpoint = \"bundled\" "
                                  "for the model in the package")
        model, tokenizer, meta = checkpoint.load(path, modalities)
        meta["path"] = str(path)
        logger.info("loaded checkpoint %s", path)
    else:
        tokenizer = Tokenizer.train(SEED_TEXT * 4, vocab_size=min(config.model.vocab_size, 64))
        dcfg = dialogue_config(config, modalities, tokenizer.vocab_size)
        torch.manual_seed(0)
        model = checkpoint.build_untrained(dcfg, modalities)
        meta = {"path": "untrained"}
        logger.warning("serving an UNTRAINED model: replies will be gibberish")
    model.eval()
    for_inference(model, modalities)
    if config.model.quantize == "dynamic-int8":
        model = quantize(model)
    return model.to(config.model.device), tokenizer, meta


def for_inference(model: DialogueLM, modalities: Mapping[str, Modality]) -> None:
    """Swap each encoder of ``model`` (in eval mode) for its modality's
    :meth:`~mmchat.modality.Modality.inference_encoder`; one that fails keeps the
    trained encoder, and the failure is logged with the plugin's name."""
    for name, encoder in list(model.encoders.items()):
        modality = modalities.get(name)
        if modality is None:
            continue
        try:
            served = modality.inference_encoder(encoder)
        except Exception as exc:  # a plugin's bug must not keep the model from loading
            logger.warning("plugin %s: inference_encoder of modality %r failed (%s: %s); "
                           "serving its encoder as trained", modality.plugin_name or "?",
                           name, type(exc).__name__, exc)
            continue
        if not isinstance(served, torch.nn.Module):
            logger.warning("plugin %s: inference_encoder of modality %r returned %s, not a "
                           "torch.nn.Module; serving its encoder as trained",
                           modality.plugin_name or "?", name, type(served).__name__)
            continue
        model.encoders[name] = served.eval()


def fallback_threshold(config: Config, meta: Mapping[str, Any]) -> float:
    """``[generation] fallback_threshold``, or when it is -1 the ``[train]
    fallback_threshold`` the checkpoint was trained with (0 if it has none)."""
    threshold = config.generation.fallback_threshold
    if threshold >= 0:
        return threshold
    return float(meta.get("train", {}).get("config", {}).get("fallback_threshold", 0.0))


def quantize(model: DialogueLM) -> DialogueLM:
    """Dynamic int8 quantization of the RNN and linear layers (CPU inference)."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model, {torch.nn.LSTM, torch.nn.GRU, torch.nn.Linear},
                            dtype=torch.qint8)
