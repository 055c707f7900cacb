"""Failing storage: a checkpoint write that raises (disk full, EIO) mid-save leaves the previous complete checkpoint in
charge and resumable, never a half checkpoint that ``--resume`` picks; the error is one line (docs/reliability.md)."""

from __future__ import annotations

import builtins
import contextlib
import errno
import logging
import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from helpers import free_port, join_gloo_group, make_shards, png_bytes, run_ranks
from torch.distributed.checkpoint.filesystem import FileSystem

from transfusion.checkpoint import CheckpointError, ModelOptimizerState, latest_checkpoint, load_checkpoint
from transfusion.checkpoint.dcp import MARKER, PendingSave, save_checkpoint
from transfusion.checkpoint.manager import CheckpointManager
from transfusion.config import CheckpointConfig
from transfusion.distributed.env import DistEnv

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# a disk that fills up: writes to a chosen file fail part-way with ENOSPC (or EIO)


class _FailingFile:
    """A file opened for writing that accepts ``budget`` bytes, then raises like a full disk (the bytes that fit
    are written, as a real short write would leave them)."""

    def __init__(self, f, fault: "Fault") -> None:
        self._f, self._fault = f, fault

    def write(self, data) -> int:
        data = bytes(data)
        room = self._fault.budget
        if len(data) > room:
            self._f.write(data[:room])
            self._fault.budget = 0
            self._fault.fired += 1
            raise OSError(self._fault.errno, os.strerror(self._fault.errno), self._f.name)
        self._fault.budget -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class Fault:
    """Makes the ``nth`` file (1-based) whose name ends with ``suffix`` fail after ``budget`` bytes, whether it is
    written through ``open`` (per-rank extras, the marker) or through DCP's FileSystem (data, .metadata)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, suffix: str, *, nth: int = 1, budget: int = 100,
                 err: int = errno.ENOSPC) -> None:
        self.suffix, self.nth, self.budget, self.errno = suffix, nth, budget, err
        self.seen = self.fired = 0
        real_open, real_stream = builtins.open, FileSystem.create_stream
        fault = self

        def armed(path, mode) -> bool:
            if "w" not in str(mode) or not str(path).endswith(fault.suffix):
                return False
            fault.seen += 1
            return fault.seen == fault.nth

        def fake_open(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            return _FailingFile(f, fault) if armed(path, mode) else f

        @contextlib.contextmanager
        def fake_stream(self_fs, path, mode):
            with real_stream(self_fs, path, mode) as stream:
                yield _FailingFile(stream, fault) if armed(path, mode) else stream

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(FileSystem, "create_stream", fake_stream)


# ---------------------------------------------------------------------------------------------------------------
# a small model and its checkpoint state


def make(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(4, 16)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def state(model, opt) -> dict:
    return {"app": ModelOptimizerState(model, opt)}


def loaded(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    model, opt = make(99)
    extras = load_checkpoint(path, state(model, opt))
    return params(model), extras


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------------------
# synchronous saves


@pytest.mark.parametrize("suffix,err", [
    ("rank_0.pt", errno.ENOSPC),  # this rank's extras (RNG, data position)
    ("__0_0.distcp", errno.ENOSPC),  # DCP's tensor data, part-way through
    (".metadata.tmp", errno.EIO),  # DCP's .metadata, after all the data
    (f".{MARKER}.tmp", errno.ENOSPC),  # the completion marker itself (its first 10 bytes fit)
])
def test_failed_save_leaves_the_previous_checkpoint_in_charge(tmp_path, monkeypatch, suffix, err):
    root = tmp_path / "checkpoints"
    model, opt = make(0)
    step(model, opt)
    save_checkpoint(root, 2, state(model, opt), {"data": "at 2"}, keep=1)
    at_2 = params(model)
    step(model, opt)
    fault = Fault(monkeypatch, suffix, err=err, budget=10)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(root, 4, state(model, opt), {"data": "at 4"}, keep=1)  # keep=1: nothing pruned before done
    monkeypatch.undo()
    assert fault.fired == 1
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("checkpoint save at step 4 failed: ") and os.strerror(err) in msg
    assert msg.endswith("; the last complete checkpoint is step 2")
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]  # the torn save is gone
    assert latest_checkpoint(tmp_path) == root / "step_00000002"
    got, extras = loaded(tmp_path)  # what --resume picks, and it loads
    assert_same(got, at_2) and extras["data"] == "at 2"
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    assert CheckpointManager(tmp_path, CheckpointConfig(), env).find(True) == root / "step_00000002"


def test_failed_first_save_says_there_is_no_checkpoint_yet(tmp_path, monkeypatch):
    model, opt = make(0)
    Fault(monkeypatch, "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"^checkpoint save at step 3 failed: .*No space left on device.*; "
                                              r"there is no complete checkpoint yet$"):
        save_checkpoint(tmp_path, 3, state(model, opt), {}, keep=2)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) is None and list(tmp_path.iterdir()) == []


def test_failed_rewrite_of_a_complete_step_keeps_it(tmp_path, monkeypatch):
    """Saving a step that already has a complete checkpoint (a preemption save right after the interval save, a
    rerun in the same directory) writes beside it and swaps only once the new one is complete."""
    model, opt = make(0)
    step(model, opt)
    save_checkpoint(tmp_path, 2, state(model, opt), {"v": 1}, keep=1)
    old = params(model)
    step(model, opt)
    Fault(monkeypatch, "__0_0.distcp", budget=1000)
    with pytest.raises(CheckpointError, match=r"step 2 failed: .*; the last complete checkpoint is step 2$"):
        save_checkpoint(tmp_path, 2, state(model, opt), {"v": 2}, keep=1)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002"]
    got, extras = loaded(tmp_path)
    assert_same(got, old) and extras["v"] == 1
    # without a fault the rewrite replaces it, and leaves nothing beside it
    save_checkpoint(tmp_path, 2, state(model, opt), {"v": 2}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002"]
    got, extras = loaded(tmp_path)
    assert_same(got, params(model)) and extras["v"] == 2


def test_a_rewrite_interrupted_inside_its_swap_is_still_found(tmp_path):
    """A kill between removing the old step directory and renaming the complete rewrite into its place leaves the
    rewrite as the step's checkpoint; the next save tidies it up."""
    model, opt = make(0)
    save_checkpoint(tmp_path, 2, state(model, opt), {"v": 1}, keep=2)
    (tmp_path / "step_00000002").rename(tmp_path / "step_00000002.rewrite")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000002.rewrite"
    assert loaded(tmp_path)[1]["v"] == 1
    (tmp_path / "step_00000003.rewrite").mkdir()  # an incomplete rewrite: never a checkpoint
    save_checkpoint(tmp_path, 4, state(model, opt), {"v": 4}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000004"]
    assert loaded(tmp_path / "step_00000002")[1]["v"] == 1


# ---------------------------------------------------------------------------------------------------------------
# asynchronous saves


def _finish(pending: PendingSave) -> None:
    deadline = time.monotonic() + 120
    while not pending.poll():
        assert time.monotonic() < deadline, "async save never finished"
        time.sleep(0.01)


def test_failed_async_save_surfaces_at_poll_and_is_removed(tmp_path, monkeypatch):
    model, opt = make(0)
    step(model, opt)
    _finish(save_checkpoint(tmp_path, 2, state(model, opt), {"v": 2}, keep=1, async_save=True))
    at_2 = params(model)
    step(model, opt)
    Fault(monkeypatch, "__0_0.distcp", budget=500)
    pending = save_checkpoint(tmp_path, 4, state(model, opt), {"v": 4}, keep=1, async_save=True)
    assert isinstance(pending, PendingSave)
    with pytest.raises(CheckpointError, match=r"^checkpoint save at step 4 failed: .*No space left on device.*; "
                                              r"the last complete checkpoint is step 2$"):
        _finish(pending)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002"]
    got, extras = loaded(tmp_path)
    assert_same(got, at_2) and extras["v"] == 2


# ---------------------------------------------------------------------------------------------------------------
# the manager's policy: checkpoint.on_save_error


class _Data:
    def state_dict(self) -> dict:
        return {0: {"pos": 1}}

    def layout(self) -> dict:
        return {"consumers": 1, "num_workers": 0, "grad_accum": 1, "seed": 0}


def _manager(tmp_path: Path, **cfg) -> CheckpointManager:
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    return CheckpointManager(tmp_path, CheckpointConfig(keep=1, **cfg), env)


@pytest.mark.parametrize("async_save", [False, True])
def test_on_save_error_stop_raises_one_line(tmp_path, monkeypatch, async_save):
    model, opt = make(0)
    ckpts = _manager(tmp_path, async_save=async_save)
    assert ckpts.cfg.on_save_error == "stop"  # the default
    ckpts.save(2, state(model, opt), _Data())
    ckpts.wait()
    Fault(monkeypatch, "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"^checkpoint save at step 4 failed: .*; the last complete "
                                              r"checkpoint is step 2$"):
        ckpts.save(4, state(model, opt), _Data())
        ckpts.wait()
    assert ckpts.find(True) == tmp_path / "checkpoints/step_00000002"


@pytest.mark.parametrize("async_save", [False, True])
def test_on_save_error_continue_warns_and_the_next_save_succeeds(tmp_path, monkeypatch, caplog, async_save):
    model, opt = make(0)
    ckpts = _manager(tmp_path, async_save=async_save, on_save_error="continue")
    ckpts.save(2, state(model, opt), _Data())
    ckpts.wait()
    fault = Fault(monkeypatch, "__0_0.distcp")  # the save at step 4 fails, the one at 6 does not
    with caplog.at_level(logging.WARNING, logger="transfusion"):
        ckpts.save(4, state(model, opt), _Data())
        ckpts.save(6, state(model, opt), _Data())  # waits for (and reports) the failed async save at 4 first
        ckpts.wait()
    assert fault.fired == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("checkpoint save at step 4 failed: ")
    assert "training goes on" in warned[0]
    assert ckpts.find(True) == tmp_path / "checkpoints/step_00000006"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000006"]
    # the final save is the run's last word: its failure stops the run even under "continue"
    Fault(monkeypatch, "__0_0.distcp")
    with pytest.raises(CheckpointError, match="step 8 failed"):
        ckpts.save(8, state(model, opt), _Data(), final=True)
    assert ckpts.find(True) == tmp_path / "checkpoints/step_00000006"


# ---------------------------------------------------------------------------------------------------------------
# two ranks: a fault on one rank fails the save on both, with the same line, and nothing hangs


def _two_rank_worker(rank: int, port: int, root: str, suffix: str, faulty_rank: int, out: str) -> None:
    import torch.distributed as dist

    join_gloo_group(rank, port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model, opt = make(0)
    save_checkpoint(Path(root), 2, state(model, opt), {"rank": rank}, keep=1)
    if rank == faulty_rank:
        Fault(pytest.MonkeyPatch(), suffix, budget=10)
    try:
        save_checkpoint(Path(root), 4, state(model, opt), {"rank": rank}, keep=1)
        result = "saved"
    except CheckpointError as e:
        result = str(e)
    Path(out, f"rank_{rank}.txt").write_text(result)
    dist.barrier()
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("suffix,faulty_rank", [("rank_1.pt", 1), (f".{MARKER}.tmp", 0)])
def test_a_fault_on_one_rank_fails_the_save_on_every_rank(tmp_path, suffix, faulty_rank):
    port, root = free_port(), tmp_path / "checkpoints"
    procs, hung = run_ranks(_two_rank_worker, lambda r: (r, port, str(root), suffix, faulty_rank, str(tmp_path)))
    assert not hung, "a rank hung after another rank's write failed"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    lines = [(tmp_path / f"rank_{r}.txt").read_text() for r in range(2)]
    assert lines[0] == lines[1], lines
    assert lines[0].startswith(f"checkpoint save at step 4 failed: rank {faulty_rank}: ")
    assert lines[0].endswith("; the last complete checkpoint is step 2")
    assert latest_checkpoint(root) == root / "step_00000002" and not (root / "step_00000004").exists()


# ---------------------------------------------------------------------------------------------------------------
# end to end: the training CLI stops with one line; --resume continues from the last complete checkpoint


def _colour_sample(k: int) -> dict:
    return {"__key__": f"k{k:04d}", "png": png_bytes((k * 5 % 256, 255 - k * 3 % 256, k * 11 % 256), (16, 16)),
            "txt": f"colour {k}"}


@pytest.mark.slow
def test_training_stops_with_one_line_and_resumes_from_the_last_complete_checkpoint(tmp_path, monkeypatch, capsys):
    from transfusion.train import main

    run, shards = tmp_path / "run", make_shards(tmp_path / "shards", 2, 20, sample=_colour_sample)
    args = ["recipes/shapes_tiny.toml", f"--run.dir={run}", "--run.device=cpu", f"--data.shards={shards}",
            "--data.image_size=16", "--data.seq_len=64", "--data.batch_rows=2", "--data.num_workers=0",
            "--data.shuffle_buffer=8", "--model.dim=32", "--model.n_layers=1", "--model.n_heads=2",
            "--train.steps=6", "--train.warmup_steps=2", "--train.log_interval=2", "--train.autocast=fp32",
            "--checkpoint.interval=2", "--checkpoint.keep=2", "--sample.steps=2", "--sample.prompts=['colour 3']",
            "--no-progress"]
    monkeypatch.chdir(REPO)
    Fault(monkeypatch, "__0_0.distcp", nth=2)  # the save at step 2 succeeds, the one at step 4 finds the disk full
    assert main(args) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: checkpoint save at step 4 failed: ")
    assert "No space left on device" in lines[-1]
    assert lines[-1].endswith("; the last complete checkpoint is step 2")
    assert not any("Traceback" in ln for ln in lines)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002"]
    monkeypatch.undo()
    monkeypatch.chdir(REPO)
    assert main([*args, "--resume"]) == 0
    assert "resumed from" in (run / "train.log").read_text()
    assert latest_checkpoint(run) == ckpts / "step_00000006"
