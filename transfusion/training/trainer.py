"""The trainer: build everything from a config, then step; checkpoint, sample, export.

One code path from one CPU process to many GPU nodes. The model is built on the meta device, parallelised
(activation checkpointing -> compile -> FSDP2 under torchrun, see ``transfusion.distributed``) and materialised with
weights that do not depend on the sharding; without torchrun the same steps run without a process group.

One optimizer step::

    every rank reads train.grad_accum micro-batches, one per data consumer  (world-size independent, distributed/data)
    normalisers = all-reduce(text targets, target image elements) over ranks and micro-steps
    per micro-batch: loss = (w_t * text_sum / N_text + w_i * image_sum / N_image) -> backward   (FSDP sums grads)
    clip (global norm) -> AdamW -> LR schedule -> EMA (sharded like the parameters)

so the step equals one big batch of dp_ranks x grad_accum micro-batches, on any number of ranks. With one micro-step
per rank the normalisers come from the forward pass itself (exact for any objective, including MAR's random masks);
with several they are counted from the batches up front (``loss_counts``) and checked against the forward's counts.

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
from torch import Tensor
from tqdm import tqdm

from transfusion.attention.backends import build_attention_mask, resolve_backend
from transfusion.batch import IGNORE_INDEX, Batch
from transfusion.checkpoint.dcp import (
    CheckpointError,
    ModelOptimizerState,
    ObjectState,
    PendingSave,
    fault_point,
    latest_checkpoint,
    load_rank_extras,
    load_state,
    read_marker,
    resolve_checkpoint,
    save_checkpoint,
)
from transfusion.config import Config, dumps_toml, to_dict
from transfusion.distributed.data import DataLayoutError, StepData, check_layout, owner_of
from transfusion.distributed.env import all_ranks_true, all_reduce_sum, barrier, init_distributed
from transfusion.distributed.init import materialize, mix_seed
from transfusion.distributed.parallelize import parallelize
from transfusion.latents.prepare import prepare_batch
from transfusion.precision import (
    Precision,
    agree_across_ranks,
    cpu_features,
    measure_peak_flops,
    model_matmul_shapes,
    resolve_precision,
)
from transfusion.runtime import build_parts
from transfusion.training.ema import EMA
from transfusion.training.losses import compute_loss_parts
from transfusion.training.metrics import Window, flops_per_token
from transfusion.training.optim import build_lr_scheduler, build_optimizer

log = logging.getLogger("transfusion")


def setup_logging(run_dir: Path, rank: int = 0) -> None:
    """Rank 0 logs INFO to stderr and ``train.log``; other ranks log warnings and errors to stderr only."""
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    sh = logging.StreamHandler(sys.stderr)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    else:
        fmt = logging.Formatter(f"%(asctime)s %(levelname)s [rank {rank}] %(message)s", "%H:%M:%S")
        sh.setLevel(logging.WARNING)
    sh.setFormatter(fmt)
    log.addHandler(sh)


def provenance(device: torch.device, parallel: dict | None = None) -> dict:
    """Git commit, library versions, device and parallel layout, saved with every run."""
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
            "versions": versions, "python": platform.python_version(), "device": dev, "cpu": cpu_features(),
            "parallel": parallel or {},
            "host": platform.node(), "argv": sys.argv, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip by the global gradient norm; gradients may be plain tensors or FSDP2-sharded DTensors."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return float(total)


class Trainer:
    def __init__(self, cfg: Config, resume: str | bool | None = None, *, progress: bool = True,
                 reset_data: bool = False) -> None:
        self.cfg = cfg
        self.env = init_distributed(cfg.parallel, cfg.run.device)
        self.device = self.env.device
        self.run_dir = Path(cfg.run.dir)
        setup_logging(self.run_dir, self.env.rank)
        self.progress = progress and self.env.is_main
        if cfg.train.num_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.train.num_threads)
        torch.manual_seed(cfg.run.seed)
        # Fail fast, and identically on every rank, before building anything heavy or entering a collective.
        ckpt = self.find_checkpoint(resume)
        marker, data_ok = self.check_resumable(ckpt, reset_data) if ckpt is not None else (None, True)

        parts = build_parts(cfg, self.device, model_device="meta")
        self.tokenizer, self.schedule, self.codec = parts.tokenizer, parts.schedule, parts.codec
        self.patch_grid = parts.patch_grid
        self.model = parallelize(parts.model, cfg.parallel, self.env.mesh, self.device)
        materialize(self.model, self.device, cfg.run.seed)
        self.backend = resolve_backend(cfg.model.attention, self.device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.train)
        self.ema = EMA(self.model, cfg.train.ema_decay)
        self.flops = flops_per_token(cfg.model, self.tokenizer.vocab_size, self.codec.channels, cfg.data.seq_len)
        self.step = 0
        self.pending: PendingSave | None = None
        self.writer = None
        self.data = self.build_data(cfg.run.seed)
        self.grid_prompts = grid_prompts(cfg)  # before training: a run without grid prompts fails now, on every rank
        self.precision, self.measured_peak = self.choose_precision()

        if ckpt is not None:
            self.restore(ckpt, marker, data_ok)
        if self.env.is_main:
            self._write_run_files()
        self._truncate_trace()
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("model: %.2fM parameters, attention=%s, device=%s x %d rank(s) (mesh %s), patch grid %s, "
                 "grad_accum %d, start step %d", n_params / 1e6, self.backend, self.device, self.env.world_size,
                 f"{self.env.dp_replicate}x{self.env.dp_shard}" if self.env.distributed else "none",
                 self.patch_grid, cfg.train.grad_accum, self.step)

    def choose_precision(self) -> tuple[Precision, float]:
        """The compute dtype for this machine (``train.autocast``; ``auto`` measures, the same on every rank) and the
        device's measured matmul peak in that dtype, the denominator of the logged ``peak_share``."""
        cfg = self.cfg
        shapes = model_matmul_shapes(cfg.model, self.tokenizer.vocab_size, self.codec.channels,
                                     cfg.data.batch_rows * cfg.data.seq_len)
        prec = agree_across_ranks(resolve_precision(cfg.train.autocast, self.device, shapes), self.device)
        peak = measure_peak_flops(self.device, prec.dtype, shapes)
        log.info("precision: %s | measured %s matmul peak %.1f GFLOP/s", prec.reason, prec.name, peak / 1e9)
        return prec, peak

    # -- data ------------------------------------------------------------------------------------------------
    def build_data(self, seed: int) -> StepData:
        return StepData(self.cfg.data, self.tokenizer, self.patch_grid, seed=seed, dp_rank=self.env.dp_rank,
                        dp_size=self.env.dp_size, grad_accum=self.cfg.train.grad_accum)

    def data_layout(self) -> dict:
        return {"consumers": self.env.dp_size * self.cfg.train.grad_accum, "num_workers": self.cfg.data.num_workers}

    # -- run files and checkpoints ---------------------------------------------------------------------------
    def _write_run_files(self) -> None:
        (self.run_dir / "config.toml").write_text(dumps_toml(self.cfg))
        layout = {"world_size": self.env.world_size, "dp_replicate": self.env.dp_replicate,
                  "dp_shard": self.env.dp_shard, "fsdp": self.env.distributed}
        prov = provenance(self.device, layout) | {
            "precision": self.precision.as_dict() | {"measured_peak_gflops": round(self.measured_peak / 1e9, 2)}}
        (self.run_dir / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")

    def checkpoint_state(self) -> dict:
        return {"model_optim": ModelOptimizerState(self.model, self.optimizer),
                "lr_scheduler": ObjectState(self.lr_scheduler), "ema": ObjectState(self.ema)}

    def save(self, *, final: bool = False) -> None:
        """Checkpoint at ``self.step`` (collective). With ``checkpoint.async_save`` the write goes on in the background
        after the state is staged; the final save is always blocking."""
        self.wait_for_save()
        extras = {"step": self.step, "torch_rng": torch.get_rng_state(), "data": self.data.state_dict()}
        if self.device.type == "cuda":
            extras["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        info = {"data": self.data.layout(), "mesh": [self.env.dp_replicate, self.env.dp_shard]}
        out = save_checkpoint(self.run_dir / "checkpoints", self.step, self.checkpoint_state(), extras,
                              keep=self.cfg.checkpoint.keep, info=info,
                              async_save=self.cfg.checkpoint.async_save and not final)
        if isinstance(out, PendingSave):
            self.pending = out
            log.info("staged checkpoint %s (writing in the background)", out.path)
        else:
            log.info("saved checkpoint %s", out)

    def poll_save(self) -> None:
        if self.pending is not None and self.pending.poll():
            log.info("saved checkpoint %s", self.pending.path)
            self.pending = None

    def wait_for_save(self) -> None:
        if self.pending is not None:
            log.info("saved checkpoint %s", self.pending.wait())
            self.pending = None

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

    def check_resumable(self, ckpt: Path, reset_data: bool) -> tuple[dict, bool]:
        """(marker, whether the data position can be restored). Weights and optimizer load into any world size
        (DCP reshards); the data position only into the same number of data consumers and workers. Otherwise this
        raises one line, or with ``reset_data`` warns that the data streams start afresh."""
        marker = read_marker(ckpt)
        try:
            check_layout(marker.get("data"), self.data_layout())
        except DataLayoutError as e:
            if not reset_data:
                raise CheckpointError(f"cannot resume the data position of {ckpt}: {e}; or pass --reset-data to "
                                      f"load weights and optimizer and start fresh data streams") from None
            log.warning("--reset-data: %s; the data streams start afresh (samples may repeat within this epoch)", e)
            return marker, False
        return marker, True

    def restore(self, ckpt: Path, marker: dict, data_ok: bool) -> None:
        load_state(ckpt, self.checkpoint_state())
        self.step = int(marker["step"])
        same_world = int(marker.get("world_size", -1)) == self.env.world_size
        if same_world:  # RNG states are per rank: only meaningful for the same ranks
            extras = load_rank_extras(ckpt, self.env.rank)
            torch.set_rng_state(extras["torch_rng"])
            if "cuda_rng" in extras and self.device.type == "cuda":
                torch.cuda.set_rng_state(extras["cuda_rng"], self.device)
        layout = marker.get("data")
        if data_ok:
            if layout["seed"] != self.data.seed:
                self.data = self.build_data(layout["seed"])
            saved: dict[int, dict] = {}
            states = {}
            for v in self.data.consumers:  # each consumer's position, from whichever rank owned it then
                owner = owner_of(v, layout["grad_accum"])
                if owner not in saved:
                    saved[owner] = load_rank_extras(ckpt, owner)
                states[v] = saved[owner]["data"][v]
            self.data.load_state_dict(states)
        else:
            self.data = self.build_data(mix_seed(self.cfg.run.seed, 0xDA7A, self.step))
        log.info("resumed from %s at step %d%s", ckpt, self.step, "" if data_ok else " (fresh data streams)")

    # -- one optimisation step -------------------------------------------------------------------------------
    def autocast(self):
        return self.precision.autocast(self.device)

    def prepare(self, batch: Batch) -> Batch:
        """Move a batch to the device; pixel batches are encoded when the run diffuses VAE latents, latent batches
        are checked and used as they are (``transfusion.latents.prepare``)."""
        return prepare_batch(batch, self.codec, self.device, self.patch_grid, self.cfg.model.patch_size)

    def noise_generator(self, consumer: int) -> torch.Generator:
        """Timesteps, noise and masks of one micro-batch: a function of (seed, step, consumer), so the same on any
        number of ranks and after any resume."""
        return torch.Generator().manual_seed(mix_seed(self.cfg.run.seed, self.step, consumer))

    def loss_counts(self, batch: Batch) -> Tensor:
        """[text targets, image loss units] of a prepared batch, counted without a forward pass (float64). Needed up
        front with several micro-steps per rank; an objective whose counts depend on random draws made in the
        forward (MAR's masks) must override this to use grad_accum > 1."""
        text = (batch.text_targets != IGNORE_INDEX).sum()
        targets = batch.image_is_target.sum()
        image = targets * math.prod(batch.images.shape[1:]) if self.cfg.loss.image_reduction == "element" else targets
        return torch.stack([text, image.to(text.device)]).to(self.device, torch.float64)

    def train_step(self, micro: list[tuple[int, Batch]]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches ``[(consumer, batch), ...]``; returns global metrics."""
        self.model.train()
        cfg = self.cfg
        norms = all_reduce_sum(sum(self.loss_counts(b) for _, b in micro)) if len(micro) > 1 else None
        stats = torch.zeros(5, dtype=torch.float64, device=self.device)  # loss, text sum, image sum, counts
        for consumer, batch in micro:
            mask = build_attention_mask(batch.doc_ids, batch.image_ids, self.backend, hidden_ids=batch.hidden_ids,
                                        bidirectional_images=cfg.model.image_attention == "bidirectional")
            with self.autocast():
                parts = compute_loss_parts(self.model, batch, mask, self.schedule, cfg.loss,
                                           self.noise_generator(consumer))
            counts = torch.stack([parts.text_count.to(self.device), parts.image_count.to(self.device)]).double()
            if norms is None:  # one micro-step: the forward's own counts, summed over ranks
                norms = all_reduce_sum(counts.clone())
            loss = parts.total(cfg.loss, norms[0], norms[1])
            loss.backward()
            stats += torch.cat([torch.stack([loss.detach(), parts.text_sum.detach(), parts.image_sum.detach()])
                                .double(), counts])
        grad_norm = clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.ema.update(self.model, self.step)
        loss, text_sum, image_sum, text_count, image_count = all_reduce_sum(stats).tolist()
        if len(micro) > 1 and [text_count, image_count] != norms.tolist():
            raise RuntimeError(f"the forward pass counted {text_count:.0f} text targets / {image_count:.0f} image "
                               f"units, Trainer.loss_counts predicted {norms.tolist()}: this objective's counts "
                               f"depend on the forward, so train.grad_accum > 1 needs an overridden loss_counts")
        return {"loss": loss, "text_loss": text_sum / max(text_count, 1.0), "image_loss": image_sum /
                max(image_count, 1.0), "grad_norm": grad_norm, "lr": self.lr_scheduler.get_last_lr()[0]}

    # -- the loop --------------------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> None:
        """Train to ``train.steps``; then save, sample and export. ``stop_after`` ends the loop early at that step
        without the final outputs, like a job that is killed there (tests use it to check exact resume)."""
        cfg = self.cfg.train
        self.writer = self._open_writer()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 30.0,  # a log file gets a line per 30 s, not per step
                   disable=not self.progress)
        window = Window()
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                micro = self.data.next_step()
                if not self.cfg.data.repeat and not all_ranks_true(micro is not None, self.device):
                    log.info("a finite data stream (data.repeat = false) ended after step %d: stopping", self.step)
                    break
                if micro is None:
                    raise RuntimeError("a repeating data stream ended unexpectedly")
                text_tokens = sum(int(((b.doc_ids >= 0) & (b.image_ids < 0)).sum()) for _, b in micro)
                image_tokens = sum(int((b.image_ids >= 0).sum()) for _, b in micro)
                micro = [(v, self.prepare(b)) for v, b in micro]
                t1 = time.perf_counter()
                metrics = self.train_step(micro)
                t2 = time.perf_counter()
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"non-finite loss {metrics['loss']} at step {self.step}")
                self.step += 1
                self.trace(micro)
                window.add(step_s=t2 - t0, data_s=t1 - t0, text_tokens=text_tokens, image_tokens=image_tokens,
                           metrics=metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", text=f"{metrics['text_loss']:.3f}",
                                img=f"{metrics['image_loss']:.3f}", refresh=False)  # drawn by update (mininterval)
                bar.update(1)
                if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                    self.log(window)
                    window = Window()
                self.poll_save()
                if self.cfg.checkpoint.interval and self.step % self.cfg.checkpoint.interval == 0 \
                        and self.step < cfg.steps:
                    self.save()
                if cfg.sample_interval and self.step % cfg.sample_interval == 0 and self.step < cfg.steps:
                    self.sample_grid()
                fault_point("after_step", self.step)
                if stop_after is not None and self.step >= stop_after:
                    self.wait_for_save()
                    return
            if window.steps:
                self.log(window)
            self.save(final=True)
            state = self.consolidated_state()
            self.sample_grid(state)
            self.export(state)
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.close()

    def _open_writer(self):
        if not self.env.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional at run time (e.g. a bare GPU box)
            log.warning("tensorboard is not installed: logging to train.log and metrics.jsonl only")
            return None
        return SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step or None)

    def log(self, window: Window) -> None:
        """Averages over the window; throughput per device averaged over ranks (collective: every rank calls it)."""
        avg = window.summary(self.flops, self.device, self.measured_peak)
        skipped = self.skip_counts()
        if not self.env.is_main:
            return
        if self.writer is not None:
            for k, v in avg.items():
                self.writer.add_scalar(f"{'loss' if 'loss' in k else 'train'}/{k}", v, self.step)
            for reason, count in skipped.items():
                self.writer.add_scalar(f"data/skipped_{reason}", count, self.step)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **avg, **{f"skipped_{k}": v for k, v in skipped.items()}}) + "\n")
        eff = f" | {1e3 * avg['tflops_per_s']:.1f} GFLOP/s = {100 * avg['peak_share']:.0f}% of measured peak"
        eff += f" | MFU {100 * avg['mfu']:.1f}%" if "mfu" in avg else ""
        log.info("step %d | loss %.4f text %.4f image %.4f | lr %.2e | gnorm %.2f | %.0f tok/s/device (text %.0f, "
                 "image %.0f)%s | mem %.2f GiB | data %.0f%%%s",
                 self.step, avg["loss"], avg["text_loss"], avg["image_loss"], avg["lr"], avg["grad_norm"],
                 avg["tokens_per_s"], avg["text_tokens_per_s"], avg["image_tokens_per_s"], eff,
                 avg["peak_memory_gib"], 100 * avg["data_wait_share"],
                 (" | skipped " + ", ".join(f"{k}={v}" for k, v in skipped.items() if v)) if any(skipped.values())
                 else "")

    def skip_counts(self) -> dict[str, int]:
        """Cumulative skip counts by reason, summed over this rank's consumers and over ranks (collective)."""
        from data_pipelines.loader import data_counts

        total: dict[str, int] = {}
        for state in self.data.state_dict().values():
            for k, v in data_counts(state).items():
                total[k] = total.get(k, 0) + v
        keys = sorted(k for k in total if k != "seen")
        summed = all_reduce_sum(torch.tensor([float(total[k]) for k in keys], dtype=torch.float64,
                                             device=self.device)).tolist()
        return {k: int(v) for k, v in zip(keys, summed)}

    def trace(self, micro: list[tuple[int, Batch]]) -> None:
        """With ``train.trace_data``: the keys each consumer fed into this step, one JSON line per micro-batch."""
        if not self.cfg.train.trace_data:
            return
        path = self.run_dir / "data_trace" / f"rank_{self.env.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for consumer, batch in micro:
                f.write(json.dumps({"step": self.step, "consumer": consumer, "keys": list(batch.keys)}) + "\n")

    def _truncate_trace(self) -> None:
        """Drop trace lines of steps after the resume point (they were trained by a run that died before saving)."""
        if self.cfg.train.trace_data and self.env.is_main:
            for path in (self.run_dir / "data_trace").glob("rank_*.jsonl"):
                lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= self.step]
                path.write_text("".join(ln + "\n" for ln in lines))
        barrier()

    # -- outputs ---------------------------------------------------------------------------------------------
    def consolidated_state(self) -> dict[str, Tensor]:
        """The EMA weights as full CPU tensors under clean parameter names, on rank 0 (empty on other ranks).
        Collective: parameters are gathered one at a time, so no rank but 0 ever holds more than one in full."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.tensor import DTensor

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        for name, shadow in self.ema.shadow_state_dict().items():
            full = shadow.full_tensor() if isinstance(shadow, DTensor) else shadow
            if self.env.is_main:
                state[name] = full.detach().to("cpu", state[name].dtype, copy=True)
        return state if self.env.is_main else {}

    def inference_model(self, state: dict[str, Tensor]) -> torch.nn.Module:
        """A plain single-device model holding ``state`` (for sampling: no FSDP hooks, no compiled blocks)."""
        from transfusion.model import build_model

        with torch.device(self.device):
            model = build_model(self.cfg.model, self.tokenizer.vocab_size, self.codec.channels)
        model.load_state_dict(state)
        return model.eval()

    def sample_grid(self, state: dict[str, Tensor] | None = None) -> Path | None:
        """A grid of EMA samples, drawn on rank 0 from a consolidated copy of the weights (collective)."""
        from transfusion.generation.engine import Engine
        from transfusion.generation.grid import make_grid

        state = self.consolidated_state() if state is None else state
        out = None
        if self.env.is_main:
            prompts = self.grid_prompts
            engine = Engine(self.inference_model(state), self.tokenizer, self.schedule, self.codec, self.patch_grid,
                            self.device, precision=self.precision, cfg=self.cfg)
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
        barrier()
        return out

    def export(self, state: dict[str, Tensor] | None = None) -> Path | None:
        """Consolidated EMA weights + config as safetensors, written by rank 0 (collective)."""
        from transfusion.checkpoint.export import export_model

        state = self.consolidated_state() if state is None else state
        out = None
        if self.env.is_main:
            out = export_model(self.run_dir / "export", state, to_dict(self.cfg),
                               {"step": str(self.step), "weights": "ema", "trained_precision": self.precision.name})
            log.info("exported EMA weights to %s", out)
        barrier()
        return out

    def close(self) -> None:
        """Finish an async save in flight and stop the data workers."""
        self.wait_for_save()
        self.data.close()


def grid_prompts(cfg: Config, n: int = 16) -> list[str]:
    """Prompts for sample grids: the recipe's ``sample.prompts``, else the first ``n`` held-out captions
    (``data.eval_shards``), so a grid shows the run's own domain. Raises DataError when there are neither."""
    from data_pipelines.errors import DataError
    from data_pipelines.shards import ShardSpecError, iter_captions

    if cfg.sample.prompts:
        return list(cfg.sample.prompts)
    try:
        prompts = list(iter_captions(cfg.data.eval_shards, cfg.data.caption_field, n,
                                     segments_field=cfg.data.segments_field)) if cfg.data.eval_shards else []
    except ShardSpecError:
        prompts = []
    if not prompts:
        raise DataError(f"no prompts for the sample grid: sample.prompts is empty and data.eval_shards "
                        f"({cfg.data.eval_shards!r}) has no captions")
    return prompts
