"""Preemption: a signal stops every rank after the same step with one checkpoint and exit code 75; --resume then ends
bitwise where an uninterrupted run ends. A second signal while stopping is ignored.

The torchrun test signals one rank (the ranks must agree), then the torchrun parent (which forwards the signal to
every worker's process group, data-loader workers included), each at a seeded random step, and resumes to the end.
The single-process test sends SIGUSR1 in the middle of a step and SIGTERM in the middle of the checkpoint save.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import torchrun_cmd, train_env
from test_distributed_torchrun import STEPS, all_keys, ok, overrides, shards, torchrun, trace_keys  # noqa: F401
from test_train_integration import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
PREEMPTED = 75  # transfusion.training.guards.PREEMPTED_EXIT_CODE, spelled out: the documented contract


def checkpoint_tensors(step_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint (model, optimizer state, EMA, LR schedule), by flattened key."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{step_dir.parent.parent.name}_{step_dir.name}.pt"
    dcp_to_torch_save(str(step_dir), str(out))
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, (int, float)):
            flat[prefix] = torch.tensor(value)

    walk("", torch.load(out, weights_only=False))
    return flat


def export_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export/model.safetensors"))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*/COMPLETE"))


# -- torchrun, 2 CPU processes ----------------------------------------------------------------------------------


def worker_pids(torchrun_pid: int) -> dict[int, int]:
    """rank -> pid of the torchrun agent's worker processes (its direct children)."""
    children = []
    for task in Path(f"/proc/{torchrun_pid}/task").iterdir():
        children += (task / "children").read_text().split()
    out = {}
    for pid in map(int, children):
        env = dict(kv.split("=", 1) for kv in (Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
                                              .split("\0")) if "=" in kv)
        if "RANK" in env:
            out[int(env["RANK"])] = pid
    return out


