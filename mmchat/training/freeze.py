"""Weights a training run holds fixed (``[train] freeze``, ``mmchat train --freeze``).

A frozen weight gets no gradient, and a part of the model whose every weight is frozen
stays in evaluation mode while the rest trains, so its BatchNorm statistics and its
dropout hold too: a frozen image encoder computes exactly what it did before the run.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..errors import MMChatError


def freeze_named(model: nn.Module, prefixes: Iterable[str]) -> list[str]:
    """Stop the gradients of every weight of ``model`` whose name is one of ``prefixes``
    or lies under one (``"encoders.image"`` holds ``encoders.image.proj.weight``).
    Returns the names frozen; a prefix that names no weight raises :class:`MMChatError`
    listing the model's parts."""
    names = [name for name, _ in model.named_parameters()]
    frozen: list[str] = []
    for prefix in prefixes:
        prefix = prefix.strip(".")
        hits = [n for n in names if lies_under(n, prefix)]
        if not hits:
            parts = sorted({".".join(n.split(".")[:2]) if n.startswith("encoders.")
                            else n.split(".")[0] for n in names})
            raise MMChatError(f"train.freeze names {prefix!r}, which is no weight or part "
                              f"of this model; its parts: {', '.join(parts)}")
        frozen += [n for n in hits if n not in frozen]
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen


def lies_under(name: str, prefix: str) -> bool:
    """Whether weight ``name`` is ``prefix`` or lies under it (``"encoders.image"`` holds
    ``encoders.image.proj.weight``, not ``encoders.images.x``)."""
    return name == prefix or name.startswith(prefix + ".")


def hold_frozen(model: nn.Module) -> None:
    """Put each largest part of ``model`` whose every weight is frozen (and that has
    weights) into evaluation mode; call after ``model.train()``."""
    for child in model.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()
        else:
            hold_frozen(child)
