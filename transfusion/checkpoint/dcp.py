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
import io
import json
import logging
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

from transfusion.distributed.env import is_distributed

log = logging.getLogger("transfusion")

MARKER = "COMPLETE"
REWRITE = ".rewrite"  # suffix of a save of a step that already has a complete checkpoint, until it is swapped in
_STEP_DIR = re.compile(r"^step_(\d+)(?:\.rewrite)?$")


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
    if isinstance(e, CheckpointException) and e.failures:  # per-rank failures with tracebacks: the lowest rank's
        e = e.failures[min(e.failures)][0]
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


def _all_step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) for each step under ``root``, by step: ``step_<n>``, or ``step_<n>.rewrite`` when that
    one is complete and ``step_<n>`` is missing or incomplete (a rewrite interrupted inside its swap). Any other
    ``.rewrite`` (a save of an already complete step, in flight or failed) is not listed."""
    plain: dict[int, Path] = {}
    rewrites: dict[int, Path] = {}
    for s, p in _all_step_dirs(root):
        (rewrites if p.name.endswith(REWRITE) else plain)[s] = p
    for s, p in rewrites.items():
        if is_complete(p) and not (s in plain and is_complete(plain[s])):
            plain[s] = p
    return sorted(plain.items())


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


class CheckpointSaveError(CheckpointError):
    """A save that failed (disk full, quota, EIO, ...): its directory was removed or never marked complete, so the
    previous complete checkpoint is still the one ``--resume`` picks. One line: ``checkpoint save at step N failed:
    <cause>; the last complete checkpoint is step M``, the same on every rank."""


def _remove(path: Path) -> None:
    """Delete a step directory, marker first, so a half-deleted directory never looks complete."""
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def _discard(path: Path) -> None:
    """Rank 0, after a failed save: remove its directory as far as the storage lets us. What cannot be removed has
    no marker, so it is never picked; the next successful save prunes it."""
    try:
        _remove(path)
    except OSError as e:
        log.warning("could not remove the failed checkpoint directory %s (%s); it has no %s marker and is never "
                    "resumed from", path, _one_line(e), MARKER)


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints (``keep <= 0`` keeps all) and drop incomplete directories
    older than the newest complete one (interrupted or failed saves), and leftovers of rewrites (a ``.rewrite``
    directory that is not its step's checkpoint). Newer incomplete ones may be saves in flight and stay. A complete
    ``.rewrite`` that stands in for its step (a rewrite interrupted inside its swap) is renamed into place. Returns
    the removed directories. Call on one rank only, after a marker was written (never before: the previous
    complete checkpoint stays until the new one is complete)."""
    root = Path(root)
    dirs = _step_dirs(root)
    complete = [(s, p) for s, p in dirs if is_complete(p)]
    if not complete:
        return []
    newest = complete[-1][0]
    doomed = [p for s, p in dirs if not is_complete(p) and s < newest]
    if keep > 0:
        doomed += [p for _, p in complete[:-keep]]
    listed = {p for _, p in dirs}
    doomed += [p for s, p in _all_step_dirs(root) if p not in listed and s <= newest]  # shadowed by another
    for p in doomed:
        _remove(p)
    for s, p in dirs:  # a complete rewrite standing in for its step: move it to the step's own name
        if p.name.endswith(REWRITE) and p not in doomed and not step_dir(root, s).exists():
            os.rename(p, step_dir(root, s))
    return doomed


def fault_point(name: str, step: int) -> None:
    """Fault injection for the resume tests: ``TRANSFUSION_FAULT=<name>@<step>`` SIGKILLs this process here."""
    if os.environ.get("TRANSFUSION_FAULT") == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _write_bytes(path: Path, data: bytes) -> None:
    """Write and fsync a small file (per-rank extras, the marker): an error (ENOSPC, EIO) surfaces here, not later."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_dir(final: Path) -> Path:
    """Where a save of step directory ``final`` writes: ``final`` itself, or ``step_<n>.rewrite`` beside it when
    ``final`` holds a complete checkpoint, which stays in charge until the new one is complete (:func:`_finish`
    swaps them)."""
    return final.with_name(final.name + REWRITE) if is_complete(final) else final


def _make_empty(path: Path) -> None:
    """Rank 0: create the save's directory, removing a stale incomplete one of the same name first."""
    if path.exists():
        _remove(path)
    path.mkdir(parents=True)