def preempt_torchrun(args: list[str], step: int, target: str, log_dir: Path) -> subprocess.CompletedProcess:
    """Start 2 ranks that wait before ``step`` (fault hook ``await_signal``) and SIGTERM ``target`` ("rank1" or
    "torchrun") there; return the finished torchrun."""
    cmd = torchrun_cmd(2, args, log_dir)
    proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(f"await_signal@{step}"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run_log = Path(next(a.split("=", 1)[1] for a in args if a.startswith("--run.dir="))) / "train.log"
    waiting = f"fault injection: waiting before step {step} for a preemption signal"
    deadline = time.monotonic() + 240
    while not (run_log.is_file() and waiting in run_log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    os.kill(worker_pids(proc.pid)[1] if target == "rank1" else proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def rank_exit_codes(proc: subprocess.CompletedProcess) -> list[int]:
    """The workers' exit codes torchrun reports when a worker ended non-zero."""
    return [int(line.split(":", 1)[1].split()[0]) for line in proc.stderr.splitlines()
            if line.strip().startswith("exitcode")]


def test_sigterm_under_torchrun_stops_every_rank_with_a_checkpoint_and_resumes_bitwise(shards, tmp_path):
    rng = random.Random(20240611)
    first = rng.randint(1, STEPS - 2)
    second = rng.randint(first + 1, STEPS - 1)
    extra = ["--data.num_workers=1"]  # a data worker per rank: it is in the rank's process group torchrun signals
    reference = tmp_path / "reference"
    ok(torchrun(2, overrides(shards, reference, *extra)))
    run = tmp_path / "preempted"
    args = overrides(shards, run, *extra)

    # 1) SIGTERM to rank 1 only, before step `first`: both ranks finish that step, save it and exit 75
    stopped = preempt_torchrun(args, first, "rank1", tmp_path / "logs1")
    assert stopped.returncode != 0  # torchrun reports the workers' non-zero exit
    assert rank_exit_codes(stopped) and set(rank_exit_codes(stopped)) == {PREEMPTED}, stopped.stderr[-3000:]
    assert complete_steps(run)[-1] == first
    text = (run / "train.log").read_text()
    assert f"checkpoint of step {first} saved; exiting with code {PREEMPTED}" in text
    rank1 = next((tmp_path / "logs1").rglob("1/stderr.log")).read_text()
    assert f"received SIGTERM: stopping after step {first}" in rank1

    # 2) resumed; SIGTERM to the torchrun parent before step `second`: forwarded to every rank's process group
    stopped = preempt_torchrun([*args, "--resume"], second, "torchrun", tmp_path / "logs2")
    assert stopped.returncode != 0
    assert complete_steps(run)[-1] == second
    assert "Traceback" not in "".join(p.read_text() for p in (tmp_path / "logs2").rglob("stderr.log"))
    assert (run / "train.log").read_text().count(f"exiting with code {PREEMPTED}") == 2

    # 3) resumed to the end: bitwise the uninterrupted run, each sample read once over the three segments
    ok(torchrun(2, [*args, "--resume"]))
    assert_bitwise_equal(checkpoint_tensors(reference / f"checkpoints/step_{STEPS:08d}", tmp_path),
                         checkpoint_tensors(run / f"checkpoints/step_{STEPS:08d}", tmp_path))
    assert_bitwise_equal(export_tensors(reference), export_tensors(run))
    assert trace_keys(run) == Counter(all_keys(shards))


# -- one process: SIGUSR1 mid-step, SIGTERM mid-save --------------------------------------------------------------


@pytest.fixture(scope="module")
def small_shards(shapes_shards) -> Path:
    return shapes_shards(train=96, heldout=8, shard_size=32)


def test_sigusr1_in_one_process_saves_ignores_a_second_signal_and_resumes_bitwise(small_shards, tmp_path,
                                                                                   monkeypatch):
    import transfusion.checkpoint.dcp as dcp_module
    from transfusion.train import main
    from transfusion.training.trainer import Trainer

    steps = 6
    step = random.Random(7).randint(1, steps - 1)  # signalled in the middle of this step
    received: list[int] = []
    # the test's own handlers (whatever the trainer does, pytest lives on), to be restored by the trainer after fit
    before = {sig: signal.signal(sig, lambda s, f: received.append(s)) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    ours = {sig: signal.getsignal(sig) for sig in before}
    try:
        reference = tmp_path / "reference"
        assert main(["recipes/shapes_tiny.toml", "--no-progress", *tiny_overrides(small_shards, reference, steps)]) == 0

        real_step, real_save = Trainer.train_step, dcp_module.dcp.save
        sent = []

        def train_step(self, micro):
            if self.step + 1 == step and not sent:
                sent.append("SIGUSR1")
                os.kill(os.getpid(), signal.SIGUSR1)  # arrives while the step runs
            return real_step(self, micro)

        def save(*a, **kw):
            if sent == ["SIGUSR1"]:
                sent.append("SIGTERM")
                os.kill(os.getpid(), signal.SIGTERM)  # a second signal in the middle of the preemption's save
            return real_save(*a, **kw)

        monkeypatch.setattr(Trainer, "train_step", train_step)
        monkeypatch.setattr(dcp_module.dcp, "save", save)
        run = tmp_path / "run"
        args = ["recipes/shapes_tiny.toml", "--no-progress", *tiny_overrides(small_shards, run, steps)]
        assert main(args) == PREEMPTED
        assert sent == ["SIGUSR1", "SIGTERM"] and received == []  # both went to the trainer's handler
        assert {sig: signal.getsignal(sig) for sig in ours} == ours  # and the previous handlers are back
        assert complete_steps(run)[-1] == step  # the step the signal arrived in was finished and saved
        assert not (run / "export").exists()
        text = (run / "train.log").read_text()
        assert f"received SIGUSR1: stopping after step {step}" in text
        assert "received SIGTERM while stopping: ignored" in text
        assert text.count("saved checkpoint") == len(complete_steps(run))  # one save at the preempted step

        monkeypatch.setattr(Trainer, "train_step", real_step)
        assert main([*args, "--resume"]) == 0
        assert_bitwise_equal(checkpoint_tensors(reference / f"checkpoints/step_{steps:08d}", tmp_path),
                             checkpoint_tensors(run / f"checkpoints/step_{steps:08d}", tmp_path))
        assert_bitwise_equal(export_tensors(reference), export_tensors(run))
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_unknown_preempt_signal_is_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "transfusion.train", "recipes/shapes_tiny.toml",
                           f"--run.dir={tmp_path}", "--train.preempt_signals=['SIGTERM', 'SIGKILL']"], cwd=REPO,
                          env=train_env(), capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: unknown value 'SIGKILL' for 'train.preempt_signals[1]'")
