"""The voice encoder: two strided 1-D convolutions, then a bidirectional GRU.

The convolutions cut the frame rate by four (100 -> 25 vectors a second). A summary
vector, projected from the GRU's final forward and backward states, goes first so
the dialogue model has one vector that stands for the whole spoken question.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def _length_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """``(B, T)`` bool, True for the first ``lengths[b]`` positions of row b."""
    return torch.arange(T, device=lengths.device) < lengths.unsqueeze(1)  # (B, T)


class VoiceEncoder(nn.Module):
    """``encoder(x, lengths)`` -> ``(vectors (B, 1 + T', d_model), mask (B, 1 + T'))``.

    ``x`` is a ``(B, n_mels, T)`` batch padded on the right, ``lengths`` the ``(B,)``
    real frame counts. ``T' = ceil(ceil(T / 2) / 2)``. Position 0 is the summary
    vector (always real); the rest are frame vectors, masked past each length.
    Padding never changes the real vectors: every layer masks or packs it away.
    """

    def __init__(self, n_mels: int, d_model: int, kernel_size: int = 5) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv1d(n_mels, d_model, kernel_size, stride=2, padding=padding)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size, stride=2, padding=padding)
        self.gru = nn.GRU(d_model, d_model, batch_first=True, bidirectional=True)
        self.frame_proj = nn.Linear(2 * d_model, d_model)
        self.summary_proj = nn.Linear(2 * d_model, d_model)

    @staticmethod
    def _downsample(conv: nn.Conv1d, x: torch.Tensor,
                    lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(conv(x))  # (B, C, ceil(T / 2))
        lengths = torch.div(lengths + 1, 2, rounding_mode="floor")  # (B,) ceil(len / 2)
        h = h * _length_mask(lengths, h.shape[-1]).unsqueeze(1)  # zero past each length
        return h, lengths

    def forward(self, x: torch.Tensor,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, T = x.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=x.device)
        lengths = lengths.to(device=x.device, dtype=torch.long).clamp(min=1, max=T)  # (B,)
        x = x * _length_mask(lengths, T).unsqueeze(1)  # (B, n_mels, T)
        h, lengths = self._downsample(self.conv1, x, lengths)  # (B, d, T/2)
        h, lengths = self._downsample(self.conv2, h, lengths)  # (B, d, T')
        h = h.transpose(1, 2)  # (B, T', d)
        T2 = h.shape[1]
        packed = pack_padded_sequence(h, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, last = self.gru(packed)  # last: (2, B, d), forward then backward
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=T2)  # (B, T', 2d)
        mask = _length_mask(lengths, T2)  # (B, T')
        frames = self.frame_proj(out) * mask.unsqueeze(-1)  # (B, T', d)
        summary = self.summary_proj(torch.cat([last[0], last[1]], dim=-1))  # (B, d)
        vectors = torch.cat([summary.unsqueeze(1), frames], dim=1)  # (B, 1 + T', d)
        mask = torch.cat([mask.new_ones(B, 1), mask], dim=1)  # (B, 1 + T')
        return vectors, mask
