"""The MAR image head: masked clean patches in, a per-token diffusion MLP out (MAR, arXiv 2406.11838; LTH14/mar).

Training: a random share of each target image's patches (truncated-Gaussian ratio with a minimum, drawn per image or
once per batch: ``model.mar.mask_ratio_per``) is replaced by a learned mask embedding at the transformer input; the
transformer's output z at each masked position conditions a small MLP denoiser that is trained,
``diffusion_batch_mul`` times per token, on that patch under the run's diffusion objective. Generation (outside the
model, with the sampling loops) reveals the patches of an image over K steps in a random order on a cosine schedule,
sampling each revealed patch with the head's denoiser.

Following the reference: the denoiser's residual blocks use LayerNorm with affine parameters before the adaLN
modulation (the final layer's LayerNorm has none); the head samples with DDPM without clipping the x0 estimate
(``model.mar.sampler = "auto"``: DDPM for epsilon / v, Euler for flow; ``sample.sampler`` is the whole-image head's);
the temperature scales the noise that every DDPM step adds (the initial noise is a unit Gaussian); deterministic
samplers, which add none, get it on their initial noise instead. One difference stays: the reference's denoiser also
learns its variance (twice the output channels, a variational-bound term); ours predicts the objective only and
samples with DDPM's fixed-small variance.

Legend: N images, P patches per image, E = C*p*p values per patch, D transformer dim, W head width, M tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from transfusion.batch import Batch
from transfusion.config import ModelConfig
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.model.adapters import TimestepEmbedding, patchify
from transfusion.model.image_head import HeadDraw, ImageHead, reduce_per_image


@dataclass
class MARInputs:
    """What one training pass of the MAR head needs besides the clean images."""

    patch_mask: Tensor  # [N, P] bool: True = replaced by the mask embedding at the transformer input
    index: Tensor  # [M] long: flat (image * P + patch) index of the tokens the head is trained on
    x_t: Tensor  # [M * mul, E] noisy patch tokens: the M tokens, repeated ``mul`` times (repeat-major)
    t: Tensor  # [M * mul] their timesteps


class AdaLNBlock(nn.Module):
    """Residual MLP block modulated by the condition: x + gate * MLP(LN(x) * (1 + scale) + shift)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)  # affine, as the reference's residual blocks
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))  # zero-init: every block starts as identity

    def forward(self, x_MW: Tensor, c_MW: Tensor) -> Tensor:
        shift, scale, gate = self.ada(c_MW).chunk(3, dim=-1)
        return x_MW + gate * self.mlp(self.norm(x_MW) * (1 + scale) + shift)


