"""Which job samples a model's images, and one job run alone against a prefix batch.

    job = start_image_job(setup, n, guided=True, guidance=3.0, sampler=None, steps=50, generator=g,
                          guidance_schedule="constant")
    z = run_image_job(job, prefix, uncond, engine.image_block)      # latents [n, C, h, w]

The job is chosen by the model's image head (``model.head``) in ``IMAGE_JOBS``: the whole-image head denoises the
block (``transfusion/generation/denoise.py``), the MAR head reveals its patches in random order
(``transfusion/generation/mar_sampling.py``). ``run_image_job`` is the reference the serving scheduler's interleaved
jobs are tested against.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from transfusion.generation.denoise import start_denoising
from transfusion.generation.image_job import ImageJob, JobSetup
from transfusion.generation.mar_sampling import start_mar
from transfusion.generation.prefix import Prefix, concat_prefixes

# model.head -> the starter of its sampling job: (setup, n, *, guided, guidance, sampler, steps, generator,
# guidance_schedule) -> ImageJob, the initial randomness drawn from the generator when it starts
IMAGE_JOBS: dict[str, Callable[..., ImageJob]] = {"transformer": start_denoising, "mar": start_mar}

# (prefix batch, block pass, block inputs [M, C, H, W], timestep, patch mask [M, P] or None) -> the pass's output
BlockPass = Callable[[Prefix, str, Tensor, object, "Tensor | None"], Tensor]


def start_image_job(setup: JobSetup, n: int, *, guided: bool, guidance: float, sampler: str | None, steps: int,
                    generator: torch.Generator, guidance_schedule: str) -> ImageJob:
    """Begin sampling ``n`` images with the job of the model's image head (``setup.head.cfg.head``)."""
    return IMAGE_JOBS[setup.head.cfg.head](setup, n, guided=guided, guidance=guidance, sampler=sampler, steps=steps,
                                           generator=generator, guidance_schedule=guidance_schedule)


def run_image_job(job: ImageJob, prefix: Prefix, uncond: Prefix | None, block: BlockPass,
                  trace: list | None = None) -> Tensor:
    """Drive ``job`` to the end, its passes run by ``block`` against ``prefix`` (stacked with ``uncond`` on guided
    passes) -> latents [n, C, h, w]. ``trace`` (a list) receives ``job.snapshot()`` after every pass."""
    both = concat_prefixes(prefix, uncond) if job.guided else prefix
    while not job.done:
        x, t, mask = job.block_input()
        pre = both if job.pass_guided else prefix
        job.advance(block(pre, job.block_pass, job.rows(x), t, job.rows(mask)))
        if trace is not None:
            trace.append(job.snapshot())
    return job.result()
