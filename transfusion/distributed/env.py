"""The process's place in the job: rank, device, process group and data-parallel mesh.

One code path for every launch::

    python -m transfusion.train R.toml                  no process group; a plain single-device model
    torchrun --nproc-per-node=N -m transfusion.train    gloo (CPU) or nccl (CUDA); FSDP2 over an N-rank mesh
    torchrun --nnodes=M ... with parallel.dp_replicate  HSDP: a (dp_replicate x dp_shard) mesh

Every rank is a data-parallel rank (no tensor or pipeline parallelism), so the data-parallel rank is the global rank.
The mesh shape is checked against the world size before the process group exists, so a wrong recipe fails every rank
with the same one-line error instead of hanging in the first collective.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from transfusion.config import ConfigError, ParallelConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device = {name!r} but CUDA is not available on this machine")
    return dev


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None  # None: launched without torchrun; the model stays a plain module
    dp_replicate: int = 1
    dp_shard: int = 1

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def dp_size(self) -> int:
        return self.world_size


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def mesh_shape(cfg: ParallelConfig, world_size: int) -> tuple[int, int]:
    """(dp_replicate, dp_shard) for ``world_size`` ranks; ConfigError when they do not multiply to it."""
    rep = cfg.dp_replicate
    shard = world_size // rep if cfg.dp_shard == -1 else cfg.dp_shard
    if rep * shard != world_size or shard < 1:
        raise ConfigError(f"parallel.dp_replicate ({cfg.dp_replicate}) x parallel.dp_shard ({cfg.dp_shard}) does not "
                          f"match the world size {world_size}")
    return rep, shard


def _device(name: str, local_rank: int) -> torch.device:
    dev = resolve_device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(cfg: ParallelConfig, device_name: str) -> DistEnv:
    """Join the torchrun job (if any), pick this rank's device and build the data-parallel mesh."""
    if not launched_by_torchrun():
        return DistEnv(rank=0, world_size=1, local_rank=0, device=resolve_device(device_name), mesh=None)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    rep, shard = mesh_shape(cfg, world)
    device = _device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        if device.type == "cuda":
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    if rep > 1:
        mesh = init_device_mesh(device.type, (rep, shard), mesh_dim_names=("dp_replicate", "dp_shard"))
    else:
        mesh = init_device_mesh(device.type, (shard,), mesh_dim_names=("dp_shard",))
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, mesh=mesh, dp_replicate=rep,
                   dp_shard=shard)


def shutdown(*, graceful: bool = True) -> None:
    """Leave the job. ``graceful``: wait for every rank first, so no rank tears its connections down while a peer
    still uses them (gloo aborts the peer then); after an error, leave at once (torchrun stops the others)."""
    global _HOST_GROUP
    if dist.is_available() and dist.is_initialized():
        if graceful:
            dist.barrier()
        dist.destroy_process_group()
    _HOST_GROUP = None


def is_distributed() -> bool:
    """A process group is initialised (torchrun); False in plain single-process runs."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place (a no-op without a process group); returns ``t``."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (one tiny collective)."""
    if not is_distributed():
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t)
    return t.item() == 0.0


_HOST_GROUP: Any = None


def host_group() -> Any:
    """A gloo group for small agreements on host tensors: the default group when it is gloo (CPU runs), else one
    made once (collectively, on first use) beside NCCL's, so a per-step flag costs no device sync."""
    global _HOST_GROUP
    if _HOST_GROUP is None:
        _HOST_GROUP = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _HOST_GROUP


def any_rank_true(flag: bool) -> bool:
    """True when ``flag`` holds on some rank: one all-reduce (MAX) of a 1-element int tensor over :func:`host_group`
    (collective; just ``flag`` without a process group)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return bool(t.item())


def barrier() -> None:
    if is_distributed():
        dist.barrier()
