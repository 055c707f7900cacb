"""The hybrid attention mask as a pure function of document ids and image ids.

    allowed(q, k) = (same document  and  k is not padding  and  (k <= q  or  q, k in the same image))  or  q == k

Causal over text, bidirectional inside each image block, nothing across documents, nothing into padding. The
``q == k`` term only matters for padding queries: it gives each of them one key (itself) so that softmax never sees
an all-masked row (which would produce NaN); no real token ever attends to padding.

A row with document 0 = [BOS t BOI i i EOI] and document 1 = [BOS t] then one PAD (x = allowed):

           k: B t O i i E B t P
    q  BOS    x . . . . . . . .
       t      x x . . . . . . .
       BOI    x x x . . . . . .
       i      x x x x x . . . .     <- both image slots see each other
       i      x x x x x . . . .
       EOI    x x x x x x . . .
       BOS    . . . . . . x . .     <- document 1 sees nothing of document 0
       t      . . . . . . x x .
       PAD    . . . . . . . . x     <- padding sees only itself

The same function serves every backend: FlexAttention evaluates it per (b, h, q, k) index, the SDPA backend
broadcasts it into a dense boolean tensor.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def hybrid_mask_mod(doc_ids: Tensor, image_ids: Tensor) -> MaskMod:
    """Return ``mask_mod(b, h, q_idx, k_idx) -> bool`` for ``doc_ids`` / ``image_ids`` of shape [B, L].

    ``image_ids`` must be unique per image across the whole batch (they index ``Batch.images``), so equal image ids
    imply the same row."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, k_idx: Tensor) -> Tensor:
        doc_q, doc_k = doc_ids[b, q_idx], doc_ids[b, k_idx]
        img_q, img_k = image_ids[b, q_idx], image_ids[b, k_idx]
        same_doc = (doc_q == doc_k) & (doc_k >= 0)
        same_image = (img_q == img_k) & (img_q >= 0)
        return (same_doc & ((k_idx <= q_idx) | same_image)) | (q_idx == k_idx)

    return mask_mod


def dense_mask(doc_ids: Tensor, image_ids: Tensor) -> Tensor:
    """[B, L] ids -> [B, L, L] bool (True = may attend), by broadcasting the same ``mask_mod``."""
    bsz, length = doc_ids.shape
    dev = doc_ids.device
    b = torch.arange(bsz, device=dev)[:, None, None]
    q = torch.arange(length, device=dev)[None, :, None]
    k = torch.arange(length, device=dev)[None, None, :]
    h = torch.zeros((), dtype=torch.long, device=dev)
    return hybrid_mask_mod(doc_ids, image_ids)(b, h, q, k)
