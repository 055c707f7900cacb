"""Objectives (epsilon, v, flow) and their samplers: oracle recovery, train/sample agreement, learning, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import GRID, TOK, make_batch

from transfusion.attention.backends import build_attention_mask
from transfusion.config import ConfigError, DiffusionConfig, LossConfig, ModelConfig, load_config
from transfusion.diffusion.schedule import NoiseSchedule, guidance_scale, guidance_sigmas
from transfusion.generation.engine import Engine
from transfusion.latents.vae import PixelCodec
from transfusion.model import build_model
from transfusion.training.losses import compute_loss_terms

REPO = Path(__file__).resolve().parents[1]
CASES = [("epsilon", "ddim"), ("epsilon", "ddpm"), ("v", "ddim"), ("v", "ddpm"), ("flow", "euler"), ("flow", "heun")]


def oracle(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
    """The exact model output for the current x_t when the clean sample is known to be x0 (float64 inside)."""
    x0, x_t = x0.double(), x_t.double()
    T = schedule.num_train_timesteps
    if schedule.objective == "flow":
        return ((x_t - x0) / (float(t) / T)).float()  # velocity eps - x0, with eps = (x_t - (1 - s) x0) / s
    abar = schedule.alphas_cumprod[int(t)]
    eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
    if schedule.objective == "epsilon":
        return eps.float()
    return (abar.sqrt() * eps - (1 - abar).sqrt() * x0).float()


@pytest.mark.parametrize("objective,sampler", CASES)
def test_sampler_fed_the_oracle_recovers_the_clean_sample(objective, sampler):
    """Through the engine's own loop (with CFG on: the oracle answers the same for both halves)."""
    from helpers import tiny_model

    schedule = NoiseSchedule(DiffusionConfig(objective=objective, shift=3.0 if objective == "flow" else 1.0))
    eng = Engine(tiny_model(), TOK, schedule, PixelCodec(), GRID, torch.device("cpu"), precision="fp32")
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 1.8 - 0.9
    calls = []

    def fake_block(pre, x_t, t):
        calls.append(float(t))
        return oracle(schedule, x0.repeat(x_t.shape[0] // 2, 1, 1, 1), x_t, t)

    eng.image_block_prediction = fake_block
    pre = eng.prefill([[TOK.bos_id, TOK.boi_id]] * 2)
    out = eng.denoise(pre, uncond=pre, guidance=3.0, sampler=sampler, steps=8,
                      generator=torch.Generator().manual_seed(0))
    assert (out - x0).abs().max() < 1e-3
    assert calls[0] >= 0.9 * schedule.num_train_timesteps  # starts from (almost) pure noise


@pytest.mark.parametrize("objective,sampler", CASES)
def test_sampler_and_training_share_noise_levels(objective, sampler):
    """At every sampler timestep, the training process's x_t is the sample the sampler assumes."""
    schedule = NoiseSchedule(DiffusionConfig(objective=objective, shift=2.0 if objective == "flow" else 1.0))
    sched = schedule.sampler(sampler, 6)
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    for i, t in enumerate(sched.timesteps):
        x_t = schedule.add_noise(x0, eps, torch.full((4,), float(t)))
        if objective == "flow":
            s = float(sched.sigmas[sched.index_for_timestep(t)]) if sampler == "heun" else float(sched.sigmas[i])
            expected = (1 - s) * x0 + s * eps
        else:
            abar = sched.alphas_cumprod[int(t)]
            expected = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        assert torch.allclose(x_t, expected.float(), atol=1e-5), (i, float(t))


def test_training_timesteps():
    g = torch.Generator().manual_seed(0)
    vp = NoiseSchedule(DiffusionConfig()).sample_timesteps(1000, g, torch.device("cpu"))
    assert vp.dtype == torch.long and vp.min() >= 0 and vp.max() < 1000
    uni = NoiseSchedule(DiffusionConfig(objective="flow")).sample_timesteps(4000, g, torch.device("cpu"))
    ln = NoiseSchedule(DiffusionConfig(objective="flow", timestep_sampling="logit_normal"))
    ln = ln.sample_timesteps(4000, g, torch.device("cpu"))
    shifted = NoiseSchedule(DiffusionConfig(objective="flow", shift=3.0)).sample_timesteps(4000, g, torch.device("cpu"))
    for t in (uni, ln, shifted):
        assert t.is_floating_point() and 0 <= t.min() and t.max() <= 1000
    assert abs(uni.mean().item() - 500) < 25 and abs(ln.mean().item() - 500) < 25
    assert ln.std() < uni.std()  # logit-normal concentrates on the middle noise levels
    assert shifted.mean() > 600  # a shift > 1 moves training towards high noise (larger images)


def test_guidance_schedules():
    assert guidance_scale(3.0, "constant", 0.1) == 3.0
    assert guidance_scale(3.0, "linear", 0.0) == 1.0 and guidance_scale(3.0, "linear", 1.0) == 3.0
    # interval: unguided for the first 16 % of the loop and after 78 %, guided between (50 steps: passes 9-39)
    on = [k for k in range(50) if guidance_scale(3.0, "interval", (k + 1) / 50) == 3.0]
    assert on == list(range(8, 39)) and all(guidance_scale(3.0, "interval", (k + 1) / 50) == 1.0
                                            for k in range(50) if k not in on)
    # with the pass's noise level (EDM sigma) of data at EDM2's std 0.5, the interval is (0.28, 5.42]: flow Euler at
    # 10 steps guides t = 0.8..0.3
    sched = NoiseSchedule(DiffusionConfig(objective="flow"))
    ts = sched.sampler("euler", 10).timesteps
    on = lambda s, ts, std: [i for i, t in enumerate(ts)  # noqa: E731
                             if guidance_scale(3.0, "interval", 0.5, s.edm_sigma(t), data_std=std) == 3.0]
    assert on(sched, ts, 0.5) == list(range(2, 8))
    assert on(sched, ts, 1.0) == list(range(1, 6))  # unit-std data: (0.56, 10.84], noisier passes (t = 0.89..0.45)
    shifted = NoiseSchedule(DiffusionConfig(objective="flow", shift=3.0))  # noisier passes: the window moves later
    assert min(on(shifted, shifted.sampler("euler", 10).timesteps, 0.5)) > 2
    with pytest.raises(ValueError, match="data std"):
        guidance_scale(3.0, "interval", 0.5, 1.0)  # a noise level without the scale it is measured in
    with pytest.raises(ValueError, match="known: constant, linear, interval"):
        guidance_scale(3.0, "cosine", 0.5)


def test_interval_window_is_measured_in_the_data_std():
    """The noise window is EDM2's (0.28, 5.42] at EDM2's data std 0.5, bit for bit (the decisions of the unscaled
    gate, boundaries included), and moves with the data's std: data of std s is gated at sigma / s as EDM2's latents
    were at sigma / 0.5."""
    assert guidance_sigmas(0.5) == (0.28, 5.42)
    assert guidance_sigmas(1.0) == pytest.approx((0.56, 10.84)) and guidance_sigmas(0.25) == pytest.approx((0.14, 2.71))
    sigmas = [0.0, 0.1, 0.14, 0.2, 0.28, 0.2800001, 0.3, 0.5, 0.56, 0.6, 1.0, 2.71, 3.0, 5.42, 5.4200001, 6.0, 10.0,
              10.84, 11.0, 1e4, float("inf")]
    old = [3.0 if 0.28 < s <= 5.42 else 1.0 for s in sigmas]  # the gate before the window knew the data's std
    assert [guidance_scale(3.0, "interval", 0.5, s, data_std=0.5) for s in sigmas] == old
    for std in (0.25, 0.42, 1.0, 2.0):
        # the naive rule: compare the noise-to-signal ratio sigma / std with EDM2's window over its std 0.5
        want = [3.0 if 0.28 / 0.5 < s / std <= 5.42 / 0.5 else 1.0 for s in sigmas]
        interior = [i for i, s in enumerate(sigmas) if min(abs(s / std - b / 0.5) for b in (0.28, 5.42)) > 1e-6]
        got = [guidance_scale(3.0, "interval", 0.5, s, data_std=std) for s in sigmas]
        assert [got[i] for i in interior] == [want[i] for i in interior]
    at_one = [guidance_scale(3.0, "interval", 0.5, s, data_std=1.0) for s in (0.3, 0.5, 6.0, 10.0)]
    assert at_one == [1.0, 1.0, 3.0, 3.0]  # guided at EDM2's scale the other way round: the window moved
    with pytest.raises(ValueError, match="> 0"):
        guidance_sigmas(0.0)


@pytest.mark.parametrize("objective", ["epsilon", "v", "flow"])
def test_training_on_a_fixed_batch_lowers_the_objective_loss(objective):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    batch = make_batch([["a red", 0, "circle", 1], ["blue", 2, "sq"]], 40, images)
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=32, n_layers=1, n_heads=2, patch_size=4), TOK.vocab_size, 3)
    schedule = NoiseSchedule(DiffusionConfig(objective=objective))
    mask = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def image_loss() -> float:  # over the fixed noise draws used for training
        with torch.no_grad():
            parts = [compute_loss_terms(model, batch, mask, schedule, LossConfig(), torch.Generator().manual_seed(s))
                     for s in range(4)]
        return sum((p.image_sum / p.image_count).item() for p in parts) / 4

    before = image_loss()
    for step in range(40):
        parts = compute_loss_terms(model, batch, mask, schedule, LossConfig(), torch.Generator().manual_seed(step % 4))
        opt.zero_grad()
        parts.total(LossConfig()).backward()
        opt.step()
    assert image_loss() < 0.8 * before


