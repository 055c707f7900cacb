"""Attention backends behind one call.

    mask = build_attention_mask(doc_ids, image_ids, backend)   # once per batch, shared by every layer
    out  = attend(q, k, v, mask)                                # per layer

Backends:
- ``"flex"``: FlexAttention with a BlockMask built from ``hybrid_mask_mod``; compiled on CUDA (fast kernels), eager
  elsewhere (a forward-only reference on CPU: FlexAttention has no CPU backward).
- ``"sdpa"``: ``scaled_dot_product_attention`` with the dense boolean mask from the same function (CPU training,
  numerical reference, and the KV-cache path of generation).

Shapes: q/k/v ``[B, H, L, Dh]`` (k/v may be longer than q when a KV cache is used); a dense mask is ``[B, 1, Lq, Lk]``
(True = may attend) or None (attend everywhere).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from transfusion.attention.masks import dense_mask, hybrid_mask_mod

BACKENDS = ("flex", "sdpa")


def resolve_backend(name: str, device: torch.device) -> str:
    """``"auto"`` -> flex on CUDA, sdpa elsewhere."""
    if name == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (known: auto, {', '.join(BACKENDS)})")
    return name


def build_attention_mask(doc_ids: Tensor, image_ids: Tensor, backend: str, bidirectional_images: bool = True,
                         *, hidden_ids: Tensor | None = None) -> object:
    """Build the per-batch mask object for ``backend`` from [B, L] document and image ids
    (``bidirectional_images=False``: causal image blocks, the attention ablation; ``hidden_ids``: spans hidden from
    later tokens, ``Batch.hidden_ids``)."""
    if backend == "sdpa":
        return dense_mask(doc_ids, image_ids, bidirectional_images, hidden_ids=hidden_ids)[:, None]  # [B, 1, L, L]
    if backend == "flex":
        bsz, length = doc_ids.shape
        mod = hybrid_mask_mod(doc_ids, image_ids, bidirectional_images, hidden_ids=hidden_ids)
        return _block_mask_fn(doc_ids.device.type == "cuda")(mod, bsz, None, length, length, device=doc_ids.device)
    raise ValueError(f"unknown attention backend {backend!r} (known: {', '.join(BACKENDS)})")


@functools.cache
def _block_mask_fn(compiled: bool):
    """``create_block_mask``, compiled once per process on CUDA (as torchtitan does: eager, it materialises the dense
    [L, L] mask on every call; compiled, it evaluates the mask function block by block). The mask function's tensors
    are inputs of the compiled graph, so a new batch of the same shape does not recompile."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask) if compiled else create_block_mask


@functools.cache
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def attend(q: Tensor, k: Tensor, v: Tensor, mask: object) -> Tensor:
    """Attention of q over k/v under ``mask`` (a BlockMask, a dense bool tensor, or None)."""
    if mask is None or isinstance(mask, Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return _flex_fn(q.device.type == "cuda")(q, k, v, block_mask=mask)
