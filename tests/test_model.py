"""Model behaviour: backends agree, the hybrid mask holds through the whole network, loss goes down."""

from __future__ import annotations

import warnings

import pytest
import torch

from transfusion.attention.backends import build_attention_mask
from transfusion.batch import Batch
from transfusion.config import DiffusionConfig, LossConfig, ModelConfig
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.model import build_model
from helpers import P, TOK, make_batch, tiny_model
from transfusion.training.losses import compute_loss_terms


def run(model, batch: Batch, backend: str = "sdpa", t: torch.Tensor | None = None):
    mask = build_attention_mask(batch.doc_ids, batch.image_ids, backend)
    t = torch.full((batch.num_images,), 500) if t is None else t
    with torch.no_grad():
        return model(batch.tokens, batch.positions, mask, batch.images, t, batch.image_rows, batch.image_starts,
                     batch.patch_grid)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 8, 8, generator=g)
    return make_batch([["a red", 0, "circle", 1, "x"], ["blue", 2, "sq"]], 48, images)


def test_flex_forward_equals_sdpa(batch):
    model = tiny_model()
    lo_s, im_s = run(model, batch, "sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # eager flex warns that it is unfused on CPU
        lo_f, im_f = run(model, batch, "flex")
    assert (lo_s - lo_f).abs().max() < 1e-5
    assert (im_s - im_f).abs().max() < 1e-5


def _text_positions_before(batch: Batch, end: int) -> torch.Tensor:
    idx = torch.arange(end)
    return idx[(batch.image_ids[0, :end] < 0) & (batch.doc_ids[0, :end] >= 0)]


def test_later_image_and_later_text_do_not_change_earlier_text(batch):
    model = tiny_model()
    logits, _ = run(model, batch)
    start_img1 = int(batch.image_starts[1])
    earlier = _text_positions_before(batch, start_img1)

    changed = Batch(**{f: getattr(batch, f) for f in batch.__slots__})
    changed.images = batch.images.clone()
    changed.images[1] += 3.0  # later image in the same document
    logits2, _ = run(model, changed)
    assert torch.equal(logits[0, earlier], logits2[0, earlier])
    assert not torch.allclose(logits[0, start_img1 + P:], logits2[0, start_img1 + P:])  # later text does change

    tok2 = batch.tokens.clone()
    tok2[0, start_img1 + P + 1] = TOK.encode("z")[0]  # text after image 1
    changed = Batch(**{f: getattr(batch, f) for f in batch.__slots__})
    changed.tokens = tok2
    logits3, _ = run(model, changed)
    assert torch.equal(logits[0, : start_img1 + P + 1], logits3[0, : start_img1 + P + 1])


def test_one_patch_changes_its_whole_image_only(batch):
    model = tiny_model()
    _, img = run(model, batch)
    changed = Batch(**{f: getattr(batch, f) for f in batch.__slots__})
    changed.images = batch.images.clone()
    changed.images[1, :, 0:4, 0:4] += 2.0  # patch 0 of image 1
    _, img2 = run(model, changed)
    # every patch of image 1 changes (bidirectional attention inside the image)
    for py in range(2):
        for px in range(2):
            a = img[1, :, py * 4:(py + 1) * 4, px * 4:(px + 1) * 4]
            b = img2[1, :, py * 4:(py + 1) * 4, px * 4:(px + 1) * 4]
            assert not torch.allclose(a, b), (py, px)
    assert torch.equal(img[0], img2[0])  # the earlier image is untouched
    assert torch.equal(img[2], img2[2])  # an image in another document is untouched


def test_documents_are_isolated(batch):
    model = tiny_model()
    logits, img = run(model, batch)
    single = make_batch([["blue", 0, "sq"]], 48, batch.images[2:3])
    # shift: the second document starts after the first in the packed row
    first_len = int((batch.doc_ids[0] == 0).sum())
    n2 = int((batch.doc_ids[0] == 1).sum())
    logits_single, img_single = run(model, single)
    assert (logits[0, first_len:first_len + n2] - logits_single[0, :n2]).abs().max() < 1e-5
    assert (img[2] - img_single[0]).abs().max() < 1e-5


def test_loss_decreases_on_fixed_batch(batch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=64, n_layers=2, n_heads=4, patch_size=4), TOK.vocab_size, 3)
    sched = NoiseSchedule(DiffusionConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mask = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa")
    losses = []
    for step in range(40):
        gen = torch.Generator().manual_seed(step % 4)  # a few fixed noise draws
        parts = compute_loss_terms(model, batch, mask, sched, LossConfig(), gen)
        loss = parts.total(LossConfig())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((parts.text_sum / parts.text_count).item())
        if step == 0:
            first_image = (parts.image_sum / parts.image_count).item()
    assert losses[-1] < 0.5 * losses[0]
    assert (parts.image_sum / parts.image_count).item() < first_image


def test_image_modules_run_without_images():
    model = tiny_model()
    b = make_batch([["only text"]], 16, torch.zeros(0, 3, 8, 8))
    sched = NoiseSchedule(DiffusionConfig())
    mask = build_attention_mask(b.doc_ids, b.image_ids, "sdpa")
    model.train()
    parts = compute_loss_terms(model, b, mask, sched, LossConfig(), torch.Generator().manual_seed(0))
    parts.total(LossConfig()).backward()
    # every parameter received a gradient (zeros for image modules), so sharded reductions never hang
    assert all(p.grad is not None for p in model.parameters())
    assert parts.image_count.item() == 0


def test_rope_equals_the_textbook_rotation_bitwise():
    from transfusion.model.layers import apply_rope, rope_tables

    def reference(x, positions, head_dim, theta):  # the naive form: rotate (x1, x2) pairs by position * freq
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        ang = positions.float()[..., None] * inv_freq
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)

    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 300, (3, 17), generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 4, 17, 16, generator=gen).to(dtype)
        got = apply_rope(x, *rope_tables(positions, 16, 10000.0))
        assert got.dtype == dtype and torch.equal(got, reference(x, positions, 16, 10000.0))