def test_unknown_objective_head_or_sampler_is_one_clear_line():
    for override, listing in (("--diffusion.objective=x0", "known: epsilon, v, flow"),
                              ("--model.head=dit", "known: transformer, mar"),
                              ("--model.adapter=conv", "known: linear, unet"),
                              ("--sample.sampler=ddim", "known: euler, heun")):
        with pytest.raises(ConfigError, match=listing) as err:
            load_config(REPO / "recipes/shapes_tiny.toml", [override])
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="known: ddim, ddpm"):
        load_config(None, ["--diffusion.objective=v", "--sample.sampler=euler"])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "transfusion.train", "recipes/shapes_tiny.toml",
                           "--diffusion.objective=x0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0] == "error: unknown value 'x0' for 'diffusion.objective' (known: epsilon, v, flow)"


def x0_from_prediction(schedule: NoiseSchedule, x_t: torch.Tensor, pred: torch.Tensor, t_N: torch.Tensor):
    """Naive reference: the clean-sample estimate implied by a model output under each objective (float64)."""
    x_t, pred = x_t.double(), pred.double()
    if schedule.objective == "flow":
        return x_t - (t_N.double() / schedule.num_train_timesteps)[:, None] * pred  # x0 = x_s - s v
    abar = schedule.alphas_cumprod[t_N.long()][:, None]
    if schedule.objective == "epsilon":
        return (x_t - (1 - abar).sqrt() * pred) / abar.sqrt()
    return abar.sqrt() * x_t - (1 - abar).sqrt() * pred  # v


