"""torchrun on CPU (gloo): 2 ranks == 1 rank, world-size changes, SIGKILL / kill-during-save resume, exactly-once
data, and one-line failures on every rank.

The dataset is sized so that one epoch is exactly the run: 24 samples in 2 shards, one document per 64-token row,
2 rows per micro-batch, 2 data consumers -> 6 steps read every key once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN, torchrun_cmd, train_env
from helpers import overrides as recipe_overrides

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
STEPS = 6


@pytest.fixture(scope="module")
def shards(shapes_shards) -> Path:
    return shapes_shards(train=24, heldout=4, shard_size=12)


def overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return recipe_overrides({"run.dir": run_dir, "run.device": "cpu",
                             "data.shards": f"{shards}/train-{{000000..000001}}.tar",
                             "data.eval_shards": f"{shards}/heldout-000000.tar"}, TINY_RUN, {
        "data.batch_rows": 2, "data.shuffle_buffer": 8, "data.caption_dropout": "0.0", "train.steps": STEPS,
        "train.warmup_steps": 2, "train.log_interval": 1, "train.trace_data": True, "checkpoint.interval": 2,
        "checkpoint.keep": 5, "sample.steps": 1, "sample.prompts": "['a red circle on the left']"},
        extra=("--no-progress", *extra))


def torchrun(nproc: int, args: list[str], *, fault: str | None = None, log_dir: Path | None = None,
             timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(nproc, args, log_dir), cwd=REPO, env=train_env(fault), capture_output=True,
                          text=True, timeout=timeout)


def python_train(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "transfusion.train", "recipes/shapes_tiny.toml", *args]
    return subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl (log_interval 1); a step trained again after a resume keeps its last value."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def model_params(step_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{step_dir.parent.parent.name}_{step_dir.name}.pt"
    dcp_to_torch_save(str(step_dir), str(out))
    return torch.load(out, weights_only=False)["model_optim"]["model"]


def assert_close_curves(a: dict[int, float], b: dict[int, float], steps) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) <= 1e-4 * abs(a[s]), (s, a[s], b[s])


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """2 ranks, 6 steps, asynchronous checkpoints every 2 steps."""
    run = tmp_path_factory.mktemp("ref") / "run"
    ok(torchrun(2, overrides(shards, run, "--checkpoint.async_save=true")))
    return run


def trace_keys(run_dir: Path) -> Counter:
    keys: Counter = Counter()
    for path in (run_dir / "data_trace").glob("rank_*.jsonl"):
        for line in path.read_text().splitlines():
            keys.update(json.loads(line)["keys"])
    return keys


def all_keys(shards: Path) -> set[str]:
    import tarfile

    keys = set()
    for i in range(2):
        with tarfile.open(shards / f"train-{i:06d}.tar") as tar:
            keys |= {m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()}
    return keys


def test_two_ranks_match_one_rank_and_hsdp_with_the_same_global_batch(reference, shards, tmp_path):
    one, hsdp = tmp_path / "one", tmp_path / "hsdp"
    ok(torchrun(1, overrides(shards, one, "--train.grad_accum=2")))
    ok(torchrun(2, overrides(shards, hsdp, "--parallel.dp_replicate=2", "--checkpoint.interval=0")))  # 2 x 1 mesh
    ref = losses(reference)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert_close_curves(ref, losses(one), range(1, STEPS + 1))
    assert_close_curves(ref, losses(hsdp), range(1, STEPS + 1))
    assert ref[STEPS] < ref[1]
    # every key of the epoch exactly once, over the two ranks
    assert trace_keys(reference) == Counter(all_keys(shards))
    for name in ("export/model.safetensors", f"checkpoints/step_{STEPS:08d}/COMPLETE",
                 f"samples/step_{STEPS:08d}.png"):
        assert (reference / name).is_file(), name
    marker = json.loads((reference / "checkpoints/step_00000004/COMPLETE").read_text())
    assert marker["world_size"] == 2 and marker["data"]["consumers"] == 2


def test_two_rank_checkpoint_continues_in_one_process(reference, shards, tmp_path):
    ckpt = reference / "checkpoints/step_00000004"
    cont = tmp_path / "cont"
    ok(python_train(overrides(shards, cont, "--train.grad_accum=2", f"--resume={ckpt}")))
    assert_close_curves(losses(reference), losses(cont), (5, 6))
    ref_p, cont_p = model_params(reference / "checkpoints/step_00000006", tmp_path), \
        model_params(cont / "checkpoints/step_00000006", tmp_path)
    for k, v in ref_p.items():
        torch.testing.assert_close(cont_p[k], v, rtol=1e-4, atol=1e-6, msg=k)
    # a layout whose data position cannot be mapped: one line, non-zero
    bad = python_train(overrides(shards, tmp_path / "bad", f"--resume={ckpt}"))
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: cannot resume the data position")
    assert "--reset-data" in lines[0]


def test_sigkill_and_kill_during_save_resume_to_the_same_state(reference, shards, tmp_path):
    run = tmp_path / "killed"
    args = overrides(shards, run)
    # 1) killed while saving step 4: its DCP files are written, its marker is not -> step 2 stays the latest
    assert torchrun(2, args, fault="save_before_marker@4").returncode != 0
    from transfusion.checkpoint.dcp import latest_checkpoint, resolve_checkpoint

    assert (run / "checkpoints/step_00000004/.metadata").is_file()
    assert not (run / "checkpoints/step_00000004/COMPLETE").exists()
    assert latest_checkpoint(run) == run / "checkpoints/step_00000002"
    assert resolve_checkpoint(run) == run / "checkpoints/step_00000002"  # the run dir resolves past the torn save
    # 2) resumed from step 2, SIGKILLed right after step 5 (step 4 saved this time)
    assert torchrun(2, [*args, "--resume"], fault="after_step@5").returncode != 0
    assert latest_checkpoint(run) == run / "checkpoints/step_00000004"
    # 3) resumed from step 4 to the end
    ok(torchrun(2, [*args, "--resume"]))
    assert_close_curves(losses(reference), losses(run), range(1, STEPS + 1))
    assert losses(reference)[STEPS] == losses(run)[STEPS]
    ref_p, got = model_params(reference / "checkpoints/step_00000006", tmp_path), \
        model_params(run / "checkpoints/step_00000006", tmp_path)
    for k, v in ref_p.items():
        assert torch.equal(got[k], v), k
    assert trace_keys(run) == Counter(all_keys(shards))  # each key once over the kill/resume cycles


def _rank_stderr(log_dir: Path) -> list[list[str]]:
    files = sorted(log_dir.rglob("stderr.log"), key=lambda p: p.parent.name)
    return [[ln for ln in f.read_text().splitlines() if ln.strip()] for f in files]


def test_torchrun_failures_are_one_line_on_every_rank(reference, shards, tmp_path):
    bad = torchrun(2, overrides(shards, tmp_path / "bad", "--train.stepz=3"), log_dir=tmp_path / "logs1",
                   timeout=120)
    assert bad.returncode != 0
    per_rank = _rank_stderr(tmp_path / "logs1")
    assert len(per_rank) == 2 and all(len(lines) == 1 and "error: unknown config key 'train.stepz'" in lines[0]
                                      for lines in per_rank), per_rank
    # 2 ranks x 2 micro-steps = 4 data consumers cannot continue a 2-consumer data position
    run = tmp_path / "grown"
    shutil.copytree(reference / "checkpoints/step_00000004", run / "checkpoints/step_00000004")
    grown = torchrun(2, overrides(shards, run, "--train.grad_accum=2", "--resume"), log_dir=tmp_path / "logs2",
                     timeout=180)
    assert grown.returncode != 0
    per_rank = _rank_stderr(tmp_path / "logs2")
    assert len(per_rank) == 2 and all(len(lines) == 1 and lines[0].startswith("error: cannot resume the data")
                                      for lines in per_rank), per_rank


def test_frozen_text_under_fsdp2_stays_at_its_init_and_mot_twins_train(shards, tmp_path):
    """Two FSDP2 ranks, MoT with frozen text: the text weights after training are bitwise the sharding-independent
    init of one process (``materialize``), the image twins (copies of them at init) moved, and the optimizer state in
    the checkpoint has no entry for a frozen parameter."""
    from transfusion.components import build_components
    from transfusion.config import load_config
    from transfusion.distributed.init import materialize
    from transfusion.model.transfusion import is_image_twin, is_text_parameter

    run = tmp_path / "frozen"
    args = overrides(shards, run, "--model.mot=true", "--train.freeze=['text']", "--train.steps=2",
                     "--checkpoint.interval=0", "--train.trace_data=false")
    ok(torchrun(2, args))
    assert "MoT image twins" in (run / "train.log").read_text()
    cfg = load_config(REPO / "recipes/shapes_tiny.toml", [a for a in args if "=" in a])
    init = build_components(cfg, torch.device("cpu"), model_device="meta").model
    materialize(init, torch.device("cpu"), cfg.run.seed)
    init_state = init.state_dict()
    ckpt = torch.load(_dcp_file(run / "checkpoints/step_00000002", tmp_path), weights_only=False)["model_optim"]
    text = [n for n in init_state if is_text_parameter(n)]
    twins = [n for n in init_state if is_image_twin(n)]
    assert text and twins
    for name in twins:
        assert torch.equal(init_state[name], init_state[name.replace("image_", "", 1)]), name
    for name in text:
        assert torch.equal(ckpt["model"][name], init_state[name]), name
    assert all(not torch.equal(ckpt["model"][n], init_state[n]) for n in twins if n.endswith("wqkv.weight"))
    optim_keys = set(ckpt["optim"]["state"])
    assert optim_keys and not optim_keys & set(text) and set(twins) <= optim_keys


def _dcp_file(step_dir: Path, tmp: Path) -> Path:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{step_dir.name}_full.pt"
    dcp_to_torch_save(str(step_dir), str(out))
    return out
