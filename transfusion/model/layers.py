"""Llama-style building blocks: RMSNorm, rotary embeddings with per-token positions, attention, SwiGLU.

Legend: B batch rows, L query tokens, S key tokens (L + cached prefix), D model dim, H query heads, G key/value
heads (grouped-query attention: each serves H / G query heads), Dh head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from transfusion.attention.backends import attend
from transfusion.config import ModelConfig, RopeScalingConfig, head_dim, kv_heads

KV = tuple[Tensor, Tensor]  # (k_BHSDh, v_BHSDh)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig | None = None,
                     device: torch.device | None = None) -> Tensor:
    """The rotation speed of each (first half, second half) pair of the head dim, [Dh/2] fp32: ``theta^(-2i/Dh)``,
    stretched as ``scaling`` says. ``llama3``: wavelengths longer than ``original / low_freq_factor`` are slowed by
    ``factor``, ones shorter than ``original / high_freq_factor`` kept, and between the two the speed moves linearly
    (in ``original / wavelength``) from the slowed to the kept one."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if scaling is None or scaling.kind == "none":
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    wavelength = 2 * math.pi / inv_freq
    lo, hi = scaling.low_freq_factor, scaling.high_freq_factor
    ramp = ((scaling.original_max_positions / wavelength - lo) / (hi - lo)).clamp(0.0, 1.0)  # 0 slow .. 1 kept
    return (1 - ramp) * inv_freq / scaling.factor + ramp * inv_freq


def rope_tables(positions_BL: Tensor, head_dim: int, theta: float, scaling: RopeScalingConfig | None = None
                ) -> tuple[Tensor, Tensor]:
    """Rotation tables [B, 1, L, Dh] for per-token integer positions (documents restart at 0): ``cos`` repeated over
    both halves, and ``sin`` negated on the first half, so that ``apply_rope`` is two products and a sum."""
    inv_freq = rope_frequencies(head_dim, theta, scaling, positions_BL.device)
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


@dataclass(frozen=True)
class AttentionShape:
    """What the attention projections need from the model config (``attention_shape`` builds it)."""

    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    qk_norm: bool
    qkv_bias: bool
    eps: float


class Attention(nn.Module):
    """Self-attention with rotary positions. One fused projection makes the H query, G key and G value heads (in
    that order along its output); with G < H each key/value head serves H / G consecutive query heads, and the
    cache keeps the G heads only."""

    def __init__(self, s: AttentionShape) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = s.n_heads, s.n_kv_heads, s.head_dim
        self.wqkv = nn.Linear(s.dim, (s.n_heads + 2 * s.n_kv_heads) * s.head_dim, bias=s.qkv_bias)
        self.wo = nn.Linear(s.n_heads * s.head_dim, s.dim, bias=False)
        self.q_norm = RMSNorm(s.head_dim, s.eps) if s.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(s.head_dim, s.eps) if s.qk_norm else nn.Identity()

    def forward(self, x_BLD: Tensor, rope: tuple[Tensor, Tensor], mask: object, past_kv: KV | None = None,
                use_cache: bool = False) -> tuple[Tensor, KV | None]:
        """Returns the output and, with a cache (``past_kv`` given or ``use_cache``), the present (past + new)
        keys/values [B, G, S, Dh]; None in training, so no layer's K/V outlives the attention that used it."""
        bsz, length, _ = x_BLD.shape
        h, g, dh = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x_BLD).split((h * dh, g * dh, g * dh), dim=-1)
        q = q.view(bsz, length, h, dh).transpose(1, 2)  # [B, H, L, Dh]
        k, v = (t.view(bsz, length, g, dh).transpose(1, 2) for t in (k, v))  # [B, G, L, Dh]
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        if past_kv is not None:
            k, v = torch.cat((past_kv[0], k), dim=2), torch.cat((past_kv[1], v), dim=2)
        present = (k, v) if use_cache or past_kv is not None else None
        if g != h:  # the naive grouped-query form: each key/value head repeated for the query heads it serves
            k, v = k.repeat_interleave(h // g, dim=1), v.repeat_interleave(h // g, dim=1)
        out = attend(q, k, v, mask)  # [B, H, L, Dh]
        return self.wo(out.transpose(1, 2).reshape(bsz, length, h * dh)), present


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
    def __init__(self, shape: AttentionShape, hidden: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(shape.dim, shape.eps)
        self.attn = Attention(shape)
        self.ffn_norm = RMSNorm(shape.dim, shape.eps)
        self.ffn = FeedForward(shape.dim, hidden)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: object, past_kv: KV | None = None,
                use_cache: bool = False) -> tuple[Tensor, KV | None]:
        h, kv = self.attn(self.attn_norm(x), rope, mask, past_kv, use_cache)
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), kv


def attention_shape(cfg: ModelConfig) -> AttentionShape:
    return AttentionShape(cfg.dim, cfg.n_heads, kv_heads(cfg), head_dim(cfg), cfg.qk_norm, cfg.qkv_bias, cfg.norm_eps)
