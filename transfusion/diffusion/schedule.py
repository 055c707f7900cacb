"""One schedule object per run: the forward (noising) process, the training target and the samplers.

Objectives (``diffusion.objective``):

    epsilon   x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps          target eps              samplers: ddim, ddpm
    v         same x_t                                               target sqrt(abar_t) eps - sqrt(1 - abar_t) x0
    flow      x_s = (1 - s) x0 + s eps,  s = sigma in [0, 1]         target eps - x0         samplers: euler, heun

The epsilon / v process is a diffusers ``DDPMScheduler`` configuration (cosine = ``squaredcos_cap_v2``): training
noises with its ``alphas_cumprod`` and the DDIM / DDPM samplers are made from the same config with the matching
``prediction_type``. Rectified flow draws sigma uniformly or logit-normally and maps it through the resolution
shift ``s -> shift s / (1 + (shift - 1) s)``; its samplers are diffusers' flow-matching Euler / Heun schedulers made
with the same ``num_train_timesteps`` and ``shift``. So train and sample can never disagree on the noise levels.

The model's timestep input is the diffusers timestep: an integer in [0, T) for epsilon / v, ``sigma * T`` (a float)
for flow, with T = ``num_train_timesteps``. Clean conditioning images use timestep 0 under every objective.

Legend: N images (or tokens), C/H/W channels/height/width; any trailing shape works.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transfusion.config import SAMPLERS, ConfigError, DiffusionConfig

PREDICTION_TYPES = {"epsilon": "epsilon", "v": "v_prediction"}  # our objective name -> diffusers prediction_type


class NoiseSchedule:
    def __init__(self, cfg: DiffusionConfig) -> None:
        from diffusers import DDPMScheduler

        if cfg.objective not in SAMPLERS:
            raise ConfigError(f"unknown diffusion objective {cfg.objective!r} (known: {', '.join(SAMPLERS)})")
        self.cfg = cfg
        self.objective = cfg.objective
        self.train_scheduler = None
        self.alphas_cumprod = None
        if not self.is_flow:
            self.train_scheduler = DDPMScheduler(
                num_train_timesteps=cfg.num_train_timesteps,
                beta_schedule=cfg.beta_schedule,
                prediction_type=PREDICTION_TYPES[cfg.objective],
                clip_sample=cfg.clip_sample,
            )
            self.alphas_cumprod = self.train_scheduler.alphas_cumprod.to(torch.float64)  # [T]

    @property
    def is_flow(self) -> bool:
        return self.objective == "flow"

    @property
    def num_train_timesteps(self) -> int:
        return self.cfg.num_train_timesteps

    @property
    def samplers(self) -> tuple[str, ...]:
        return SAMPLERS[self.objective]

    @property
    def default_sampler(self) -> str:
        return self.samplers[0]

    # -- training ----------------------------------------------------------------------------------------------
    def shift_sigma(self, s: Tensor) -> Tensor:
        k = self.cfg.shift
        return s if k == 1.0 else k * s / (1 + (k - 1) * s)

    def sample_timesteps(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """Training timesteps [n]: integers in [0, T) (epsilon / v) or sigma * T floats (flow)."""
        if not self.is_flow:
            return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(device)
        if self.cfg.timestep_sampling == "logit_normal":
            u = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * torch.randn(n, generator=generator))
        else:
            u = torch.rand(n, generator=generator)
        return (self.shift_sigma(u) * self.num_train_timesteps).to(device)

    def _coefs(self, t_N: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(a_t, b_t) with x_t = a_t x0 + b_t eps, shaped to broadcast against ``like``."""
        if self.is_flow:
            s = t_N.to(torch.float64) / self.num_train_timesteps
            a, b = 1 - s, s
        else:
            abar = self.alphas_cumprod.to(like.device)[t_N.long()]
            a, b = abar.sqrt(), (1 - abar).sqrt()
        shape = (-1, *([1] * (like.ndim - 1)))
        return a.to(like.device, like.dtype).view(shape), b.to(like.device, like.dtype).view(shape)

    def add_noise(self, x0: Tensor, noise: Tensor, t_N: Tensor) -> Tensor:
        a, b = self._coefs(t_N, x0)
        return a * x0 + b * noise

    def snr(self, t_N: Tensor) -> Tensor:
        """Signal-to-noise ratio a_t^2 / b_t^2 of x_t [N] (float64); flow sigma is clamped away from 0."""
        if self.is_flow:
            s = (t_N.to(torch.float64) / self.num_train_timesteps).clamp(1e-5, 1.0)
            return ((1 - s) / s) ** 2
        abar = self.alphas_cumprod.to(t_N.device)[t_N.long()]
        return abar / (1 - abar)

    def edm_sigma(self, t) -> float:
        """The noise level of timestep ``t`` in EDM units, sigma = 1 / sqrt(SNR) (inf at pure noise)."""
        snr = float(self.snr(torch.as_tensor(t).reshape(1))[0])
        return float("inf") if snr == 0 else snr ** -0.5

    def loss_weight(self, t_N: Tensor, gamma: float) -> Tensor:
        """Min-SNR-gamma loss weights [N] (float32; Hang et al. 2023, arXiv 2303.09556): w = min(SNR, gamma) / c_t,
        where c_t is this objective's error scale at fixed x_t, |objective error|^2 = c_t |x0 error|^2 (epsilon:
        SNR, v: SNR + 1, flow velocity: 1 / s^2). The weighted loss is min(SNR, gamma) |x0 error|^2 under every
        objective: capped at high SNR, so nearly-clean steps stop dominating. ``gamma <= 0`` gives weights 1."""
        if gamma <= 0:
            return torch.ones(t_N.shape, dtype=torch.float32, device=t_N.device)
        snr = self.snr(t_N)
        if self.objective == "epsilon":
            scale = snr
        elif self.objective == "v":
            scale = snr + 1
        else:  # flow: 1 / s^2, with 1 / s = sqrt(SNR) + 1 since sqrt(SNR) = (1 - s) / s
            scale = (snr.sqrt() + 1) ** 2
        return (snr.clamp(max=gamma) / scale).to(torch.float32)

    def target(self, x0: Tensor, noise: Tensor, t_N: Tensor) -> Tensor:
        """What the image head learns to predict under this objective."""
        if self.objective == "epsilon":
            return noise
        if self.objective == "flow":
            return noise - x0
        a, b = self._coefs(t_N, x0)  # v = a eps - b x0
        return a * noise - b * x0

    # -- sampling ----------------------------------------------------------------------------------------------
    def predict_x0(self, pred: Tensor, x_t: Tensor, t) -> Tensor:
        """The clean estimate implied by a prediction of this objective at timestep ``t`` (a number or 0-d tensor:
        integer for epsilon / v, the sampler's float timestep for flow)."""
        a, b = self._coefs(torch.as_tensor(t).reshape(1).cpu(), x_t)
        if self.objective == "epsilon":
            return (x_t - b * pred) / a
        if self.objective == "flow":  # x_t = (1 - s) x0 + s eps, v = eps - x0
            return x_t - b * pred
        return a * x_t - b * pred

    def ddpm_step(self, pred: Tensor, t: int, prev_t: int, x_t: Tensor, generator: torch.Generator | None, *,
                  noise_scale: float = 1.0, clip: bool = False) -> Tensor:
        """One ancestral DDPM step ``t -> prev_t`` (posterior mean + fixed-small variance), the step of diffusers'
        ``DDPMScheduler``, with the added noise scaled by ``noise_scale`` (MAR's temperature) and optional clipping of
        the x0 estimate to [-1, 1]. The noise is drawn on the CPU from ``generator``, as diffusers does there."""
        if self.is_flow:
            raise ConfigError("ddpm_step needs an epsilon or v objective")
        ac = self.alphas_cumprod
        a_t = float(ac[t])
        a_prev = float(ac[prev_t]) if prev_t >= 0 else 1.0
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev
        x0 = self.predict_x0(pred.float(), x_t.float(), t)
        if clip:
            x0 = x0.clamp(-1, 1)
        mean = (a_prev ** 0.5 * beta / (1 - a_t)) * x0 + (alpha ** 0.5 * (1 - a_prev) / (1 - a_t)) * x_t.float()
        if t <= 0:
            return mean
        std = max((1 - a_prev) / (1 - a_t) * beta, 1e-20) ** 0.5
        noise = torch.randn(x_t.shape, generator=generator).to(x_t.device)
        return mean + std * noise_scale * noise

    def sampler(self, name: str, steps: int):
        """A fresh diffusers scheduler of kind ``name`` with ``steps`` inference steps set. Use it as
        ``for t in s.timesteps: x = s.step(model(x, t), t, x, generator=g).prev_sample``."""
        from diffusers import (
            DDIMScheduler,
            DDPMScheduler,
            FlowMatchEulerDiscreteScheduler,
            FlowMatchHeunDiscreteScheduler,
        )

        if name not in self.samplers:
            raise ConfigError(f"unknown sampler {name!r} for objective {self.objective!r} "
                             f"(known: {', '.join(self.samplers)})")
        if self.is_flow:
            cls = {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler}[name]
            sched = cls(num_train_timesteps=self.num_train_timesteps, shift=self.cfg.shift)
        else:
            extra = {"timestep_spacing": "trailing"}  # start sampling at t = T-1, i.e. from (almost) pure noise
            if name == "ddim":
                extra["set_alpha_to_one"] = True
            cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[name]
            sched = cls.from_config(self.train_scheduler.config, **extra)
        sched.set_timesteps(steps)
        return sched


