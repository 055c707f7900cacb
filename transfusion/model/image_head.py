"""The image-head interface and its whole-image implementation (the Transfusion head).

An image head decides everything that differs between ways of producing an image block from the transformer:

    timestep_embedding(t)       what the input adapter is told about the noise level (None: nothing)
    mark_inputs(h, temb, mask)  the image tokens that enter the transformer (+ timestep, or masked -> embedding)
    draw(batch, schedule, g)    the training inputs: noised images / masks, timesteps, the objective's target
    predict(z, grid, enc, d)    the prediction from the normalised hidden states at the image slots
    loss_sum(pred, d, ...)      summed squared error of that prediction (min-SNR weighted)
    start(engine, n, ..)        an ``ImageJob``: n images being sampled, advanced one transformer pass at a time
    sample(engine, prefix, ..)  one image per prefix at generation: a job driven to the end against one prefix batch

Sampling is a job rather than a loop so that a server can interleave it: the scheduler (``transfusion/serving``)
stacks the block passes of several requests' jobs into one forward, each row at its own step, and advances each job
with its own generator. ``ImageHead.sample`` is the same job run alone, the reference the scheduler is tested against.

Two implementations: ``WholeImageHead`` here (the transformer denoises the whole noisy image, Transfusion) and
``MARImageHead`` in ``transfusion/model/mar.py`` (clean patches, a masked share replaced by a learned embedding, and
a per-token MLP denoiser, MAR). The loss *count* is one rule for both (``image_loss_count``): it is fixed by the
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
from transfusion.diffusion.schedule import NoiseSchedule, guidance_scale
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

    def start(self, engine, n: int, *, guided: bool, guidance: float, sampler: str | None, steps: int,
              generator: torch.Generator, guidance_schedule: str) -> "ImageJob":
        """Begin sampling ``n`` images (the initial randomness is drawn from ``generator`` now)."""
        raise NotImplementedError

    def sample(self, engine, prefix, *, uncond, guidance: float, sampler: str | None, steps: int,
               generator: torch.Generator, guidance_schedule: str, trace: list | None = None) -> Tensor:
        """One image per prefix (each ending in BOI) -> latents [N, C, h, w]: a job run to the end, its passes against
        ``prefix`` (stacked with ``uncond`` under classifier-free guidance). ``trace`` (a list) receives
        ``job.snapshot()`` after every pass."""
        guided = uncond is not None and guidance != 1.0
        job = self.start(engine, prefix.next_pos.shape[0], guided=guided, guidance=guidance, sampler=sampler,
                         steps=steps, generator=generator, guidance_schedule=guidance_schedule)
        both = engine.stack_prefixes(prefix, uncond) if guided else prefix
        while not job.done:
            x, t, mask = job.block_input()
            pre = both if job.pass_guided else prefix
            job.advance(engine.image_block(pre, job.block_pass, job.rows(x), t, job.rows(mask)))
            if trace is not None:
                trace.append(job.snapshot())
        return job.result()


class ImageJob:
    """A head's sampling of ``n`` images in progress. Each ``block_input`` / ``advance`` pair is one transformer pass
    over the image blocks; ``block_pass`` names the engine pass it needs (``Engine.image_block``): "prediction"
    (noisy blocks at timestep t -> the head's prediction) or "condition" (clean blocks with masked patches -> per-token
    conditions). Under guidance (``pass_guided``) a pass covers 2n rows, [conditional; unconditional], with the same
    inputs (``rows``), and ``advance`` receives the output of all of them. All randomness comes from the job's generator."""

    block_pass: str
    n: int
    guided: bool
    index: int = 0  # passes done
    total: int = 0  # passes in all

    @property
    def done(self) -> bool:
        return self.index >= self.total

    @property
    def pass_guided(self) -> bool:
        """Whether the next pass needs the unconditional rows (a guided job may skip them on a pass whose guidance
        scale is 1, as the ``interval`` schedule's unguided ends)."""
        return self.guided

    def rows(self, x: Tensor | None) -> Tensor | None:
        """Inputs for every row of the next pass: the n conditional rows, repeated for the unconditional ones."""
        return None if x is None else torch.cat((x, x)) if self.pass_guided else x

    def block_input(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """(images [n, C, H, W], timestep (0-d), patch mask [n, P] or None) for the next pass."""
        raise NotImplementedError

    def advance(self, out: Tensor) -> None:
        raise NotImplementedError

    def preview(self) -> Tensor:
        """The current clean estimate, latents [n, C, h, w] (what a client may show while denoising; decode, then
        clamp: latents of a VAE are not bounded to [-1, 1])."""
        raise NotImplementedError

    def result(self) -> Tensor:
        raise NotImplementedError

    def snapshot(self):
        return self.preview().clone()


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

    def start(self, engine, n: int, *, guided: bool, guidance: float, sampler: str | None, steps: int,
              generator: torch.Generator, guidance_schedule: str) -> ImageJob:
        gh, gw = engine.patch_grid
        p = self.cfg.patch_size
        x = torch.randn((n, self.image_channels, gh * p, gw * p), generator=generator).to(engine.device)
        sched = engine.schedule.sampler(sampler or engine.schedule.default_sampler, steps)
        return DenoisingJob(engine.schedule, sched, x, guided, guidance, guidance_schedule, generator,
                            data_std=engine.guidance_data_std)


class DenoisingJob(ImageJob):
    """The whole-image head's sampling: one "prediction" pass per entry of the sampler's ``timesteps`` (Heun takes
    two per step), guided as unc + w (cond - unc), stepped by the sampler on the images' device (no host round
    trip). The preview is the clean estimate implied by the last prediction. ``data_std``: the std of the data, in
    which the ``interval`` schedule's noise window is measured (``schedule.guidance_sigmas``)."""

    block_pass = "prediction"

    def __init__(self, schedule: NoiseSchedule, sched, x: Tensor, guided: bool, guidance: float,
                 guidance_schedule: str, generator: torch.Generator, *, data_std: float) -> None:
        self.schedule, self.sched, self.x = schedule, sched, x
        self.n, self.guided, self.guidance, self.guidance_schedule = x.shape[0], guided, guidance, guidance_schedule
        self.generator, self.index, self.total = generator, 0, len(sched.timesteps)
        self._pred: Tensor | None = None
        interval = guidance_schedule == "interval"  # gated by each pass's own noise level
        self.scales = [guidance_scale(guidance, guidance_schedule, (i + 1) / self.total,
                                      schedule.edm_sigma(t) if interval else None, data_std=data_std)
                       for i, t in enumerate(sched.timesteps)]  # the guidance scale of every pass

    @property
    def pass_guided(self) -> bool:
        # at scale 1, unc + 1 (cond - unc) is cond: no unconditional rows
        return self.guided and self.scales[self.index] != 1.0

    def block_input(self) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.x, self.sched.timesteps[self.index], None

    def advance(self, out: Tensor) -> None:
        t = self.sched.timesteps[self.index]
        if self.pass_guided:
            cond, unc = out.chunk(2)
            out = unc + self.scales[self.index] * (cond - unc)
        self._pred = out  # turned into a clean estimate only when a preview is asked for
        self._t, self._x_t = t, self.x
        self.x = self.sched.step(out, t, self.x, generator=self.generator).prev_sample
        self.index += 1

    def preview(self) -> Tensor:
        if self._pred is None:
            return self.x
        return self.schedule.predict_x0(self._pred.float(), self._x_t.float(), self._t)

    def result(self) -> Tensor:
        return self.x


def zero_resblock_outputs(module: nn.Module) -> None:
    """U-Net residual blocks start as their skip path: zero second conv."""
    for mod in module.modules():
        if isinstance(mod, ResBlock):
            nn.init.zeros_(mod.conv2.weight)
            nn.init.zeros_(mod.conv2.bias)


def build_image_head(cfg: ModelConfig, image_channels: int) -> ImageHead:
    """The head named by ``model.head``."""
    if cfg.head == "mar":
        from transfusion.model.mar import MARImageHead

        return MARImageHead(cfg, image_channels)
    return WholeImageHead(cfg, image_channels)


__all__ = ["HeadDraw", "ImageHead", "WholeImageHead", "build_image_head", "image_loss_count", "noised_images",
           "reduce_per_image"]
