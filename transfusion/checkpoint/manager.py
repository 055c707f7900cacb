"""The trainer's checkpoint policy in one place (torchtitan's CheckpointManager shape): find, check, restore, save,
poll, wait.

    ckpts = CheckpointManager(run_dir, cfg.checkpoint, env)
    found = ckpts.find(resume)                        # before anything heavy is built, identically on every rank
    marker, data_ok = ckpts.check(found, layout, reset_data)
    ...
    step, data = ckpts.restore(found, marker, data_ok, state, data, build_data, seed)
    ckpts.save(step, state, data, final=False)        # async with checkpoint.async_save; the final save blocks
    ckpts.poll(); ckpts.wait()

What a checkpoint restores: model, optimizer, LR schedule and EMA (DCP, resharded to any world size); the torch (and
CUDA) RNG of each rank when the world size is unchanged; and the data position of every data consumer, each read
from whichever rank owned it when the checkpoint was written (``distributed/data.owner_of``), or fresh data streams
under ``--reset-data`` when the consumer layout changed.

Failing storage (``checkpoint.on_save_error``). A save that raises (disk full, quota, EIO from a network filesystem)
never leaves a checkpoint that ``--resume`` would pick: its directory is removed or never marked complete, and
nothing older is pruned before a new marker exists (``dcp.save_checkpoint``). What the run does next:

- ``"stop"`` (the default): raise CheckpointSaveError, one line naming the step, the cause and the last complete
  checkpoint; the CLI prints it as ``error: ...`` and exits 2. Stopping is the safe default: a run that cannot
  write checkpoints loses all work since the last one at its next preemption or crash, and the storage that just
  failed (full, over quota) rarely heals by itself, so going on mostly burns accelerator hours that cannot be kept.
  The operator frees space and resumes; the resume is exact from the last complete checkpoint.
- ``"continue"``: log the same line as a warning and train on; the next interval's save tries again (into a fresh
  directory). For storage known to fail transiently (a flaky network filesystem) on long runs where a lost interval
  is cheaper than a stopped job. The final save (``final=True``: the end of the run, a preemption) is the run's last
  word and stops the run on failure under either policy, so a run never exits as if saved when it was not.

Under torchrun every rank reaches the same decision at the same point (the outcome is agreed collectively), so a
fault on one rank's disk neither hangs the others nor lets them train on alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from transfusion.checkpoint.dcp import (
    CheckpointError,
    CheckpointSaveError,
    PendingSave,
    latest_checkpoint,
    load_rank_extras,
    load_state,
    read_marker,
    resolve_checkpoint,
    save_checkpoint,
)
from transfusion.config import CheckpointConfig
from transfusion.distributed.data import DataLayoutError, StepData, check_layout, owner_of
from transfusion.distributed.env import DistEnv
from transfusion.distributed.init import mix_seed

log = logging.getLogger("transfusion")


class CheckpointManager:
    def __init__(self, run_dir: Path, cfg: CheckpointConfig, env: DistEnv) -> None:
        self.dir, self.cfg, self.env = Path(run_dir) / "checkpoints", cfg, env
        self.pending: PendingSave | None = None
        self._told: str | None = None  # the pending save's outcome as this rank's poll logged it: "saved" / "failed"

    # -- resume ----------------------------------------------------------------------------------------------
    def find(self, resume: str | bool | None) -> Path | None:
        """``True``: this run's latest complete checkpoint (None when there is none yet); a path: that run or step
        directory, which must hold a complete checkpoint."""
        if not resume:
            return None
        if resume is True:
            found = latest_checkpoint(self.dir)
            if found is None:
                log.info("no complete checkpoint under %s: starting from scratch", self.dir)
            return found
        return resolve_checkpoint(resume)

    def check(self, ckpt: Path, layout: dict, reset_data: bool) -> tuple[dict, bool]:
        """(marker, whether the data position can be restored). Weights and optimizer load into any world size
        (DCP reshards); the data position only into the same number of data consumers and workers (``layout``).
        Otherwise this raises one line, or with ``reset_data`` warns that the data streams start afresh."""
        marker = read_marker(ckpt)
        try:
            check_layout(marker.get("data"), layout)
        except DataLayoutError as e:
            if not reset_data:
                raise CheckpointError(f"cannot resume the data position of {ckpt}: {e}; or pass --reset-data to "
                                      f"load weights and optimizer and start fresh data streams") from None
            log.warning("--reset-data: %s; the data streams start afresh (samples may repeat within this epoch)", e)
            return marker, False
        return marker, True

    def restore(self, ckpt: Path, marker: dict, data_ok: bool, state: dict, data: StepData,
                build_data: Callable[[int], StepData], seed: int) -> tuple[int, StepData]:
        """Load ``state`` (Stateful objects) in place; set this rank's RNG; return (step, the data streams at the
        checkpoint's position). ``build_data(seed)`` makes streams when the checkpoint's data seed differs or the data
        starts afresh."""
        load_state(ckpt, state)
        step = int(marker["step"])
        extras: dict[int, dict] = {}  # rank -> its extras file, each read at most once

        def rank_extras(rank: int) -> dict:
            if rank not in extras:
                extras[rank] = load_rank_extras(ckpt, rank)
            return extras[rank]

        if int(marker.get("world_size", -1)) == self.env.world_size:  # RNG states are per rank: same ranks only
            mine = rank_extras(self.env.rank)
            torch.set_rng_state(mine["torch_rng"])
            if "cuda_rng" in mine and self.env.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda_rng"], self.env.device)
        layout = marker.get("data")
        if data_ok:
            if layout["seed"] != data.seed:
                data.close()
                data = build_data(layout["seed"])
            data.load_state_dict({v: rank_extras(owner_of(v, layout["grad_accum"]))["data"][v]
                                  for v in data.consumers})  # each consumer's position, from its owner then
        else:
            data.close()
            data = build_data(mix_seed(seed, 0xDA7A, step))
        log.info("resumed from %s at step %d%s", ckpt, step, "" if data_ok else " (fresh data streams)")
        return step, data

    # -- save ------------------------------------------------------------------------------------------------
    def save(self, step: int, state: dict, data: StepData, *, final: bool = False) -> None:
        """Checkpoint at ``step`` (collective): ``state`` through DCP, this rank's RNG and data position beside it.
        With ``checkpoint.async_save`` the write goes on in the background after the state is staged; the final save
        always blocks. A save that fails is handled by ``checkpoint.on_save_error`` (class docstring)."""
        self.wait()
        extras = {"step": step, "torch_rng": torch.get_rng_state(), "data": data.state_dict()}
        if self.env.device.type == "cuda":
            extras["cuda_rng"] = torch.cuda.get_rng_state(self.env.device)
        info = {"data": data.layout(), "mesh": [self.env.dp_replicate, self.env.dp_shard]}
        try:
            out = save_checkpoint(self.dir, step, state, extras, keep=self.cfg.keep, info=info,
                                  async_save=self.cfg.async_save and not final)
        except CheckpointSaveError as e:
            self._failed(e, final=final)
            return
        if isinstance(out, PendingSave):
            self.pending, self._told = out, None
            log.info("staged checkpoint %s (writing in the background)", out.path)
        else:
            log.info("saved checkpoint %s", out)

    def _failed(self, e: CheckpointSaveError, *, final: bool = False) -> None:
        """Stop (raise the one line) or, under ``on_save_error = "continue"``, warn and go on."""
        if final or self.cfg.on_save_error == "stop":
            raise e
        log.warning("%s; training goes on (checkpoint.on_save_error = \"continue\") and the next save tries again", e)

    def poll(self) -> None:
        """Report an async save that has finished (cheap; call every step). Local to this rank: the save stays
        pending until ``wait()``, the collective point where every rank learns its outcome."""
        if self.pending is None or self._told:
            return
        try:
            done = self.pending.poll()
        except CheckpointSaveError as e:
            self._told = "failed"
            self._failed(e)
            return
        if done:
            self._told = "saved"
            log.info("saved checkpoint %s", self.pending.path)

    def wait(self) -> None:
        """Block until an async save in flight is written (collective while one is pending: every rank has the same
        one, since saves are collective)."""
        if self.pending is None:
            return
        pending, told = self.pending, self._told
        self.pending = None
        try:
            path = pending.wait()
        except CheckpointSaveError as e:
            if not (told == "failed" and self.cfg.on_save_error == "continue"):  # else warned at poll already
                self._failed(e)
            return
        if not told:
            log.info("saved checkpoint %s", path)

    def due(self, step: int, last_step: int) -> bool:
        """Whether the loop checkpoints after ``step`` (every ``checkpoint.interval``; the last step saves anyway)."""
        return bool(self.cfg.interval) and step % self.cfg.interval == 0 and step < last_step
