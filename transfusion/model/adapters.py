"""Image <-> token adapters: patchify, linear patch projections, U-Net down/up blocks, timestep embedding.

Legend: N images, C channels, H/W height/width, p patch side, P = (H/p)(W/p) patches, D model dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
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


def sincos_2d(grid: tuple[int, int], dim: int, device: torch.device | None = None) -> Tensor:
    """Fixed 2D sine-cosine features [P, dim] of the patch grid positions, raster order (half per axis)."""
    gh, gw = grid
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1))
    yy, xx = torch.meshgrid(torch.arange(gh, device=device, dtype=torch.float32),
                            torch.arange(gw, device=device, dtype=torch.float32), indexing="ij")
    parts = []
    for coord in (yy.reshape(-1), xx.reshape(-1)):
        ang = coord[:, None] * omega[None]
        parts += [ang.sin(), ang.cos()]
    table = torch.cat(parts, dim=1)
    return F.pad(table, (0, dim - table.shape[1]))


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


# -- U-Net adapters (Transfusion paper, section 3.2 / 4.4) ---------------------------------------------------------
# The down path maps an image to the patch-grid tokens (one level per factor 2 from pixels to patches); the up path
# maps the transformer's outputs at those tokens back to pixels, with skip connections from the down path. Both
# are conditioned on the timestep embedding. Extra legend: c channels of a level, E timestep-embedding dim (= D).


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> timestep scale/shift -> GroupNorm -> SiLU -> conv3x3 (zero-init), plus a
    (1x1 when widths differ) skip: [N, c_in, h, w], [N, E] -> [N, c_out, h, w]."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.cond = nn.Linear(cond_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, c_NE: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.cond(F.silu(c_NE)).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


def _levels(patch: int) -> int:
    """Number of 2x resolution changes between pixels and the patch grid (patch must be a power of two)."""
    if patch < 1 or patch & (patch - 1):
        raise ValueError(f"U-Net adapters need a power-of-two patch size, got {patch}")
    return patch.bit_length() - 1


class UNetDown(nn.Module):
    """[N, C, H, W] + timestep embedding [N, E] -> tokens [N, P, D] and the features of every level (skips)."""

    def __init__(self, channels_in: int, patch: int, dim: int, widths: list[int], blocks: int, groups: int) -> None:
        super().__init__()
        if len(widths) != _levels(patch) + 1:
            raise ValueError(f"U-Net widths {widths} need log2(patch)+1 = {_levels(patch) + 1} entries")
        self.conv_in = nn.Conv2d(channels_in, widths[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.down = nn.ModuleList()
        prev = widths[0]
        for i, c in enumerate(widths):
            self.levels.append(nn.ModuleList(ResBlock(prev if b == 0 else c, c, dim, groups) for b in range(blocks)))
            prev = c
            if i + 1 < len(widths):
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.proj = nn.Linear(widths[-1], dim)

    def forward(self, x_NCHW: Tensor, c_NE: Tensor) -> tuple[Tensor, list[Tensor]]:
        h = self.conv_in(x_NCHW)
        skips = []
        for i, blocks in enumerate(self.levels):
            for block in blocks:
                h = block(h, c_NE)
            skips.append(h)
            if i < len(self.down):
                h = self.down[i](h)
        return self.proj(h.flatten(2).transpose(1, 2)), skips  # raster order, as ``patchify``


class UNetUp(nn.Module):
    """Tokens [N, P, D] + timestep embedding [N, E] + down-path skips -> [N, C, H, W].

    Each level's skip enters through a learned gate (one scalar per level) that starts closed (zero-init): early in
    training the output must come through the transformer, which has the text; the local path from the noisy input
    opens as it helps. The conv path is added to a per-token linear prediction (as ``LinearPatchOut``): image-wide
    information in the transformer outputs (the caption's color) reaches the pixels directly (measured on the shapes
    world: without it the caption's color binds far later; the final GroupNorm of the conv path can normalise a
    per-image offset away)."""

    def __init__(self, channels_out: int, patch: int, dim: int, widths: list[int], blocks: int, groups: int) -> None:
        super().__init__()
        _levels(patch)
        self.channels = channels_out
        self.proj = nn.Linear(dim, widths[-1])
        self.levels = nn.ModuleList()
        self.up = nn.ModuleList()
        prev = widths[-1]
        for i in reversed(range(len(widths))):
            c = widths[i]
            # the first block of a level takes the upsampled features concatenated with that level's skip
            self.levels.append(nn.ModuleList(ResBlock(prev + c if b == 0 else c, c, dim, groups)
                                             for b in range(blocks)))
            prev = c
            if i > 0:
                self.up.append(nn.Conv2d(c, widths[i - 1], 3, padding=1))
                prev = widths[i - 1]
        self.skip_gates = nn.Parameter(torch.zeros(len(widths)))  # coarsest level first, as ``levels``
        self.norm_out = nn.GroupNorm(groups, widths[0])
        self.conv_out = nn.Conv2d(widths[0], channels_out, 3, padding=1)
        self.patch = patch
        self.direct = nn.Linear(dim, channels_out * patch * patch)

    def forward(self, h_NPD: Tensor, grid: tuple[int, int], c_NE: Tensor, skips: list[Tensor]) -> Tensor:
        n = h_NPD.shape[0]
        h = self.proj(h_NPD).transpose(1, 2).reshape(n, self.proj.out_features, *grid)
        for j, blocks in enumerate(self.levels):
            skip = skips[len(skips) - 1 - j] * self.skip_gates[j].to(skips[0].dtype)
            h = torch.cat((h.to(skip.dtype), skip), dim=1)
            for block in blocks:
                h = block(h, c_NE)
            if j < len(self.up):
                h = self.up[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        direct = unpatchify(self.direct(h_NPD), self.patch, grid, self.channels)
        return direct + self.conv_out(F.silu(self.norm_out(h))).to(direct.dtype)
