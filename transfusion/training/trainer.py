"""The trainer: build everything from a config, then step; checkpoint, sample, export.

Steps are small methods (``train_step``, ``log``, ``save``, ``sample_grid``, ``export``) so that a variant trainer
overrides one of them instead of forking the loop.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from transfusion.attention.backends import build_attention_mask, resolve_backend
from transfusion.batch import Batch
from transfusion.checkpoint.dcp import (
    ModelOptimizerState,
    ObjectState,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from transfusion.checkpoint.export import export_model
from transfusion.config import Config, dumps_toml, to_dict
from transfusion.runtime import build_parts, resolve_device
from transfusion.training.ema import EMA
from transfusion.training.losses import compute_loss_parts
from transfusion.training.optim import build_lr_scheduler, build_optimizer

log = logging.getLogger("transfusion")


def setup_logging(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    log.setLevel(logging.INFO)
    log.handlers.clear()
    fh = logging.FileHandler(run_dir / "train.log")
    fh.setFormatter(fmt)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    log.addHandler(fh)
    log.addHandler(sh)
    log.propagate = False


def provenance(device: torch.device) -> dict:
    """Git commit, library versions and device, saved with every run."""
    import importlib.metadata as md

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                                  cwd=Path(__file__).resolve().parents[2]).stdout.strip()
        except Exception:
            return ""

    versions = {}
    for pkg in ("torch", "diffusers", "webdataset", "torchdata", "safetensors", "numpy", "pillow", "tokenizers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    dev = str(device)
    if device.type == "cuda":
        dev += f" ({torch.cuda.get_device_name(device)})"
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
            "versions": versions, "python": platform.python_version(), "device": dev,
            "host": platform.node(), "argv": sys.argv, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


class Trainer:
    def __init__(self, cfg: Config, resume: str | bool | None = None, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress
        self.run_dir = Path(cfg.run.dir)
        setup_logging(self.run_dir)
        self.device = resolve_device(cfg.run.device)
        if cfg.train.num_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.train.num_threads)
        torch.manual_seed(cfg.run.seed)
        ckpt = self.find_checkpoint(resume)  # fail fast on a bad --resume, before building anything heavy

        parts = build_parts(cfg, self.device)
        self.model, self.tokenizer, self.schedule, self.codec = parts.model, parts.tokenizer, parts.schedule, parts.codec
        self.patch_grid = parts.patch_grid
        self.backend = resolve_backend(cfg.model.attention, self.device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.train)
        self.ema = EMA(self.model, cfg.train.ema_decay)
        self.noise_rng = torch.Generator().manual_seed(cfg.run.seed + 1)  # timesteps + noise, saved in checkpoints
        self.step = 0

        from data_pipelines.loader import build_loader

        self.loader = build_loader(cfg.data, self.tokenizer, self.patch_grid, seed=cfg.run.seed)
        self.writer: SummaryWriter | None = None

        if ckpt is not None:
            self.restore(ckpt)
        self._write_run_files()
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("model: %.2fM parameters, attention=%s, device=%s, patch grid %s, start step %d",
                 n_params / 1e6, self.backend, self.device, self.patch_grid, self.step)

    # -- run files and checkpoints ---------------------------------------------------------------------------
    def _write_run_files(self) -> None:
        (self.run_dir / "config.toml").write_text(dumps_toml(self.cfg))
        (self.run_dir / "provenance.json").write_text(json.dumps(provenance(self.device), indent=2) + "\n")

    def checkpoint_state(self) -> dict:
        return {"model_optim": ModelOptimizerState(self.model, self.optimizer),
                "lr_scheduler": ObjectState(self.lr_scheduler), "ema": ObjectState(self.ema)}

    def save(self) -> Path:
        extras = {"step": self.step, "noise_rng": self.noise_rng.get_state(), "torch_rng": torch.get_rng_state(),
                  "loader": self.loader.state_dict()}
        path = save_checkpoint(self.run_dir / "checkpoints", self.step, self.checkpoint_state(), extras,
                               keep=self.cfg.checkpoint.keep)
        log.info("saved checkpoint %s", path)
        return path

    def find_checkpoint(self, resume: str | bool | None) -> Path | None:
        """``True``: this run's latest complete checkpoint (None when there is none yet); a path: that run or step
        directory, which must hold a complete checkpoint."""
        if not resume:
            return None
        if resume is True:
            found = latest_checkpoint(self.run_dir / "checkpoints")
            if found is None:
                log.info("no complete checkpoint under %s: starting from scratch", self.run_dir / "checkpoints")
            return found
        return resolve_checkpoint(resume)

    def restore(self, ckpt: Path) -> None:
        extras = load_checkpoint(ckpt, self.checkpoint_state())
        self.step = int(extras["step"])
        self.noise_rng.set_state(extras["noise_rng"])
        torch.set_rng_state(extras["torch_rng"])
        self.loader.load_state_dict(extras["loader"])
        log.info("resumed from %s at step %d", ckpt, self.step)

    # -- one optimisation step -------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.autocast == "bf16")

    def prepare(self, batch: Batch) -> Batch:
        batch = batch.to(self.device, non_blocking=True)
        if self.cfg.latents.kind != "pixels" and batch.num_images:
            with torch.no_grad():
                batch.images = self.codec.encode(batch.images)
        return batch

    def train_step(self, batch: Batch) -> dict[str, float]:
        self.model.train()
        mask = build_attention_mask(batch.doc_ids, batch.image_ids, self.backend)
        with self.autocast():
            parts = compute_loss_parts(self.model, batch, mask, self.schedule, self.cfg.loss, self.noise_rng)
            loss = parts.total(self.cfg.loss)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.ema.update(self.model, self.step)
        text = (parts.text_sum / parts.text_count.clamp(min=1)).item()
        image = (parts.image_sum / parts.image_count.clamp(min=1)).item()
        return {"loss": loss.item(), "text_loss": text, "image_loss": image, "grad_norm": float(grad_norm),
                "lr": self.lr_scheduler.get_last_lr()[0]}

    # -- the loop --------------------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> None:
        """Train to ``train.steps``; then save, sample and export. ``stop_after`` ends the loop early at that step
        without the final outputs, like a job that is killed there (tests use it to check exact resume)."""
        cfg = self.cfg.train
        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step or None)
        it = iter(self.loader)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not self.progress)
        window = {"data_s": 0.0, "step_s": 0.0, "tokens": 0, "image_tokens": 0, "n": 0, "sums": {}}
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            batch = self.prepare(next(it))
            t1 = time.perf_counter()
            metrics = self.train_step(batch)
            t2 = time.perf_counter()
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"non-finite loss {metrics['loss']} at step {self.step}")
            self.step += 1
            window["data_s"] += t1 - t0
            window["step_s"] += t2 - t0
            real = int((batch.doc_ids >= 0).sum())
            window["tokens"] += real
            window["image_tokens"] += int((batch.image_ids >= 0).sum())
            window["n"] += 1
            for k, v in metrics.items():
                window["sums"][k] = window["sums"].get(k, 0.0) + v
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", text=f"{metrics['text_loss']:.3f}",
                            img=f"{metrics['image_loss']:.3f}")
            if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                self.log(window)
                window = {"data_s": 0.0, "step_s": 0.0, "tokens": 0, "image_tokens": 0, "n": 0, "sums": {}}
            if self.cfg.checkpoint.interval and self.step % self.cfg.checkpoint.interval == 0 \
                    and self.step < cfg.steps:
                self.save()
            if cfg.sample_interval and self.step % cfg.sample_interval == 0 and self.step < cfg.steps:
                self.sample_grid()
            if stop_after is not None and self.step >= stop_after:
                bar.close()
                self.writer.close()
                return
        bar.close()
        self.save()
        self.sample_grid()
        self.export()
        self.writer.close()

    def log(self, window: dict) -> None:
        n = max(window["n"], 1)
        avg = {k: v / n for k, v in window["sums"].items()}
        step_s = max(window["step_s"], 1e-9)
        avg["tokens_per_s"] = window["tokens"] / step_s
        avg["image_tokens_per_s"] = window["image_tokens"] / step_s
        avg["text_tokens_per_s"] = (window["tokens"] - window["image_tokens"]) / step_s
        avg["data_wait_share"] = window["data_s"] / step_s
        for k, v in avg.items():
            group = "loss" if "loss" in k else "train"
            self.writer.add_scalar(f"{group}/{k}", v, self.step)
        skipped = self.skip_counts()
        for reason, count in skipped.items():
            self.writer.add_scalar(f"data/skipped_{reason}", count, self.step)
        log.info("step %d | loss %.4f text %.4f image %.4f | lr %.2e | gnorm %.2f | %.0f tok/s | data %.0f%%%s",
                 self.step, avg["loss"], avg["text_loss"], avg["image_loss"], avg["lr"], avg["grad_norm"],
                 avg["tokens_per_s"], 100 * avg["data_wait_share"],
                 (" | skipped " + ", ".join(f"{k}={v}" for k, v in skipped.items() if v)) if any(skipped.values())
                 else "")

    def skip_counts(self) -> dict[str, int]:
        from data_pipelines.loader import data_counts

        counts = data_counts(self.loader.state_dict())
        return {k: v for k, v in counts.items() if k != "seen"}

    # -- outputs ---------------------------------------------------------------------------------------------
    def sample_grid(self) -> Path:
        from transfusion.generation.engine import Engine
        from transfusion.generation.grid import make_grid

        prompts = self.cfg.sample.prompts or default_prompts()
        engine = Engine(self.model, self.tokenizer, self.schedule, self.codec, self.patch_grid, self.device,
                        autocast=self.cfg.train.autocast == "bf16")
        with self.ema.swapped_into(self.model):
            images = engine.text_to_image(prompts, steps=self.cfg.sample.steps, guidance=self.cfg.sample.guidance,
                                          sampler=self.cfg.sample.sampler, seed=self.cfg.sample.seed)
        grid = make_grid(images, prompts)
        out = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        if self.writer is not None:
            import numpy as np

            self.writer.add_image("samples/t2i", np.asarray(grid), self.step, dataformats="HWC")
        log.info("wrote sample grid %s", out)
        return out

    def export(self) -> Path:
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        state.update({k: v.detach().cpu().to(state[k].dtype) for k, v in self.ema.shadow_state_dict().items()})
        out = export_model(self.run_dir / "export", state, to_dict(self.cfg),
                           {"step": str(self.step), "weights": "ema"})
        log.info("exported EMA weights to %s", out)
        return out


def default_prompts() -> list[str]:
    """16 shapes-world prompts that cycle through every color, shape and position."""
    from data_pipelines.shapes import COLORS, POSITION_PHRASES, POSITIONS, SHAPES

    colors, shapes, positions = list(COLORS), list(SHAPES), list(POSITIONS)
    return [f"a {colors[i % len(colors)]} {shapes[i % len(shapes)]} {POSITION_PHRASES[positions[i % len(positions)]]}"
            for i in range(16)]
