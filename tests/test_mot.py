"""Mixture of transformers (``model.mot``) and frozen text (``train.freeze``).

The routing (gather each modality's rows, run its twin, scatter back) is held to the naive reference (both twins on
every token, ``torch.where``); every attention backend to the dense one with MoT on; the engine's cached passes to a
prefill of the whole sequence; freezing the text model to bitwise unchanged text weights and text-only logits.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from helpers import GRID, TOK, make_batch

from transfusion.attention.backends import build_attention_mask
from transfusion.config import ConfigError, LossConfig, ModelConfig, TrainConfig, load_config
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.model import build_model
from transfusion.model.layers import copy_text_to_image_twins
from transfusion.model.transfusion import is_image_twin, is_text_parameter
from transfusion.training.ema import EMA
from transfusion.training.freeze import freeze_parameters
from transfusion.training.losses import compute_loss_terms
from transfusion.training.metrics import flops_per_token, parameter_summary
from transfusion.training.optim import build_optimizer

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, qkv_bias=True, patch_size=4, mot=True)


def mot_model(seed: int = 0, perturb: bool = True, **overrides):
    """A tiny MoT model; ``perturb`` moves the image twins away from their text copies (and gives the zero-init
    image head weights), so a wrong routing shows."""
    torch.manual_seed(seed)
    model = build_model(dataclasses.replace(CFG, **overrides), TOK.vocab_size, 3)
    with torch.no_grad():
        torch.nn.init.normal_(model.image_head.image_out.proj.weight, std=0.02)
        if perturb:
            g = torch.Generator().manual_seed(seed + 100)
            for name, p in model.named_parameters():
                if is_image_twin(name):
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model


def packed():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return make_batch([["a red", 0, "circle", 1], ["x", 2], [3, "tail"]], 64, images)


def trunk_out(model, batch, mask, reference=False):
    t0 = torch.zeros(len(batch.images), dtype=torch.long)
    img = model.embed_images(batch.images.to(model.tok_emb.weight.dtype), t0)
    h = model.embed(batch.tokens, img, batch.image_rows, batch.image_starts)
    out, _ = model.trunk(h, batch.positions, mask, image_mask_BL=batch.image_ids >= 0, mot_reference=reference)
    return out


# -- parameters and init ---------------------------------------------------------------------------------------------
def test_twins_are_copies_and_text_weights_do_not_depend_on_mot():
    torch.manual_seed(3)
    plain = build_model(dataclasses.replace(CFG, mot=False), TOK.vocab_size, 3)
    torch.manual_seed(3)
    mot = build_model(CFG, TOK.vocab_size, 3)
    mot_state = mot.state_dict()
    assert set(plain.state_dict()) < set(mot_state)
    for name, value in plain.state_dict().items():  # a seed gives the same text (and image) weights
        assert torch.equal(mot_state[name], value), name
    twins = [n for n in mot_state if is_image_twin(n)]
    assert len(twins) == len([n for n in plain.state_dict() if n.startswith("layers.")])
    for name in twins:
        text = name.replace("image_", "", 1)
        assert torch.equal(mot_state[name], mot_state[text]) and mot_state[name] is not mot_state[text], name
    # the hook the pretrained loader calls: copies the (loaded) text weights again
    with torch.no_grad():
        mot.layers[1].attn.wqkv.weight.add_(1.0)
    copy_text_to_image_twins(mot)
    assert torch.equal(mot.layers[1].image_attn.wqkv.weight, mot.layers[1].attn.wqkv.weight)


def test_text_and_image_parameter_names():
    model = mot_model()
    names = [n for n, _ in model.named_parameters()]
    text = {n for n in names if is_text_parameter(n)}
    assert {"tok_emb.weight", "lm_head.weight", "norm.weight", "layers.0.attn.wqkv.bias",
            "layers.1.attn.q_norm.weight", "layers.1.ffn.w2.weight", "layers.0.ffn_norm.weight"} <= text
    assert not text & {n for n in names if is_image_twin(n)}
    assert not any(n.startswith(("image_", "layers.0.image_")) for n in text)
    assert "image_norm.weight" not in text and "layers.0.image_attn_norm.weight" not in text


def test_flops_per_token_are_unchanged_and_the_parameter_line_says_what_is_active():
    plain_cfg = dataclasses.replace(CFG, mot=False)
    assert flops_per_token(CFG, 300, 3, 64) == flops_per_token(plain_cfg, 300, 3, 64)
    model = mot_model()
    total = sum(p.numel() for p in model.parameters())
    twins = sum(p.numel() for n, p in model.named_parameters() if is_image_twin(n))
    plain = sum(p.numel() for p in build_model(plain_cfg, TOK.vocab_size, 3).parameters())
    assert total - twins == plain
    line = parameter_summary(model)
    assert f"{total / 1e6:.2f}M parameters ({twins / 1e6:.2f}M MoT image twins, {plain / 1e6:.2f}M active" in line
    assert "MoT" not in parameter_summary(build_model(plain_cfg, TOK.vocab_size, 3))


# -- routing ---------------------------------------------------------------------------------------------------------
def test_routing_equals_the_naive_reference_forward_and_backward():
    batch = packed()
    mask = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa")
    outs = []
    for reference in (False, True):
        model = mot_model().double()
        h = trunk_out(model, batch, mask, reference)
        h.pow(2).mean().backward()
        outs.append((h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12)
    assert outs[0][1].keys() == outs[1][1].keys()
    assert any(is_image_twin(n) for n in outs[0][1]) and any(is_text_parameter(n) for n in outs[0][1])
    for name, g in outs[0][1].items():
        torch.testing.assert_close(g, outs[1][1][name], rtol=1e-10, atol=1e-12, msg=name)


def test_image_twins_see_only_image_slots():
    """Text positions ignore the image twins and image slots ignore the text modules (up to attention mixing:
    with perturbed twins the image rows differ from the plain model's, text rows before the first image do not)."""
    batch = packed()
    mask = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa")
    model = mot_model().double()
    plain = mot_model(perturb=False).double()  # twins equal the text weights: MoT is the plain model exactly
    plain_off = build_model(dataclasses.replace(CFG, mot=False), TOK.vocab_size, 3).double()
    plain_off.load_state_dict({k: v for k, v in plain.state_dict().items() if not is_image_twin(k)})
    with torch.no_grad():
        h, h_same = trunk_out(model, batch, mask), trunk_out(plain, batch, mask)
        emb = plain_off.embed(batch.tokens, plain_off.embed_images(batch.images.double(),
                                                                   torch.zeros(4, dtype=torch.long)),
                              batch.image_rows, batch.image_starts)
        h_off, _ = plain_off.trunk(emb, batch.positions, mask)
    torch.testing.assert_close(h_same, h_off, rtol=1e-12, atol=1e-12)
    first_image = int(batch.image_starts[0])
    torch.testing.assert_close(h[0, :first_image], h_off[0, :first_image], rtol=0, atol=0)
    assert not torch.allclose(h[0, first_image:first_image + 4], h_off[0, first_image:first_image + 4])


def test_without_mot_the_modality_mask_changes_nothing():
    batch = packed()
    mask = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa")
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(CFG, mot=False), TOK.vocab_size, 3)
    with torch.no_grad():
        t0 = torch.zeros(len(batch.images), dtype=torch.long)
        h = model.embed(batch.tokens, model.embed_images(batch.images, t0), batch.image_rows, batch.image_starts)
        a, _ = model.trunk(h, batch.positions, mask)
        b, _ = model.trunk(h, batch.positions, mask, image_mask_BL=batch.image_ids >= 0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["split", "flex"])
