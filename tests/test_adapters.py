"""U-Net patch adapters, and the intra-image attention ablation (causal image blocks)."""

from __future__ import annotations

import pytest
import torch
from helpers import GRID, P, TOK, fit_fixed_batch, make_batch

from transfusion.attention.backends import build_attention_mask
from transfusion.attention.masks import dense_mask, hybrid_mask_mod
from transfusion.config import ConfigError, DiffusionConfig, LossConfig, ModelConfig, UNetConfig, load_config
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.generation.engine import Engine
from transfusion.latents.vae import PixelCodec
from transfusion.model import build_model
from transfusion.model.adapters import UNetDown, UNetUp, patchify
from transfusion.training.losses import compute_loss_terms


def unet_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, patch_size=4, adapter="unet",
                      unet=UNetConfig(channels=[8, 8, 16], groups=4), **kw)
    return build_model(cfg, TOK.vocab_size, 3)


@pytest.fixture
def batch():
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return make_batch([["a red", 0, "circle", 1, "x"], ["blue", 2, "sq"]], 48, images)


def test_unet_paths_map_between_pixels_and_the_patch_grid():
    down = UNetDown(3, 4, 32, [8, 8, 16], blocks=2, groups=4)
    up = UNetUp(3, 4, 32, [8, 8, 16], blocks=2, groups=4)
    x, c = torch.randn(2, 3, 16, 8), torch.randn(2, 32)
    tokens, skips = down(x, c)
    assert tokens.shape == (2, 8, 32)  # a 4 x 2 patch grid, raster order
    assert [s.shape[1:] for s in skips] == [(8, 16, 8), (8, 8, 4), (16, 4, 2)]
    assert up(tokens, (4, 2), c, skips).shape == x.shape
    # timestep conditioning reaches the tokens
    assert not torch.allclose(down(x, c + 1.0)[0], tokens)
    with pytest.raises(ValueError, match="power-of-two"):
        UNetDown(3, 3, 32, [8, 8], 1, 4)


def test_unet_config_is_checked():
    with pytest.raises(ConfigError, match="needs log2"):
        load_config(None, ["--model.adapter=unet", "--model.unet.channels=[8, 16]"])
    cfg = load_config(None, ["--model.adapter=unet", "--model.unet.channels=[8, 16, 32]", "--model.unet.groups=4"])
    assert cfg.model.unet.channels == [8, 16, 32]


def test_unet_model_starts_at_zero_and_its_cached_block_equals_the_full_pass(batch):
    model = unet_model().eval()
    mask = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa")
    with torch.no_grad():
        _, pred = model(batch.tokens, batch.positions, mask, batch.images, torch.full((3,), 500.0),
                        batch.image_rows, batch.image_starts, batch.patch_grid)
    assert pred.shape == batch.images.shape and pred.abs().max() == 0  # zero-init output conv
    torch.nn.init.normal_(model.image_head.image_out.conv_out.weight, std=0.1)
    torch.nn.init.normal_(model.image_head.image_out.direct.weight, std=0.1)
    torch.nn.init.ones_(model.image_head.image_out.skip_gates)  # open the skips from the down path
    for mod in model.modules():  # wake the zero-init residual branches too
        if hasattr(mod, "conv2"):
            torch.nn.init.normal_(mod.conv2.weight, std=0.1)
    eng = Engine(model, TOK, NoiseSchedule(DiffusionConfig()), PixelCodec(), GRID, torch.device("cpu"),
                 precision="fp32")
    seq = [TOK.bos_id] + TOK.encode("blue") + [TOK.boi_id]
    x = torch.randn(1, 3, 8, 8)
    cached = eng.image_block_prediction(eng.prefill([seq]), x, 300)
    L = len(seq) + P
    image_ids = torch.full((1, L), -1)
    image_ids[0, len(seq):] = 0
    with torch.no_grad():
        _, ref = model(torch.tensor([seq + [TOK.image_id] * P]), torch.arange(L)[None],
                       dense_mask(torch.zeros(1, L, dtype=torch.long), image_ids)[:, None], x,
                       torch.tensor([300.0]), torch.tensor([0]), torch.tensor([len(seq)]), GRID)
    assert (cached - ref).abs().max() < 1e-5


