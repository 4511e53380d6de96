"""Start training from a trained model (``mmchat train --init-from CHECKPOINT``).

The new model keeps the checkpoint's shape, tokenizer, answer classes and modalities,
in their order (a modality's type id is its place in that list), and appends the
modalities and answer classes the data has that the checkpoint lacks; the memory
settings (``[fusion] entry_tags``, ``carry_query``, ``select_entries``, ``summaries``,
``reread``, ``object_slots``, ``object_order``) are the run's.
Every weight of the checkpoint is loaded; a weight that grew (the modality type
embedding, the ``concat`` fusion's projection, the answer head) keeps its trained part
and starts the new part at zero or at its fresh initialisation. ``freeze`` keeps every
weight loaded unchanged and trains only the new encoders and the new part of the grown
weights (with ``[train] weight_decay = 0``, the default, the loaded part then stays
exactly as it was: the trainer keeps wholly frozen parts in evaluation mode, see
:mod:`.freeze`). ``[train] init_parts`` loads only the named parts (the encoders, say)
and starts the rest fresh: a new decoder over trained encoders.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .. import checkpoint
from ..errors import MMChatError
from ..modality import Modality
from ..model import DialogueConfig, DialogueLM
from ..tokenizer import Tokenizer
from .freeze import lies_under

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Base:
    """A trained model to start from."""

    path: Path
    config: DialogueConfig
    state: dict[str, torch.Tensor]
    tokenizer: Tokenizer

    @classmethod
    def load(cls, path: str | Path, registered: Mapping[str, Modality]) -> Base:
        model, tokenizer, _ = checkpoint.load(path, registered)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return cls(Path(path), model.config, state, tokenizer)

    def grown(self, run: DialogueConfig) -> DialogueConfig:
        """The checkpoint's config (its sizes, cell, fusion method and vocabulary) grown
        by what the run's config ``run`` adds: the modalities it lacks appended, the
        transcript head kept (or added) for ``run.heard``, the answer classes it lacks
        appended after its own, and the run's memory settings (entry tags, carried query,
        entry selection), whose weights start fresh where the checkpoint has none."""
        c = self.config
        added = [m for m in sorted(run.modalities) if m not in c.modalities]
        heard_all = sorted(set(c.heard) | set(run.heard))
        answers = [*c.answers, *(a for a in run.answers if a not in c.answers)]
        return dataclasses.replace(c, modalities=[*c.modalities, *added], heard=heard_all,
                                   transcripts=c.transcripts or bool(heard_all),
                                   answers=answers, entry_tags=run.entry_tags,
                                   carry_query=run.carry_query,
                                   select_entries=run.select_entries,
                                   summaries=run.summaries, reread=run.reread,
                                   object_slots=run.object_slots,
                                   object_order=run.object_order,
                                   objects_for=run.objects_for)

    def load_into(self, model: DialogueLM, *, freeze: bool = False,
                  parts: Sequence[str] = ()) -> list[str]:
        """Copy the checkpoint's weights into ``model`` (built from :meth:`grown`); with
        ``freeze``, stop gradients of every weight loaded unchanged. ``parts`` (``[train]
        init_parts``) loads only the weights under those names (``"encoders.image"``),
        and every other weight starts fresh. Returns the names of the weights that start
        fresh or grew."""
        wanted = [p.strip(".") for p in parts]
        unknown = [p for p in wanted if not any(lies_under(n, p) for n in self.state)]
        if unknown:
            raise MMChatError(f"train.init_parts names {', '.join(map(repr, unknown))}, "
                              f"which {self.path} has no weights under")
        fresh = []
        kept: dict[str, torch.Tensor] = {}  # grown weight -> 1 where it is new, 0 where loaded
        n_old = len(self.config.modalities)
        n_tags = model.config.entry_tags
        with torch.no_grad():
            for name, param in model.state_dict().items():
                old = self.state.get(name)
                if old is None or (wanted and not any(lies_under(name, p) for p in wanted)):
                    fresh.append(name)
                elif old.shape == param.shape:
                    param.copy_(old)
                elif name == "fusion.proj.weight":  # concat: [kind 1..K blocks | query]
                    d = model.config.d_model
                    param[:, n_old * d:].zero_()
                    param[:, : n_old * d] = old[:, : n_old * d]
                    param[:, -d:] = old[:, -d:]
                    fresh.append(name)
                    kept[name] = torch.zeros_like(param)
                    kept[name][:, n_old * d: -d] = 1
                elif name.startswith("select."):
                    # entry selector, (2, K, n_tags) score rows: the kinds grow inside
                    # each half (recency, ordinal)
                    if old.shape[0] != 2 * n_old * n_tags:
                        raise MMChatError(f"cannot start from {self.path}: its entry "
                                          "selector has another [fusion] entry_tags")
                    grown, was = _halves(param, n_tags), _halves(old, n_tags)
                    grown.zero_()
                    grown[:, :n_old] = was
                    fresh.append(name)
                    kept[name] = torch.ones_like(param)
                    _halves(kept[name], n_tags)[:, :n_old] = 0
                elif old.dim() == param.dim() and all(
                        o <= n for o, n in zip(old.shape, param.shape)):
                    param[tuple(slice(0, o) for o in old.shape)] = old  # rows appended
                    fresh.append(name)
                    kept[name] = torch.ones_like(param)
                    kept[name][tuple(slice(0, o) for o in old.shape)] = 0
                else:
                    raise MMChatError(f"cannot start from {self.path}: weight {name} has "
                                      f"shape {tuple(old.shape)} there and "
                                      f"{tuple(param.shape)} here")
        if freeze:
            for name, param in model.named_parameters():
                if name not in fresh:
                    param.requires_grad_(False)
                elif name in kept:  # only the new part of a grown weight learns
                    param.register_hook(lambda grad, new=kept[name]: grad * new)
        added = model.config.modalities[n_old:]
        logger.info("starting from %s; new modalities: %s; %d weights start fresh or grew%s",
                    self.path, ", ".join(added) or "none", len(fresh),
                    "; the rest is frozen" if freeze else "")
        return fresh


def _halves(t: torch.Tensor, n_tags: int) -> torch.Tensor:
    """The entry selector's score rows (2 K n_tags, ...) as (2, K, n_tags, ...), a view."""
    return t.view(2, -1, n_tags, *t.shape[1:])
