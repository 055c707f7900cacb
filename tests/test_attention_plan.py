"""The attention plan (transfusion/attention/plan.py): resolved once, it only routes to the pure mask functions, and
its cached-block mask is the hybrid mask's rows read against a KV cache."""

from __future__ import annotations

import pytest
import torch

from transfusion.attention.backends import SplitMask, build_attention_mask
from transfusion.attention.masks import cached_block_mask, dense_mask
from transfusion.attention.plan import AttentionPlan, inference_plan, training_plan
from transfusion.config import Config, ModelConfig

CPU = torch.device("cpu")


def ids():
    """Two rows: [t t BOI i i i i EOI t] and [PAD t BOI i i i i EOI PAD]-like packing with two documents."""
    doc = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 1], [-1, 0, 0, 0, 0, 0, 0, 1, 1]])
    img = torch.tensor([[-1, -1, -1, 0, 0, 0, 0, -1, -1], [-1, -1, -1, 1, 1, 1, 1, -1, -1]])
    return doc, img


@pytest.mark.parametrize("bidirectional", [True, False])
def test_plan_routes_to_build_attention_mask(bidirectional):
    doc, img = ids()
    hidden = torch.full_like(doc, -1)
    hidden[0, 3:5] = 0
    plan = AttentionPlan("sdpa", bidirectional)
    assert torch.equal(plan.mask(doc, img, hidden_ids=hidden),
                       build_attention_mask(doc, img, "sdpa", bidirectional, hidden_ids=hidden))
    assert torch.equal(plan.mask(doc, img), dense_mask(doc, img, bidirectional)[:, None])


@pytest.mark.parametrize("bidirectional", [True, False])
def test_cached_block_mask_is_the_dense_mask_rows_of_the_block(bidirectional):
    """A prefix (left-padded) then one image block of P slots: the block's rows of the dense mask, read against the
    prefix's valid keys and the block, are the cached mask."""
    P = 4
    doc = torch.tensor([[-1, -1, 0, 0, 0] + [0] * P, [0, 0, 0, 0, 0] + [0] * P])
    img = torch.tensor([[-1] * 5 + [0] * P, [-1] * 5 + [1] * P])
    dense = dense_mask(doc, img, bidirectional)[:, None, -P:, :]  # [N, 1, P, S + P]
    cached = AttentionPlan("sdpa", bidirectional).cached_mask(doc[:, :5] >= 0, P)
    assert cached.shape == dense.shape
    assert torch.equal(cached, dense)
    assert torch.equal(cached, cached_block_mask(doc[:, :5] >= 0, P, bidirectional))


def test_inference_plan_follows_the_model_config():
    assert inference_plan(ModelConfig(image_attention="causal")) == AttentionPlan("sdpa", False)
    assert inference_plan(ModelConfig()).bidirectional_images
    assert inference_plan(object()).bidirectional_images  # a model config without the field: bidirectional


def test_training_plan_on_cpu():
    cfg = Config()
    plan = training_plan(cfg, CPU)
    assert (plan.backend, plan.flex, plan.fp32) == ("sdpa", None, cfg.train.autocast == "fp32")
    assert "sdpa on cpu" in plan.description
    cfg.model.attention, cfg.model.image_attention = "split", "causal"
    plan = training_plan(cfg, CPU)
    assert (plan.backend, plan.split_kernel, plan.bidirectional_images) == ("split", "sdpa", False)
    doc, img = ids()
    mask, ref = plan.mask(doc, img), build_attention_mask(doc, img, "split", False, split_kernel="auto")
    assert isinstance(mask, SplitMask) and mask.kernel is ref.kernel
    assert len(mask.plan.calls) == len(ref.plan.calls)
    for a, b in zip(mask.plan.calls, ref.plan.calls):
        assert torch.equal(a.q_idx, b.q_idx) and torch.equal(a.k_idx, b.k_idx) and a.causal == b.causal


def test_agree_is_asked_once_for_flex(monkeypatch):
    """The flex probe's verdict goes through ``agree`` (every rank the same kernel)."""
    import transfusion.attention.plan as plan_mod

    calls = []
    monkeypatch.setattr(plan_mod, "resolve_backend", lambda *a, **k: "flex")
    plan = training_plan(Config(), CPU, agree=lambda ok: calls.append(ok) or ok)
    assert plan.backend == "flex" and plan.flex is not None and calls == [True]
    assert plan.flex.describe() in plan.description
