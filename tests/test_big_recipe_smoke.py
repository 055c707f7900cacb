"""The ~1B / 8-GPU recipe on a CPU, shrunk only in width, depth, sizes and steps: its own code path end to end.

Pixel shards -> ``tools/precompute_latents.py`` with a tiny local AutoencoderKL -> ``python -m transfusion.train
recipes/t2i_1b_8gpu.toml`` (latent shards, flow + logit-normal, selective activation checkpointing, compiled blocks
where this machine can build CPU kernels, async checkpoints, precision by measurement) -> a sample grid drawn from
held-out captions -> ``tools/evaluate.py`` on the held-out latent shard.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(*args: str, inductor_cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    # A private inductor cache: compiled CPU kernels cached by a run under another CPU capability (e.g. the AVX2
    # emulation of `make demo-avx2` on the same machine) were reused and gave NaN losses and heap corruption.
    env = dict(os.environ, PYTHONPATH=str(REPO), TORCHINDUCTOR_CACHE_DIR=str(inductor_cache))
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_big_recipe_trains_samples_and_evaluates_on_cpu(tmp_path: Path, vae_dir: Path) -> None:
    pixels, latents, run = tmp_path / "pixels", tmp_path / "latents", tmp_path / "run"
    run_tool = functools.partial(_run, inductor_cache=tmp_path / "inductor")
    run_tool("tools/make_shapes_shards.py", "--out", str(pixels), "--train-samples", "48", "--heldout-samples", "8",
         "--shard-size", "24", "--image-size", "16")
    for name in ("train-000000.tar", "train-000001.tar", "heldout-000000.tar"):
        run_tool("tools/precompute_latents.py", "--shards", str(pixels / name), "--vae", str(vae_dir), "--out",
             str(latents), "--image-size", "16", "--decode-workers", "0", "--no-progress", "--batch-size", "8")
    heldout = str(latents / "heldout-000000.tar")
    run_tool("-m", "transfusion.train", "recipes/t2i_1b_8gpu.toml", "--no-progress",
         # sizes
         f"--run.dir={run}", f"--data.shards={latents}/train-{{000000..000001}}.tar", f"--data.eval_shards={heldout}",
         "--data.image_size=16", "--data.seq_len=96", "--data.batch_rows=2", "--data.num_workers=1",
         "--data.shuffle_buffer=8", f"--latents.vae_path={vae_dir}", "--eval.num_t2i=4", "--eval.num_caption=4",
         "--eval.batch_size=4", "--eval.max_caption_tokens=8",
         # width and depth
         "--model.dim=64", "--model.n_layers=2", "--model.n_heads=4",
         # steps
         "--train.steps=3", "--train.warmup_steps=1", "--train.log_interval=1", "--checkpoint.interval=2",
         "--sample.steps=2")
    assert (run / "checkpoints/step_00000003/COMPLETE").is_file() and (run / "export/model.safetensors").is_file()
    cfg = (run / "config.toml").read_text()
    for line in ('format = "latents"', 'activation_checkpointing = "selective"', "compile = true",
                 'objective = "flow"', 'timestep_sampling = "logit_normal"', "async_save = true"):
        assert line in cfg, line  # the recipe's own settings, not a copy's
    assert len(list((run / "samples").glob("step_*.png"))) == 1
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss"] > 0 and r["peak_share"] > 0 for r in rows)

    out = run_tool("tools/evaluate.py", "--run", str(run), "--steps", "2", "--no-progress")
    report = json.loads((run / "eval/report.json").read_text())
    assert report["held_out_format"] == "latents" and report["caption"]["n"] == 4
    assert report["text"]["perplexity"] > 1 and report["diffusion"]["val_loss"] > 0
    assert report["t2i"]["n"] == 4  # shapes scenes ride along in the latent shards' json: judged from the decode
    assert "wrote" in out.stdout


def test_qwen25_recipe_starts_from_a_tiny_qwen2_on_cpu(tmp_path: Path, vae_dir: Path) -> None:
    """recipes/qwen25_t2i_8gpu.toml from a tiny random Qwen2 (with tokenizer) written by transformers: the checkpoint
    fixes the shape (no width / depth override), MoT and frozen text as the recipe says, a few steps, an export that
    carries the checkpoint's tokenizer. Shrunk in sizes and steps only; blocks run eagerly (parallel.compile=false):
    MoT's per-batch row counts would make inductor recompile on CPU for minutes."""
    pytest.importorskip("transformers")
    from test_import_llm import save_tiny

    qwen = save_tiny(tmp_path / "qwen2", "qwen2")
    pixels, latents, run = tmp_path / "pixels", tmp_path / "latents", tmp_path / "run"
    run_tool = functools.partial(_run, inductor_cache=tmp_path / "inductor")
    run_tool("tools/make_shapes_shards.py", "--out", str(pixels), "--train-samples", "24", "--heldout-samples", "4",
             "--shard-size", "24", "--image-size", "16")
    run_tool("tools/precompute_latents.py", "--shards", str(pixels / "train-000000.tar"), "--vae", str(vae_dir),
             "--out", str(latents), "--image-size", "16", "--decode-workers", "0", "--no-progress", "--batch-size", "8")
    out = run_tool("-m", "transfusion.train", "recipes/qwen25_t2i_8gpu.toml", "--no-progress",
                   f"--run.dir={run}", f"--model.pretrained={qwen}", f"--data.shards={latents}/train-000000.tar",
                   f"--data.eval_shards={latents}/train-000000.tar", "--data.image_size=16", "--data.seq_len=96",
                   "--data.batch_rows=2", "--data.num_workers=1", "--data.shuffle_buffer=8",
                   f"--latents.vae_path={vae_dir}", "--parallel.compile=false", "--train.steps=2",
                   "--train.warmup_steps=1", "--train.log_interval=1", "--checkpoint.interval=0", "--sample.steps=2")
    log = out.stdout + out.stderr
    assert "MoT image twins" in log and "trainable" in log
    cfg = (run / "config.toml").read_text()
    assert "mot = true" in cfg and 'freeze = ["text"]' in cfg and "qkv_bias = true" in cfg  # Qwen2's biases
    config = json.loads((run / "export/config.json").read_text())
    assert config["model"]["pretrained"] == "" and config["model"]["dim"] == 32 and config["model"]["n_layers"] == 2
    assert (run / "export/tokenizer.json").is_file()
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)