# Guidance only at middle noise levels (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval"): their
# EDM2 interval of the noise level sigma = 1 / sqrt(SNR), in data units (x_t / a_t = x0 + sigma eps). EDM2 chose it
# for latents of std EDM2_DATA_STD (its sigma_data); what it fixes is the noise-to-signal ratio sigma / data std, so
# for data of std s the same window is GUIDANCE_SIGMAS * s / EDM2_DATA_STD (``guidance_sigmas``; s = 0.5 keeps it
# unscaled). Passes at the noisiest levels and the last clean-up ones go unguided. A head without one noise level per
# pass (MAR) gates on the share of its loop done instead, pass index / passes (not the share of patches revealed):
# the unscaled window in flow time t = sigma / (1 + sigma) is (0.22, 0.84], about the passes of a uniform loop with a
# share done in (0.16, 0.78].
GUIDANCE_SIGMAS = (0.28, 5.42)
EDM2_DATA_STD = 0.5
GUIDANCE_INTERVAL = (0.16, 0.78)


def guidance_sigmas(data_std: float) -> tuple[float, float]:
    """The interval ``GUIDANCE_SIGMAS`` for data of std ``data_std``: the same ratios sigma / data std as EDM2's window
    at its ``EDM2_DATA_STD`` (``data_std`` = 0.5 returns the window unchanged, bit for bit)."""
    if not data_std > 0:
        raise ValueError(f"the data std of the guidance interval must be > 0, got {data_std!r}")
    ratio = data_std / EDM2_DATA_STD
    return GUIDANCE_SIGMAS[0] * ratio, GUIDANCE_SIGMAS[1] * ratio


