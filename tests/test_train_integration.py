"""End to end on a tiny config: train, resume exactly, export, generate, evaluate, and fail cleanly on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from transfusion.config import load_config
from helpers import TINY_RUN, overrides

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(shapes_shards) -> Path:
    return shapes_shards(train=96, heldout=8, shard_size=32)


def tiny_overrides(shards: Path, run_dir: Path, steps: int) -> list[str]:
    return overrides({"run.dir": run_dir, "data.shards": f"{shards}/train-{{000000..000002}}.tar",
                      "data.eval_shards": f"{shards}/heldout-000000.tar"}, TINY_RUN, {
        "data.batch_rows": 2, "data.shuffle_buffer": 8, "train.steps": steps, "train.warmup_steps": 2,
        "train.log_interval": 2, "checkpoint.interval": 3, "checkpoint.keep": 3, "sample.steps": 2,
        "sample.prompts": "['a red circle on the left']", "eval.num_t2i": 4, "eval.num_caption": 4,
        "eval.batch_size": 4, "eval.max_caption_tokens": 4})


def train(shards: Path, run_dir: Path, steps: int, resume=None, stop_after=None, extra: tuple[str, ...] = ()):
    from transfusion.training.trainer import Trainer

    cfg = load_config(REPO / "recipes/shapes_tiny.toml", tiny_overrides(shards, run_dir, steps) + list(extra))
    trainer = Trainer(cfg, resume=resume, progress=False)
    trainer.fit(stop_after=stop_after)
    return trainer


@pytest.mark.parametrize("extra", [(), ("--model.mot=true", "--train.freeze=['text']")], ids=["plain", "mot_frozen"])
def test_resume_reaches_identical_parameters(shards, tmp_path, extra):
    full = train(shards, tmp_path / "full", 6, extra=extra)
    part = train(shards, tmp_path / "part", 6, stop_after=4, extra=extra)  # checkpoint at step 3, "killed" at 4
    assert (tmp_path / "part/checkpoints/step_00000003/COMPLETE").is_file()
    resumed = train(shards, tmp_path / "part", 6, resume=True, extra=extra)
    assert resumed.step == 6
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for name, a in full.ema.shadow_state_dict().items():
        assert torch.equal(a, resumed.ema.shadow_state_dict()[name]), name
    del part


def test_max_minutes_ends_training_with_its_outputs(shards, tmp_path):
    from transfusion.training.trainer import Trainer

    run_dir = tmp_path / "capped"  # a budget already spent at the first check (log_interval = 2) ends at step 2
    cfg = load_config(REPO / "recipes/shapes_tiny.toml", tiny_overrides(shards, run_dir, 6) + ["--train.max_minutes=1e-9"])
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    assert trainer.step == 2
    assert (run_dir / "checkpoints/step_00000002/COMPLETE").is_file() and (run_dir / "export/model.safetensors").is_file()
    assert "train.max_minutes = 1e-09 spent at step 2 of 6" in (run_dir / "train.log").read_text()
    cfg = load_config(REPO / "recipes/shapes_tiny.toml",
                      tiny_overrides(shards, tmp_path / "roomy", 3) + ["--train.max_minutes=60"])
    roomy = Trainer(cfg, progress=False)
    roomy.fit()  # a budget not spent changes nothing
    assert roomy.step == 3 and (tmp_path / "roomy/export/model.safetensors").is_file()


def test_outputs_generate_and_evaluate(shards, tmp_path):
    run_dir = tmp_path / "run"
    train(shards, run_dir, 4)
    for name in ("config.toml", "provenance.json", "train.log", "export/model.safetensors", "export/config.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").iterdir()) and list((run_dir / "samples").glob("step_*.png"))
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert "torch" in prov["versions"] and "git_commit" in prov
    # the precision choice, the probe's figures and the CPU facts behind them are recorded with the run
    assert prov["precision"]["precision"] in ("fp32", "bf16") and prov["precision"]["requested"] == "auto"
    assert prov["precision"]["measured_peak_gflops"] > 0 and prov["cpu"]["capability"]
    assert "precision: " in (run_dir / "train.log").read_text()
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(0 < r["peak_share"] and r["tflops_per_s"] > 0 for r in rows)
    assert "% of measured peak" in (run_dir / "train.log").read_text()
    from safetensors import safe_open

    with safe_open(str(run_dir / "export/model.safetensors"), "pt") as f:  # what it was trained with
        assert f.metadata()["trained_precision"] == prov["precision"]["precision"]

    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "tools/generate.py", "--export", str(run_dir / "export"), "--prompt",
                          "a red circle on the left", "--out", str(tmp_path / "gen"), "--steps", "2",
                          "--grid", str(tmp_path / "grid.png"), "--num-per-prompt", "2"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "gen/001.png").is_file() and (tmp_path / "grid.png").is_file()
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size[0] == 2 * (96 + 4) + 4  # one row per prompt, its samples across
    out = subprocess.run([sys.executable, "tools/generate.py", "--export", str(run_dir / "export"),
                          "--caption-image", str(tmp_path / "gen/000.png"), "--max-tokens", "4"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "000.png" in out.stdout, out.stderr
    out = subprocess.run([sys.executable, "tools/evaluate.py", "--run", str(run_dir), "--steps", "2",
                          "--guidance", "2", "--guidance-schedule", "linear", "--no-progress", "--precision", "fp32"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads((run_dir / "eval/report.json").read_text())
    assert report["settings"]["guidance"] == 2.0 and report["settings"]["guidance_schedule"] == "linear"
    assert report["settings"]["precision"] == "fp32" and "precision: fp32 (set explicitly)" in out.stderr
    for sec, key in (("t2i", "color_accuracy"), ("t2i", "shape_accuracy"), ("t2i", "position_accuracy"),
                     ("caption", "exact_match"), ("caption", "color_accuracy"), ("caption", "shape_accuracy"),
                     ("text", "perplexity"), ("diffusion", "val_loss")):
        assert isinstance(report[sec][key], float), (sec, key)
    assert report["text"]["perplexity"] > 1.0


def _cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr


def test_bad_input_gives_one_clear_line(shards, tmp_path):
    _one_line_error(_cli("-m", "transfusion.train", str(tmp_path / "missing.toml")), "recipe not found")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 3\n")
    _one_line_error(_cli("-m", "transfusion.train", str(bad)), "train.stepz")
    _one_line_error(_cli("-m", "transfusion.train", "recipes/shapes_tiny.toml", f"--run.dir={tmp_path / 'r'}",
                         f"--data.shards={tmp_path}/nothing-*.tar"), "matches no files")
    # an incomplete checkpoint directory (no COMPLETE marker) and an unreadable one
    ckpt = tmp_path / "r2/checkpoints/step_00000005"
    ckpt.mkdir(parents=True)
    (ckpt / ".metadata").write_bytes(b"garbage")
    args = tiny_overrides(shards, tmp_path / "r2", 6)
    _one_line_error(_cli("-m", "transfusion.train", "recipes/shapes_tiny.toml", *args, f"--resume={ckpt}"),
                    "incomplete")
    (ckpt / "COMPLETE").write_text("{}")
    _one_line_error(_cli("-m", "transfusion.train", "recipes/shapes_tiny.toml", *args, f"--resume={ckpt}"),
                    str(ckpt))
    _one_line_error(_cli("tools/evaluate.py", "--run", str(tmp_path / "nope")), "nope")


@pytest.mark.parametrize("override,needle", [
    ("--model.n_heads=0", "'model.n_heads' must be >= 1"),
    ("--data.seq_len=10", "data.seq_len 10 cannot hold one document"),
    ("--data.image_size=0", "'data.image_size' must be >= 1"),
    ("--sample.guidance=-5", "'sample.guidance' must be >= 0"),
    ("--train.lr=nan", "'train.lr' must be > 0"),
])
def test_bad_config_values_stop_before_anything_is_built(tmp_path, override, needle):
    run_dir = tmp_path / "run"
    _one_line_error(_cli("-m", "transfusion.train", "recipes/shapes_tiny.toml", f"--run.dir={run_dir}", override),
                    needle)
    assert not run_dir.exists()  # nothing was written: the config failed before the run directory was made


def test_ablation_tool_trains_evaluates_and_rewrites_only_its_table_block(shards, tmp_path):
    page = tmp_path / "ablation.md"
    page.write_text("# intro kept\n<!-- ablation:begin -->\nold table\n<!-- ablation:end -->\nouter text kept\n")
    tiny = [o for o in tiny_overrides(shards, tmp_path / "unused", 2)
            if not o.startswith(("--run.dir", "--train.steps"))]
    cmd = [sys.executable, "tools/ablate.py", "--variants", "eps_linear,mar", "--steps", "2", "--runs",
           str(tmp_path / "runs"), "--out", str(page), "--num-t2i", "2", "--num-caption", "2",
           "--figure", str(tmp_path / "fig.png"),
           *[f"--set={o}" for o in tiny]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = page.read_text()
    assert text.startswith("# intro kept\n<!-- ablation:begin -->\n")
    assert text.endswith("<!-- ablation:end -->\nouter text kept\n")
    assert "old table" not in text and "(`eps_linear`) | 2 |" in text and "(`mar`) | 2 |" in text
    for name in ("eps_linear", "mar"):
        result = json.loads((tmp_path / "runs" / name / "ablation.json").read_text())
        assert result["steps"] == 2 and result["report"]["t2i"]["n"] == 2 and result["train_samples_per_s"] > 0
    from PIL import Image

    fig = np.asarray(Image.open(tmp_path / "fig.png").convert("L"))
    rows = np.split(fig, 2)  # one row per variant, of equal height
    assert all((row < 128).any() for row in rows)  # each row holds its variant's samples, not a blank strip
    mar_cfg = (tmp_path / "runs" / "mar" / "config.toml").read_text()
    assert 'head = "mar"' in mar_cfg and "dim = 32" in mar_cfg  # variant overrides + the shared --set overrides
    bad = subprocess.run([sys.executable, "tools/ablate.py", "--variants", "eps_linear,nope"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown variant(s) nope (known: eps_linear" in bad.stderr


def test_bench_step_reports_throughput_and_share_of_measured_peak(shards, tmp_path):
    args = [a for a in tiny_overrides(shards, tmp_path / "unused", 4)
            if not a.startswith(("--run.dir", "--train.steps"))]
    out = _cli("tools/bench_step.py", "recipes/shapes_tiny.toml", "--steps", "2", "--warmup", "1", "--profile", "5",
               "--precision", "fp32", *args)
    assert out.returncode == 0, out.stderr
    rows = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.startswith(("precision ", "tokens/s ")))
    assert rows["precision"].strip() == "fp32" and float(rows["tokens/s"]) > 0
    share = next(ln for ln in out.stdout.splitlines() if ln.startswith("share of peak"))
    assert 0 < float(share.split()[-1].rstrip("%")) <= 150
    assert "Self CPU" in out.stdout  # the profile table
    assert not (tmp_path / "unused").exists()  # the run's files went to a temporary directory
    _one_line_error(_cli("tools/bench_step.py", "recipes/shapes_tiny.toml", "--model.n_heads=0"), "model.n_heads")
