"""The KV prefix: a batch of sequences that went through the model, and the three ways batches of them change shape.

    both = concat_prefixes(cond, uncond)          # one batch of 2N rows (classifier-free guidance, a text batch)
    rows = select_rows(both, torch.tensor([0, 2]))
    own = split_prefix(rows, [5, 9])              # each row back to its own, unpadded cache

Stacked caches are left-padded to the longest (padding keys are masked by ``key_valid``), so every row's next token
goes in the last column; splitting keeps each row's last ``length`` columns, undoing the padding.

Legend: N rows, H heads, S cached key length, Dh head dim, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from transfusion.model.layers import KV


@dataclass
class Prefix:
    """A batch of prefixes that went through the model: their cache and where the next token goes."""

    kv: list[KV]  # per layer ([N, H, S, Dh], [N, H, S, Dh])
    key_valid: Tensor  # [N, S] bool: False on left padding
    next_pos: Tensor  # [N] long: RoPE position of the next token
    last_h: Tensor  # [N, D] hidden state of the last prefix token (predicts the next token)


def concat_prefixes(*prefixes: Prefix) -> Prefix:
    """Stack prefix batches into one (in order), left-padding the shorter caches; one copy per tensor."""
    s = max(p.key_valid.shape[1] for p in prefixes)
    pad = lambda t, cur, value=0: torch.nn.functional.pad(t, (s - cur, 0), value=value)  # noqa: E731
    kv = [(torch.cat([torch.nn.functional.pad(layer[0], (0, 0, s - p.key_valid.shape[1], 0))
                      for p, layer in zip(prefixes, layers)]),
           torch.cat([torch.nn.functional.pad(layer[1], (0, 0, s - p.key_valid.shape[1], 0))
                      for p, layer in zip(prefixes, layers)]))
          for layers in zip(*(p.kv for p in prefixes))]
    return Prefix(kv, torch.cat([pad(p.key_valid, p.key_valid.shape[1], False) for p in prefixes]),
                  torch.cat([p.next_pos for p in prefixes]), torch.cat([p.last_h for p in prefixes]))


def select_rows(prefix: Prefix, rows: Tensor) -> Prefix:
    """The rows ``rows`` [M] (long) of a prefix batch, in that order, with the batch's padding."""
    return Prefix([(k[rows], v[rows]) for k, v in prefix.kv], prefix.key_valid[rows], prefix.next_pos[rows],
                  prefix.last_h[rows])


def split_prefix(stacked: Prefix, lengths: list[int]) -> list[Prefix]:
    """Undo ``concat_prefixes``: row i keeps its last ``lengths[i]`` cache columns (its own, unpadded keys)."""
    out = []
    for i, n in enumerate(lengths):
        kv = [(k[i:i + 1, :, -n:], v[i:i + 1, :, -n:]) for k, v in stacked.kv]
        out.append(Prefix(kv, stacked.key_valid[i:i + 1, -n:], stacked.next_pos[i:i + 1], stacked.last_h[i:i + 1]))
    return out
