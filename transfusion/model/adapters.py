"""Image <-> token adapters: patchify, linear patch projections, timestep embedding.

Legend: N images, C channels, H/W height/width, p patch side, P = (H/p)(W/p) patches, D model dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor


def patchify(x_NCHW: Tensor, p: int) -> Tensor:
    """[N, C, H, W] -> [N, P, C*p*p], patches in raster order."""
    n, c, h, w = x_NCHW.shape
    x = x_NCHW.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(x_NPE: Tensor, p: int, grid: tuple[int, int], channels: int) -> Tensor:
    """[N, P, C*p*p] -> [N, C, H, W]; inverse of ``patchify``."""
    n = x_NPE.shape[0]
    gh, gw = grid
    x = x_NPE.reshape(n, gh, gw, channels, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(n, channels, gh * p, gw * p)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of the (continuous) diffusion timestep -> MLP -> D."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t_N: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t_N.device) / half)
        args = t_N.float()[:, None] * freqs[None]
        feats = torch.cat((args.cos(), args.sin()), dim=-1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class LinearPatchIn(nn.Module):
    """Patches -> tokens: [N, C, H, W] -> [N, P, D]."""

    def __init__(self, channels: int, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(channels * patch * patch, dim)

    def forward(self, x_NCHW: Tensor) -> Tensor:
        return self.proj(patchify(x_NCHW, self.patch))


class LinearPatchOut(nn.Module):
    """Tokens -> patches: [N, P, D] -> [N, C, H, W]."""

    def __init__(self, channels: int, patch: int, dim: int) -> None:
        super().__init__()
        self.patch, self.channels = patch, channels
        self.proj = nn.Linear(dim, channels * patch * patch)

    def forward(self, h_NPD: Tensor, grid: tuple[int, int]) -> Tensor:
        return unpatchify(self.proj(h_NPD), self.patch, grid, self.channels)