def test_every_backend_equals_the_dense_reference_with_mot(backend):
    batch = packed()
    dense = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa")
    other = build_attention_mask(batch.doc_ids, batch.image_ids, backend, split_kernel="sdpa")
    model = mot_model()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # eager flex warns that it is unfused on CPU
        ref, got = trunk_out(model, batch, dense), trunk_out(model, batch, other)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if backend == "split":  # the split backend also trains: gradients equal too (fp64)
        grads = []
        for mask in (dense, other):
            m = mot_model().double()
            trunk_out(m, batch, mask).pow(2).mean().backward()
            grads.append([p.grad for p in m.parameters() if p.grad is not None])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_full_forward_routes_the_image_slots():
    """The packed training forward builds the modality mask from image_rows / image_starts itself."""
    batch = packed()
    mask = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa")
    model = mot_model().double()
    t = torch.full((4,), 10, dtype=torch.long)
    with torch.no_grad():
        logits, _ = model(batch.tokens, batch.positions, mask, batch.images.double(), t, batch.image_rows,
                          batch.image_starts, batch.patch_grid)
        enc = model.encode_images(batch.images.double(), t)
        h = model.embed(batch.tokens, enc.tokens, batch.image_rows, batch.image_starts)
        h, _ = model.trunk(h, batch.positions, mask, image_mask_BL=batch.image_ids >= 0, mot_reference=True)
    torch.testing.assert_close(logits, model.text_logits(h), rtol=1e-12, atol=1e-12)


