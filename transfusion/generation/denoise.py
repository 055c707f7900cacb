"""The whole-image head's sampling: the transformer denoises the whole noisy image block, one pass per sampler step.

The run's sampler (DDIM / DDPM for epsilon and v, Euler / Heun for flow, all from the one schedule object) steps the
block; every pass is one ``image_block_prediction`` against the frozen prefix cache, guided as unc + w (cond - unc).

Legend: n images, C/H/W image channels/height/width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transfusion.diffusion.schedule import NoiseSchedule, guidance_scale
from transfusion.generation.image_job import ImageJob, JobSetup


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


def start_denoising(setup: JobSetup, n: int, *, guided: bool, guidance: float, sampler: str | None, steps: int,
                    generator: torch.Generator, guidance_schedule: str) -> DenoisingJob:
    """Begin denoising ``n`` images: their initial noise is drawn from ``generator`` now (on the CPU, then moved)."""
    gh, gw = setup.patch_grid
    p, c = setup.head.cfg.patch_size, setup.head.image_channels
    x = torch.randn((n, c, gh * p, gw * p), generator=generator).to(setup.device)
    sched = setup.schedule.sampler(sampler or setup.schedule.default_sampler, steps)
    return DenoisingJob(setup.schedule, sched, x, guided, guidance, guidance_schedule, generator,
                        data_std=setup.data_std)