def guidance_scale(guidance: float, schedule: str, progress: float, sigma: float | None = None, *,
                   data_std: float | None = None) -> float:
    """Classifier-free guidance scale at ``progress`` in (0, 1] of the sampling loop (the share done after this
    pass): ``constant`` keeps ``guidance``; ``linear`` rises from 1 (no guidance) towards ``guidance``, reached at the
    last step; ``interval`` is ``guidance`` where the pass's noise level ``sigma`` (EDM units, data units) is in
    ``guidance_sigmas(data_std)`` (a ``sigma`` needs its ``data_std``) and 1 elsewhere; without a ``sigma``, where
    ``progress`` is in ``GUIDANCE_INTERVAL``."""
    if schedule == "constant":
        return guidance
    if schedule == "linear":
        return 1.0 + (guidance - 1.0) * progress
    if schedule == "interval":
        if sigma is not None:
            if data_std is None:
                raise ValueError("an interval gated by the noise level sigma needs the data std it is measured in")
            lo, hi = guidance_sigmas(data_std)
            return guidance if lo < sigma <= hi else 1.0
        lo, hi = GUIDANCE_INTERVAL
        return guidance if lo < progress <= hi else 1.0
    raise ConfigError(f"unknown guidance schedule {schedule!r} (known: constant, linear, interval)")