def test_engine_cached_passes_equal_one_prefill_with_mot():
    """prefill(prompt, BOI) -> append_image -> step(EOI) gives the hidden state of one prefill of the whole
    sequence: the prefill routes the prompt's image slots, the image pass routes all of its tokens as image, the text
    step none."""
    from transfusion.config import DiffusionConfig
    from transfusion.generation.engine import Engine
    from transfusion.latents.vae import PixelCodec

    model = mot_model().double()
    eng = Engine(model, TOK, NoiseSchedule(DiffusionConfig()), PixelCodec(), GRID, torch.device("cpu"), "fp32")
    z = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)).double() * 2 - 1
    head = [TOK.bos_id] + TOK.encode("a red") + [TOK.boi_id]
    whole = eng.prefill([head + [TOK.image_id] * 4 + [TOK.eoi_id]], z, [(0, len(head))])
    step = eng.step_tokens(eng.append_image(eng.prefill([head]), z), torch.tensor([TOK.eoi_id]))
    torch.testing.assert_close(step.last_h, whole.last_h, rtol=1e-10, atol=1e-10)
    # and the routing matters: treating the image slots as text changes the result
    plain = eng.prefill([head + [TOK.image_id] * 4 + [TOK.eoi_id]], None, None)
    assert not torch.allclose(plain.last_h, whole.last_h)


# -- frozen text -----------------------------------------------------------------------------------------------------
def test_freeze_values_are_checked(tmp_path):
    assert load_config(None, ["--train.freeze=['text']"]).train.freeze == ["text"]
    with pytest.raises(ConfigError, match="train.freeze"):
        load_config(None, ["--train.freeze=['vision']"])
    with pytest.raises(ValueError, match="unknown train.freeze"):
        freeze_parameters(mot_model(), ["txt"])


def test_freezing_text_without_mot_warns_that_the_trunk_is_frozen(caplog):
    model = build_model(dataclasses.replace(CFG, mot=False), TOK.vocab_size, 3)
    with caplog.at_level("WARNING", logger="transfusion"):
        frozen = freeze_parameters(model, ["text"])
    assert "whole transformer trunk is frozen" in caplog.text
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("layers."))
    assert "image_norm.weight" not in frozen and "tok_emb.weight" in frozen


def train_frozen(steps: int = 4, tie: bool = False):
    """A tiny MoT model with frozen text trained ``steps`` AdamW steps on an image + text batch -> (model before,
    model after, optimizer, ema)."""
    batch = packed()
    mask = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa")
    model = mot_model(tie_embeddings=tie).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = freeze_parameters(model, ["text"])
    tcfg = TrainConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1, freeze=["text"])
    opt = build_optimizer(model, tcfg)
    ema = EMA(model, 0.9)
    schedule = NoiseSchedule(load_config(None).diffusion)
    for step in range(steps):
        parts = compute_loss_terms(model, batch, mask, schedule, LossConfig(), torch.Generator().manual_seed(step))
        parts.total(LossConfig()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, step)
    return model, before, frozen, opt, ema


