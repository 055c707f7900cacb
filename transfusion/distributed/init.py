"""Materialise a meta-device (possibly sharded) model with weights that do not depend on how it is sharded.

The problem: after ``fully_shard`` on the meta device, ``to_empty`` + ``init_weights()`` under one seed draws each
rank's *shard* from the same random stream, so a 2-rank model differs from a 1-rank one (and from itself on 4 ranks).

The approach: every random init call on a parameter is replayed on a full-size CPU tensor drawn from a generator
seeded by (seed, parameter name), and each rank keeps its own slice of that full tensor. The weights are therefore a
pure function of (seed, parameter names, the model's init code); the names are the seed names of
``transfusion/model/names.py``, frozen when parameters move between modules: identical for 1, 2 or N ranks, with or without
FSDP, HSDP, activation checkpointing or compile, on CPU or CUDA. Host memory peaks at one full parameter, never at
the full model. The model's own init code stays the single place of init decisions:

    to_empty(device) -> every module's reset_parameters() (the constructor defaults) -> model.init_weights()

Both run under a ``TorchFunctionMode`` that reroutes ``torch.nn.init.*`` and the in-place random ``Tensor`` methods
(``normal_``, ``uniform_`` ...) whose target is a parameter or buffer; other ops (``zero_``, ``fill_``, arithmetic)
act on the local shard as usual. A parameter or floating buffer that nothing initialised is an error (it is filled
with NaN after ``to_empty`` and checked at the end), so a new module whose init lives only in its constructor is
caught at once instead of training from garbage.
"""

from __future__ import annotations

import hashlib
import inspect

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.overrides import TorchFunctionMode

from transfusion.distributed.parallelize import clean_name
from transfusion.model.names import seed_name

_INIT_FUNCS = {getattr(nn.init, n) for n in (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
    "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_") if hasattr(nn.init, n)}
_RANDOM_METHODS = {getattr(Tensor, n) for n in (
    "normal_", "uniform_", "random_", "bernoulli_", "exponential_", "geometric_", "log_normal_", "cauchy_")}


def _takes_generator(func) -> bool:
    try:
        return "generator" in inspect.signature(func).parameters
    except (TypeError, ValueError):  # C methods: the in-place random Tensor methods all take ``generator``
        return func in _RANDOM_METHODS


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of integers or names (stable across processes and Python versions)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def assign_full(t: Tensor, full: Tensor) -> None:
    """Write the full-size value ``full`` into ``t``: all of it, or this rank's shard of it."""
    if isinstance(t, DTensor):
        local = distribute_tensor(full.to(t.device_mesh.device_type), t.device_mesh, t.placements,
                                  src_data_rank=None).to_local()
        t.to_local().copy_(local)
    else:
        t.copy_(full)


class ShardingIndependentInit(TorchFunctionMode):
    """Replays init calls on full-size CPU tensors drawn from per-tensor generators, then keeps the local shard."""

    def __init__(self, tensors: dict[int, tuple[str, Tensor]], seed: int) -> None:
        super().__init__()
        self.tensors, self.seed = tensors, seed
        self.generators: dict[int, torch.Generator] = {}

    def _generator(self, key: int) -> torch.Generator:
        if key not in self.generators:
            self.generators[key] = torch.Generator().manual_seed(mix_seed(self.seed, self.tensors[key][0]))
        return self.generators[key]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _INIT_FUNCS or func in _RANDOM_METHODS:
            in_kwargs = not args and "tensor" in kwargs
            target = kwargs["tensor"] if in_kwargs else (args[0] if args else None)
            key = id(target)
            if key in self.tensors:
                full = torch.empty(target.shape, dtype=target.dtype)  # a DTensor's shape is global
                if _takes_generator(func):
                    kwargs["generator"] = self._generator(key)
                if in_kwargs:
                    kwargs["tensor"] = full
                else:
                    args = (full, *args[1:])
                with torch.no_grad():
                    func(*args, **kwargs)
                    assign_full(target, full)
                return target
        return func(*args, **kwargs)


def shared_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Parameters registered under several names (a tied LM head is the token embedding), as groups of (module,
    attribute). ``to_empty`` from the meta device replaces each module's parameter by its own new one, which would
    silently untie them (a single-process run only: FSDP2's DTensor parameters are swapped in place)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, name))
    return [group for group in owners.values() if len(group) > 1]


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Allocate a meta-device model on ``device`` and initialise it independently of its sharding (see module
    docstring). Works as well on a model that is already materialised (it is re-initialised)."""
    shared = shared_parameters(model)
    model.to_empty(device=device)
    for (owner, attr), *others in shared:  # meta -> a device makes one new Parameter per module: tie them again
        for module, name in others:
            setattr(module, name, getattr(owner, attr))
    tensors: dict[int, tuple[str, Tensor]] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        tensors.setdefault(id(t), (seed_name(clean_name(name)), t))
        if t.is_floating_point():
            t.fill_(float("nan"))  # DTensor: fills the local shard
    with ShardingIndependentInit(tensors, seed):
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and module is not model:
                reset()
        model.init_weights()
    for name, t in tensors.values():
        local = t.to_local() if isinstance(t, DTensor) else t
        if t.is_floating_point() and local.numel() and bool(torch.isnan(local).any()):
            raise RuntimeError(f"'{name}' was not initialised by reset_parameters() or {type(model).__name__}."
                               f"init_weights(): initialise it there so meta-device materialisation can reproduce it")
    return model
