"""The files that describe a run: its log (``train.log``), its resolved ``config.toml``, ``provenance.json`` and, with
``train.trace_data``, the keys every data consumer fed into every step (``data_trace/rank_<r>.jsonl``)."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from transfusion.config import Config, dumps_toml
from transfusion.distributed.env import DistEnv, barrier
from transfusion.precision import Precision, cpu_features

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
    """Git commit, library versions, device, CPU features and parallel layout, saved with every run."""
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
            "parallel": parallel or {}, "host": platform.node(), "argv": sys.argv,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_run_files(run_dir: Path, cfg: Config, env: DistEnv, precision: Precision, measured_peak: float) -> None:
    """``config.toml`` (resolved) and ``provenance.json`` (with the precision choice and the measured peak)."""
    (run_dir / "config.toml").write_text(dumps_toml(cfg))
    layout = {"world_size": env.world_size, "dp_replicate": env.dp_replicate, "dp_shard": env.dp_shard,
              "fsdp": env.distributed}
    prov = provenance(env.device, layout) | {
        "precision": precision.as_dict() | {"measured_peak_gflops": round(measured_peak / 1e9, 2)}}
    (run_dir / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")


class DataTrace:
    """With ``train.trace_data``: one JSON line per micro-batch, ``{"step", "consumer", "keys"}``, per rank."""

    def __init__(self, run_dir: Path, env: DistEnv, *, enabled: bool) -> None:
        self.dir, self.env, self.enabled = Path(run_dir) / "data_trace", env, enabled

    def write(self, step: int, micro: list) -> None:
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"rank_{self.env.rank}.jsonl", "a") as f:
            for consumer, batch in micro:
                f.write(json.dumps({"step": step, "consumer": consumer, "keys": list(batch.keys)}) + "\n")

    def truncate(self, step: int) -> None:
        """Drop lines of steps after ``step`` (the resume point: a run that died before saving trained them);
        collective."""
        if self.enabled and self.env.is_main:
            for path in self.dir.glob("rank_*.jsonl"):
                lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
                path.write_text("".join(ln + "\n" for ln in lines))
        barrier()
