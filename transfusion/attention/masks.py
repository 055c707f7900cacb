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

``bidirectional_images=False`` drops the same-image term (the Transfusion paper's attention ablation): image
patches then attend causally, in raster order, like text.

Optional ``hidden_ids`` (clean copies, ``data_pipelines.samples``): a token with ``hidden_ids >= 0`` belongs to a
hidden span, and a key in a hidden span is visible only to queries of the same span:

    allowed(q, k) = ... as above ...  and  (hidden[k] < 0  or  hidden[k] == hidden[q]),  or q == k

A document [BOS BOI n n BOI c c EOI t]: the noisy copy (BOI n n, hidden span 0) denoises against the prefix; the
clean copy (BOI c c EOI, same positions) and the text after it never see the noisy copy:

           k: B O n n O c c E t
    q  BOS    x . . . . . . . .
       BOI    x x . . . . . . .     <- hidden span 0
       n      x x x x . . . . .     <- hidden span 0: prefix, its own BOI, the whole noisy image
       n      x x x x . . . . .
       BOI    x . . . x . . . .     <- clean copy: the prefix, not the noisy copy
       c      x . . . x x x . .
       c      x . . . x x x . .
       EOI    x . . . x x x x .
       t      x . . . x x x x x
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def hybrid_mask_mod(doc_ids: Tensor, image_ids: Tensor, bidirectional_images: bool = True, *,
                    hidden_ids: Tensor | None = None) -> MaskMod:
    """Return ``mask_mod(b, h, q_idx, k_idx) -> bool`` for ``doc_ids`` / ``image_ids`` (and optionally
    ``hidden_ids``) of shape [B, L].

    ``image_ids`` must be unique per image across the whole batch (they index ``Batch.images``), so equal image ids
    imply the same row; ``hidden_ids`` likewise (``Batch.hidden_ids``). ``bidirectional_images=False`` makes image
    blocks causal (the attention ablation)."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, k_idx: Tensor) -> Tensor:
        doc_q, doc_k = doc_ids[b, q_idx], doc_ids[b, k_idx]
        same_doc = (doc_q == doc_k) & (doc_k >= 0)
        if not bidirectional_images:
            allowed = same_doc & (k_idx <= q_idx)
        else:
            img_q, img_k = image_ids[b, q_idx], image_ids[b, k_idx]
            same_image = (img_q == img_k) & (img_q >= 0)
            allowed = same_doc & ((k_idx <= q_idx) | same_image)
        if hidden_ids is not None:
            hid_k = hidden_ids[b, k_idx]
            allowed = allowed & ((hid_k < 0) | (hid_k == hidden_ids[b, q_idx]))
        return allowed | (q_idx == k_idx)

    return mask_mod


def dense_mask(doc_ids: Tensor, image_ids: Tensor, bidirectional_images: bool = True, *,
               hidden_ids: Tensor | None = None) -> Tensor:
    """[B, L] ids -> [B, L, L] bool (True = may attend), by broadcasting the same ``mask_mod``."""
    bsz, length = doc_ids.shape
    dev = doc_ids.device
    b = torch.arange(bsz, device=dev)[:, None, None]
    q = torch.arange(length, device=dev)[None, :, None]
    k = torch.arange(length, device=dev)[None, None, :]
    h = torch.zeros((), dtype=torch.long, device=dev)
    return hybrid_mask_mod(doc_ids, image_ids, bidirectional_images, hidden_ids=hidden_ids)(b, h, q, k)


def cached_block_mask(key_valid_NS: Tensor, block: int, bidirectional_images: bool = True) -> Tensor:
    """The mask of a block of ``block`` new tokens appended to a KV cache: [N, S] valid cached keys (False on left
    padding) -> [N, 1, block, S + block] bool. The block sees every valid cached key and itself: all of itself (an
    image block), or causally (``bidirectional_images=False``, the ablation; also one text token, block = 1).

    A cache of [PAD t t] and an image block of 3 patches (x = allowed):

           k: P t t i i i
    q  i      . x x x x x     <- bidirectional: each patch sees the whole block
       i      . x x x x x
       i      . x x x x x

    It is the hybrid mask's rows of the block, read against the cache (the generation engine's decode path)."""
    n, dev = key_valid_NS.shape[0], key_valid_NS.device
    block_PP = torch.ones(block, block, dtype=torch.bool, device=dev)
    if not bidirectional_images:
        block_PP = block_PP.tril()
    return torch.cat((key_valid_NS[:, None, None, :].expand(n, 1, block, -1), block_PP.expand(n, 1, block, block)),
                     dim=-1)
