"""The joint objective: text next-token cross-entropy + lambda * diffusion loss on generation-target images.

Losses are returned as sums with their counts, so that the reduction unit is explicit (config ``loss``) and a
distributed trainer can normalise by global counts across ranks and micro-steps instead of per rank.

The diffusion term is the model's image head's (``transfusion/model/image_head.py``): the whole-image head regresses
the schedule's objective (epsilon, v or flow velocity) on noised target images; the MAR head masks a random share of
each target image's patches and regresses the objective on the masked patches only, with its per-token denoiser.
Optional min-SNR-gamma weighting (``loss.snr_gamma``) scales each noised image's (or MAR token's) squared error by
``NoiseSchedule.loss_weight``. All randomness (timesteps, noise, masks) is drawn by the head from ``generator``; the
model's forward only computes. The image count is one rule for both heads (``image_loss_count``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from transfusion.batch import IGNORE_INDEX, Batch
from transfusion.config import LossConfig
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.model.image_head import image_loss_count


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


def compute_loss_terms(model, batch: Batch, mask: object, schedule: NoiseSchedule, cfg: LossConfig,
                       generator: torch.Generator | None) -> LossTerms:
    """One packed forward pass: the text CE sum and the image head's loss sum, with their counts. The head draws its
    own training inputs (timesteps, noise, masks) from ``generator``."""
    head = model.image_head
    draw = head.draw(batch, schedule, generator)
    logits, pred = model(batch.tokens, batch.positions, mask, draw.images, draw.timesteps, batch.image_rows,
                         batch.image_starts, batch.patch_grid, draw.extra)
    targets = batch.text_targets.reshape(-1)
    text_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX,
                               reduction="sum")
    text_count = (targets != IGNORE_INDEX).sum()
    image_sum = head.loss_sum(pred, draw, batch, schedule, cfg.snr_gamma, cfg.image_reduction)
    image_count = image_loss_count(batch, cfg.image_reduction)
    return LossTerms(text_sum, text_count, image_sum, torch.as_tensor(image_count, device=text_sum.device))
