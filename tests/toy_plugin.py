"""A throwaway modality plugin for core tests: bytes become a (4, T) feature sequence."""

import torch
from torch import nn

from mmchat import Modality, hookimpl
from mmchat.errors import CorruptMedia

__version__ = "9.9"


class ToyEncoder(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(4, d_model)

    def forward(self, x, lengths):
        vectors = self.proj(x.transpose(1, 2))  # (B, T, d)
        mask = torch.arange(x.shape[-1])[None] < lengths[:, None]  # (B, T)
        return vectors, mask


class ToyModality(Modality):
    name = "toy"
    mime_types = ("application/x-toy",)
    max_bytes = 64
    version = "1"

    decoded = 0  # payloads decoded, the warm-up's included

    def example(self):
        return bytes(range(8)), "application/x-toy"

    def decode(self, data, mime_type):
        self.decoded += 1
        if len(data) % 4 or not data:
            raise CorruptMedia(f"toy payload must be a non-empty multiple of 4 bytes, "
                               f"got {len(data)}")
        return torch.tensor(list(data), dtype=torch.float32).reshape(-1, 4).T / 255

    def build_encoder(self, d_model):
        return ToyEncoder(d_model)


@hookimpl
def register_modalities(register):
    register(ToyModality())
