"""Distributed checkpoints (torch.distributed.checkpoint) with a completion marker and keep-k pruning.

Layout, under the run's ``checkpoints/`` directory::

    checkpoints/
      step_00000200/
        .metadata  __0_0.distcp ...   DCP: model + optimizer (sharded as trained), scheduler, EMA, scalars
        rank_0.pt  rank_1.pt ...      per-rank picklable extras (RNG states, data-loader position)
        COMPLETE                      written last, by rank 0, after every rank finished; JSON {step, world_size,
                                      ...the caller's info (e.g. the data layout)}

A step directory without ``COMPLETE`` is an interrupted save and never counts as a checkpoint. With ``async_save`` the
state is staged to CPU memory and written by a background thread while training goes on; the marker follows when
the write is done (:class:`PendingSave`), so a kill at any moment still leaves the previous checkpoint in charge.
Every rank calls :func:`save_checkpoint` / :func:`load_checkpoint` (DCP is collective); rank 0 alone removes
directories. Without an initialised process group (single process) the same code runs with world size 1.

    state = {"app": ModelOptimizerState(model, optimizer), "scheduler": ObjectState(scheduler), "ema": ema}
    save_checkpoint(run / "checkpoints", step, state, {"rng": rng_state(), "data": loader.state_dict()}, keep=2)
    ...
    extras = load_checkpoint(resolve_checkpoint(run), state)   # in place; returns this rank's extras
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from transfusion.distributed.env import barrier, is_distributed

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _legacy_name(key: str) -> bool:
    """Whether a DCP key (model, optimizer or EMA entry) holds a parameter name from before the image-head module:
    ``mar_head``, or ``time_emb`` / ``image_out`` / ``mask_emb`` not under ``image_head`` (or its ``denoiser``)."""
    parts = key.split(".")
    return any(p == "mar_head" or (p in ("time_emb", "image_out", "mask_emb") and
                                   (i == 0 or parts[i - 1] not in ("image_head", "denoiser")))
               for i, p in enumerate(parts))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, is incomplete, or cannot be read. The message is one line."""


# ---------------------------------------------------------------------------------------------------------------
# Stateful wrappers


class ModelOptimizerState(Stateful):
    """Model (+ optimizer) through ``get_state_dict`` / ``set_state_dict``: plain tensors on one process, sharded
    DTensors under FSDP2, keys are clean FQNs. With ``optimizer=None`` only the model is saved / loaded (e.g. to
    read weights out of a training checkpoint for export)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state_dict["model"])
        else:
            set_state_dict(
                self.model, self.optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"]
            )


class ObjectState(Stateful):
    """Adapter for any object with ``state_dict()`` / ``load_state_dict()`` (LR scheduler, EMA, counters). Values
    that are not tensors are pickled by DCP and written once (they are identical on every rank)."""

    def __init__(self, obj: Any):
        self.obj = obj

    def state_dict(self) -> dict[str, Any]:
        return self.obj.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.obj.load_state_dict(state_dict)


# ---------------------------------------------------------------------------------------------------------------
# Discovery


def _rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every call without a process group; single-process use is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _one_line(e: BaseException) -> str:
    if isinstance(e, CheckpointException) and e.failures:  # per-rank failures with tracebacks: keep the first cause
        e = next(iter(e.failures.values()))[0]
    text = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {text[:300]}"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    """Step number of a ``step_<n>`` checkpoint directory."""
    m = _STEP_DIR.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path} is not a checkpoint directory (expected a name like step_00000200)")
    return int(m.group(1))


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def _ckpt_root(path: Path) -> Path:
    """Accept a run directory (holding ``checkpoints/``) or the checkpoints directory itself."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """Newest complete checkpoint under ``root`` (a run directory or its ``checkpoints/``), or None."""
    complete = [p for _, p in _step_dirs(_ckpt_root(root)) if is_complete(p)]
    return complete[-1] if complete else None


def _check_metadata(path: Path) -> None:
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {path} is corrupt: its DCP .metadata file is missing")
    try:
        meta = FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} has unreadable DCP metadata ({_one_line(e)})") from None
    old = [k for k in meta.state_dict_metadata if _legacy_name(k)]
    if old:
        raise CheckpointError(f"checkpoint {path} predates the image-head module (it holds {old[0]!r}): resume it "
                              f"with a commit before 5ad56bb, or start a new run from its export (exports written "
                              f"before the rename load under today's names)")


def resolve_checkpoint(path: str | Path) -> Path:
    """Map a run directory, a checkpoints directory or one ``step_<n>`` directory to a complete, readable checkpoint
    (a directory resolves to its newest complete step). Raises CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path does not exist: {path}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path is not a directory: {path}")
    if _STEP_DIR.match(path.name) or (path / ".metadata").exists() or (path / MARKER).exists():
        if not is_complete(path):
            raise CheckpointError(
                f"checkpoint {path} is incomplete (no {MARKER} marker): its save was interrupted; "
                f"pass the run directory to use the newest complete checkpoint"
            )
        ckpt = path
    else:
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            root = _ckpt_root(path)
            partial = [p.name for _, p in _step_dirs(root)]
            seen = f"; found only incomplete: {', '.join(partial[-3:])}" if partial else ""
            raise CheckpointError(f"no complete checkpoint under {path} (looked for {root}/step_*/{MARKER}{seen})")
    _check_metadata(ckpt)
    return ckpt


