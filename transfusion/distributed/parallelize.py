"""Apply activation checkpointing, torch.compile and FSDP2 to a single-device TransfusionModel, in that order.

    model = build_model(...)            # on the meta device: no memory
    parallelize(model, cfg.parallel, env.mesh, env.device)
    materialize(model, env.device, seed)   # transfusion.distributed.init

Order matters: checkpoint wrappers go innermost so that compile sees (and can optimise) the recomputation, and
``fully_shard`` goes outermost so that its all-gather / reduce-scatter hooks sit around the compiled block.

Sharding units: every transformer block, the LM head, and the root (token embedding, image adapters, timestep MLP,
norms). The token embedding stays in the root group because the model reads its dtype outside its own forward (to
cast images); a unit's parameters are only unsharded inside that unit's forward. The last block and the LM head
keep their parameters after forward since backward needs them at once.
Gradients are *summed* across data-parallel ranks (divide factor 1): the trainer already normalises each rank's loss
by the global token / element counts, so a mean would divide twice.

Selective checkpointing (``selective``) keeps the outputs of matmuls and attention and recomputes the cheap
pointwise / norm / rotary ops in backward: most of the memory of ``full`` at a fraction of its recompute.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from transfusion.config import ParallelConfig


_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    """Drop the wrapper segments that activation checkpointing, torch.compile (and FSDP1) add to a parameter FQN, so
    names match the plain single-device model's."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _param_dtype(cfg: ParallelConfig, device: torch.device) -> torch.dtype:
    if cfg.param_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if cfg.param_dtype == "bf16" else torch.float32


def _saved_ops() -> set:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_flash_attention_forward", "_efficient_attention_forward")
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    if hasattr(torch.ops.higher_order, "flex_attention"):
        ops.add(torch.ops.higher_order.flex_attention)
    return ops


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = _saved_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap each transformer block: ``full`` recomputes the whole block, ``selective`` all but matmul/attention."""
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    extra = {"context_fn": _selective_context} if mode == "selective" else {}
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False, **extra)  # non-reentrant default


def cpu_compile_missing() -> str | None:
    """Why inductor cannot build CPU kernels here (no C++ compiler, or no Python headers), or None when it can."""
    import shutil
    import sysconfig
    from pathlib import Path

    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        return "no C++ compiler (g++ / clang++) on PATH"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return "no Python development headers (Python.h)"
    return None


def apply_compile(model: nn.Module, device: torch.device | None = None) -> bool:
    """Compile each block in place (``Module.compile`` keeps parameter names). Blocks are identical, so one
    compiled graph serves them all. On CPU, inductor needs a C++ compiler and Python's headers: without them the
    blocks stay eager (with a warning) instead of failing at the first step. Returns whether it compiled."""
    if device is not None and device.type == "cpu":
        missing = cpu_compile_missing()
        if missing:
            logging.getLogger("transfusion").warning("parallel.compile = true but %s: the blocks run eagerly", missing)
            return False
    for block in model.layers:
        block.compile()
    return True


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig, device: torch.device) -> None:
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=_param_dtype(cfg, device),
                              reduce_dtype=torch.bfloat16 if cfg.reduce_dtype == "bf16" else torch.float32)
    shard = functools.partial(fully_shard, mesh=mesh, mp_policy=mp)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        shard(block, reshard_after_forward=i < n - 1)
    lm_head = getattr(model, "lm_head", None)
    tied = lm_head is not None and lm_head.weight is getattr(getattr(model, "tok_emb", None), "weight", None)
    if isinstance(lm_head, nn.Module) and not tied:  # a tied head shares the root's embedding: sharded with it
        shard(model.lm_head, reshard_after_forward=False)  # used last in forward, first in backward
    shard(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: no PREMUL_SUM (unsupported by gloo), no scaling


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh | None, device: torch.device) -> nn.Module:
    """AC -> compile -> FSDP2 (when ``mesh`` is given), in place; returns ``model``. Works on a meta-device model."""
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        apply_compile(model, device)
    if mesh is not None:
        apply_fsdp(model, mesh, cfg, device)
    return model
