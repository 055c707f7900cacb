"""The trainer: build everything from a config, then step; checkpoint, sample, export.

One code path from one CPU process to many GPU nodes. The model is built on the meta device, parallelised
(activation checkpointing -> compile -> FSDP2 under torchrun, see ``transfusion.distributed``) and materialised with
weights that do not depend on the sharding; without torchrun the same steps run without a process group.

One optimizer step::

    every rank reads train.grad_accum micro-batches, one per data consumer  (world-size independent, distributed/data)
    normalisers = all-reduce(text targets, target image elements) over ranks and micro-steps
    per micro-batch: loss = (w_t * text_sum / N_text + w_i * image_sum / N_image) -> backward   (FSDP sums grads)
    clip (global norm) -> check: loss and grad norm finite on every rank? (the loss sum's all-reduce, before the update)
        yes: AdamW -> LR schedule -> EMA (sharded like the parameters)
        no:  skip the update (weights, optimizer state, LR schedule and EMA unchanged; the batch is consumed)

so the step equals one big batch of dp_ranks x grad_accum micro-batches, on any number of ranks. With one micro-step
per rank the normalisers come from the forward pass itself (exact for any objective, including MAR's random masks);
with several they are counted from the batches up front (``loss_counts``) and checked against the forward's counts.

Steps are small methods (``train_step``, ``log``, ``save``, ``sample_grid``) so that a variant trainer overrides one
of them instead of forking the loop. Everything else is a collaborator built once: the checkpoint policy
(``checkpoint/manager.py``: find, check, restore, save, poll, wait), grids and the export (``training/outputs.py``),
the run's files and data trace (``training/run_files.py``) and the precision choice (``precision.py``).

Stopping (``training/guards.py``, docs/reliability.md), and the exit codes of ``python -m transfusion.train``:

    preemption   a signal of ``train.preempt_signals`` (default SIGTERM, SIGUSR1, SIGINT) on any rank: the ranks agree
                 on it after every step (one tiny all-reduce), finish the step, save one checkpoint of it (the
                 periodic save's path, data position included) and exit 75 (``PREEMPTED_EXIT_CODE``, EX_TEMPFAIL);
                 ``--resume`` continues bitwise as if uninterrupted. Further signals while stopping are logged and
                 ignored. Under torchrun pass ``--signals-to-handle`` for SIGUSR1 and a ``--shutdown-timeout`` longer
                 than a checkpoint save (torchrun forwards the signal, then SIGKILLs after 30 s by default).
    non-finite   a skipped step is logged (a warning) and counted (``bad_steps`` in metrics.jsonl and the log line);
                 more than ``train.max_bad_steps`` in a row stop the run with one ``error:`` line and exit 3
                 (``NONFINITE_EXIT_CODE``), saving nothing; the previous checkpoints stay as they were.
    0 done, 2 bad input (one ``error:`` line), 130 SIGINT outside the training loop.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from transfusion.batch import IGNORE_INDEX, Batch
from transfusion.checkpoint.dcp import ModelOptimizerState, ObjectState, fault_point, latest_checkpoint
from transfusion.checkpoint.manager import CheckpointManager
from transfusion.config import Config
from transfusion.distributed.data import StepData
from transfusion.distributed.env import all_ranks_true, all_reduce_sum, init_distributed
from transfusion.distributed.init import materialize, mix_seed
from transfusion.distributed.parallelize import parallelize
from transfusion.latents.prepare import prepare_batch
from transfusion.precision import choose_precision, model_matmul_shapes
from transfusion.components import build_components
from transfusion.pretrained.checkpoint import load_pretrained
from transfusion.pretrained.config import open_pretrained
from transfusion.training.ema import EMA
from transfusion.training.guards import (
    NONFINITE_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    NonFiniteError,
    Preemption,
    fault_active,
    protect_data_workers,
)
from transfusion.model.image_head import image_loss_count
from transfusion.training.losses import compute_loss_terms
from transfusion.training.freeze import freeze_parameters
from transfusion.training.metrics import Window, flops_per_token, parameter_summary
from transfusion.training.optim import build_lr_scheduler, build_optimizer
from transfusion.training.outputs import RunOutputs
from transfusion.training.run_files import DataTrace, setup_logging, write_run_files

log = logging.getLogger("transfusion")


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


def token_counts(micro: list[tuple[int, Batch]]) -> tuple[int, int]:
    """(text tokens, image tokens) of a step's micro-batches, padding excluded: what throughput and FLOPs count."""
    text = sum(int(((b.doc_ids >= 0) & (b.image_ids < 0)).sum()) for _, b in micro)
    return text, sum(int((b.image_ids >= 0).sum()) for _, b in micro)