# ---------------------------------------------------------------------------------------------------------------
# Save / load


def _remove(path: Path) -> None:
    """Delete a step directory, marker first, so a half-deleted directory never looks complete."""
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints (``keep <= 0`` keeps all) and drop incomplete directories
    older than the newest complete one (interrupted saves). Newer incomplete ones may be saves in flight and stay.
    Returns the removed directories. Call on one rank only."""
    dirs = _step_dirs(Path(root))
    complete = [(s, p) for s, p in dirs if is_complete(p)]
    if not complete:
        return []
    newest = complete[-1][0]
    doomed = [p for s, p in dirs if not is_complete(p) and s < newest]
    if keep > 0:
        doomed += [p for _, p in complete[:-keep]]
    for p in doomed:
        _remove(p)
    return doomed


def fault_point(name: str, step: int) -> None:
    """Fault injection for the resume tests: ``TRANSFUSION_FAULT=<name>@<step>`` SIGKILLs this process here."""
    if os.environ.get("TRANSFUSION_FAULT") == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _write_marker(root: Path, path: Path, step: int, info: dict[str, Any], keep: int) -> None:
    """Rank 0, once every rank's files are written: the COMPLETE marker (atomically), then pruning."""
    fault_point("save_before_marker", step)
    tmp = path / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "world_size": _world_size(), **info}) + "\n")
    os.replace(tmp, path / MARKER)
    prune_checkpoints(root, keep)


class PendingSave:
    """An asynchronous save in flight: the state was staged to CPU memory and is written by a background thread.

    ``poll()`` (cheap, every step) finishes it on rank 0 once DCP reports the write done: DCP's coordinator (rank 0)
    completes only after every rank's files and the ``.metadata`` are written, and every rank wrote its extras before
    joining the save, so the marker can follow without a barrier. ``wait()`` (collective) blocks until it is done:
    before the next save, and before the process ends."""

    def __init__(self, future: Any, root: Path, path: Path, step: int, info: dict[str, Any], keep: int) -> None:
        self.future, self.root, self.path, self.step, self.info, self.keep = future, root, path, step, info, keep
        self.finished = False

    def _result(self) -> None:
        try:
            self.future.result()
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"failed to save checkpoint {self.path}: {_one_line(e)}") from None

    def poll(self) -> bool:
        """True once this save is complete (on rank 0: marker written). Raises CheckpointError if it failed."""
        if not self.finished and self.future.done():
            self._result()
            if _rank() == 0:
                _write_marker(self.root, self.path, self.step, self.info, self.keep)
            self.finished = True
        return self.finished

    def wait(self) -> Path:
        self._result()
        self.poll()
        barrier()
        return self.path


_ASYNC_GROUP: Any = None


