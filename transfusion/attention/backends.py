"""Attention backends behind one call.

    mask = build_attention_mask(doc_ids, image_ids, backend)   # once per batch, shared by every layer
    out  = attend(q, k, v, mask)                                # per layer

Backends:
- ``"flex"``: FlexAttention with a BlockMask built from ``hybrid_mask_mod`` (``flex.py``: compiled cached builder,
  lengths padded to buckets of 128, kernel and options per GPU architecture); compiled on CUDA, eager elsewhere (a
  forward-only reference on CPU: FlexAttention has no CPU backward).
- ``"sdpa"``: ``scaled_dot_product_attention`` with the dense boolean mask from the same function (CPU training,
  numerical reference, and the KV-cache path of generation).
- ``"split"``: the mask as variable-length calls (``split.py``: causal text runs, non-causal image blocks) of a
  kernel: flash-attn's varlen function, torch's ``varlen_attn``, xformers' block-diagonal attention, or SDPA per
  segment (the reference kernel, any device). Not for batches with hidden spans (clean copies).

``auto`` on CUDA: the split when a fast varlen kernel is installed and the data has no hidden spans, else flex; on
CPU: sdpa. ``describe_backend`` says what was chosen and why (the attention plan, ``plan.py``, keeps it; the
trainer logs it). Callers hold an ``AttentionPlan`` (resolved once per run) rather than calling these directly.

Shapes: q/k/v ``[B, H, L, Dh]`` (k/v may be longer than q when a KV cache is used); a dense mask is ``[B, 1, Lq, Lk]``
(True = may attend) or None (attend everywhere).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from transfusion.attention.flex import FlexMask, FlexTuning, flex_attend, flex_mask
from transfusion.attention.masks import dense_mask
from transfusion.attention.split import KERNELS, Kernel, SplitPlan, split_attention, split_plan

BACKENDS = ("flex", "sdpa", "split")
# Kernels ``auto`` picks on CUDA, when their package is installed (the user opted in by installing it). torch's own
# varlen_attn is used when asked for (model.split_kernel = "torch_varlen") until it is measured on a GPU here.
AUTO_SPLIT_KERNELS = ("flash_attn", "xformers")


def available_split_kernels(device: torch.device, find_spec=importlib.util.find_spec, *,
                            fp32: bool = False) -> list[str]:
    """Split kernels usable on ``device``: the fast ones need CUDA and their package (flash-attn's and torch's
    varlen kernels also need fp16 / bf16 inputs, so not under ``fp32``); "sdpa" always works."""
    out = []
    if device.type == "cuda":
        if find_spec("flash_attn") is not None and not fp32:
            out.append("flash_attn")
        if find_spec("torch.nn.attention.varlen") is not None and not fp32:
            out.append("torch_varlen")
        if find_spec("xformers") is not None:
            out.append("xformers")
    return out + ["sdpa"]


def resolve_split_kernel(name: str, device: torch.device, find_spec=importlib.util.find_spec, *,
                         fp32: bool = False) -> str:
    available = available_split_kernels(device, find_spec, fp32=fp32)
    if name == "auto":
        return next((k for k in available if k in AUTO_SPLIT_KERNELS), "sdpa")
    if name not in available:
        raise ValueError(f"attention split kernel {name!r} is not usable on {device.type} here "
                         f"(usable: {', '.join(available)})")
    return name


def resolve_backend(name: str, device: torch.device, *, hidden_spans: bool = False, fp32: bool = False,
                    find_spec=importlib.util.find_spec) -> str:
    """``"auto"`` -> on CUDA the split when a fast varlen kernel is installed (for this precision: ``fp32`` rules
    out flash-attn) and the data has no hidden spans (``data.clean_copy``), else flex; sdpa elsewhere. An explicit
    "split" with hidden spans is refused."""
    if name == "auto":
        if device.type != "cuda":
            return "sdpa"
        fast = any(k in AUTO_SPLIT_KERNELS for k in available_split_kernels(device, find_spec, fp32=fp32))
        return "split" if fast and not hidden_spans else "flex"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (known: auto, {', '.join(BACKENDS)})")
    if name == "split" and hidden_spans:
        raise ValueError("model.attention = 'split' cannot express hidden spans (data.clean_copy = true): use "
                         "'flex' or 'sdpa'")
    return name


def describe_backend(requested: str, backend: str, kernel: str | None, device: torch.device) -> str:
    what = f"split ({kernel} kernel)" if backend == "split" else backend
    return f"attention: {what} on {device.type} (model.attention = {requested!r})"


@dataclass
class SplitMask:
    """The split backend's per-batch mask object: the plan and the kernel that runs it."""

    plan: SplitPlan
    kernel: Kernel


def build_attention_mask(doc_ids: Tensor, image_ids: Tensor, backend: str, bidirectional_images: bool = True,
                         *, hidden_ids: Tensor | None = None, split_kernel: str = "auto", fp32: bool = False,
                         flex: FlexTuning | None = None) -> object:
    """Build the per-batch mask object for ``backend`` from [B, L] document and image ids
    (``bidirectional_images=False``: causal image blocks, the attention ablation; ``hidden_ids``: spans hidden from
    later tokens, ``Batch.hidden_ids``; ``split_kernel``: the split backend's kernel, ``KERNELS`` or auto; ``flex``:
    the flex backend's tuning, ``flex.flex_tuning``, default torch's defaults with 128-token buckets)."""
    if backend == "split":
        kernel = KERNELS[resolve_split_kernel(split_kernel, doc_ids.device, fp32=fp32)]
        plan = split_plan(doc_ids, image_ids, bidirectional_images, hidden_ids)
        return SplitMask(plan.to(doc_ids.device), kernel)
    if backend == "sdpa":
        return dense_mask(doc_ids, image_ids, bidirectional_images, hidden_ids=hidden_ids)[:, None]  # [B, 1, L, L]
    if backend == "flex":
        return flex_mask(doc_ids, image_ids, flex or FlexTuning(), bidirectional_images, hidden_ids=hidden_ids)
    raise ValueError(f"unknown attention backend {backend!r} (known: {', '.join(BACKENDS)})")


def attend(q: Tensor, k: Tensor, v: Tensor, mask: object) -> Tensor:
    """Attention of q over k/v under ``mask`` (a FlexMask, a SplitMask, a dense bool tensor, or None)."""
    if mask is None or isinstance(mask, Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if isinstance(mask, SplitMask):
        return split_attention(q, k, v, mask.plan, mask.kernel)
    if isinstance(mask, FlexMask):
        return flex_attend(q, k, v, mask)
    raise TypeError(f"unknown attention mask object {type(mask).__name__}")
