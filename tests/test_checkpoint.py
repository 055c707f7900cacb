"""DCP checkpoints (round trip, completion marker, pruning, errors) and the safetensors export."""

import json
import random

import pytest
import torch
from torch import nn

from transfusion.checkpoint import (
    CheckpointError,
    ExportError,
    ModelOptimizerState,
    ObjectState,
    checkpoint_step,
    export_model,
    latest_checkpoint,
    load_checkpoint,
    load_export,
    resolve_checkpoint,
    save_checkpoint,
)
from transfusion.checkpoint.export import export_metadata
from transfusion.config import TrainConfig
from transfusion.training.ema import EMA
from transfusion.training.optim import build_lr_scheduler, build_optimizer

CFG = TrainConfig(steps=20, lr=1e-2, warmup_steps=3, weight_decay=0.1)


def make(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 10))
    opt = build_optimizer(model, CFG)
    sched = build_lr_scheduler(opt, CFG)
    ema = EMA(model, CFG.ema_decay)
    return model, opt, sched, ema


def train_step(model, opt, sched, ema, step, ids):
    loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(1, dims=1).flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    ema.update(model, step)


def state_of(model, opt, sched, ema):
    return {"app": ModelOptimizerState(model, opt), "scheduler": ObjectState(sched), "ema": ema, "meta": {"step": 0}}


def batch(seed):
    return torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(seed))


def test_round_trip_continues_identically(tmp_path):
    model, opt, sched, ema = make(0)
    for s in range(3):
        train_step(model, opt, sched, ema, s, batch(s))
    state = state_of(model, opt, sched, ema)
    state["meta"]["step"] = 3
    extras = {"rng": torch.get_rng_state(), "py": random.getstate(), "data": {"shard": 2, "offset": 17}}
    path = save_checkpoint(tmp_path / "checkpoints", 3, state, extras, keep=2)
    assert path.name == "step_00000003" and (path / "COMPLETE").is_file() and (path / "rank_0.pt").is_file()
    assert checkpoint_step(path) == 3

    model2, opt2, sched2, ema2 = make(1)  # different init, fresh optimizer state
    state2 = state_of(model2, opt2, sched2, ema2)
    got = load_checkpoint(resolve_checkpoint(tmp_path), state2)  # the run dir resolves to its newest step
    assert got["data"] == {"shard": 2, "offset": 17} and got["py"] == extras["py"]
    assert torch.equal(got["rng"], extras["rng"])
    assert state2["meta"] == {"step": 3}
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), n
    for n in ema.shadow:
        assert torch.equal(ema.shadow[n], ema2.shadow[n]), n
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[p2][k]), k
    assert sched2.state_dict() == sched.state_dict()
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]

    for s in (3, 4):  # two continued steps stay bit-identical
        train_step(model, opt, sched, ema, s, batch(s))
        train_step(model2, opt2, sched2, ema2, s, batch(s))
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)
    for n in ema.shadow:
        assert torch.equal(ema.shadow[n], ema2.shadow[n])


def test_model_only_load(tmp_path):
    model, opt, sched, ema = make(0)
    train_step(model, opt, sched, ema, 0, batch(0))
    save_checkpoint(tmp_path, 1, state_of(model, opt, sched, ema), {}, keep=1)
    fresh = make(5)[0]
    load_checkpoint(tmp_path, {"app": ModelOptimizerState(fresh)})
    for p, p2 in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, p2)


def test_keep_k_pruning_and_incomplete_dirs(tmp_path):
    model, opt, sched, ema = make(0)
    root = tmp_path / "checkpoints"
    (root / "step_00000001").mkdir(parents=True)  # interrupted save older than any complete one
    (root / "step_00000009").mkdir()  # a newer incomplete one (e.g. in flight) survives pruning
    for step in (2, 4, 6, 8):
        save_checkpoint(root, step, state_of(model, opt, sched, ema), {}, keep=2)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step_00000006", "step_00000008", "step_00000009"]
    assert latest_checkpoint(root) == root / "step_00000008"  # step 9 has no marker
    assert latest_checkpoint(tmp_path) == root / "step_00000008"  # run dir works too
    with pytest.raises(CheckpointError, match="incomplete") as e:
        resolve_checkpoint(root / "step_00000009")
    assert "\n" not in str(e.value)


