"""The image encoder: a small strided CNN over the image, one vector per grid region.

A 64x64 input gives an 8x8 grid of 128-channel features. Two coordinate channels
(x and y in [-1, 1], as in CoordConv) are appended before the projection to
``d_model``, so each region vector knows where it is and questions about left,
right, top and bottom can be answered.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _coordinate_grid(grid: int) -> torch.Tensor:
    """``(1, 2, grid, grid)``: channel 0 is x (left -1, right 1), channel 1 is y (top -1)."""
    steps = torch.linspace(-1.0, 1.0, grid)  # (G,)
    y, x = torch.meshgrid(steps, steps, indexing="ij")  # (G, G) each
    return torch.stack([x, y]).unsqueeze(0)  # (1, 2, G, G)


class ImageEncoder(nn.Module):
    """``encoder(x, lengths)`` -> ``(vectors (B, grid*grid, d_model), mask (B, grid*grid))``.

    ``x`` is a ``(B, 3, H, W)`` batch from :class:`~mmchat_image.ImageModality`.
    ``lengths`` is accepted for the modality contract and ignored: every image
    has the same size, so every region vector is real and the mask is all True.
    """

    def __init__(self, d_model: int, grid: int = 8) -> None:
        super().__init__()
        self.grid = grid
        self.features = nn.Sequential(
            _conv_bn_relu(3, 32, stride=2),
            _conv_bn_relu(32, 64, stride=2),
            _conv_bn_relu(64, 128, stride=2),
            _conv_bn_relu(128, 128, stride=1),
        )
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.proj = nn.Conv2d(128 + 2, d_model, kernel_size=1)
        # Derived from `grid`, so it is rebuilt rather than stored in checkpoints.
        self.register_buffer("coords", _coordinate_grid(grid), persistent=False)

    def forward(self, x: torch.Tensor,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B = x.shape[0]
        h = self.features(x)  # (B, 128, H/8, W/8)
        if h.shape[-2:] != (self.grid, self.grid):
            h = self.pool(h)  # (B, 128, G, G)
        coords = self.coords.to(h.dtype).expand(B, -1, -1, -1)  # (B, 2, G, G)
        h = torch.cat([h, coords], dim=1)  # (B, 130, G, G)
        h = self.proj(h)  # (B, d_model, G, G)
        vectors = h.flatten(2).transpose(1, 2)  # (B, G*G, d_model)
        mask = torch.ones(vectors.shape[:2], dtype=torch.bool, device=x.device)  # (B, G*G)
        return vectors, mask

    def for_inference(self) -> ImageEncoder:
        """A copy to serve with, from this encoder in eval mode: each batch norm folded
        into the convolution before it, and the weights in channels-last layout, where
        oneDNN's convolutions run 1.2-1.3x faster on a CPU (``python -m bench encode``).
        The same function up to float rounding."""
        if self.training:
            raise ValueError("for_inference needs the encoder in eval mode (model.eval())")
        served = copy.deepcopy(self)
        for i, (conv, norm, relu) in enumerate(served.features):
            served.features[i] = nn.Sequential(fuse_conv_bn_eval(conv, norm), relu)
        return served.to(memory_format=torch.channels_last)