def _finish(root: Path, path: Path, final: Path, step: int, info: dict[str, Any], keep: int) -> Path:
    """Rank 0, once every rank's files are written: the COMPLETE marker (written, fsynced, renamed into place), the
    swap of a rewrite into the step's name, then pruning. A failure to write the new marker (or to remove the old
    one a rewrite replaces) fails the save; the rest of the swap and pruning run on a complete checkpoint and merely
    warn. Returns the checkpoint's directory."""
    fault_point("save_before_marker", step)
    tmp = path / f".{MARKER}.tmp"
    _write_bytes(tmp, (json.dumps({"step": step, "world_size": _world_size(), **info}) + "\n").encode())
    os.replace(tmp, path / MARKER)
    if path != final:
        # The old marker goes first: from then on the complete rewrite stands in for the step (_step_dirs). If it
        # cannot be removed, the save fails and the rewrite is discarded: the old checkpoint stays in charge.
        (final / MARKER).unlink(missing_ok=True)
        try:
            shutil.rmtree(final, ignore_errors=True)
            os.rename(path, final)
            path = final
        except OSError as e:
            log.warning("checkpoint %s is complete but could not take the place of %s (%s); it stands in for "
                        "step %d", path, final, _one_line(e), step)
    try:
        prune_checkpoints(root, keep)
    except OSError as e:
        log.warning("pruning old checkpoints under %s failed (%s); they stay until the next save", root,
                    _one_line(e))
    return path


def _cause(e: BaseException | None) -> str | None:
    """One line naming what failed; under a process group, on which rank."""
    if e is None:
        return None
    rank = _rank()
    if isinstance(e, CheckpointException) and e.failures:
        rank = min(e.failures)
    return f"rank {rank}: {_one_line(e)}" if is_distributed() else _one_line(e)


def _save_error(root: Path, step: int, cause: str) -> CheckpointSaveError:
    last = latest_checkpoint(root)
    where = (f"the last complete checkpoint is step {checkpoint_step(last)}" if last is not None
             else "there is no complete checkpoint yet")
    return CheckpointSaveError(f"checkpoint save at step {step} failed: {cause}; {where}")


_AGREE_GROUP: Any = None


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (small, picklable), in rank order; ``[obj]`` without a process group. Collective, on a
    gloo group of its own, so ranks agree on a save's outcome whatever failed where (created on the first save)."""
    global _AGREE_GROUP
    if not is_distributed():
        return [obj]
    if _AGREE_GROUP is None:
        _AGREE_GROUP = dist.new_group(backend="gloo")
    out: list[Any] = [None] * _world_size()
    dist.all_gather_object(out, obj, group=_AGREE_GROUP)
    return out


def _agree(root: Path, step: int, path: Path, error: BaseException | str | None, value: Any = None) -> Any:
    """Collective: raise the same CheckpointSaveError on every rank when ``error`` is set on any (rank 0 first
    removes the save's directory ``path``); else return rank 0's ``value``."""
    mine = error if isinstance(error, str) or error is None else _cause(error)
    replies = _gather((mine, value))
    failed = next((cause for cause, _ in replies if cause is not None), None)
    if failed is not None:
        if _rank() == 0:
            _discard(path)
        raise _save_error(root, step, failed)
    return replies[0][1]