def test_stale_incomplete_dir_for_same_step_is_replaced(tmp_path):
    model, opt, sched, ema = make(0)
    stale = tmp_path / "step_00000005"
    stale.mkdir()
    (stale / "junk.distcp").write_bytes(b"half-written")
    save_checkpoint(tmp_path, 5, state_of(model, opt, sched, ema), {}, keep=0)
    assert not (stale / "junk.distcp").exists() and (stale / "COMPLETE").is_file()
    assert resolve_checkpoint(stale) == stale


def test_resolve_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "empty_run")
    assert latest_checkpoint(tmp_path / "nope") is None


def test_corrupt_metadata(tmp_path):
    model, opt, sched, ema = make(0)
    path = save_checkpoint(tmp_path, 1, state_of(model, opt, sched, ema), {}, keep=1)
    (path / ".metadata").write_bytes(b"\x00not a pickle")
    with pytest.raises(CheckpointError, match="metadata") as e:
        resolve_checkpoint(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="metadata"):
        load_checkpoint(path, state_of(model, opt, sched, ema))


def test_missing_rank_extras_and_missing_keys(tmp_path):
    model, opt, sched, ema = make(0)
    path = save_checkpoint(tmp_path, 1, state_of(model, opt, sched, ema), {"a": 1}, keep=1)
    with pytest.raises(CheckpointError, match=r"no rank_1\.pt \(saved by 1 rank"):
        load_checkpoint(path, state_of(model, opt, sched, ema), rank=1)
    bigger = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 10), nn.Linear(10, 2))
    with pytest.raises(CheckpointError, match="failed to load checkpoint") as e:
        load_checkpoint(path, {"app": ModelOptimizerState(bigger)})
    assert "\n" not in str(e.value)


def test_export_round_trip(tmp_path):
    emb = torch.randn(10, 4)
    sd = {
        "emb.weight": emb,
        "head.weight": emb,  # tied: shares storage
        "half": torch.randn(3, 5, dtype=torch.bfloat16),
        "view": torch.arange(12.0).view(3, 4).t(),  # non-contiguous
        "count": torch.tensor([1, 2, 3], dtype=torch.int64),
    }
    config = {"model": {"dim": 4}, "latents": {"kind": "pixels"}}
    out = export_model(tmp_path / "export", sd, config, metadata={"step": 12, "commit": "abc"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded, cfg = load_export(out)
    assert cfg == config and set(loaded) == set(sd)
    for k, v in sd.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert export_metadata(out)["step"] == "12" and export_metadata(out)["commit"] == "abc"

    (tmp_path / "tok.json").write_text("{}")
    export_model(out, {"x": torch.ones(2)}, {"v": 2}, files={"tokenizer.json": tmp_path / "tok.json"})
    assert (out / "tokenizer.json").read_text() == "{}"  # files travel with the export
    export_model(out, {"x": torch.ones(2)}, {"v": 2})  # replaces the previous export
    loaded, cfg = load_export(out)
    assert set(loaded) == {"x"} and cfg == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "tok.json"]  # no temp dirs left behind


def test_export_errors(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        load_export(tmp_path / "missing")
    out = export_model(tmp_path / "export", {"x": torch.ones(2)}, {})
    (out / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match="invalid config.json") as e:
        load_export(out)
    assert "\n" not in str(e.value)
    (out / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="missing model.safetensors"):
        load_export(out)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train.log").write_text("x")
    with pytest.raises(ExportError, match="not an export"):
        export_model(tmp_path / "run", {"x": torch.ones(2)}, {})
    assert json.loads("{}") == {}


def test_checkpoints_from_before_the_image_head_module_are_refused_clearly(tmp_path):
    """A training checkpoint with the old parameter names (time_emb, image_out, mar_head, mask_emb at the top
    level) gets one line saying what to do, not DCP's missing-key error."""

    class Old(nn.Module):
        def __init__(self):
            super().__init__()
            self.time_emb = nn.Linear(4, 4)
            self.image_out = nn.Linear(4, 4)

    old = Old()
    opt = build_optimizer(old, CFG)
    save_checkpoint(tmp_path, 1, {"app": ModelOptimizerState(old, opt)}, {}, keep=1)
    with pytest.raises(CheckpointError, match="predates the image-head module") as e:
        resolve_checkpoint(tmp_path)
    assert "\n" not in str(e.value) and "export" in str(e.value)
    model, opt, sched, ema = make(0)  # today's names (nothing called time_emb at the top level) pass
    save_checkpoint(tmp_path / "new", 1, state_of(model, opt, sched, ema), {}, keep=1)
    assert resolve_checkpoint(tmp_path / "new").name.startswith("step_")