def test_unet_flow_model_learns_a_fixed_batch(batch):
    model = unet_model()
    schedule = NoiseSchedule(DiffusionConfig(objective="flow"))
    before, after = fit_fixed_batch(model, batch, schedule, steps=25)
    assert after < 0.8 * before
    assert all(p.grad is not None for p in model.parameters())
    assert model.image_head.image_out.skip_gates.abs().min() > 0  # the closed skip gates learn to open


# -- the attention ablation: causal image blocks ---------------------------------------------------------------


def test_causal_image_mask_drops_only_the_same_image_term():
    doc = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1]])
    img = torch.tensor([[-1, -1, 0, 0, 0, -1, -1, 1, 1, -1, -1]])
    bi, causal = dense_mask(doc, img)[0], dense_mask(doc, img, bidirectional_images=False)[0]
    allowed_causal = (doc[0, :, None] == doc[0, None, :]) & (doc[0, None, :] >= 0) & torch.ones(11, 11).tril().bool()
    assert torch.equal(causal, allowed_causal | torch.eye(11, dtype=torch.bool))
    assert bi[2, 4] and not causal[2, 4]  # an earlier patch no longer sees a later one
    assert torch.equal(bi & ~causal, bi & (img[0, :, None] == img[0, None, :]) & (img[0, :, None] >= 0)
                       & ~torch.ones(11, 11).tril().bool())
    mod = hybrid_mask_mod(doc, img, bidirectional_images=False)
    q, k = torch.arange(11)[:, None], torch.arange(11)[None, :]
    assert torch.equal(mod(torch.tensor(0), torch.tensor(0), q, k), causal)


def test_causal_image_model_trains_and_samples_causally(batch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=32, n_layers=2, n_heads=2, patch_size=4, image_attention="causal"),
                        TOK.vocab_size, 3).eval()
    torch.nn.init.normal_(model.image_head.image_out.proj.weight, std=0.1)
    schedule = NoiseSchedule(DiffusionConfig())
    # the caller's mask decides (the trainer and evaluation build it from model.image_attention): a causal image
    # block changes the image loss of the same model and draws, the text loss of this batch stays the same
    default = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa")
    causal = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa", bidirectional_images=False)
    a = compute_loss_terms(model, batch, default, schedule, LossConfig(), torch.Generator().manual_seed(0))
    b = compute_loss_terms(model, batch, causal, schedule, LossConfig(), torch.Generator().manual_seed(0))
    assert not torch.equal(a.image_sum, b.image_sum)
    # in generation, a later patch does not change an earlier patch's prediction
    eng = Engine(model, TOK, schedule, PixelCodec(), GRID, torch.device("cpu"), precision="fp32")
    pre = eng.prefill([[TOK.bos_id, TOK.boi_id]])
    x = torch.randn(1, 3, 8, 8)
    x2 = x.clone()
    x2[..., 4:, 4:] += 1.0  # the last patch
    p1, p2 = eng.image_block_prediction(pre, x, 500), eng.image_block_prediction(pre, x2, 500)
    assert torch.equal(patchify(p1, 4)[:, :3], patchify(p2, 4)[:, :3])
    assert not torch.equal(patchify(p1, 4)[:, 3], patchify(p2, 4)[:, 3])


def test_unet_modules_run_without_images():
    model = unet_model().train()
    b = make_batch([["only text"]], 16, torch.zeros(0, 3, 8, 8))
    mask = build_attention_mask(b.doc_ids, b.image_ids, "sdpa")
    parts = compute_loss_terms(model, b, mask, NoiseSchedule(DiffusionConfig(objective="flow")), LossConfig(),
                               torch.Generator().manual_seed(0))
    parts.total(LossConfig()).backward()
    assert all(p.grad is not None for p in model.parameters()) and parts.image_count.item() == 0
