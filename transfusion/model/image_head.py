"""The image-head interface and its whole-image implementation (the Transfusion head).

An image head decides everything that differs between ways of producing an image block from the transformer:

    timestep_embedding(t)       what the input adapter is told about the noise level (None: nothing)
    mark_inputs(h, temb, mask)  the image tokens that enter the transformer (+ timestep, or masked -> embedding)
    draw(batch, schedule, g)    the training inputs: noised images / masks, timesteps, the objective's target
    predict(z, grid, enc, d)    the prediction from the normalised hidden states at the image slots
    loss_sum(pred, d, ...)      summed squared error of that prediction (min-SNR weighted)

Sampling is not the head's: the sampling loops (the whole-image denoising loop, MAR's masked random-order
generation) live with generation and take the model as an argument; the head keeps the modules they call (the
per-token denoiser) and its config. The model never sees who samples from it.

Two implementations: ``WholeImageHead`` here (the transformer denoises the whole noisy image, Transfusion) and
``MARImageHead`` in ``transfusion/model/mar.py`` (clean patches, a masked share replaced by a learned embedding, and
a per-token MLP denoiser, MAR); ``build_image_head`` (``transfusion/model/heads.py``) builds the one ``model.head``
names. The loss *count* is one rule for both (``image_loss_count``): it is fixed by the
batch before any random draw, so trainers can normalise across ranks and micro-steps in advance.

Legend: N images, P patches per image, D model dim, C/H/W image channels/height/width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from transfusion.batch import Batch
from transfusion.config import ModelConfig
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.model.adapters import LinearPatchOut, ResBlock, TimestepEmbedding, UNetUp


@dataclass
class HeadDraw:
    """One training pass's random inputs, drawn by the head outside the model (the loss owns the randomness)."""

    images: Tensor  # [N, C, H, W] what the input adapter sees (noised targets, or clean images under MAR)
    timesteps: Tensor  # [N] timestep per image (0 for clean images)
    target: Tensor  # the objective's target, shaped like the head's prediction
    extra: Any = None  # head-specific inputs to ``predict`` (MAR: ``MARInputs``)


def image_loss_count(batch: Batch, reduction: str) -> Tensor:
    """The image loss's normaliser, the same for every head: target images x C*H*W under "element" reduction, target
    images under "image". A function of the batch alone, known before the forward pass."""
    targets = batch.image_is_target.sum()
    return targets * math.prod(batch.images.shape[1:]) if reduction == "element" else targets


def reduce_per_image(err_N: Tensor, batch: Batch, reduction: str) -> Tensor:
    """Sum of per-image mean squared errors ``err_N`` (0 for non-targets), weighted by the image's element count under
    "element" reduction, so that ``sum / image_loss_count`` is the mean over elements (or over images)."""
    return err_N.sum() * (math.prod(batch.images.shape[1:]) if reduction == "element" else 1)


class ImageHead(nn.Module):
    """Interface; see the module docstring. ``cfg`` is the model config, ``image_channels`` C."""

    def __init__(self, cfg: ModelConfig, image_channels: int) -> None:
        super().__init__()
        self.cfg, self.image_channels = cfg, image_channels

    def timestep_embedding(self, timesteps_N: Tensor) -> Tensor | None:
        raise NotImplementedError

    def mark_inputs(self, h_NPD: Tensor, temb_ND: Tensor | None, patch_mask_NP: Tensor | None) -> Tensor:
        raise NotImplementedError

    def init_weights(self, std: float) -> None:
        raise NotImplementedError

    def input_mask(self, extra: Any) -> Tensor | None:
        """[N, P] patches replaced by a mask embedding in a training pass with ``HeadDraw.extra`` (None: none)."""
        return None

    def draw(self, batch: Batch, schedule: NoiseSchedule, generator: torch.Generator | None) -> HeadDraw:
        raise NotImplementedError

    def predict(self, z_NPD: Tensor, grid: tuple[int, int], enc, extra: Any = None) -> Tensor:
        raise NotImplementedError

    def loss_sum(self, pred: Tensor, draw: HeadDraw, batch: Batch, schedule: NoiseSchedule, snr_gamma: float,
                 reduction: str) -> Tensor:
        raise NotImplementedError


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


class WholeImageHead(ImageHead):
    """The transformer denoises the whole noisy image: every image token carries the timestep embedding, and the
    output adapter (patch projection or U-Net up path) maps the block's hidden states to the objective's
    prediction for the whole image."""

    def __init__(self, cfg: ModelConfig, image_channels: int) -> None:
        super().__init__(cfg, image_channels)
        d, p = cfg.dim, cfg.patch_size
        self.time_emb = TimestepEmbedding(d, cfg.time_freq_dim)
        if cfg.adapter == "unet":
            u = cfg.unet
            self.image_out = UNetUp(image_channels, p, d, u.channels, u.blocks, u.groups)
        else:
            self.image_out = LinearPatchOut(image_channels, p, d)

    def timestep_embedding(self, timesteps_N: Tensor) -> Tensor:
        return self.time_emb(timesteps_N)  # [N, D]

    def mark_inputs(self, h_NPD: Tensor, temb_ND: Tensor | None, patch_mask_NP: Tensor | None) -> Tensor:
        return h_NPD + temb_ND[:, None, :].to(h_NPD.dtype)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """The output starts at zero (DiT practice): the first prediction is 0, a neutral estimate under every
        objective; U-Net residual blocks of the up path start as their skip path, its skip gates closed. (The
        linears were drawn N(0, std) by the model's init, in module order.)"""
        if isinstance(self.image_out, UNetUp):
            for out in (self.image_out.conv_out, self.image_out.direct):
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)
            nn.init.zeros_(self.image_out.skip_gates)  # skips open as training finds them useful
            zero_resblock_outputs(self.image_out)
        else:
            nn.init.zeros_(self.image_out.proj.weight)
            nn.init.zeros_(self.image_out.proj.bias)

    def draw(self, batch: Batch, schedule: NoiseSchedule, generator: torch.Generator | None) -> HeadDraw:
        x_t, t, target = noised_images(batch, schedule, generator)
        return HeadDraw(x_t, t, target)

    def predict(self, z_NPD: Tensor, grid: tuple[int, int], enc, extra: Any = None) -> Tensor:
        """[N, C, H, W] (fp32). The U-Net up path also needs the ``ImageEncoding`` of the same images."""
        if isinstance(self.image_out, UNetUp):
            if enc is None:
                raise ValueError("the U-Net output adapter needs the ImageEncoding of the same images")
            return self.image_out(z_NPD, grid, enc.temb, enc.skips).float()
        return self.image_out(z_NPD, grid).float()

    def loss_sum(self, pred: Tensor, draw: HeadDraw, batch: Batch, schedule: NoiseSchedule, snr_gamma: float,
                 reduction: str) -> Tensor:
        sel = batch.image_is_target
        weight = schedule.loss_weight(draw.timesteps, snr_gamma).to(pred.device) * sel  # [N]; 0 for non-targets
        err = (pred - draw.target.float()).pow(2) * weight[:, None, None, None]  # [N, C, H, W]
        return err.sum() if reduction == "element" else err.flatten(1).mean(1).sum()


def zero_resblock_outputs(module: nn.Module) -> None:
    """U-Net residual blocks start as their skip path: zero second conv."""
    for mod in module.modules():
        if isinstance(mod, ResBlock):
            nn.init.zeros_(mod.conv2.weight)
            nn.init.zeros_(mod.conv2.bias)


__all__ = ["HeadDraw", "ImageHead", "WholeImageHead", "image_loss_count", "noised_images", "reduce_per_image"]
