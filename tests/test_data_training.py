"""The data pipeline end to end through the trainer: broken shard sets train to the end and report each skip by
reason, a skip-rate ceiling stops `python -m transfusion.train` with one line, latent shards train unencoded."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_RUN, overrides, png_bytes, write_tar

from transfusion.config import load_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _png(i: int, size: int = 16) -> bytes:
    return png_bytes((40 * (i % 6), 255 - 20 * (i % 9), 90), (size, size))


def _good(i: int) -> dict:
    return {"__key__": f"k{i:04d}", "png": _png(i), "txt": f"shape {i % 7}".encode()}


def _overrides(shards: str, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return overrides({"run.dir": run_dir, "data.shards": shards}, TINY_RUN, {
        "data.batch_rows": 4, "data.shuffle_buffer": 4, "train.steps": steps, "train.warmup_steps": 1,
        "train.log_interval": 2, "checkpoint.interval": 0, "sample.steps": 1, "sample.prompts": "['shape 1']"},
        extra=extra)


def test_broken_shard_set_trains_to_the_end_and_reports_each_reason(tmp_path: Path) -> None:
    from transfusion.training.trainer import Trainer

    write_tar(tmp_path / "part-0.tar", [_good(i) for i in range(6)])
    write_tar(tmp_path / "part-1.tar", [_good(10), {"__key__": "noise", "jpg": os.urandom(600), "txt": b"random bytes"},
                                        {"__key__": "nocap", "png": _png(3)}, _good(11), _good(12)])
    full = Path(write_tar(tmp_path / "full.tar", [_good(20 + i) for i in range(6)])).read_bytes()
    (tmp_path / "part-3.tar").write_bytes(full[: len(full) // 2])  # truncated mid-member
    # part-2.tar does not exist: the brace list still names it
    spec = f"{tmp_path}/part-{{0..3}}.tar"
    cfg = load_config(REPO / "recipes/shapes_tiny.toml", _overrides(spec, tmp_path / "run", 6))
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    assert trainer.step == 6 and (tmp_path / "run/export/model.safetensors").is_file()
    counts = trainer.skip_counts()
    for reason in ("bad_image", "missing_caption", "corrupt_shard", "missing_shard"):
        assert counts[reason] >= 1, (reason, counts)
    assert counts["no_image"] == counts["caption_too_long"] == 0
    last = [ln for ln in (tmp_path / "run/train.log").read_text().splitlines() if "| skipped " in ln][-1]
    for reason in ("bad_image", "missing_caption", "corrupt_shard", "missing_shard"):
        assert f"{reason}={counts[reason]}" in last, last


def test_skip_rate_ceiling_stops_the_run_with_one_line(tmp_path: Path) -> None:
    samples = [_good(i) if i % 2 else {"__key__": f"k{i:04d}", "png": b"not an image", "txt": b"x"}
               for i in range(240)]
    write_tar(tmp_path / "half-bad.tar", samples)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "transfusion.train", "recipes/shapes_tiny.toml", "--no-progress",
                           *_overrides(str(tmp_path / "half-bad.tar"), tmp_path / "run", 50),
                           "--data.max_skip_rate=0.1", "--data.num_workers=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Original" not in proc.stderr
    assert errors[0].startswith("error: data skip rate 5") and "exceeds data.max_skip_rate=10.0%" in errors[0]
    assert "bad_image=" in errors[0]



def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latent_shards_train_without_reencoding(tmp_path: Path, vae_dir: Path) -> None:
    from transfusion.training.trainer import Trainer

    write_tar(tmp_path / "pix-0.tar", [_good(i) for i in range(12)])
    rc = _tool("precompute_latents").main(["--shards", str(tmp_path / "pix-0.tar"), "--vae", str(vae_dir),
                                           "--out", str(tmp_path / "lat"), "--image-size", "16",
                                           "--decode-workers", "0", "--no-progress", "--batch-size", "5"])
    assert rc == 0
    overrides = _overrides(str(tmp_path / "lat/pix-0.tar"), tmp_path / "run", 3, "--model.patch_size=2",
                           "--latents.kind=vae", f"--latents.vae_path={vae_dir}", "--diffusion.clip_sample=false")
    trainer = Trainer(load_config(REPO / "recipes/shapes_tiny.toml", overrides), progress=False)

    def no_encoding(x):
        raise AssertionError("latents from latent shards must not be encoded again")

    trainer.codec.encode = no_encoding
    seen = []
    prepare = trainer.prepare
    trainer.prepare = lambda batch: seen.append(batch.images_are_latents) or prepare(batch)
    trainer.fit(stop_after=3)
    assert trainer.step == 3 and seen == [True] * 3
    # a pixel-space run pointed at latent shards says what is wrong, in one line
    pixel_run = load_config(REPO / "recipes/shapes_tiny.toml",
                            _overrides(str(tmp_path / "lat/pix-0.tar"), tmp_path / "run2", 3, "--model.patch_size=2",
                                       "--data.seq_len=128"))
    from transfusion.latents.prepare import LatentShapeError

    with pytest.raises(LatentShapeError, match=r"latent shards hold 4x8x8 latents but .* expect 3x16x16") as err:
        Trainer(pixel_run, progress=False).fit(stop_after=1)
    assert "\n" not in str(err.value)


def test_clean_copies_and_noise_limits_train(tmp_path: Path) -> None:
    """Captioning samples with a target image and a clean copy for the caption: the Transfusion noise cap, asked for,
    does not reach the noisy copy (the caption reads the clean one)."""
    from transfusion.training.trainer import Trainer

    write_tar(tmp_path / "pairs.tar", [_good(i) for i in range(16)])
    overrides = _overrides(str(tmp_path / "pairs.tar"), tmp_path / "run", 2, "--data.t2i_ratio=0.0",
                           "--data.seq_len=96", "--data.image_then_text_role=target", "--data.clean_copy=true",
                           "--data.noise_limit=0.5", "--data.noise_limit_share=1.0")
    trainer = Trainer(load_config(REPO / "recipes/shapes_tiny.toml", overrides), progress=False)
    seen = []
    prepare = trainer.prepare
    trainer.prepare = lambda batch: seen.append(batch) or prepare(batch)
    trainer.fit(stop_after=2)
    assert trainer.step == 2 and len(seen) == 2
    for batch in seen:  # every document: hidden noisy copy (target, not capped) + clean copy (conditioning)
        assert batch.hidden_ids is not None and int(batch.hidden_ids.max()) + 1 == len(batch.keys)
        assert batch.image_is_target.tolist() == [True, False] * len(batch.keys)
        assert batch.image_noise_limit.tolist() == [1.0, 1.0] * len(batch.keys)


def test_evaluation_reads_latent_shards_without_reencoding(tmp_path: Path, vae_dir: Path) -> None:
    import math

    from transfusion.eval.metrics import evaluate
    from transfusion.generation.engine import Engine
    from transfusion.training.trainer import Trainer

    write_tar(tmp_path / "pix-0.tar", [_good(i) for i in range(12)])
    assert _tool("precompute_latents").main(["--shards", str(tmp_path / "pix-0.tar"), "--vae", str(vae_dir),
                                             "--out", str(tmp_path / "lat"), "--image-size", "16",
                                             "--decode-workers", "0", "--no-progress", "--batch-size", "5"]) == 0
    latent_spec = str(tmp_path / "lat/pix-0.tar")
    overrides = _overrides(latent_spec, tmp_path / "run", 2, "--model.patch_size=2", "--latents.kind=vae",
                           f"--latents.vae_path={vae_dir}", "--diffusion.clip_sample=false",
                           f"--data.eval_shards={latent_spec}")
    Trainer(load_config(REPO / "recipes/shapes_tiny.toml", overrides), progress=False).fit()
    engine = Engine.from_export(str(tmp_path / "run/export"), precision="fp32")
    opts = dict(num_t2i=2, num_caption=4, batch_size=4, steps=1, guidance=1.0, sampler="euler", seed=0,
                max_caption_tokens=4, progress=False)
    encode = engine.codec.encode

    def no_encoding(x):
        raise AssertionError("held-out latents must not be encoded again")

    engine.codec.encode = no_encoding
    report = evaluate(engine, shards=latent_spec, **opts)
    assert report["held_out_format"] == "latents" and report["caption"]["n"] == 4
    assert math.isfinite(report["diffusion"]["val_loss"]) and report["text"]["perplexity"] > 1
    engine.codec.encode = encode  # the pixel shard of the same images goes through the VAE
    assert evaluate(engine, shards=str(tmp_path / "pix-0.tar"), **opts)["held_out_format"] == "pixels"
