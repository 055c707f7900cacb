"""The joint objective: text next-token cross-entropy + lambda * diffusion loss on generation-target images.

Losses are returned as sums with their counts, so that the reduction unit is explicit (config ``loss``) and a
distributed trainer can normalise by global counts across ranks and micro-steps instead of per rank.

The diffusion term follows the model's image head: the whole-image head regresses the schedule's objective (epsilon,
v or flow velocity) on noised target images; the MAR head masks a random share of each target image's patches and
regresses the objective on the masked patches only, with its per-token denoiser. Optional min-SNR-gamma weighting
(``loss.snr_gamma``) scales each noised image's (or MAR token's) squared error by ``NoiseSchedule.loss_weight``. All
randomness (timesteps, noise, masks) is drawn here from ``generator``; the model only computes.
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
from transfusion.model.adapters import patchify
from transfusion.model.mar import MARInputs, sample_patch_mask


@dataclass
class LossTerms:
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
    """Noise generation targets at random timesteps; conditioning images stay clean at t = 0. An image with a noise
    limit ``l < 1`` (``Batch.image_noise_limit``, the Transfusion captioning cap) has its draw scaled into
    ``[0, l * T)``: the same random numbers, so batches without limits are unchanged.

    Returns (model input x_t [N,C,H,W], timesteps [N], objective target [N,C,H,W])."""
    x0 = batch.images
    n = x0.shape[0]
    t = schedule.sample_timesteps(n, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    if batch.image_noise_limit is not None and n:
        limit = batch.image_noise_limit.to(t.device, torch.float64)
        scaled = t.to(torch.float64) * limit
        scaled = scaled.to(t.dtype) if t.is_floating_point() else scaled.floor().to(t.dtype)
        t = torch.where(limit < 1, scaled, t)
    is_target = batch.image_is_target
    t = torch.where(is_target, t, torch.zeros_like(t))
    x_t = torch.where(is_target[:, None, None, None], schedule.add_noise(x0, noise, t), x0)
    return x_t, t, schedule.target(x0, noise, t)


def compute_loss_terms(model, batch: Batch, mask: object, schedule: NoiseSchedule, cfg: LossConfig,
                       generator: torch.Generator | None) -> LossTerms:
    if getattr(model, "is_mar", False):
        x_in, t, mar, target = mar_inputs(batch, schedule, model.cfg, generator)
    else:
        (x_in, t, target), mar = noised_images(batch, schedule, generator), None
    logits, pred = model(batch.tokens, batch.positions, mask, x_in, t, batch.image_rows, batch.image_starts,
                         batch.patch_grid, **({} if mar is None else {"mar": mar}))
    targets = batch.text_targets.reshape(-1)
    text_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX,
                               reduction="sum")
    text_count = (targets != IGNORE_INDEX).sum()
    if mar is not None:
        weight = schedule.loss_weight(mar.t, cfg.snr_gamma).to(pred.device)
        image_sum, image_count = _mar_image_loss(pred, target, mar, batch, cfg, weight)
        return LossTerms(text_sum, text_count, image_sum, image_count.to(text_sum.device))
    sel = batch.image_is_target
    weight = schedule.loss_weight(t, cfg.snr_gamma).to(pred.device) * sel  # [N]; zero for non-targets
    err = (pred - target.float()).pow(2) * weight[:, None, None, None]  # [N, C, H, W]
    if cfg.image_reduction == "element":
        image_sum, image_count = err.sum(), sel.sum() * math.prod(pred.shape[1:])
    else:  # "image": mean within each image, then over images
        image_sum, image_count = err.flatten(1).mean(1).sum(), sel.sum()
    return LossTerms(text_sum, text_count, image_sum, torch.as_tensor(image_count, device=text_sum.device))


def mar_inputs(batch: Batch, schedule: NoiseSchedule, model_cfg, generator: torch.Generator | None):
    """Draw the MAR training inputs: per-image patch masks (generation targets only), and for every masked patch
    ``diffusion_batch_mul`` noisy copies with their timesteps. Returns (clean images [N,C,H,W], timesteps [N]
    (zeros: the transformer sees clean patches), MARInputs, objective target [M*mul, E])."""
    x0 = batch.images
    n, dev = x0.shape[0], x0.device
    num_patches = batch.patch_grid[0] * batch.patch_grid[1]
    mcfg = model_cfg.mar
    patch_mask = sample_patch_mask(n, num_patches, mcfg.mask_ratio_min, generator).to(dev)
    patch_mask &= batch.image_is_target[:, None]
    index = patch_mask.reshape(-1).nonzero()[:, 0]  # [M]
    tokens = patchify(x0, model_cfg.patch_size).flatten(0, 1)[index]  # [M, E]
    x0_tok = tokens.repeat(mcfg.diffusion_batch_mul, 1)  # [M * mul, E]
    t = schedule.sample_timesteps(x0_tok.shape[0], generator, dev)
    noise = torch.randn(x0_tok.shape, generator=generator).to(dev, x0.dtype)
    mar = MARInputs(patch_mask, index, schedule.add_noise(x0_tok, noise, t), t)
    zeros = torch.zeros(n, dtype=torch.long, device=dev)
    return x0, zeros, mar, schedule.target(x0_tok, noise, t)


def _mar_image_loss(pred: Tensor, target: Tensor, mar: MARInputs, batch: Batch, cfg: LossConfig,
                    weight: Tensor) -> tuple[Tensor, Tensor]:
    """Squared error averaged within each target image (over its masked tokens, their repeats and elements), then
    summed over images: weighted by the image's element count under "element" reduction, by 1 under "image".
    The counts are then those of the whole-image head (target images x C*H*W, or target images), fixed before the
    forward whatever the random masks, so trainers can normalise across micro-steps in advance."""
    err = (pred - target.float()).pow(2).mean(1) * weight  # [M * mul]; weight: min-SNR per row (or ones)
    num_patches = batch.patch_grid[0] * batch.patch_grid[1]
    n = batch.images.shape[0]
    img = (mar.index // num_patches).repeat(err.shape[0] // max(mar.index.shape[0], 1))  # image of each row
    sums = torch.zeros(n, device=err.device).index_add(0, img, err)
    counts = torch.zeros(n, device=err.device).index_add(0, img, torch.ones_like(err))
    per_image = sums / counts.clamp(min=1)  # 0 for images without masked tokens (non-targets)
    targets = batch.image_is_target.sum()
    if cfg.image_reduction == "element":
        elems = math.prod(batch.images.shape[1:])
        return per_image.sum() * elems, targets * elems
    return per_image.sum(), targets