@pytest.mark.parametrize("objective", ["epsilon", "v", "flow"])
def test_min_snr_weighting_is_capped_snr_times_the_x0_error(objective):
    """Under every objective, weight * |objective error|^2 == min(SNR, gamma) * |x0 error|^2 per sample."""
    schedule = NoiseSchedule(DiffusionConfig(objective=objective))
    g = torch.Generator().manual_seed(3)
    n, gamma = 64, 5.0
    x0, eps = torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(n, 6, generator=g, dtype=torch.float64)
    t = schedule.sample_timesteps(n, g, torch.device("cpu"))
    t = t.clamp(min=5) if t.is_floating_point() else t  # keep flow sigma away from 0 (the division in the reference)
    x_t = schedule.add_noise(x0, eps, t)
    pred = schedule.target(x0, eps, t) + 0.1 * torch.randn(n, 6, generator=g, dtype=torch.float64)
    weighted = schedule.loss_weight(t, gamma).double() * (pred - schedule.target(x0, eps, t)).pow(2).sum(1)
    x0_err = (x0_from_prediction(schedule, x_t, pred, t) - x0).pow(2).sum(1)
    expected = schedule.snr(t).clamp(max=gamma) * x0_err
    assert torch.allclose(weighted, expected, rtol=1e-3, atol=1e-8)
    snr = schedule.snr(t)
    assert (snr > gamma).any() and (snr < gamma).any()  # both sides of the cap were exercised
    assert torch.equal(schedule.loss_weight(t, 0.0), torch.ones(n))


def test_min_snr_changes_only_the_image_term_and_a_huge_cap_is_plain_epsilon():
    g = torch.Generator().manual_seed(1)
    batch = make_batch([["a red", 0, "circle", 1], ["blue", 2, "sq"]], 40, torch.rand(3, 3, 8, 8, generator=g) * 2 - 1)
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=32, n_layers=1, n_heads=2, patch_size=4), TOK.vocab_size, 3)
    mask = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa")
    schedule = NoiseSchedule(DiffusionConfig(objective="epsilon"))

    def parts(gamma):
        with torch.no_grad():
            return compute_loss_terms(model, batch, mask, schedule, LossConfig(snr_gamma=gamma),
                                      torch.Generator().manual_seed(0))

    plain, capped, uncapped = parts(0.0), parts(5.0), parts(1e12)
    assert torch.equal(plain.text_sum, capped.text_sum) and torch.equal(plain.image_count, capped.image_count)
    assert capped.image_sum < plain.image_sum  # epsilon weights min(SNR, 5) / SNR <= 1, < 1 where SNR > 5
    assert torch.allclose(uncapped.image_sum, plain.image_sum, rtol=1e-5)
