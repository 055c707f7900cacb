"""Optimizer groups, the warmup + cosine schedule, and EMA."""

import math

import pytest
import torch
from torch import nn

from transfusion.config import TrainConfig
from transfusion.training.ema import EMA
from transfusion.training.optim import build_lr_scheduler, build_optimizer, lr_at


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.gain = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 11, bias=False)
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)

    def forward(self, ids):
        return self.head(self.norm(self.proj(self.emb(ids))) * self.gain)


CFG = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.05, weight_decay=0.1, beta1=0.8, beta2=0.9)


def test_lr_schedule_values():
    assert lr_at(0, CFG) == pytest.approx(1e-4)  # (0 + 1) / warmup of the peak: near zero, not zero
    assert lr_at(9, CFG) == pytest.approx(1e-3)  # warmup ends at the peak
    assert lr_at(10, CFG) == pytest.approx(1e-3)
    assert lr_at(55, CFG) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))  # half-way through the cosine
    assert lr_at(100, CFG) == pytest.approx(1e-3 * 0.05)
    assert lr_at(500, CFG) == pytest.approx(1e-3 * 0.05)  # clamped after the end
    warm = [lr_at(s, CFG) for s in range(10)]
    decay = [lr_at(s, CFG) for s in range(10, 101)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_lr_schedule_without_warmup():
    cfg = TrainConfig(steps=10, lr=2.0, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(0, cfg) == pytest.approx(2.0)
    assert lr_at(5, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(0.0)


def test_scheduler_follows_lr_at():
    opt = build_optimizer(Toy(), CFG)
    sched = build_lr_scheduler(opt, CFG)
    seen = []
    for _ in range(101):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, CFG) for s in range(101)])
    assert all(g["lr"] == seen[-1] for g in opt.param_groups)


def test_optimizer_groups():
    model = Toy()
    opt = build_optimizer(model, CFG)
    assert isinstance(opt, torch.optim.AdamW)
    by_wd = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_wd[0.1] == {id(model.proj.weight), id(model.head.weight)}
    no_decay = (model.emb.weight, model.proj.bias, model.norm.weight, model.norm.bias, model.gain)
    assert by_wd[0.0] == {id(p) for p in no_decay}
    assert all(g["betas"] == (0.8, 0.9) for g in opt.param_groups)
    assert id(model.frozen) not in by_wd[0.0] | by_wd[0.1]


def test_optimizer_tied_embedding_listed_once_without_decay():
    model = Toy()
    model.head = nn.Linear(8, 11, bias=False)
    model.head.weight = model.emb.weight  # tied LM head
    opt = build_optimizer(model, CFG)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    nodecay = next(g for g in opt.param_groups if g["weight_decay"] == 0.0)
    assert any(p is model.emb.weight for p in nodecay["params"])


def test_ema_math_by_hand():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, -2.0]]))
    ema.update(model, step=0)  # decay = min(0.9, 1/10) = 0.1
    expected = 0.1 * torch.tensor([[1.0, 2.0]]) + 0.9 * torch.tensor([[3.0, -2.0]])
    torch.testing.assert_close(ema.shadow["weight"], expected, rtol=0, atol=1e-6)
    ema.update(model, step=1000)  # decay = min(0.9, 1001/1010) = 0.9
    expected = 0.9 * expected + 0.1 * torch.tensor([[3.0, -2.0]])
    torch.testing.assert_close(ema.shadow["weight"], expected, rtol=0, atol=1e-6)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.9


def test_ema_shadow_is_fp32_copy():
    model = nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(model, decay=0.99)
    sd = ema.shadow_state_dict()
    assert set(sd) == {"weight", "bias"} and all(t.dtype == torch.float32 for t in sd.values())
    assert sd["weight"].data_ptr() != model.weight.data_ptr()
    ema.update(model, step=5)  # bf16 params blend into fp32 shadows


def test_ema_swap_restores_exactly():
    torch.manual_seed(0)
    model = Toy()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.update(model, step=100)
    assert set(ema.shadow) == {n for n, p in model.named_parameters() if p.requires_grad}  # frozen: no shadow
    with ema.swapped_into(model):
        for n, p in model.named_parameters():  # a frozen parameter keeps its own value
            assert torch.equal(p, ema.shadow[n] if p.requires_grad else live[n])
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n])
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_into(model):
        raise RuntimeError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n])


def test_ema_state_dict_round_trip_and_wrapper_names():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    a, b = Toy(), Toy()
    b.proj = checkpoint_wrapper(b.proj)  # adds a `_checkpoint_wrapped_module.` segment to names
    ema_a, ema_b = EMA(a, 0.9), EMA(b, 0.9)
    assert set(ema_b.state_dict()) == set(ema_a.state_dict())
    ema_b.load_state_dict(ema_a.state_dict())
    for n, t in ema_a.state_dict().items():
        assert torch.equal(ema_b.shadow[n], t)
    with pytest.raises(KeyError):
        ema_b.load_state_dict({"nope": torch.zeros(1)})
    assert math.isfinite(float(ema_b.shadow["proj.weight"].sum()))


def test_ema_refuses_meta_weights():
    with torch.device("meta"):
        model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="materialised"):
        EMA(model, 0.9)