class Trainer:
    def __init__(self, cfg: Config, resume: str | bool | None = None, *, progress: bool = True,
                 reset_data: bool = False) -> None:
        self.cfg = cfg
        self.env = init_distributed(cfg.parallel, cfg.run.device)
        self.device = self.env.device
        self.run_dir = Path(cfg.run.dir)
        pretrained = open_pretrained(cfg)  # fills cfg.model from the checkpoint; bad input fails before any write
        setup_logging(self.run_dir, self.env.rank)
        self.progress = progress and self.env.is_main
        if cfg.train.num_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.train.num_threads)
        torch.manual_seed(cfg.run.seed)
        # Fail fast, and identically on every rank, before building anything heavy or entering a collective.
        self.checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint, self.env)
        ckpt = self.checkpoints.find(resume)
        marker, data_ok = self.checkpoints.check(ckpt, self.data_layout(), reset_data) if ckpt else (None, True)

        parts = build_components(cfg, self.device, model_device="meta", training=True, pretrained=pretrained,
                                 agree=lambda ok: all_ranks_true(ok, self.device))  # every rank: the same kernel
        self.attention = parts.attention
        self.tokenizer, self.schedule, self.codec = parts.tokenizer, parts.schedule, parts.codec
        self.patch_grid = parts.patch_grid
        freeze_parameters(parts.model, cfg.train.freeze)  # before sharding and the optimizer (training/freeze.py)
        self.model = parallelize(parts.model, cfg.parallel, self.env.mesh, self.device)
        materialize(self.model, self.device, cfg.run.seed)
        if pretrained is not None and ckpt is None:  # a resumed run restores its own weights instead
            load_pretrained(self.model, pretrained)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.train)
        self.ema = EMA(self.model, cfg.train.ema_decay)
        self.flops = flops_per_token(cfg.model, self.tokenizer.vocab_size, self.codec.channels, cfg.data.seq_len)
        self.step = 0
        self.writer = None
        self.preemption = Preemption(cfg.train.preempt_signals)
        self.preempted: str | None = None  # set when fit stopped on a preemption signal (exit PREEMPTED_EXIT_CODE)
        self.bad_steps = 0  # steps skipped for a non-finite loss or gradient norm, in this process
        self.bad_in_a_row = 0
        self.data = self.build_data(cfg.run.seed)
        self.precision, self.measured_peak = choose_precision(
            cfg.train.autocast, self.device,
            model_matmul_shapes(cfg.model, self.tokenizer.vocab_size, self.codec.channels,
                                cfg.data.batch_rows * cfg.data.seq_len))
        self.outputs = RunOutputs(cfg, self.run_dir, self.env, parts, self.precision)

        if ckpt is not None:
            self.step, self.data = self.checkpoints.restore(ckpt, marker, data_ok, self.checkpoint_state(),
                                                            self.data, self.build_data, cfg.run.seed)
        if self.env.is_main:
            write_run_files(self.run_dir, cfg, self.env, self.precision, self.measured_peak)
        self.trace = DataTrace(self.run_dir, self.env, enabled=cfg.train.trace_data)
        self.trace.truncate(self.step)
        log.info(self.attention.description)
        mesh = f"{self.env.dp_replicate}x{self.env.dp_shard}" if self.env.distributed else "none"
        log.info("model: %s, attention=%s, device=%s x %d rank(s) (mesh %s), patch grid %s, grad_accum %d, "
                 "start step %d", parameter_summary(self.model), self.backend, self.device, self.env.world_size, mesh,
                 self.patch_grid, cfg.train.grad_accum, self.step)

    @property
    def backend(self) -> str:
        """The resolved attention backend (``self.attention``, built once in ``build_components``)."""
        return self.attention.backend

    @property
    def flex_tuning(self):
        """The flex backend's probed tuning, or None."""
        return self.attention.flex

    # -- data ------------------------------------------------------------------------------------------------
    def build_data(self, seed: int) -> StepData:
        data = StepData(self.cfg.data, self.tokenizer, self.patch_grid, seed=seed, dp_rank=self.env.dp_rank,
                        dp_size=self.env.dp_size, grad_accum=self.cfg.train.grad_accum)
        protect_data_workers(data.loaders.values(), self.cfg.train.preempt_signals)  # the trainer ends its workers
        return data

    def data_layout(self) -> dict:
        return {"consumers": self.env.dp_size * self.cfg.train.grad_accum, "num_workers": self.cfg.data.num_workers}

    # -- checkpoints (policy in transfusion/checkpoint/manager.py) -------------------------------------------
    def checkpoint_state(self) -> dict:
        return {"model_optim": ModelOptimizerState(self.model, self.optimizer),
                "lr_scheduler": ObjectState(self.lr_scheduler), "ema": ObjectState(self.ema)}

    def save(self, *, final: bool = False) -> None:
        self.checkpoints.save(self.step, self.checkpoint_state(), self.data, final=final)

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
        """[text targets, image loss units] of a prepared batch, counted without a forward pass (float64): the
        image heads' one count rule (``image_loss_count``). Needed up front with several micro-steps per rank."""
        text = (batch.text_targets != IGNORE_INDEX).sum()
        image = image_loss_count(batch, self.cfg.loss.image_reduction)
        return torch.stack([text, image.to(text.device)]).to(self.device, torch.float64)

    def train_step(self, micro: list[tuple[int, Batch]]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches ``[(consumer, batch), ...]``; returns global metrics."""
        self.model.train()
        cfg = self.cfg
        norms = all_reduce_sum(sum(self.loss_counts(b) for _, b in micro)) if len(micro) > 1 else None
        # loss, text sum, image sum, text count, image count, ranks whose gradient norm is not finite
        stats = torch.zeros(6, dtype=torch.float64, device=self.device)
        for consumer, batch in micro:
            mask = self.attention.mask(batch.doc_ids, batch.image_ids, hidden_ids=batch.hidden_ids)
            with self.autocast():
                parts = compute_loss_terms(self.model, batch, mask, self.schedule, cfg.loss,
                                           self.noise_generator(consumer))
            counts = torch.stack([parts.text_count.to(self.device), parts.image_count.to(self.device)]).double()
            if norms is None:  # one micro-step: the forward's own counts, summed over ranks
                norms = all_reduce_sum(counts.clone())
            loss = parts.total(cfg.loss, norms[0], norms[1])
            if consumer == micro[0][0] and fault_active("nan_loss", self.step + 1):
                loss = loss + float("nan")  # fault injection: a NaN loss whose gradients stay finite
            loss.backward()
            stats[:5] += torch.cat([torch.stack([loss.detach(), parts.text_sum.detach(), parts.image_sum.detach()])
                                    .double(), counts])
        params = [p for p in self.model.parameters() if p.requires_grad]
        if fault_active("nan_grad", self.step + 1):  # fault injection: one NaN gradient, the loss stays finite
            grad = next(p.grad for p in params if p.grad is not None)
            (grad.to_local() if hasattr(grad, "to_local") else grad).fill_(float("nan"))
        grad_norm = clip_grad_norm_(params, cfg.train.grad_clip)  # every step: its norm is checked below
        stats[5] = 0.0 if math.isfinite(grad_norm) else 1.0
        # Summed over ranks before the update, so every rank takes the same decision: a NaN or inf on any rank makes
        # the summed loss (or the count of bad gradient norms) say so everywhere.
        loss, text_sum, image_sum, text_count, image_count, bad_grads = all_reduce_sum(stats).tolist()
        if len(micro) > 1 and [text_count, image_count] != norms.tolist():
            raise RuntimeError(f"the forward pass counted {text_count:.0f} text targets / {image_count:.0f} image "
                               f"units, Trainer.loss_counts predicted {norms.tolist()}: this objective's counts "
                               f"depend on the forward, so train.grad_accum > 1 needs an overridden loss_counts")
        skipped = not math.isfinite(loss) or bad_grads > 0
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not skipped:  # a skipped step leaves weights, optimizer state, LR schedule and EMA as they were
            self.lr_scheduler.step()
            self.ema.update(self.model, self.step)
        return {"loss": loss, "text_loss": text_sum / max(text_count, 1.0), "image_loss": image_sum /
                max(image_count, 1.0), "grad_norm": grad_norm, "lr": self.lr_scheduler.get_last_lr()[0],
                "skipped": float(skipped)}

    def count_bad_step(self, metrics: dict[str, float], skipped: bool) -> None:
        """Account for step ``self.step`` (just taken): a skipped step is logged and counted; more than
        ``train.max_bad_steps`` in a row stop the run (NonFiniteError) with the last checkpoint as it was."""
        if not skipped:
            if not math.isfinite(metrics["loss"]):  # a train_step override that updated regardless
                raise NonFiniteError(f"non-finite loss {metrics['loss']} at step {self.step}, and the update was "
                                     f"applied: resume from the last checkpoint")
            self.bad_in_a_row = 0
            return
        self.bad_steps += 1
        self.bad_in_a_row += 1
        limit = self.cfg.train.max_bad_steps
        log.warning("step %d skipped: non-finite loss %.4g or gradient norm %.4g (weights, optimizer, EMA and LR "
                    "schedule unchanged; %d in a row, train.max_bad_steps = %d)", self.step, metrics["loss"],
                    metrics["grad_norm"], self.bad_in_a_row, limit)
        if self.bad_in_a_row > limit:
            self.checkpoints.wait()  # an async save in flight holds good weights: let it complete
            last = latest_checkpoint(self.checkpoints.dir)
            raise NonFiniteError(f"stopped at step {self.step}: {self.bad_in_a_row} step(s) in a row had a "
                                 f"non-finite loss or gradient norm (train.max_bad_steps = {limit}); nothing saved "
                                 f"after them, the last checkpoint is {last or 'none'} (exit code "
                                 f"{NONFINITE_EXIT_CODE})")

    # -- the loop --------------------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> None:
        """Train to ``train.steps``; then save, sample and export. ``stop_after`` ends the loop early at that step
        without the final outputs, like a job that is killed there (tests use it to check exact resume).

        A signal of ``train.preempt_signals`` (on any rank) ends the loop after the step it arrived in, with a
        checkpoint of that step and ``self.preempted`` set to the signal's name; the caller exits with
        ``PREEMPTED_EXIT_CODE``. The handlers are installed here and the previous ones restored on return."""
        cfg = self.cfg.train
        self.writer = self._open_writer()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 30.0,  # a log file gets a line per 30 s, not per step
                   disable=not self.progress)
        window = Window()
        started = time.perf_counter()
        self.preempted = None
        try:
            with self.preemption.installed():
                while self.step < cfg.steps:
                    taken = self._take_step(window)
                    if taken is None:
                        break
                    metrics, skipped = taken
                    if not skipped:
                        bar.set_postfix(loss=f"{metrics['loss']:.3f}", text=f"{metrics['text_loss']:.3f}",
                                        img=f"{metrics['image_loss']:.3f}", refresh=False)  # drawn by update
                    bar.update(1)
                    if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                        self.log(window)
                        window = Window()
                        if cfg.max_minutes and self.step < cfg.steps and self._over_time(started, cfg.max_minutes):
                            log.info("train.max_minutes = %g spent at step %d of %d: ending here (checkpoint, "
                                     "samples, export)", cfg.max_minutes, self.step, cfg.steps)
                            break
                    if self._after_step(stop_after):
                        return
                self._finish(window)
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.close()

    def _take_step(self, window: Window) -> tuple[dict[str, float], bool] | None:
        """Read, prepare and train one step and account for it (``window``, the bad-step count, the data trace):
        (metrics, skipped), or None when a finite data stream ended (on any rank)."""
        if fault_active("await_signal", self.step + 1):
            self.preemption.wait_for_signal(self.step + 1)
        t0 = time.perf_counter()
        micro = self.data.next_step()
        if not self.cfg.data.repeat and not all_ranks_true(micro is not None, self.device):
            log.info("a finite data stream (data.repeat = false) ended after step %d: stopping", self.step)
            return None
        if micro is None:
            raise RuntimeError("a repeating data stream ended unexpectedly")
        text_tokens, image_tokens = token_counts(micro)
        micro = [(v, self.prepare(b)) for v, b in micro]
        t1 = time.perf_counter()
        metrics = self.train_step(micro)
        t2 = time.perf_counter()
        skipped = bool(metrics.pop("skipped", 0.0))
        self.step += 1  # counts batches taken, so a skipped step still consumes its data
        self.count_bad_step(metrics, skipped)
        self.trace.write(self.step, micro)
        window.add(step_s=t2 - t0, data_s=t1 - t0, text_tokens=text_tokens, image_tokens=image_tokens,
                   metrics=metrics, skipped=skipped)
        return metrics, skipped

    def _after_step(self, stop_after: int | None) -> bool:
        """Checkpoint, preemption, periodic samples after a step; True when the loop ends here without the final
        outputs (preempted, or ``stop_after`` reached)."""
        cfg = self.cfg.train
        self.checkpoints.poll()
        stop = self.preemption.agreed(self.step)  # collective, every step: all ranks stop together
        if stop or self.checkpoints.due(self.step, cfg.steps):
            self.save(final=stop)  # a preemption's save blocks: the process exits next
        if stop:
            self._stop_preempted()
            return True
        if cfg.sample_interval and self.step % cfg.sample_interval == 0 and self.step < cfg.steps:
            self.sample_grid()
        fault_point("after_step", self.step)
        if stop_after is not None and self.step >= stop_after:
            self.checkpoints.wait()
            return True
        return False

    def _finish(self, window: Window) -> None:
        """The end of training: the last log window, the final checkpoint, then (unless a preemption signal came)
        the EMA sample grid and the export."""
        if window.steps:
            self.log(window)
        self.save(final=True)
        if self.preemption.agreed(self.step):  # signalled by now: samples and export wait for --resume
            return self._stop_preempted()
        state = self.outputs.consolidated_state(self.model, self.ema)
        self.sample_grid(state)
        self.outputs.export(state, self.step)

    def _stop_preempted(self) -> None:
        """After the preemption checkpoint is written (on every rank): log it and mark the run preempted."""
        self.preemption.report(self.step)  # signals that came during the save were ignored
        self.preempted = self.preemption.received[0] if self.preemption.received else "a signal on another rank"
        log.info("preempted (%s): checkpoint of step %d saved; exiting with code %d, continue with --resume",
                 self.preempted, self.step, PREEMPTED_EXIT_CODE)

    def _over_time(self, started: float, max_minutes: float) -> bool:
        """Every rank stops at the same step: the budget counts as spent when it is on any rank."""
        return not all_ranks_true(time.perf_counter() - started < max_minutes * 60.0, self.device)

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
        """Averages over the window; throughput per device averaged over ranks (collective: every rank calls it).
        ``bad_steps`` (this window) and ``bad_steps_total`` (this process) count the skipped non-finite steps."""
        avg = window.summary(self.flops, self.device, self.measured_peak)
        skipped = self.skip_counts()
        if not self.env.is_main:
            return
        avg["bad_steps_total"] = float(self.bad_steps)
        if self.writer is not None:
            for k, v in avg.items():
                self.writer.add_scalar(f"{'loss' if 'loss' in k else 'train'}/{k}", v, self.step)
            for reason, count in skipped.items():
                self.writer.add_scalar(f"data/skipped_{reason}", count, self.step)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **avg, **{f"skipped_{k}": v for k, v in skipped.items()}}) + "\n")
        if window.bad_steps == window.steps:  # every step of the window skipped: no step metrics to average
            avg = {k: math.nan for k in ("loss", "text_loss", "image_loss", "lr", "grad_norm")} | avg
        eff = f" | {1e3 * avg['tflops_per_s']:.1f} GFLOP/s = {100 * avg['peak_share']:.0f}% of measured peak"
        eff += f" | MFU {100 * avg['mfu']:.1f}%" if "mfu" in avg else ""
        log.info("step %d | loss %.4f text %.4f image %.4f | lr %.2e | gnorm %.2f | %.0f tok/s/device (text %.0f, "
                 "image %.0f)%s | mem %.2f GiB | data %.0f%%%s%s",
                 self.step, avg["loss"], avg["text_loss"], avg["image_loss"], avg["lr"], avg["grad_norm"],
                 avg["tokens_per_s"], avg["text_tokens_per_s"], avg["image_tokens_per_s"], eff,
                 avg["peak_memory_gib"], 100 * avg["data_wait_share"],
                 (" | skipped " + ", ".join(f"{k}={v}" for k, v in skipped.items() if v)) if any(skipped.values())
                 else "",
                 f" | non-finite steps not applied {window.bad_steps} of {window.steps} ({self.bad_steps} in this "
                 f"process)" if window.bad_steps else "")

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

    # -- outputs (transfusion/training/outputs.py) --------------------------------------------------------------
    def sample_grid(self, state: dict[str, Tensor] | None = None) -> Path | None:
        """A grid of EMA samples at this step (collective)."""
        state = self.outputs.consolidated_state(self.model, self.ema) if state is None else state
        return self.outputs.sample_grid(state, self.step, self.writer)

    def close(self) -> None:
        """Finish an async save in flight and stop the data workers."""
        self.checkpoints.wait()
        self.data.close()
