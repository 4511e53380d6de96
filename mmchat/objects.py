"""Object slots: a few vectors per attachment, each reading one object it shows.

An image encoder gives a vector per region; a caption or a question across pictures
needs one vector per *object*. With ``[fusion] object_slots = K``, every attachment of a
modality whose training data names its objects (an attachment's ``objects``, docs/data.md)
gets K more memory vectors: K learned queries read the attachment's vectors through a
small transformer decoder (self-attention among the slots, cross-attention to the
vectors), so slot ``i`` can take the ``i``-th object in the data's order (the demo
corpus: a picture's shapes left to right). Training gives each slot the words of its
object as a target (``[train] objects_weight``); a slot past the last object is
trained to say "nothing". With ``[fusion] object_order = "any"`` the slots are matched
to the objects one to one instead (DETR's set loss), and no slot stands for a place in
the order. The slots then join the memory like any other vector of the
attachment (type embedding, entry tags, conditioning), so the decoder can read the
objects one by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ObjectSlots(nn.Module):
    """``n_slots`` learned queries over one attachment's vectors: (A, N, d) -> (A, K, d)."""

    def __init__(self, d_model: int, n_slots: int, n_head: int = 4, n_layer: int = 2) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(n_slots, d_model))  # (K, d), set by the init
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(d_model, n_head, 2 * d_model, dropout=0.0,
                                       batch_first=True, norm_first=True)
            for _ in range(n_layer))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """vectors (A, N, d), mask (A, N) True where a vector is real -> slots (A, K, d)."""
        slots = self.queries.unsqueeze(0).expand(vectors.shape[0], -1, -1)  # (A, K, d)
        for layer in self.layers:
            slots = layer(slots, vectors, memory_key_padding_mask=~mask)
        out: torch.Tensor = self.norm(slots)
        return out


def object_targets(objects: Sequence[Sequence[Sequence[int]]], n_slots: int,
                   vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Each slot's target distribution (R, K, V + 1) for R attachments' object phrases
    (token ids): slot ``i`` spreads its mass evenly over the pieces of object ``i``;
    a slot past the last object puts it all on class ``V``, "nothing". Objects past
    the ``n_slots``-th are left out."""
    target = torch.zeros(len(objects), n_slots, vocab_size + 1, device=device)
    for r, shown in enumerate(objects):
        for i in range(n_slots):
            ids = sorted(set(shown[i])) if i < len(shown) and shown[i] else [vocab_size]
            target[r, i, ids] = 1.0 / len(ids)
    return target


def object_loss(logits: torch.Tensor, target: torch.Tensor, order: str = "data"
                ) -> torch.Tensor:
    """Summed cross-entropy of slot logits (R, K, V + 1) against :func:`object_targets`.

    ``order = "data"`` scores slot ``i`` against object ``i``; ``"any"`` first matches
    each attachment's slots to its objects one to one at the least cost (the Hungarian
    method, as DETR does), so a slot may take any object and the order is left to the
    decoder.
    """
    logp = F.log_softmax(logits, dim=-1)  # (R, K, V + 1)
    if order == "data":
        return -(target * logp).sum()
    cost = -torch.einsum("rjv,riv->rij", target, logp)  # (R, K slots, K objects)
    slots, objects = matching(cost)
    return cost[torch.arange(cost.shape[0]).unsqueeze(1), slots, objects].sum()


def matching(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-cost one-to-one matching of each row's slots to its objects: cost
    (R, K, K) -> slot and object indices (R, K) each."""
    from scipy.optimize import linear_sum_assignment

    pairs = [linear_sum_assignment(c) for c in cost.detach().cpu().numpy()]
    slots = torch.tensor([list(s) for s, _ in pairs], device=cost.device)
    objects = torch.tensor([list(o) for _, o in pairs], device=cost.device)
    return slots, objects
