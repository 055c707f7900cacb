"""The hybrid mask as variable-length attention calls (the "flash split"), for kernels that take sequence boundaries
rather than a mask: flash-attn's ``flash_attn_varlen_func``, torch's ``varlen_attn``, xformers' block-diagonal
biases, and SDPA per segment as the reference kernel.

Every query of the hybrid mask (``masks.py``) sees one contiguous key range of its document:

    a text token at q            keys [doc_start, q]          causal
    a token of image [a, b)      keys [doc_start, b)          the prefix and the whole image

So a packed batch splits into segments, each one sequence of a varlen call: every maximal run of text tokens
[a, b) of a document (queries [a, b), keys [doc_start, b), causal aligned to the bottom right: query a + j sees keys
up to a + j) and every image block (queries [a, b), keys [doc_start, b), no mask). Two calls cover a batch: one for
the causal segments, one for the image segments; every query is computed once. Padding queries see only themselves
in the dense mask, so their output is their own value. Keys of a segment are gathered from the flat token list
(a document's prefix is read once per segment, as the dense mask's rows read it).

Not expressible this way, refused with an error: hidden spans (``Batch.hidden_ids``, the clean-copy layout: a
hidden noisy copy cuts a hole in later tokens' key ranges) and causal image blocks without a document prefix are
fine (the ablation ``bidirectional_images=False`` is just documents, causal).

    plan = split_plan(doc_ids, image_ids)                   # once per batch, on the host
    out = split_attention(q, k, v, plan, kernel)            # per layer; q/k/v [B, H, L, Dh]

A kernel is ``kernel(q [Tq, H, D], k [Tk, H, D], v, cu_q, cu_k, max_q, max_k, causal) -> [Tq, H, D]`` with flash-attn's
conventions: int32 cumulative lengths, causal aligned to the bottom right when a sequence has more keys than queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Kernel = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, int, bool], Tensor]


class SplitUnsupported(ValueError):
    """The batch's mask cannot be written as contiguous key ranges (hidden spans)."""


@dataclass
class Segments:
    """One varlen call: query / key token indices into the flat [B * L] token list, cumulative lengths."""

    q_idx: Tensor  # [Tq] long
    k_idx: Tensor  # [Tk] long
    cu_q: Tensor  # [n + 1] int32
    cu_k: Tensor  # [n + 1] int32
    max_q: int
    max_k: int
    causal: bool

    def to(self, device) -> "Segments":
        return Segments(self.q_idx.to(device), self.k_idx.to(device), self.cu_q.to(device), self.cu_k.to(device),
                        self.max_q, self.max_k, self.causal)


@dataclass
class SplitPlan:
    calls: list[Segments]  # causal text runs, then image blocks (either may be absent)
    pad_idx: Tensor  # [Np] long: padding tokens (output = their own value)
    shape: tuple[int, int]  # (B, L)

    def to(self, device) -> "SplitPlan":
        return SplitPlan([c.to(device) for c in self.calls], self.pad_idx.to(device), self.shape)


def _segments(ranges: list[tuple[int, int, int]], causal: bool) -> Segments | None:
    """ranges: (key start, query start, end) in flat token indices -> one varlen call."""
    if not ranges:
        return None
    q = torch.cat([torch.arange(a, b) for _, a, b in ranges])
    k = torch.cat([torch.arange(s, b) for s, _, b in ranges])
    lq = torch.tensor([b - a for _, a, b in ranges])
    lk = torch.tensor([b - s for s, _, b in ranges])
    cu = lambda n: torch.cat((torch.zeros(1, dtype=torch.int32), n.cumsum(0).to(torch.int32)))  # noqa: E731
    return Segments(q, k, cu(lq), cu(lk), int(lq.max()), int(lk.max()), causal)


def split_plan(doc_ids: Tensor, image_ids: Tensor, bidirectional_images: bool = True,
               hidden_ids: Tensor | None = None) -> SplitPlan:
    """[B, L] document / image ids (``Batch``) -> the varlen calls of the hybrid mask (``masks.hybrid_mask_mod``).
    Documents must be contiguous within a row (the packer's layout); padding is doc id -1."""
    if hidden_ids is not None and bool((hidden_ids >= 0).any()):
        raise SplitUnsupported("the flash split cannot express hidden spans (clean-copy noisy images): use "
                               "model.attention = 'flex' or 'sdpa' for this data")
    doc, img = doc_ids.cpu(), image_ids.cpu()
    bsz, length = doc.shape
    text_runs, image_blocks = [], []
    for r in range(bsz):
        d, m = doc[r].tolist(), img[r].tolist()
        i = 0
        while i < length:
            if d[i] < 0:
                i += 1
                continue
            start = i  # a document: [start, end)
            while i < length and d[i] == d[start]:
                i += 1
            end = i
            j = start
            while j < end:  # maximal runs of text / one image block each
                image = bidirectional_images and m[j] >= 0
                k = j
                while k < end and ((m[k] == m[j]) if image else not (bidirectional_images and m[k] >= 0)):
                    k += 1
                off = r * length
                (image_blocks if image else text_runs).append((off + start, off + j, off + k))
                j = k
    calls = [c for c in (_segments(text_runs, True), _segments(image_blocks, False)) if c is not None]
    pad = (doc.reshape(-1) < 0).nonzero().reshape(-1)
    return SplitPlan(calls, pad, (bsz, length))


def split_attention(q: Tensor, k: Tensor, v: Tensor, plan: SplitPlan, kernel: Kernel) -> Tensor:
    """Attention of q/k/v [B, H, L, Dh] under the hybrid mask, as ``plan``'s varlen calls of ``kernel``."""
    bsz, heads, length, dh = q.shape
    qf, kf, vf = (t.transpose(1, 2).reshape(bsz * length, heads, dh) for t in (q, k, v))  # [T, H, Dh]
    out = qf.new_zeros(qf.shape)
    for seg in plan.calls:
        o = kernel(qf[seg.q_idx], kf[seg.k_idx], vf[seg.k_idx], seg.cu_q, seg.cu_k, seg.max_q, seg.max_k, seg.causal)
        out = out.index_copy(0, seg.q_idx, o.to(out.dtype))
    if plan.pad_idx.numel():
        out = out.index_copy(0, plan.pad_idx, vf[plan.pad_idx])
    return out.reshape(bsz, length, heads, dh).transpose(1, 2)


# -- kernels ---------------------------------------------------------------------------------------------------------
def sdpa_kernel(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                causal: bool) -> Tensor:
    """The reference kernel: SDPA per sequence (causal aligned to the bottom right). Any device; slow."""
    outs = []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        qi, ki, vi = (t.transpose(0, 1)[None] for t in (q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]]))
        mask = None
        if causal:
            lq, lk = qi.shape[2], ki.shape[2]
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask)[0].transpose(0, 1))
    return torch.cat(outs)


def flash_attn_kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    from flash_attn import flash_attn_varlen_func  # flash-attn >= 2.1: causal is bottom-right aligned

    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal)


def torch_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:  # torch >= 2.12: (-1, 0) = causal, flash-attn's bottom-right convention
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0) if causal else (-1, -1))
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=causal)


def xformers_kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    from xformers.ops import fmha

    lq, lk = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
    bias_cls = fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask if causal else fmha.attn_bias.BlockDiagonalMask
    bias = bias_cls.from_seqlens(q_seqlen=lq, kv_seqlen=lk)
    return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]


KERNELS: dict[str, Kernel] = {"flash_attn": flash_attn_kernel, "torch_varlen": torch_varlen_kernel,
                              "xformers": xformers_kernel, "sdpa": sdpa_kernel}
