"""Llama-style building blocks: RMSNorm, rotary embeddings with per-token positions, attention, SwiGLU.

Legend: B batch rows, L query tokens, S key tokens (L + cached prefix), D model dim, H heads, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from transfusion.attention.backends import attend

KV = tuple[Tensor, Tensor]  # (k_BHSDh, v_BHSDh)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def rope_tables(positions_BL: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """Rotation tables [B, 1, L, Dh] for per-token integer positions (documents restart at 0): ``cos`` repeated over
    both halves, and ``sin`` negated on the first half, so that ``apply_rope`` is two products and a sum."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions_BL.device, dtype=torch.float32)
                               / head_dim)
    angles = positions_BL.float()[..., None] * inv_freq  # [B, L, Dh/2]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1)[:, None], torch.cat((-sin, sin), dim=-1)[:, None]


def apply_rope(x_BHLDh: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Rotate the (first half, second half) pairs of the head dim: ``(x1 cos - x2 sin, x2 cos + x1 sin)``, computed
    as ``x * cos + swap_halves(x) * sin_signed`` (bitwise equal to the textbook form, fewer kernels; see
    tests/test_model.py for the reference)."""
    xf = x_BHLDh.float()
    half = xf.shape[-1] // 2
    swapped = xf.unflatten(-1, (2, half)).flip(-2).flatten(-2)  # (x2, x1)
    return (xf * cos + swapped * sin_signed).type_as(x_BHLDh)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, eps) if qk_norm else nn.Identity()

    def forward(self, x_BLD: Tensor, rope: tuple[Tensor, Tensor], mask: object, past_kv: KV | None = None,
                use_cache: bool = False) -> tuple[Tensor, KV | None]:
        """Returns the output and, with a cache (``past_kv`` given or ``use_cache``), the present (past + new)
        keys/values; None in training, so no layer's K/V outlives the attention that used it."""
        bsz, length, dim = x_BLD.shape
        qkv = self.wqkv(x_BLD).view(bsz, length, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, Dh]
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        if past_kv is not None:
            k, v = torch.cat((past_kv[0], k), dim=2), torch.cat((past_kv[1], v), dim=2)
        out = attend(q, k, v, mask)  # [B, H, L, Dh]
        present = (k, v) if use_cache or past_kv is not None else None
        return self.wo(out.transpose(1, 2).reshape(bsz, length, dim)), present


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, hidden: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, n_heads, qk_norm, eps)
        self.ffn_norm = RMSNorm(dim, eps)
        self.ffn = FeedForward(dim, hidden)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: object, past_kv: KV | None = None,
                use_cache: bool = False) -> tuple[Tensor, KV | None]:
        h, kv = self.attn(self.attn_norm(x), rope, mask, past_kv, use_cache)
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), kv
