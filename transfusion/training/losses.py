"""The joint objective: text next-token cross-entropy + lambda * diffusion loss on generation-target images.

Losses are returned as sums with their counts, so that the reduction unit is explicit (config ``loss``) and a
distributed trainer can normalise by global counts across ranks and micro-steps instead of per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from transfusion.batch import IGNORE_INDEX, Batch
from transfusion.config import LossConfig
from transfusion.diffusion.schedule import NoiseSchedule


@dataclass
class LossParts:
    text_sum: Tensor  # summed CE over text targets (fp32 scalar)
    text_count: Tensor  # number of text targets
    image_sum: Tensor  # summed squared error over target image elements (or per-image means, "image" reduction)
    image_count: Tensor  # number of target image elements (or target images)

    def total(self, cfg: LossConfig, text_norm: Tensor | None = None, image_norm: Tensor | None = None) -> Tensor:
        """L = w_text * text_sum / text_norm + w_image * image_sum / image_norm (norms default to local counts)."""
        tn = (self.text_count if text_norm is None else text_norm).clamp(min=1)
        im = (self.image_count if image_norm is None else image_norm).clamp(min=1)
        return cfg.text_weight * self.text_sum / tn + cfg.image_weight * self.image_sum / im


def noised_images(batch: Batch, schedule: NoiseSchedule, generator: torch.Generator | None) -> tuple[Tensor, ...]:
    """Noise generation targets at random timesteps; conditioning images stay clean at t = 0.

    Returns (model input x_t [N,C,H,W], timesteps [N], objective target [N,C,H,W])."""
    x0 = batch.images
    n = x0.shape[0]
    t = schedule.sample_timesteps(n, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    is_target = batch.image_is_target
    t = torch.where(is_target, t, torch.zeros_like(t))
    x_t = torch.where(is_target[:, None, None, None], schedule.add_noise(x0, noise, t), x0)
    return x_t, t, schedule.target(x0, noise, t)


def compute_loss_parts(model, batch: Batch, mask: object, schedule: NoiseSchedule, cfg: LossConfig,
                       generator: torch.Generator | None) -> LossParts:
    x_t, t, target = noised_images(batch, schedule, generator)
    logits, pred = model(batch.tokens, batch.positions, mask, x_t, t, batch.image_rows, batch.image_starts,
                         batch.patch_grid)
    targets = batch.text_targets.reshape(-1)
    text_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX,
                               reduction="sum")
    text_count = (targets != IGNORE_INDEX).sum()
    sel = batch.image_is_target
    err = (pred - target.float()).pow(2) * sel[:, None, None, None]  # [N, C, H, W]; zero for non-targets
    if cfg.image_reduction == "element":
        image_sum, image_count = err.sum(), sel.sum() * math.prod(pred.shape[1:])
    else:  # "image": mean within each image, then over images
        image_sum, image_count = err.flatten(1).mean(1).sum(), sel.sum()
    return LossParts(text_sum, text_count, image_sum, torch.as_tensor(image_count, device=text_sum.device))