@pytest.mark.parametrize("tie", [False, True])
def test_frozen_text_is_bitwise_unchanged_and_holds_no_optimizer_state(tie):
    model, before, frozen, opt, ema = train_frozen(tie=tie)
    params = dict(model.named_parameters())
    assert set(frozen) == {n for n in params if is_text_parameter(n)} and "tok_emb.weight" in frozen
    for name in frozen:
        assert torch.equal(params[name], before[name]), name
        assert name not in ema.shadow  # frozen: no EMA shadow either (the model's value is the average)
    assert set(ema.shadow) == {n for n, p in params.items() if p.requires_grad}
    changed = [n for n in params if is_image_twin(n) and not torch.equal(params[n], before[n])]
    assert len(changed) == len([n for n in params if is_image_twin(n)])
    state_ids = {id(p) for p in opt.state}
    assert not state_ids & {id(params[n]) for n in frozen}
    assert state_ids == {id(p) for p in params.values() if p.requires_grad}
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0

    # text-only input: bitwise the logits of the untrained model
    ids = torch.tensor([[TOK.bos_id] + TOK.encode("a red circle")])
    pos = torch.arange(ids.shape[1])[None]
    untrained = mot_model(tie_embeddings=tie)
    with torch.no_grad():
        a = model.text_logits(model.trunk(model.embed(ids), pos, None)[0])
        b = untrained.text_logits(untrained.trunk(untrained.embed(ids), pos, None)[0])
    assert torch.equal(a, b)


def test_checkpoint_round_trip_with_frozen_text_continues_bitwise(tmp_path):
    from transfusion.checkpoint import ModelOptimizerState, ObjectState, load_checkpoint, save_checkpoint

    batch = packed()
    mask = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa")
    schedule = NoiseSchedule(load_config(None).diffusion)
    tcfg = TrainConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1)

    def make(seed):
        model = mot_model(seed).train()
        freeze_parameters(model, ["text"])
        return model, build_optimizer(model, tcfg), EMA(model, 0.9)

    def step(model, opt, ema, s):
        parts = compute_loss_terms(model, batch, mask, schedule, LossConfig(), torch.Generator().manual_seed(s))
        parts.total(LossConfig()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, s)

    model, opt, ema = make(0)
    for s in range(2):
        step(model, opt, ema, s)
    state = {"app": ModelOptimizerState(model, opt), "ema": ObjectState(ema)}
    saved = state["app"].state_dict()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen <= set(saved["model"])  # frozen weights are saved with the model
    assert not frozen & set(saved["optim"]["state"]) and set(saved["optim"]["state"])  # but hold no optimizer state
    save_checkpoint(tmp_path, 2, state, {}, keep=1)
    model2, opt2, ema2 = make(1)
    load_checkpoint(tmp_path, {"app": ModelOptimizerState(model2, opt2), "ema": ObjectState(ema2)})
    for s in (2, 3):
        step(model, opt, ema, s)
        step(model2, opt2, ema2, s)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    for name, a in ema.shadow.items():
        assert torch.equal(a, ema2.shadow[name]), name


def test_meta_materialize_gives_twins_equal_to_text():
    """The sharding-independent init (``distributed/init.py``) runs ``init_weights``, whose last act copies the text
    modules into the twins: on the meta device too."""
    from transfusion.distributed.init import materialize

    with torch.device("meta"):
        model = build_model(CFG, TOK.vocab_size, 3)
    materialize(model, torch.device("cpu"), seed=7)
    state = model.state_dict()
    for name in (n for n in state if is_image_twin(n)):
        assert torch.equal(state[name], state[name.replace("image_", "", 1)]), name
    with torch.device("meta"):
        again = build_model(CFG, TOK.vocab_size, 3)
    materialize(again, torch.device("cpu"), seed=7)
    for name, value in again.state_dict().items():
        assert torch.equal(value, state[name]), name