class PendingSave:
    """An asynchronous save in flight: the state was staged to CPU memory and is written by a background thread.

    ``poll()`` (cheap, every step, on each rank by itself) settles it once DCP reports the write done: on rank 0 the
    marker follows (DCP's coordinator completes only after every rank's files and the ``.metadata`` are written, and
    every rank wrote its extras before joining the save, so no barrier is needed); a failure raises
    CheckpointSaveError once, and rank 0 removes the directory. ``wait()`` (collective) blocks until it is settled
    everywhere and raises the same error on every rank if it failed on any: before the next save, and before the
    process ends."""

    def __init__(self, future: Any, root: Path, write_dir: Path, final: Path, step: int, info: dict[str, Any],
                 keep: int) -> None:
        self.future, self.root, self.write_dir = future, root, write_dir
        self.step, self.info, self.keep = step, info, keep
        self.path = self._final = final
        self._settled, self._raised = False, False
        self._cause: str | None = None

    def _settle(self) -> str | None:
        """This rank's outcome, once (None: written, and on rank 0 marked complete)."""
        if not self._settled:
            self._settled = True
            try:
                self.future.result()
            except (Exception, CheckpointException) as e:
                self._cause = _cause(e)
            if self._cause is None and _rank() == 0:
                try:
                    self.path = _finish(self.root, self.write_dir, self._final, self.step, self.info, self.keep)
                except Exception as e:  # noqa: BLE001 - the marker could not be written: the save failed
                    self._cause = _cause(e)
            if self._cause is not None and _rank() == 0:
                _discard(self.write_dir)
        return self._cause

    def poll(self) -> bool:
        """True once this save is settled on this rank. Raises CheckpointSaveError (once) if it failed here."""
        if not self._settled and not self.future.done():
            return False
        cause = self._settle()
        if cause is not None and not self._raised:
            self._raised = True
            raise _save_error(self.root, self.step, cause)
        return True

    def wait(self) -> Path:
        try:
            self.future.result()  # block; its error is taken up by _settle
        except (Exception, CheckpointException):
            pass
        return Path(_agree(self.root, self.step, self.write_dir, self._settle(), str(self.path)))


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
    then the COMPLETE marker (JSON: step, world size and ``info``), then prune. Collective: every rank calls it.
    Returns the step directory, or with ``async_save`` a :class:`PendingSave` once the state is staged (keep at
    most one in flight: ``wait()`` on it before the next save).

    An existing incomplete directory for the same step (a stale interrupted or failed save) is removed first; an
    existing complete one (a preemption save right after the interval save, a rerun in the same run directory) is
    not: the new save is written to ``step_<n>.rewrite`` and swapped in once complete.

    Failing storage: any write that raises (ENOSPC, EIO, quota, a flaky network filesystem; on any rank, at any
    point: directory, extras, DCP data or metadata, marker) raises :class:`CheckpointSaveError` on every rank at the
    same point, after rank 0 removed the save's directory. Nothing is pruned before the new marker exists, so the
    previous complete checkpoint stays valid and is what ``--resume`` picks. Whether the run then stops is the
    caller's policy (``checkpoint.on_save_error``, see ``manager.py``)."""
    root = Path(root)
    final = step_dir(root, step)
    rank = _rank()
    info = dict(info or {})
    if async_save and not is_distributed():  # the background thread warns after _single_process_quiet has exited
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
    error: BaseException | None = None
    path = _write_dir(final) if rank == 0 else final
    if rank == 0:
        try:
            _make_empty(path)
        except Exception as e:  # noqa: BLE001
            error = e
    path = Path(_agree(root, step, path, error, str(path)))  # every rank writes where rank 0 made room
    error = None
    try:
        buf = io.BytesIO()
        torch.save(rank_extras, buf)
        _write_bytes(path / f"rank_{rank}.pt", buf.getvalue())
    except Exception as e:  # noqa: BLE001
        error = e
    _agree(root, step, path, error)
    future = None
    try:
        with _single_process_quiet():
            if async_save:
                future = dcp.async_save(state, checkpoint_id=str(path), process_group=_async_group(),
                                        no_dist=not is_distributed())
                future = getattr(future, "upload_completion", future)  # AsyncSaveResponse in newer torch
            else:
                dcp.save(state, checkpoint_id=str(path), no_dist=not is_distributed())
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException: a save error here
        error = e
    _agree(root, step, path, error)
    if future is not None:
        return PendingSave(future, root, path, final, step, info, keep)
    done = path
    if rank == 0:
        try:
            done = _finish(root, path, final, step, info, keep)
        except Exception as e:  # noqa: BLE001
            error = e
    return Path(_agree(root, step, path, error, str(done)))


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
