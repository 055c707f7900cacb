"""Non-finite steps: checked every step before the update; a bad step changes nothing but the data position, is
counted, and too many in a row stop the run with one error line, exit code 3 and the last checkpoint intact."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_integration import shards, tiny_overrides  # noqa: F401

from transfusion.config import load_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
NONFINITE = 3  # transfusion.training.guards.NONFINITE_EXIT_CODE: the documented contract


def snapshot(trainer) -> dict[str, torch.Tensor]:
    """Weights, EMA, optimizer state (moments and step counts) and LR schedule, cloned."""
    out = {f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    out |= {f"ema.{k}": v.clone() for k, v in trainer.ema.shadow_state_dict().items()}
    for i, state in trainer.optimizer.state_dict()["state"].items():
        out |= {f"optim.{i}.{k}": torch.as_tensor(v).clone() for k, v in state.items()}
    sched = trainer.lr_scheduler.state_dict()
    out["sched.last_epoch"] = torch.tensor(sched["last_epoch"])
    out["sched.lr"] = torch.tensor(sched["_last_lr"])
    return out


def metrics(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("fault", ["nan_batch", "nan_grad"])
def test_a_non_finite_step_changes_nothing_but_the_data_position(shards, tmp_path, monkeypatch, fault):
    from transfusion.training.trainer import Trainer

    bad, steps = 2, 4
    if fault == "nan_batch":  # the step's images are NaN: a NaN loss and NaN gradients
        real_prepare = Trainer.prepare

        def prepare(self, batch):
            batch = real_prepare(self, batch)
            if self.step + 1 == bad:
                assert batch.num_images > 0
                batch = dataclasses.replace(batch, images=torch.full_like(batch.images, float("nan")))
            return batch

        monkeypatch.setattr(Trainer, "prepare", prepare)
    else:  # the documented fault hook: one parameter's gradient is NaN, the loss is finite
        monkeypatch.setenv("TRANSFUSION_FAULT", f"nan_grad@{bad}")
    run = tmp_path / "run"
    cfg = load_config(REPO / "recipes/shapes_tiny.toml", tiny_overrides(shards, run, steps) +
                      ["--train.log_interval=1", "--train.trace_data=true"])
    trainer = Trainer(cfg, progress=False)
    trainer.fit(stop_after=bad - 1)
    before = snapshot(trainer)
    assert before["sched.last_epoch"].item() == bad - 1 and any(k.endswith(".step") for k in before)

    trainer.fit(stop_after=bad)
    after = snapshot(trainer)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # weights, EMA, optimizer moments and step counts, LR schedule
    assert trainer.step == bad and trainer.bad_steps == 1
    traced = [json.loads(ln)["step"] for ln in (run / "data_trace/rank_0.jsonl").read_text().splitlines()]
    assert traced == list(range(1, bad + 1))  # the bad step's batch was taken
    record = metrics(run)[bad]
    assert record["bad_steps"] == 1 and record["bad_steps_total"] == 1 and "loss" not in record
    log_text = (run / "train.log").read_text()
    assert f"step {bad} skipped: non-finite loss" in log_text and "non-finite steps not applied 1 of 1" in log_text

    trainer.fit()  # the next step updates as usual
    assert trainer.step == steps and trainer.bad_steps == 1
    assert not torch.equal(snapshot(trainer)["sched.last_epoch"], before["sched.last_epoch"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    records = metrics(run)
    assert records[steps]["bad_steps"] == 0 and records[steps]["bad_steps_total"] == 1
    assert all(records[s]["loss"] == records[s]["loss"] for s in range(bad + 1, steps + 1))
    trainer.close()


@pytest.mark.parametrize("limit,stop", [(2, 6), (0, 4)])
def test_too_many_bad_steps_in_a_row_stop_with_one_line_and_the_last_checkpoint_intact(shards, tmp_path, limit,
                                                                                        stop):
    from transfusion.training.trainer import Trainer

    run = tmp_path / "run"
    args = tiny_overrides(shards, run, 8) + [f"--train.max_bad_steps={limit}"]  # checkpoints every 3 steps
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TRANSFUSION_FAULT="nan_loss@4+")
    proc = subprocess.run([sys.executable, "-m", "transfusion.train", "recipes/shapes_tiny.toml", "--no-progress",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == NONFINITE, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert errors == [lines[-1]] and "Traceback" not in proc.stderr
    assert errors[0].startswith(f"error: stopped at step {stop}: {stop - 3} step(s) in a row had a non-finite loss")
    assert f"train.max_bad_steps = {limit}" in errors[0] and "step_00000003" in errors[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003"]  # nothing saved after
    assert not (run / "export").exists()

    cfg = load_config(REPO / "recipes/shapes_tiny.toml", args)
    resumed = Trainer(cfg, resume=True, progress=False)  # the last periodic checkpoint loads, with finite weights
    assert resumed.step == 3
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())
    assert all(torch.isfinite(v).all() for v in resumed.ema.shadow_state_dict().values())
    resumed.close()
