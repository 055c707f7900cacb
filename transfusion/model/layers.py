"""Llama-style building blocks: RMSNorm, rotary embeddings with per-token positions, attention, SwiGLU.

Legend: B batch rows, L query tokens, S key tokens (L + cached prefix), D model dim, H query heads, G key/value
heads (grouped-query attention: each serves H / G query heads), Dh head dim.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

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
        q, k, v = self.split_heads(self.wqkv(x_BLD))
        out, present = self.attend_heads(self.q_norm(q), self.k_norm(k), v, rope, mask, past_kv, use_cache)
        return self.wo(out), present

    def split_heads(self, qkv_BLX: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, L, (H + 2G) Dh] -> q [B, H, L, Dh], k and v [B, G, L, Dh]."""
        bsz, length, _ = qkv_BLX.shape
        h, g, dh = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = qkv_BLX.split((h * dh, g * dh, g * dh), dim=-1)
        q = q.view(bsz, length, h, dh).transpose(1, 2)  # [B, H, L, Dh]
        k, v = (t.view(bsz, length, g, dh).transpose(1, 2) for t in (k, v))  # [B, G, L, Dh]
        return q, k, v

    def project_rows(self, x_ND: Tensor) -> Tensor:
        """This twin's projection of some tokens (MoT routing): [N, D] -> [N, (H + 2G) Dh] with q and k already
        normalised per head, ready to be scattered into the sequence and split by ``split_heads``."""
        h, g, dh = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x_ND).split((h * dh, g * dh, g * dh), dim=-1)
        q, k = self.q_norm(q.unflatten(-1, (h, dh))).flatten(-2), self.k_norm(k.unflatten(-1, (g, dh))).flatten(-2)
        return torch.cat((q, k, v), dim=-1)

    def attend_heads(self, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor], mask: object,
                     past_kv: KV | None, use_cache: bool) -> tuple[Tensor, KV | None]:
        """The attention proper, shared by both MoT twins: rotary positions, the cache, the grouped-query repeat and
        the backend. q [B, H, L, Dh] and k / v [B, G, L, Dh] (q, k normalised) -> [B, L, H Dh] before ``wo``."""
        bsz, h, length, dh = q.shape
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if past_kv is not None:
            k, v = torch.cat((past_kv[0], k), dim=2), torch.cat((past_kv[1], v), dim=2)
        present = (k, v) if use_cache or past_kv is not None else None
        if self.n_kv_heads != h:  # the naive grouped-query form: each key/value head repeated for the query heads
            k, v = k.repeat_interleave(h // self.n_kv_heads, dim=1), v.repeat_interleave(h // self.n_kv_heads, dim=1)
        out = attend(q, k, v, mask)  # [B, H, L, Dh]
        return out.transpose(1, 2).reshape(bsz, length, h * dh), present


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


IMAGE_TWINS = ("image_attn_norm", "image_attn", "image_ffn_norm", "image_ffn")  # Block attributes, MoT only
TEXT_TWINS = ("attn_norm", "attn", "ffn_norm", "ffn")  # their text counterparts, in the same order


class Block(nn.Module):
    """Pre-norm attention + SwiGLU. With ``mot`` (mixture of transformers) the block also holds an image twin of
    every norm, projection and MLP (``image_attn_norm``, ``image_attn`` minus its attention proper, ``image_ffn_norm``,
    ``image_ffn``): image slots run the twins, text the original modules, and one attention over the whole sequence
    mixes them (``attend_heads``). Parameter names of the text path are those of the plain block."""

    def __init__(self, shape: AttentionShape, hidden: int, mot: bool = False) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(shape.dim, shape.eps)
        self.attn = Attention(shape)
        self.ffn_norm = RMSNorm(shape.dim, shape.eps)
        self.ffn = FeedForward(shape.dim, hidden)
        self.mot = mot
        if mot:  # deep copies: built without drawing from the RNG, so a seed gives the same text weights either way
            for text_name, image_name in zip(TEXT_TWINS, IMAGE_TWINS):
                setattr(self, image_name, copy.deepcopy(getattr(self, text_name)))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: object, past_kv: KV | None = None,
                use_cache: bool = False, route: Route | None = None) -> tuple[Tensor, KV | None]:
        """``route`` (MoT only): which tokens are image slots; None = all text, which is the plain block exactly.
        With a route both twins run, each on its own rows (zero rows included: every rank touches every parameter,
        as FSDP2's reduce-scatter needs)."""
        if route is None or not self.mot:
            h, kv = self.attn(self.attn_norm(x), rope, mask, past_kv, use_cache)
            x = x + h
            return x + self.ffn(self.ffn_norm(x)), kv
        qkv = route.apply(x, lambda t: self.attn.project_rows(self.attn_norm(t)),
                          lambda t: self.image_attn.project_rows(self.image_attn_norm(t)))
        q, k, v = self.attn.split_heads(qkv)
        out, kv = self.attn.attend_heads(q, k, v, rope, mask, past_kv, use_cache)
        x = x + route.apply(out, self.attn.wo, self.image_attn.wo)
        return x + route.apply(x, lambda t: self.ffn(self.ffn_norm(t)),
                               lambda t: self.image_ffn(self.image_ffn_norm(t))), kv


