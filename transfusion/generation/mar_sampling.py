"""MAR's masked, random-order generation (MAR, arXiv 2406.11838; LTH14/mar): the image's patches are revealed over K
passes in a random order, on a cosine schedule.

Each pass runs the transformer over the image blocks (known patches clean, the rest the head's mask embedding)
against the frozen prefix cache (``image_block_condition``); the model's per-token denoiser
(``MARImageHead.denoiser``) then samples the patches revealed at that pass from their conditions. Revealed patches
are never changed again. The denoiser samples with ``model.mar.sampler`` ("auto": DDPM for epsilon / v, Euler for
flow); the temperature scales the noise every DDPM step adds (the initial noise is a unit Gaussian), and deterministic
samplers, which add none, get it on their initial noise instead.

Legend: n images, P patches per image, E = C*p*p values per patch, D transformer dim, M tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from transfusion.config import MARConfig
from transfusion.diffusion.schedule import NoiseSchedule, guidance_scale
from transfusion.generation.image_job import ImageJob, JobSetup
from transfusion.model.adapters import unpatchify


def reveal_counts(num_patches: int, num_iter: int) -> list[int]:
    """Patches revealed at each of the K = min(num_iter, P) generation steps: after step k, floor(P cos(pi/2 (k+1)/K))
    stay masked (at least one is revealed per step, at least one stays masked until the last step)."""
    k_steps = max(1, min(num_iter, num_patches))
    counts, masked = [], num_patches
    for k in range(k_steps - 1):  # K <= P keeps masked >= 2 here, so the clamp below always reveals >= 1
        after = min(max(math.floor(num_patches * math.cos(math.pi / 2 * (k + 1) / k_steps)), 1), masked - 1)
        counts.append(masked - after)
        masked = after
    return counts + [masked]


def mar_guidance_scales(guidance: float, schedule: str, counts: list[int]) -> list[float]:
    """The guidance scale of each MAR pass, revealing ``counts[k]`` patches at pass k: ``linear`` rises with the
    share of patches revealed after the pass (the MAR reference's schedule); ``interval`` guides the passes whose share
    of the loop done, (k + 1) / K, is in ``GUIDANCE_INTERVAL`` (MAR has no noise level per pass: the loop share is the
    uniform loop the interval was drawn for; the revealed share, on the cosine schedule, runs behind it)."""
    total, revealed, scales = sum(counts), 0, []
    for k, count in enumerate(counts):
        revealed += count
        progress = (k + 1) / len(counts) if schedule == "interval" else revealed / total
        scales.append(guidance_scale(guidance, schedule, progress))
    return scales


def mar_sampler(cfg: MARConfig, schedule: NoiseSchedule) -> str:
    """The denoiser's sampler: ``model.mar.sampler``, or for "auto" the reference's (DDPM; Euler under flow)."""
    if cfg.sampler != "auto":
        return cfg.sampler
    return "euler" if schedule.is_flow else "ddpm"


def sample_tokens(setup: JobSetup, z_MD: Tensor, m: int, both: bool, w: float, sampler: str, steps: int,
                  generator: torch.Generator) -> Tensor:
    """Sample m tokens [m, E] with the head's denoiser from their conditions (stacked [cond; uncond] when ``both``,
    combined as unc + w (cond - unc))."""
    head, schedule, dev = setup.head, setup.schedule, setup.device
    temperature = head.cfg.mar.temperature
    sched = schedule.sampler(sampler, steps)
    ddpm = sampler == "ddpm"
    x = torch.randn(m, head.denoiser.out.out_features, generator=generator)
    x = (x if ddpm else x * temperature).to(dev)
    for t in sched.timesteps:
        t_m = torch.full((z_MD.shape[0],), float(t), device=dev)
        with torch.no_grad(), setup.autocast():
            out = head.denoiser(torch.cat((x, x)) if both else x, t_m, z_MD).float()
        if both:
            cond, unc = out.chunk(2)
            out = unc + w * (cond - unc)
        if ddpm:
            x = schedule.ddpm_step(out, int(t), int(sched.previous_timestep(t)), x, generator,
                                   noise_scale=temperature, clip=head.cfg.mar.clip_denoised)
        else:
            x = sched.step(out, t, x, generator=generator).prev_sample  # on x's device: no host round trip
    return x


class MARJob(ImageJob):
    """MAR generation of n images. Each image's patches are revealed in a random order over K = ``model.mar.num_iter``
    passes, on the cosine schedule of ``reveal_counts``. A pass runs the transformer over the image blocks (known
    patches clean, the others the mask embedding) against the prefix cache ("condition"); then the denoiser samples
    the patches revealed at that pass (``steps`` steps of ``model.mar.sampler``, each pass at its scale of
    ``mar_guidance_scales``). Revealed patches never change. ``snapshot()``: (tokens [n, P, E], known [n, P]).
    """

    block_pass = "condition"

    def __init__(self, setup: JobSetup, n: int, guided: bool, guidance: float, guidance_schedule: str,
                 steps: int, generator: torch.Generator) -> None:
        head = setup.head
        self.setup, self.n, self.guided = setup, n, guided
        self.guidance, self.guidance_schedule = guidance, guidance_schedule
        self.steps, self.generator = steps, generator
        p, c, grid, dev = head.cfg.patch_size, head.image_channels, setup.patch_grid, setup.device
        self.P, self.e = grid[0] * grid[1], c * p * p
        self.sampler = mar_sampler(head.cfg.mar, setup.schedule)
        self.tokens = torch.zeros(n, self.P, self.e, device=dev)
        self.known = torch.zeros(n, self.P, dtype=torch.bool, device=dev)
        self.order = torch.rand(n, self.P, generator=generator).argsort(dim=1).to(dev)  # reveal order per image
        self.counts = reveal_counts(self.P, head.cfg.mar.num_iter)
        self.index, self.total, self.revealed = 0, len(self.counts), 0
        self.scales = mar_guidance_scales(guidance, guidance_schedule, self.counts)  # the scale of every pass

    def _images(self) -> Tensor:
        head = self.setup.head
        return unpatchify(self.tokens, head.cfg.patch_size, self.setup.patch_grid, head.image_channels)

    def block_input(self) -> tuple[Tensor, Tensor, Tensor | None]:
        return self._images(), torch.tensor(0), ~self.known

    def advance(self, z: Tensor) -> None:  # z [M, P, D]
        n, e, count = self.n, self.e, self.counts[self.index]
        idx = self.order[:, self.revealed:self.revealed + count]  # [n, r] patches revealed at this pass
        rows = torch.cat((idx, idx)) if self.guided else idx
        z_sel = z.gather(1, rows[..., None].expand(-1, -1, z.shape[-1])).reshape(-1, z.shape[-1])
        w = self.scales[self.index]
        x = sample_tokens(self.setup, z_sel, n * count, self.guided, w, self.sampler, self.steps, self.generator)
        self.tokens.scatter_(1, idx[..., None].expand(-1, -1, e), x.reshape(n, count, e).to(self.tokens.dtype))
        self.known.scatter_(1, idx, True)
        self.revealed += count
        self.index += 1

    def preview(self) -> Tensor:
        return self._images()  # unrevealed patches are 0 (mid grey in pixels)

    def result(self) -> Tensor:
        return self._images()

    def snapshot(self):
        return self.tokens.clone(), self.known.clone()


def start_mar(setup: JobSetup, n: int, *, guided: bool, guidance: float, sampler: str | None, steps: int,
              generator: torch.Generator, guidance_schedule: str) -> MARJob:
    """MAR generation of n images (``MARJob``; its reveal order is drawn from ``generator`` now). The ``sampler``
    argument (``sample.sampler``, a whole-image head's choice) is not used: the denoiser samples with
    ``model.mar.sampler``."""
    return MARJob(setup, n, guided, guidance, guidance_schedule, steps, generator)
