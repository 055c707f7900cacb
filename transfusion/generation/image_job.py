"""An image being sampled, one transformer pass at a time: the interface every head's sampling implements.

Sampling is a job rather than a loop so that a server can interleave it: the scheduler (``transfusion/serving``)
stacks the block passes of several requests' jobs into one forward, each row at its own step, and advances each job
with its own generator. ``run_image_job`` (``transfusion/generation/image_sampling.py``) is the same job run alone,
the reference the scheduler is tested against. A job holds the model's image head (its modules: the MAR denoiser)
and what the engine knows about the images (``JobSetup``); the model never sees the job.

Legend: n images, P patches per image, C/H/W image channels/height/width.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from transfusion.diffusion.schedule import NoiseSchedule


@dataclass(frozen=True)
class JobSetup:
    """What starting an image job needs besides its arguments: the model's image head and the engine's facts."""

    head: torch.nn.Module  # the model's ``image_head`` (a ``transfusion.model.image_head.ImageHead``)
    schedule: NoiseSchedule
    patch_grid: tuple[int, int]
    device: torch.device
    autocast: Callable[[], AbstractContextManager]  # the engine's precision context, for the head's own modules
    data_std: float  # the std of the data, in which the ``interval`` guidance window is measured


class ImageJob:
    """A head's sampling of ``n`` images in progress. Each ``block_input`` / ``advance`` pair is one transformer pass
    over the image blocks; ``block_pass`` names the pass it needs (``Engine.image_block``): "prediction"
    (noisy blocks at timestep t -> the head's prediction) or "condition" (clean blocks with masked patches -> per-token
    conditions). Under guidance (``pass_guided``) a pass covers 2n rows, [conditional; unconditional], with the same
    inputs (``rows``), and ``advance`` receives the output of all of them. All randomness comes from the job's
    generator."""

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
