"""The MAR per-token diffusion head: masking, loss on masked patches only, cached conditioning, reveal-only
generation that never rewrites a revealed patch, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import GRID, P, TOK, fit_fixed_batch, make_batch

from transfusion.attention.backends import build_attention_mask
from transfusion.attention.masks import dense_mask
from transfusion.config import ConfigError, DiffusionConfig, LossConfig, MARConfig, ModelConfig, load_config
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.generation.engine import Engine
from transfusion.latents.vae import PixelCodec
from transfusion.model import build_model
from transfusion.model.adapters import patchify
from transfusion.generation import mar_sampling
from transfusion.generation.mar_sampling import mar_sampler, reveal_counts
from transfusion.model.mar import sample_patch_mask, truncated_normal
from transfusion.training.losses import compute_loss_terms


def mar_model(seed: int = 0, num_iter: int = 3):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, patch_size=4, head="mar",
                      mar=MARConfig(depth=2, width=32, diffusion_batch_mul=2, num_iter=num_iter))
    return build_model(cfg, TOK.vocab_size, 3)


def wake(model):
    """Give the zero-init head outputs weights so that samples depend on the condition."""
    with torch.no_grad():
        for lin in [b.ada[1] for b in model.image_head.denoiser.blocks] + [model.image_head.denoiser.final_ada[1], model.image_head.denoiser.out]:
            lin.weight.normal_(std=0.1)
    return model.eval()


@pytest.fixture
def batch():
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    b = make_batch([["a red", 0, "circle", 1, "x"], ["blue", 2, "sq"]], 48, images)
    b.image_is_target = torch.tensor([True, False, True])  # image 1 is a (clean) conditioning image
    return b


def test_mask_ratio_and_reveal_schedule():
    r = truncated_normal(5000, 0.7, 1.0, 1.0, 0.25, torch.Generator().manual_seed(0))
    assert r.min() >= 0.7 and r.max() <= 1.0 and 0.85 < r.mean() < 0.9  # mean of N(1, .25) cut to [.7, 1]
    m = sample_patch_mask(200, 64, 0.7, torch.Generator().manual_seed(0))
    counts = m.sum(1)
    assert counts.min() >= math.ceil(0.7 * 64) and counts.max() <= 64
    assert len({tuple(row.nonzero()[:, 0].tolist()) for row in m}) > 150  # random positions per image
    for n_patches, k in ((64, 16), (4, 3), (4, 10), (9, 1)):
        c = reveal_counts(n_patches, k)
        assert sum(c) == n_patches and len(c) == min(k, n_patches) and min(c) >= 1
    c = reveal_counts(64, 16)
    assert c[0] < c[-1]  # cosine: few patches first, many at the end


def test_training_inputs_mask_targets_only_and_hide_masked_content(batch):
    draw = mar_model().image_head.draw(batch, NoiseSchedule(DiffusionConfig()), torch.Generator().manual_seed(0))
    x0, t, mar, target = draw.images, draw.timesteps, draw.extra, draw.target
    assert torch.equal(x0, batch.images) and (t == 0).all()  # the transformer sees clean patches
    assert not mar.patch_mask[1].any() and mar.patch_mask[[0, 2]].sum(1).min() >= math.ceil(0.7 * P)
    assert torch.equal(mar.index, mar.patch_mask.reshape(-1).nonzero()[:, 0])  # loss only on masked patches
    assert mar.x_t.shape == target.shape == (2 * len(mar.index), 48)
    # masked patches enter as the mask embedding: their content cannot reach any output
    model = wake(mar_model())
    mask = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa")
    hidden = batch.images.clone()
    tok = patchify(hidden, 4)
    tok[mar.patch_mask] = 5.0
    hidden = torch.nn.functional.fold(tok.transpose(1, 2), (8, 8), 4, stride=4)
    with torch.no_grad():
        a = model(batch.tokens, batch.positions, mask, batch.images, t, batch.image_rows, batch.image_starts, GRID, mar)
        b = model(batch.tokens, batch.positions, mask, hidden, t, batch.image_rows, batch.image_starts, GRID, mar)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mar_head_learns_a_fixed_batch(batch):
    model = mar_model()
    schedule = NoiseSchedule(DiffusionConfig())
    before, after = fit_fixed_batch(model, batch, schedule, steps=30)
    assert after < 0.8 * before
    assert all(p.grad is not None for p in model.parameters())
    # per-image reduction works too
    mask = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa")
    parts = compute_loss_terms(model, batch, mask, schedule, LossConfig(image_reduction="image"),
                               torch.Generator().manual_seed(0))
    assert parts.image_count.item() == 2
    # the counts do not depend on the random masks (trainers normalise micro-steps before the forward)
    for seed in range(2):
        parts = compute_loss_terms(model, batch, mask, schedule, LossConfig(), torch.Generator().manual_seed(seed))
        assert parts.image_count.item() == 2 * 3 * 8 * 8
    # min-SNR weighting reaches the per-token loss: epsilon weights are <= 1, a huge cap is plain epsilon
    plain, capped, uncapped = (compute_loss_terms(model, batch, mask, schedule, LossConfig(snr_gamma=g),
                                                  torch.Generator().manual_seed(0)) for g in (0.0, 5.0, 1e12))
    assert capped.image_sum < plain.image_sum and torch.allclose(uncapped.image_sum, plain.image_sum, rtol=1e-5)


def test_cached_block_condition_equals_the_full_pass():
    model = wake(mar_model())
    eng = Engine(model, TOK, NoiseSchedule(DiffusionConfig()), PixelCodec(), GRID, torch.device("cpu"),
                 precision="fp32")
    seq = [TOK.bos_id] + TOK.encode("red") + [TOK.boi_id]
    img = torch.rand(1, 3, 8, 8) * 2 - 1
    pmask = torch.tensor([[True, False, False, True]])
    z = eng.image_block_condition(eng.prefill([seq]), img, pmask)
    L = len(seq) + P
    image_ids = torch.full((1, L), -1)
    image_ids[0, len(seq):] = 0
    with torch.no_grad():
        h = model.embed(torch.tensor([seq + [TOK.image_id] * P]), model.embed_images(img, torch.zeros(1), pmask),
                        torch.tensor([0]), torch.tensor([len(seq)]))
        mask = dense_mask(torch.zeros(1, L, dtype=torch.long), image_ids)[:, None]
        h, _ = model.trunk(h, torch.arange(L)[None], mask)
        ref = model.image_condition(h[:, len(seq):])
    assert (z - ref).abs().max() < 1e-5


@pytest.mark.parametrize("objective,sampler", [("epsilon", "ddim"), ("flow", "euler")])
def test_generation_reveals_patches_once_and_is_reproducible(objective, sampler):
    model = wake(mar_model(num_iter=3))
    model.cfg.mar.sampler = sampler
    eng = Engine(model, TOK, NoiseSchedule(DiffusionConfig(objective=objective)), PixelCodec(), GRID,
                 torch.device("cpu"), precision="fp32")
    cond = eng.prefill([[TOK.bos_id] + TOK.encode("a red circle") + [TOK.boi_id], [TOK.bos_id, TOK.boi_id]])
    unc = eng.prefill([[TOK.bos_id, TOK.boi_id]] * 2)
    trace: list = []
    out = eng.denoise(cond, uncond=unc, guidance=3.0, sampler=sampler, steps=4,
                      generator=torch.Generator().manual_seed(0), guidance_schedule="linear", trace=trace)
    assert len(trace) == len(reveal_counts(P, 3)) == 3
    prev_tokens, prev_known = torch.zeros_like(trace[0][0]), torch.zeros_like(trace[0][1])
    for tokens, known in trace:
        assert (known & ~prev_known).sum(1).min() >= 1  # every step reveals something in every image
        assert torch.equal(tokens[prev_known], prev_tokens[prev_known])  # revealed patches never change
        assert (tokens[~known] == 0).all()  # nothing is written before it is revealed
        prev_tokens, prev_known = tokens, known
    assert prev_known.all() and torch.equal(patchify(out, 4), prev_tokens)
    a = eng.text_to_image(["a red circle", "blue"], steps=3, guidance=2.0, sampler=sampler, seed=7)
    b = eng.text_to_image(["a red circle", "blue"], steps=3, guidance=2.0, sampler=sampler, seed=7)
    c = eng.text_to_image(["a red circle", "blue"], steps=3, guidance=2.0, sampler=sampler, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(eng.caption(a, max_tokens=3)) == 2  # conditioning images go in clean


def test_mar_config_is_checked():
    with pytest.raises(ConfigError, match="model.adapter = 'linear'"):
        load_config(None, ["--model.head=mar", "--model.adapter=unet"])
    with pytest.raises(ConfigError, match="mask_ratio_min"):
        load_config(None, ["--model.head=mar", "--model.mar.mask_ratio_min=1.5"])


def test_mar_modules_run_without_images():
    model = mar_model().train()
    b = make_batch([["only text"]], 16, torch.zeros(0, 3, 8, 8))
    mask = build_attention_mask(b.doc_ids, b.image_ids, "sdpa")
    parts = compute_loss_terms(model, b, mask, NoiseSchedule(DiffusionConfig()), LossConfig(),
                               torch.Generator().manual_seed(0))
    parts.total(LossConfig()).backward()
    assert all(p.grad is not None for p in model.parameters()) and parts.image_count.item() == 0


def test_ddpm_step_matches_diffusers_and_temperature_scales_only_the_added_noise():
    from diffusers import DDPMScheduler

    for objective in ("epsilon", "v"):
        schedule = NoiseSchedule(DiffusionConfig(objective=objective))
        sched = schedule.sampler("ddpm", 5)
        assert isinstance(sched, DDPMScheduler)
        x = torch.randn(6, 48, generator=torch.Generator().manual_seed(0))
        pred = torch.randn(6, 48, generator=torch.Generator().manual_seed(1))
        for t in sched.timesteps:
            prev = int(sched.previous_timestep(t))
            ref = sched.step(pred, t, x, generator=torch.Generator().manual_seed(2)).prev_sample
            ours = schedule.ddpm_step(pred, int(t), prev, x, torch.Generator().manual_seed(2), clip=True)
            assert torch.allclose(ours, ref, atol=1e-5), (objective, int(t))
            mean = schedule.ddpm_step(pred, int(t), prev, x, torch.Generator().manual_seed(2), noise_scale=0.0, clip=True)
            hot = schedule.ddpm_step(pred, int(t), prev, x, torch.Generator().manual_seed(2), noise_scale=2.0, clip=True)
            cold = schedule.ddpm_step(pred, int(t), prev, x, torch.Generator().manual_seed(2), noise_scale=1.0, clip=True)
            if prev >= 0:  # a noisy step: the deviation from the posterior mean scales with the temperature
                assert torch.allclose(hot - mean, 2 * (cold - mean), atol=1e-5) and (cold - mean).abs().max() > 0
            else:  # the last step adds no noise (a variance clamped at 1e-20, as diffusers does)
                assert torch.allclose(hot, mean, atol=1e-6)


def test_mar_defaults_follow_the_reference():
    model = mar_model()
    head = model.image_head
    norms = [b.norm for b in head.denoiser.blocks]
    assert all(n.weight is not None and bool((n.weight == 1).all()) for n in norms)  # affine LayerNorm, identity
    assert head.denoiser.final_norm.weight is None  # the final layer's LayerNorm has none
    assert mar_sampler(model.cfg.mar, NoiseSchedule(DiffusionConfig())) == "ddpm" and not model.cfg.mar.clip_denoised
    assert mar_sampler(model.cfg.mar, NoiseSchedule(DiffusionConfig(objective="flow"))) == "euler"
    with pytest.raises(ConfigError, match="does not fit"):
        load_config(None, ["--model.head=mar", "--model.mar.sampler=euler"])
    # generation with the defaults: every denoiser step is a ddpm step, unclipped, its noise scaled by temperature
    eng = Engine(wake(mar_model(num_iter=2)), TOK, NoiseSchedule(DiffusionConfig()), PixelCodec(), GRID,
                 torch.device("cpu"), precision="fp32")
    eng.model.cfg.mar.temperature = 0.3
    calls = []
    real = eng.schedule.ddpm_step
    eng.schedule.ddpm_step = lambda *a, **kw: calls.append(kw) or real(*a, **kw)
    cond = eng.prefill([[TOK.bos_id] + TOK.encode("red") + [TOK.boi_id]])
    eng.denoise(cond, uncond=None, guidance=1.0, sampler=None, steps=4, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2 * 4 and all(kw == {"noise_scale": 0.3, "clip": False} for kw in calls)
    # the whole-image head's sampler (sample.sampler, passed by every tool) does not replace the head's own
    eng.text_to_image(["red"], steps=3, guidance=1.0, sampler="ddim", seed=0)
    assert len(calls) == 2 * 4 + 2 * 3


def test_mask_ratio_per_batch_draws_one_ratio():
    counts = []
    for seed in range(20):
        m = sample_patch_mask(50, 64, 0.7, torch.Generator().manual_seed(seed), per="batch")
        assert len(set(m.sum(1).tolist())) == 1 and m.sum(1)[0] >= math.ceil(0.7 * 64)  # one ratio for all
        counts.append(int(m.sum(1)[0]))
        if counts[-1] < 60:
            assert len({tuple(row.nonzero()[:, 0].tolist()) for row in m}) > 40  # positions random per image
    assert len(set(counts)) > 5 and min(counts) < 60  # the ratio itself is random across batches
    per_image = sample_patch_mask(50, 64, 0.7, torch.Generator().manual_seed(0))
    assert len(set(per_image.sum(1).tolist())) > 1


def test_exports_from_before_the_head_module_load_unchanged(tmp_path):
    """An export written with the old names (``mar_head.*``, no LayerNorm affine parameters) loads under today's
    names and gives the same outputs."""
    from transfusion.model.names import legacy_state_names, upgrade_state_names

    model = wake(mar_model())
    state = model.state_dict()
    old = {k: v for k, v in legacy_state_names(state).items()  # as exported before: no block LayerNorm params
           if not (k.startswith("mar_head.blocks.") and ".norm." in k)}
    assert any(k.startswith("mar_head.") for k in old) and "mask_emb" in old
    fresh = mar_model(seed=5)
    fresh.load_state_dict(upgrade_state_names(old))
    x, t = torch.randn(3, 48), torch.tensor([10, 500, 900])
    z = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(fresh.image_head.denoiser(x, t, z), model.image_head.denoiser(x, t, z))


def test_interval_guidance_gates_on_the_share_of_the_loop_not_of_the_patches(monkeypatch):
    """MAR has no noise level per pass: the interval schedule guides the passes whose share of the loop done,
    (k + 1) / K, is in GUIDANCE_INTERVAL (as the schedule's docs say), not by the share of patches revealed, which the
    cosine schedule holds behind it (16 patches in 8 passes: pass 1 is 25 % of the loop but 2 / 16 patches). The
    linear schedule keeps rising with the revealed share (the MAR reference's)."""
    from transfusion.diffusion.schedule import GUIDANCE_INTERVAL

    grid, K = (4, 4), 8
    model = wake(mar_model(num_iter=K))
    eng = Engine(model, TOK, NoiseSchedule(DiffusionConfig()), PixelCodec(), grid, torch.device("cpu"),
                 precision="fp32")
    scales: list[float] = []

    def record(setup, z, m, both, w, sampler, steps, generator):  # the scale each pass samples its patches at
        scales.append(w)
        return torch.zeros(m, model.image_head.denoiser.out.out_features)

    monkeypatch.setattr(mar_sampling, "sample_tokens", record)
    cond = eng.prefill([[TOK.bos_id] + TOK.encode("red") + [TOK.boi_id]])
    unc = eng.prefill([[TOK.bos_id, TOK.boi_id]])
    counts = reveal_counts(16, K)
    revealed = [sum(counts[:k + 1]) / 16 for k in range(K)]
    lo, hi = GUIDANCE_INTERVAL
    for schedule in ("interval", "linear"):
        scales.clear()
        eng.denoise(cond, uncond=unc, guidance=3.0, sampler=None, steps=2,
                    generator=torch.Generator().manual_seed(0), guidance_schedule=schedule)
        if schedule == "interval":
            by_loop = [3.0 if lo < (k + 1) / K <= hi else 1.0 for k in range(K)]
            by_patches = [3.0 if lo < r <= hi else 1.0 for r in revealed]
            assert by_loop != by_patches  # the two rules disagree here: the test tells them apart
            assert scales == by_loop
        else:
            assert scales == pytest.approx([1.0 + 2.0 * r for r in revealed])
