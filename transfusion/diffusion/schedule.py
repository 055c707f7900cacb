"""The noise schedule and the training objective, and samplers built from the same schedule.

The schedule is a diffusers ``DDPMScheduler`` configuration (cosine = ``squaredcos_cap_v2``); training noises with
its ``alphas_cumprod`` and samplers (DDIM, DDPM) are diffusers schedulers made from the same config, so train and
sample can never disagree on the betas.

Legend: N images, C/H/W channels/height/width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transfusion.config import DiffusionConfig

SAMPLERS = ("ddim", "ddpm")


class NoiseSchedule:
    def __init__(self, cfg: DiffusionConfig) -> None:
        from diffusers import DDPMScheduler

        if cfg.objective != "epsilon":
            raise ValueError(f"unknown diffusion objective {cfg.objective!r} (known: epsilon)")
        self.cfg = cfg
        self.train_scheduler = DDPMScheduler(
            num_train_timesteps=cfg.num_train_timesteps,
            beta_schedule=cfg.beta_schedule,
            prediction_type="epsilon",
            clip_sample=cfg.clip_sample,
        )
        self.alphas_cumprod = self.train_scheduler.alphas_cumprod.to(torch.float64)  # [T]

    @property
    def num_train_timesteps(self) -> int:
        return self.cfg.num_train_timesteps

    def sample_timesteps(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        return t.to(device)

    def add_noise(self, x0_NCHW: Tensor, noise_NCHW: Tensor, t_N: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        abar = self.alphas_cumprod.to(x0_NCHW.device)[t_N.long()].to(x0_NCHW.dtype)
        abar = abar.view(-1, *([1] * (x0_NCHW.ndim - 1)))
        return abar.sqrt() * x0_NCHW + (1 - abar).sqrt() * noise_NCHW

    def target(self, x0_NCHW: Tensor, noise_NCHW: Tensor, t_N: Tensor) -> Tensor:
        """What the image head learns to predict (epsilon)."""
        return noise_NCHW

    def sampler(self, name: str, steps: int):
        """A fresh diffusers scheduler of kind ``name`` with ``steps`` inference steps set."""
        from diffusers import DDIMScheduler, DDPMScheduler

        classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
        if name not in classes:
            raise ValueError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")
        extra = {"timestep_spacing": "trailing"}  # start sampling at t = T-1, i.e. from (almost) pure noise
        if name == "ddim":
            extra["set_alpha_to_one"] = True
        sched = classes[name].from_config(self.train_scheduler.config, **extra)
        sched.set_timesteps(steps)
        return sched