@torch.no_grad()
def copy_text_to_image_twins(model: nn.Module) -> None:
    """Make every block's image twin an exact copy of its text modules (MoT starts as the text model; BAGEL and
    LMFusion initialise the generation expert so). Called at the end of ``TransfusionModel.init_weights`` and again
    after pretrained weights are loaded, so the copies are of the loaded text weights. Under FSDP2 a twin and its
    text parameter are sharded alike (same shape, same block), so the copy is shard to shard on every rank."""
    for block in model.modules():
        if not (isinstance(block, Block) and block.mot):
            continue
        for text_name, image_name in zip(TEXT_TWINS, IMAGE_TWINS):
            text, image = dict(getattr(block, text_name).named_parameters()), getattr(block, image_name)
            for name, p in image.named_parameters():
                p.copy_(text[name])


@dataclass
class Route:
    """Which tokens of a [B, L] batch are image slots, for the MoT twins: flat indices into the B * L tokens, built
    once per forward (``route_tokens``) and used by every layer. ``apply`` gathers each modality's rows, runs its
    twin on them and scatters the results back, so every token runs exactly one twin (the FLOPs of the plain model);
    ``naive`` runs both twins on every token and picks with ``torch.where`` (the reference the routing is held to in
    tests/test_mot.py)."""

    image_mask_BL: Tensor  # [B, L] bool: True at image slots
    text_idx: Tensor  # [T] long
    image_idx: Tensor  # [I] long
    naive: bool = False

    def apply(self, x_BLD: Tensor, text_fn: Callable[[Tensor], Tensor], image_fn: Callable[[Tensor], Tensor]
              ) -> Tensor:
        """``text_fn`` on the text tokens and ``image_fn`` on the image tokens of x [B, L, D] -> [B, L, D']."""
        if self.naive:
            return torch.where(self.image_mask_BL[..., None], image_fn(x_BLD), text_fn(x_BLD))
        flat = x_BLD.reshape(-1, x_BLD.shape[-1])
        y_text, y_image = text_fn(flat[self.text_idx]), image_fn(flat[self.image_idx])
        out = y_text.new_empty(flat.shape[0], y_text.shape[-1])
        out = out.index_copy(0, self.text_idx, y_text).index_copy(0, self.image_idx, y_image.to(y_text.dtype))
        return out.view(*x_BLD.shape[:-1], -1)


def route_tokens(image_mask_BL: Tensor, naive: bool = False) -> Route:
    """[B, L] bool (True = image slot) -> the ``Route`` every layer uses (one host sync, for the index sizes)."""
    flat = image_mask_BL.reshape(-1)
    return Route(image_mask_BL, (~flat).nonzero().reshape(-1), flat.nonzero().reshape(-1), naive)


def attention_shape(cfg: ModelConfig) -> AttentionShape:
    return AttentionShape(cfg.dim, cfg.n_heads, kv_heads(cfg), head_dim(cfg), cfg.qk_norm, cfg.qkv_bias, cfg.norm_eps)
