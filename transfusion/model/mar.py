"""The MAR per-token diffusion head and its masking / reveal schedules (MAR, arXiv 2406.11838; our implementation).

Training: a random share of each target image's patches (truncated-Gaussian ratio with a minimum) is replaced by a
learned mask embedding at the transformer input; the transformer's output z at each masked position conditions a
small MLP denoiser that is trained, ``diffusion_batch_mul`` times per token, on that patch under the run's diffusion
objective. Generation reveals the patches of an image over K steps in a random order on a cosine schedule, sampling
each revealed patch with the head.

Legend: N images, P patches per image, E = C*p*p values per patch, D transformer dim, W head width, M tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from transfusion.model.adapters import TimestepEmbedding


@dataclass
class MARInputs:
    """What one training pass of the MAR head needs, drawn outside the model (the loss owns the randomness)."""

    patch_mask: Tensor  # [N, P] bool: True = replaced by the mask embedding at the transformer input
    index: Tensor  # [M] long: flat (image * P + patch) index of the tokens the head is trained on
    x_t: Tensor  # [M * mul, E] noisy patch tokens: the M tokens, repeated ``mul`` times (repeat-major)
    t: Tensor  # [M * mul] their timesteps


class AdaLNBlock(nn.Module):
    """Residual MLP block modulated by the condition: x + gate * MLP(LN(x) * (1 + scale) + shift)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))  # zero-init: every block starts as identity

    def forward(self, x_MW: Tensor, c_MW: Tensor) -> Tensor:
        shift, scale, gate = self.ada(c_MW).chunk(3, dim=-1)
        return x_MW + gate * self.mlp(self.norm(x_MW) * (1 + scale) + shift)


class MARHead(nn.Module):
    """The per-token denoiser: (noisy patch x_t [M, E], timestep t [M], condition z [M, D]) -> prediction [M, E]."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, freq_dim: int) -> None:
        super().__init__()
        self.time_emb = TimestepEmbedding(width, freq_dim)
        self.cond_proj = nn.Linear(cond_dim, width)
        self.in_proj = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))  # zero-init
        self.out = nn.Linear(width, token_dim)  # zero-init: the first prediction is 0

    def forward(self, x_ME: Tensor, t_M: Tensor, z_MD: Tensor) -> Tensor:
        c = self.time_emb(t_M) + self.cond_proj(z_MD)
        h = self.in_proj(x_ME.to(self.in_proj.weight.dtype))
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.out(self.final_norm(h) * (1 + scale) + shift)

    @torch.no_grad()
    def init_weights(self) -> None:
        """MAR practice: xavier-uniform linears, N(0, 0.02) timestep MLP, zero-init modulations and output."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)
        for lin in self.time_emb.mlp:
            if isinstance(lin, nn.Linear):
                nn.init.normal_(lin.weight, std=0.02)
        for lin in [b.ada[1] for b in self.blocks] + [self.final_ada[1], self.out]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)


def truncated_normal(n: int, low: float, high: float, mean: float, std: float,
                     generator: torch.Generator | None) -> Tensor:
    """n draws of N(mean, std) truncated to [low, high], by inverting the normal CDF (float64, on the CPU)."""
    a = torch.special.ndtr(torch.tensor((low - mean) / std, dtype=torch.float64))
    b = torch.special.ndtr(torch.tensor((high - mean) / std, dtype=torch.float64))
    u = a + (b - a) * torch.rand(n, generator=generator, dtype=torch.float64)
    return (mean + std * torch.special.ndtri(u)).clamp(low, high)


def sample_patch_mask(n: int, num_patches: int, mask_ratio_min: float, generator: torch.Generator | None) -> Tensor:
    """[n, P] bool training masks: per image a ratio r ~ N(1, 0.25) truncated to [mask_ratio_min, 1], then
    ceil(r P) patches chosen in a random order."""
    ratio = truncated_normal(n, mask_ratio_min, 1.0, 1.0, 0.25, generator)
    count = (ratio * num_patches).ceil().long().clamp(1, num_patches)  # [n]
    rank = torch.rand(n, num_patches, generator=generator).argsort(dim=1).argsort(dim=1)  # random rank per patch
    return rank < count[:, None]


def reveal_counts(num_patches: int, num_iter: int) -> list[int]:
    """Patches revealed at each of the K = min(num_iter, P) generation steps: after step k, floor(P cos(pi/2 (k+1)/K))
    stay masked (at least one is revealed per step, at least one stays masked until the last step)."""
    k_steps = max(1, min(num_iter, num_patches))
    counts, masked = [], num_patches
    for k in range(k_steps - 1):  # K <= P keeps masked >= 2 here, so the clamp below always reveals >= 1
        after = min(max(math.floor(num_patches * math.cos(math.pi / 2 * (k + 1) / k_steps)), 1), masked - 1)
        counts.append(masked - after)
        masked = after
    return counts + [masked]
