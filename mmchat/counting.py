"""Counting over the memory: one more memory vector per turn that says how many match.

Attention averages: its weights sum to one, so a decoder that attends over every
picture of a session can find the squares but not add up how many there are ("how many
squares in all?" over three pictures). With ``[fusion] count_heads = H`` each turn
scores every countable memory vector with H sigmoid gates, after the turn's
conditioning (so the gates depend on the question), and sums each gate over the
vectors: H soft counts. Each count is written as a soft one-hot over 0 .. ``BINS - 1``
(a triangle around it: 2.3 is 0.7 of bin 2 and 0.3 of bin 3), and the H encodings are
projected into one memory vector that the decoder attends to like any other::

    g = sigmoid(W_g v_n + b_g)                      # (B, N, H) a gate per vector and head
    c = sum_n g_n * countable_n                     # (B, H) soft counts
    entry = W_o onehot(c)                           # (B, d)

A sum of per-object sigmoid gates as a count is the idea of Zhang et al., "Learning to
Count Objects in Natural Images for Visual Question Answering" (ICLR 2018), without
their de-duplication: here each object has a vector of its own. The vectors counted are
the object slots of the attachments that have them (:mod:`mmchat.objects`, one per
shape, the rest trained to say "nothing"), else every attachment vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: counts are told apart from 0 to BINS - 1; the last bin takes every count above it
BINS = 16


def soft_one_hot(counts: torch.Tensor, bins: int = BINS) -> torch.Tensor:
    """Each count (...) as a triangle over ``bins`` bins (..., bins): bin ``k`` holds
    ``max(0, 1 - |c - k|)``, so an integer count is one-hot and the weights always sum to
    one; counts are clamped to [0, bins - 1]."""
    c = counts.clamp(0, bins - 1).unsqueeze(-1)  # (..., 1)
    return F.relu(1 - (c - torch.arange(bins, dtype=c.dtype, device=c.device)).abs())


class CountEntry(nn.Module):
    """H soft counts of the countable memory vectors, as one memory vector (B, d)."""

    def __init__(self, d_model: int, n_head: int, bins: int = BINS) -> None:
        super().__init__()
        self.bins = bins
        self.gate = nn.Linear(d_model, n_head)
        self.out = nn.Linear(n_head * bins, d_model)

    def counts(self, values: torch.Tensor, countable: torch.Tensor) -> torch.Tensor:
        """values (B, N, d), countable (B, N) bool -> soft counts (B, H)."""
        gates = torch.sigmoid(self.gate(values))  # (B, N, H)
        return (gates * countable.unsqueeze(-1).to(gates.dtype)).sum(dim=1)  # (B, H)

    def forward(self, values: torch.Tensor, countable: torch.Tensor) -> torch.Tensor:
        counts = self.counts(values, countable)  # (B, H)
        entry: torch.Tensor = self.out(soft_one_hot(counts, self.bins).flatten(1))  # (B, d)
        return entry


def last_of_entry(kinds: torch.Tensor, ordinal: torch.Tensor, mask: torch.Tensor, k: int
                  ) -> torch.Tensor:
    """(B, N) True where a visible vector is one of the last ``k`` of its entry.

    The memory bank lays each entry's vectors out together (``DialogueLM.memory_bank``);
    two entries of a modality differ in ordinal, so a vector is among its entry's last
    ``k`` when the vector ``k`` places on is hidden or belongs to another entry."""
    ahead_kind = F.pad(kinds[:, k:], (0, k), value=-1)  # (B, N)
    ahead_ordinal = F.pad(ordinal[:, k:], (0, k), value=-1)
    ahead_mask = F.pad(mask[:, k:], (0, k), value=False)
    same = ahead_mask & (ahead_kind == kinds) & (ahead_ordinal == ordinal)
    return mask & ~same
