"""Choosing the next text token from the model's scores: banned ids, the greedy rule, temperature, top-k, top-p.

    ban(logits_NV, never_text_ids(tok))                      # in place: these ids are never chosen
    ids_N = choose(logits_NV, temperature, generator)        # a batch, one generator (the engine's own loops)
    token = sample_next(logits_V, params, request_generator) # one row, its own generator, top-k / top-p (the server)

Two draws, because the callers own their randomness differently. The engine's loops (captions, ``Engine.generate``)
draw every row of a batch from one generator in one fp32 call. The serving scheduler draws each request's token from
that request's own generator, in float64 (top-p's cumulative sum must not lose the tail), so a request's output does
not depend on its batch-mates. Both are kept bit for bit as they were written (seeds replay).

Legend: N rows, V vocabulary.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

GREEDY_BELOW = 1e-4  # ``sample_next``: temperatures below this are greedy (dividing by them would overflow fp32)


class TokenSampling(Protocol):
    """The per-request knobs ``sample_next`` reads (``transfusion.serving.scheduler.SamplingParams`` has them)."""

    temperature: float  # 0 = greedy
    top_k: int  # 0 = off
    top_p: float  # 1 = off


def ban(logits_NV: Tensor, ids: list[int]) -> Tensor:
    """Set the scores of ``ids`` to -inf in place (every row, or the one row of a [V] tensor); returns the scores."""
    if ids:
        logits_NV[..., ids] = float("-inf")
    return logits_NV


def choose(logits_NV: Tensor, temperature: float, generator: torch.Generator | None,
           banned: list[int] | None = None) -> Tensor:
    """One token per row from fp32 scores [N, V]: ``banned`` ids never, greedy at temperature 0, else sampled, all
    rows from ``generator`` in one draw."""
    ban(logits_NV, banned or [])
    if temperature <= 0:
        return logits_NV.argmax(-1)
    return torch.multinomial((logits_NV / temperature).softmax(-1), 1, generator=generator)[:, 0]


def sample_next(logits_V: Tensor, params: TokenSampling, generator: torch.Generator) -> int:
    """One token from fp32 logits [V] (banned ids already at -inf): greedy below ``GREEDY_BELOW``, else top-k / top-p
    filtered sampling from this request's generator."""
    if params.temperature < GREEDY_BELOW:
        return int(logits_V.argmax())
    logits = logits_V.double() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(logits_V.argmax())
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
