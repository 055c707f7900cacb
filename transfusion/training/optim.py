"""AdamW with decoupled weight decay groups, and the warmup + cosine learning-rate schedule.

Weight decay applies to matrices (``ndim >= 2``) only: norms, biases and gains (``ndim < 2``) and ``nn.Embedding``
tables are left undecayed. Build the optimizer after parallelisation (``fully_shard`` swaps parameters for DTensors;
module types and ``ndim`` are unchanged, so the grouping is the same on every rank).

Schedule, for optimizer step ``s`` (0-based; call ``scheduler.step()`` once after each ``optimizer.step()``)::

    lr
     ^        peak = cfg.lr
     |       ____
     |      /    ``--..
     |     /           ``-._
     |    /                  `--.____  cfg.lr * cfg.min_lr_ratio
     |   /
     +--|-------|-----------------------|-->  s
        0   warmup_steps            cfg.steps
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from transfusion.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``decay`` (matrices) and ``no_decay`` (ndim < 2, embedding tables). Frozen params are
    skipped; a parameter shared between modules (tied weights) is listed once."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters() already deduplicates shared parameters
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embedding_ids else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier on ``cfg.lr`` at optimizer step ``step``: ``(s + 1) / warmup`` during warmup, then a half cosine
    from 1 at ``warmup_steps`` to ``min_lr_ratio`` at ``cfg.steps``; constant ``min_lr_ratio`` afterwards."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = cfg.steps - cfg.warmup_steps
    progress = 1.0 if span <= 0 else min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at optimizer step ``step`` (pure function of the config)."""
    return cfg.lr * lr_factor(step, cfg)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """LambdaLR over :func:`lr_factor`. The multiplier is a plain closure, so the scheduler's state_dict holds only
    the step counter and base lrs: a resumed run follows the shape (warmup, ``steps``, ``min_lr_ratio``) of its
    *current* config."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