class MARDenoiser(nn.Module):
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
        """MAR practice: xavier-uniform linears, N(0, 0.02) timestep MLP, zero-init modulations and output; LayerNorm
        affine parameters at identity."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)
        for mod in self.modules():
            if isinstance(mod, nn.LayerNorm) and mod.weight is not None:
                nn.init.ones_(mod.weight)
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


def sample_patch_mask(n: int, num_patches: int, mask_ratio_min: float, generator: torch.Generator | None,
                      per: str = "image") -> Tensor:
    """[n, P] bool training masks: a ratio r ~ N(1, 0.25) truncated to [mask_ratio_min, 1] per image (or one for all
    ``n`` with ``per="batch"``, as the reference draws it), then ceil(r P) patches chosen in a random order."""
    ratio = truncated_normal(n if per == "image" else 1, mask_ratio_min, 1.0, 1.0, 0.25, generator).expand(n)
    count = (ratio * num_patches).ceil().long().clamp(1, num_patches)  # [n]
    rank = torch.rand(n, num_patches, generator=generator).argsort(dim=1).argsort(dim=1)  # random rank per patch
    return rank < count[:, None]


class MARImageHead(ImageHead):
    """Clean patches in (a masked share -> ``mask_emb``), the per-token ``denoiser`` out; see the module docstring."""

    def __init__(self, cfg: ModelConfig, image_channels: int) -> None:
        super().__init__(cfg, image_channels)
        d, p = cfg.dim, cfg.patch_size
        self.mask_emb = nn.Parameter(torch.zeros(d))
        self.denoiser = MARDenoiser(image_channels * p * p, d, cfg.mar.width, cfg.mar.depth, cfg.time_freq_dim)

    def timestep_embedding(self, timesteps_N: Tensor) -> None:
        return None  # the transformer sees clean patches

    def mark_inputs(self, h_NPD: Tensor, temb_ND: Tensor | None, patch_mask_NP: Tensor | None) -> Tensor:
        if patch_mask_NP is None:
            return h_NPD
        return torch.where(patch_mask_NP[..., None], self.mask_emb.to(h_NPD.dtype), h_NPD)

    def input_mask(self, extra: Any) -> Tensor:
        if not isinstance(extra, MARInputs):
            raise ValueError("the MAR head needs MARInputs (masks, noisy tokens) from MARImageHead.draw")
        return extra.patch_mask

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.mask_emb, std=std)
        self.denoiser.init_weights()

    # -- training --------------------------------------------------------------------------------------------
    def draw(self, batch: Batch, schedule: NoiseSchedule, generator: torch.Generator | None) -> HeadDraw:
        """Per-image patch masks (generation targets only), and for every masked patch ``diffusion_batch_mul``
        noisy copies with their timesteps. The transformer input is the clean images at t = 0; the target is the
        objective's target for the noisy tokens [M * mul, E]."""
        x0 = batch.images
        n, dev = x0.shape[0], x0.device
        num_patches = batch.patch_grid[0] * batch.patch_grid[1]
        mcfg = self.cfg.mar
        patch_mask = sample_patch_mask(n, num_patches, mcfg.mask_ratio_min, generator, mcfg.mask_ratio_per).to(dev)
        patch_mask &= batch.image_is_target[:, None]
        index = patch_mask.reshape(-1).nonzero()[:, 0]  # [M]
        tokens = patchify(x0, self.cfg.patch_size).flatten(0, 1)[index]  # [M, E]
        x0_tok = tokens.repeat(mcfg.diffusion_batch_mul, 1)  # [M * mul, E]
        t = schedule.sample_timesteps(x0_tok.shape[0], generator, dev)
        noise = torch.randn(x0_tok.shape, generator=generator).to(dev, x0.dtype)
        mar = MARInputs(patch_mask, index, schedule.add_noise(x0_tok, noise, t), t)
        zeros = torch.zeros(n, dtype=torch.long, device=dev)
        return HeadDraw(x0, zeros, schedule.target(x0_tok, noise, t), mar)

    def predict(self, z_NPD: Tensor, grid: tuple[int, int], enc, extra: Any = None) -> Tensor:
        """The denoiser's prediction [M * mul, E] (fp32) for the noisy tokens of ``extra`` (``MARInputs``)."""
        if not isinstance(extra, MARInputs):
            raise ValueError("the MAR head needs MARInputs (masks, noisy tokens) from MARImageHead.draw")
        z = z_NPD.reshape(-1, z_NPD.shape[-1])[extra.index]
        mul = extra.x_t.shape[0] // max(extra.index.shape[0], 1)
        return self.denoiser(extra.x_t, extra.t, z.repeat(mul, 1)).float()

    def loss_sum(self, pred: Tensor, draw: HeadDraw, batch: Batch, schedule: NoiseSchedule, snr_gamma: float,
                 reduction: str) -> Tensor:
        """Squared error averaged within each target image (over its masked tokens, their repeats and elements),
        then reduced like the whole-image head's per-image errors, so ``image_loss_count`` normalises both."""
        mar: MARInputs = draw.extra
        weight = schedule.loss_weight(mar.t, snr_gamma).to(pred.device)  # min-SNR per row (or ones)
        err = (pred - draw.target.float()).pow(2).mean(1) * weight  # [M * mul]
        num_patches = batch.patch_grid[0] * batch.patch_grid[1]
        n = batch.images.shape[0]
        img = (mar.index // num_patches).repeat(err.shape[0] // max(mar.index.shape[0], 1))  # image of each row
        sums = torch.zeros(n, device=err.device).index_add(0, img, err)
        counts = torch.zeros(n, device=err.device).index_add(0, img, torch.ones_like(err))
        return reduce_per_image(sums / counts.clamp(min=1), batch, reduction)  # 0 for images without masked tokens