def _async_group() -> Any:
    """A dedicated gloo group for background checkpoint collectives, so they never interleave with training's
    (NCCL or gloo) collectives on the default group. Created collectively on the first async save."""
    global _ASYNC_GROUP
    if _ASYNC_GROUP is None and is_distributed():
        _ASYNC_GROUP = dist.new_group(backend="gloo")
    return _ASYNC_GROUP


def save_checkpoint(root: Path, step: int, state: dict[str, Any], rank_extras: dict[str, Any], *, keep: int,
                    info: dict[str, Any] | None = None, async_save: bool = False) -> Path | PendingSave:
    """Write ``state`` (values may be Stateful) with DCP to ``root/step_<n:08d>`` plus this rank's ``rank_extras``,
    then the COMPLETE marker (JSON: step, world size and ``info``), then prune. Collective: every rank calls it. An
    existing directory for the same step (a stale interrupted save, or a complete one being rewritten) is removed
    first. Returns the step directory, or with ``async_save`` a :class:`PendingSave` once the state is staged (keep
    at most one in flight: ``wait()`` on it before the next save)."""
    root = Path(root)
    path = step_dir(root, step)
    rank = _rank()
    info = dict(info or {})
    if async_save and not is_distributed():  # the background thread warns after _single_process_quiet has exited
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
    if rank == 0:
        if path.exists():
            _remove(path)
        path.mkdir(parents=True)
    barrier()
    try:
        torch.save(rank_extras, path / f"rank_{rank}.pt")
        with _single_process_quiet():
            if async_save:
                future = dcp.async_save(state, checkpoint_id=str(path), process_group=_async_group(),
                                        no_dist=not is_distributed())
                future = getattr(future, "upload_completion", future)  # AsyncSaveResponse in newer torch
                return PendingSave(future, root, path, step, info, keep)
            dcp.save(state, checkpoint_id=str(path), no_dist=not is_distributed())
    except CheckpointException as e:  # a BaseException subclass: surface it as a normal error
        raise CheckpointError(f"failed to save checkpoint {path}: {_one_line(e)}") from None
    barrier()
    if rank == 0:
        _write_marker(root, path, step, info, keep)
    barrier()
    return path


def read_marker(path: Path) -> dict[str, Any]:
    """The COMPLETE marker of a checkpoint directory: ``{"step", "world_size", ...info}``."""
    try:
        return json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable {MARKER} marker ({_one_line(e)})") from None


def load_state(path: Path, state: dict[str, Any]) -> None:
    """DCP-load ``path`` (a complete step directory) into ``state`` in place, resharding tensors to the current
    layout (any world size). Collective under a process group."""
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path), no_dist=not is_distributed())
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"failed to load checkpoint {path}: {_one_line(e)}") from None


def load_rank_extras(path: Path, rank: int) -> dict[str, Any]:
    """The picklable extras saved by ``rank`` (any rank's file may be read, e.g. to take over its data position)."""
    extras_file = Path(path) / f"rank_{rank}.pt"
    if not extras_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {extras_file.name} (saved by {_saved_world_size(path)} "
                              f"rank(s)); per-rank state (RNG, data position) cannot be restored for rank {rank}")
    try:
        # Our own file; holds RNG states and data-loader positions (numpy arrays, tuples) -> full unpickling.
        return torch.load(extras_file, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {extras_file.name} ({_one_line(e)})") from None


def load_checkpoint(path: Path, state: dict[str, Any], rank: int | None = None) -> dict[str, Any]:
    """Load ``path`` (anything :func:`resolve_checkpoint` accepts) into ``state`` in place with DCP and return the
    extras saved by ``rank`` (default: this process's rank). Collective under a process group. DCP reshards
    tensors to the current layout; per-rank extras cannot be resharded, so a rank with no ``rank_<r>.pt`` (loading
    into a larger world) raises CheckpointError before anything is loaded and the caller decides what to do."""
    path = resolve_checkpoint(path)
    rank = _rank() if rank is None else rank
    if not (path / f"rank_{rank}.pt").is_file():
        load_rank_extras(path, rank)  # raises the one-line error
    load_state(path, state)
    return load_rank_extras(path, rank)


def _saved_world_size(path: Path) -> str:
    try:
        return str(json.loads((path / MARKER).read_text())["world_size"])
    except Exception:
        return "an unknown number of"
