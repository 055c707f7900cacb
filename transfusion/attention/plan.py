"""One attention plan per run: which backend, which kernels, which mask variant, resolved once and asked for masks.

    plan = training_plan(cfg, device, agree=...)     # the trainer's (transfusion/components.py builds it)
    plan = inference_plan(cfg.model)                  # generation and evaluation: dense masks a KV cache can read
    mask = plan.mask(batch.doc_ids, batch.image_ids, hidden_ids=batch.hidden_ids)   # once per batch
    mask = plan.cached_mask(key_valid, block)         # a block appended to a KV cache (the engine)

The choices (``model.attention``, ``model.split_kernel``, ``model.flex_kernel`` and its probe, the precision's fp32
constraint on flash kernels, ``model.image_attention``) are made here once and logged (``description``), so the
trainer, the evaluation and the generation engine cannot disagree on the mask variant. The plan only routes: the
masks are the pure functions of ``masks.py``, the backends those of ``backends.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from transfusion.attention.backends import build_attention_mask, describe_backend, resolve_backend, resolve_split_kernel
from transfusion.attention.flex import FlexTuning, flex_tuning
from transfusion.attention.flex import probe as probe_flex
from transfusion.attention.masks import cached_block_mask
from transfusion.config import head_dim


@dataclass(frozen=True)
class AttentionPlan:
    """A resolved attention choice. ``backend`` in backends.BACKENDS; ``split_kernel``: the split's kernel (resolved
    name, or "auto"); ``flex``: the flex backend's tuning (probed); ``fp32``: inputs stay fp32 (no flash kernels)."""

    backend: str = "sdpa"
    bidirectional_images: bool = True
    split_kernel: str = "auto"
    fp32: bool = False
    flex: FlexTuning | None = None
    description: str = "attention: sdpa"

    def mask(self, doc_ids: Tensor, image_ids: Tensor, *, hidden_ids: Tensor | None = None) -> object:
        """The per-batch mask object for [B, L] ids (see ``backends.build_attention_mask``)."""
        return build_attention_mask(doc_ids, image_ids, self.backend, self.bidirectional_images,
                                    hidden_ids=hidden_ids, split_kernel=self.split_kernel, fp32=self.fp32,
                                    flex=self.flex)

    def cached_mask(self, key_valid_NS: Tensor, block: int) -> Tensor:
        """[N, 1, block, S + block]: ``block`` new tokens (an image block) against a KV cache's valid keys (dense:
        the cached path is always SDPA)."""
        return cached_block_mask(key_valid_NS, block, self.bidirectional_images)


def bidirectional(model_cfg) -> bool:
    return getattr(model_cfg, "image_attention", "bidirectional") == "bidirectional"


def inference_plan(model_cfg) -> AttentionPlan:
    """Generation and teacher-forced evaluation: SDPA with the dense mask (the KV cache reads it; any device)."""
    return AttentionPlan(backend="sdpa", bidirectional_images=bidirectional(model_cfg))


def training_plan(cfg, device: torch.device, *, agree: Callable[[bool], bool] = lambda ok: ok) -> AttentionPlan:
    """The training run's plan for ``device``: ``model.attention`` resolved (``backends.resolve_backend``: auto ->
    split / flex on CUDA, sdpa elsewhere), the split's kernel, and for flex its tuning, confirmed by a probe that every
    rank agrees on (``agree``, e.g. ``all_ranks_true``) with the Triton tuning as fallback."""
    m = cfg.model
    fp32 = cfg.train.autocast == "fp32"  # flash-attn's kernels take fp16 / bf16 only
    bidi = bidirectional(m)
    backend = resolve_backend(m.attention, device, hidden_spans=cfg.data.clean_copy, fp32=fp32)
    kernel = resolve_split_kernel(m.split_kernel, device, fp32=fp32) if backend == "split" else None
    description = describe_backend(m.attention, backend, kernel, device)
    tuning = None
    if backend == "flex":
        dtype = torch.float32 if fp32 else torch.bfloat16
        tuning, note = probe_flex(flex_tuning(device, m.flex_kernel, m.flex_options), device, dtype,
                                  head_dim(m), fallback=flex_tuning(device, "triton", m.flex_options),
                                  bidirectional_images=bidi, hidden_spans=cfg.data.clean_copy, agree=agree)
        description += f"; {tuning.describe()}"
        if note:
            description += f" (the Flash backend failed its probe: {note})"
    return AttentionPlan(backend, bidi, kernel or m.split_kernel, fp32, tuning, description)
