"""The hybrid transformer: one decoder over text tokens and image patches, with a text head and an image head.

Legend: B rows, L tokens per row, D model dim, V vocab, N images, C/H/W image channels/height/width, P patches per
image, S key length (cached prefix + new tokens).

The model is single-device and knows nothing about data parallelism. Its pieces are exposed separately
(``encode_images`` -> ``embed`` -> ``trunk`` -> ``text_logits`` / ``image_prediction``) so that training (one packed
pass) and generation (prefill, KV-cached text steps, image denoising against a frozen prefix cache) compose the same
modules.

Image adapters (``model.adapter``): ``linear`` patch projections, or ``unet`` down/up blocks whose up path takes skip
connections from the down path (carried in ``ImageEncoding``). The image head (``model.head``, ``self.image_head``;
the interface in ``transfusion/model/image_head.py``) owns what differs between ways of producing an image:
``transformer`` predicts the objective for the whole noisy image from the transformer outputs; ``mar`` feeds clean
patches (masked ones replaced by a learned embedding) and trains a per-token MLP denoiser on the masked ones
(``transfusion/model/mar.py``). The model itself has no head-specific branch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from transfusion.config import ModelConfig, head_dim
from transfusion.model.adapters import LinearPatchIn, UNetDown, sincos_2d
from transfusion.model.heads import build_image_head
from transfusion.model.image_head import zero_resblock_outputs
from transfusion.model.layers import (IMAGE_TWINS, KV, Block, RMSNorm, attention_shape, copy_text_to_image_twins,
                                      rope_tables, route_tokens)


def mlp_hidden_size(cfg: ModelConfig) -> int:
    if cfg.mlp_hidden:
        return cfg.mlp_hidden
    return 64 * math.ceil(8 * cfg.dim / 3 / 64)


@dataclass
class ImageEncoding:
    """Images through the input adapter: the tokens that enter the transformer, plus what the output adapter needs."""

    tokens: Tensor  # [N, P, D]
    temb: Tensor | None = None  # [N, D] timestep embedding (None when the head gives none: MAR)
    skips: list[Tensor] = field(default_factory=list)  # U-Net down-path features, full resolution first


class TransfusionModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, image_channels: int) -> None:
        super().__init__()
        self.cfg, self.vocab_size, self.image_channels = cfg, vocab_size, image_channels
        d, p = cfg.dim, cfg.patch_size
        self.tok_emb = nn.Embedding(vocab_size, d)
        if cfg.adapter == "unet":
            u = cfg.unet
            self.image_in = UNetDown(image_channels, p, d, u.channels, u.blocks, u.groups)
        else:
            self.image_in = LinearPatchIn(image_channels, p, d)
        self.image_pos = nn.Linear(cfg.image_pos_dim, d, bias=False) if cfg.image_pos_dim else None
        self.layers = nn.ModuleList(
            Block(attention_shape(cfg), mlp_hidden_size(cfg), cfg.mot) for _ in range(cfg.n_layers)
        )
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        if cfg.tie_embeddings:  # one [V, D] matrix reads tokens in and scores them out
            self.lm_head.weight = self.tok_emb.weight
        self.image_norm = RMSNorm(d, cfg.norm_eps)
        self.image_head = build_image_head(cfg, image_channels)
        self.init_weights()

    # -- every init decision in one place --------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Text and shared modules drawn in module order, then the MoT image twins copied from the text modules
        (``copy_text_to_image_twins``; skipped by the draws, so a seed gives the same text weights with and without
        ``model.mot``)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual-branch outputs (GPT-2 / Llama practice)
        for name, mod in self.named_modules():
            if name.startswith("image_head.denoiser") or is_image_twin(name):
                continue  # the MAR denoiser keeps the reference's own init (MARDenoiser.init_weights); twins: copies
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=out_std if name.endswith(("attn.wo", "ffn.w2")) else std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=std)
            elif isinstance(mod, RMSNorm):
                nn.init.ones_(mod.weight)
            elif isinstance(mod, nn.Conv2d):  # U-Net convs: PyTorch's default (kaiming-uniform) init
                mod.reset_parameters()
        if isinstance(self.image_in, UNetDown):  # residual blocks start as their skip path (zero second conv)
            zero_resblock_outputs(self.image_in)
        self.image_head.init_weights(std)  # the head's own decisions (zero output, mask embedding, MAR's init)
        copy_text_to_image_twins(self)

    # -- pieces ----------------------------------------------------------------------------------------------
    def encode_images(self, images_NCHW: Tensor, timesteps_N: Tensor, patch_mask_NP: Tensor | None = None,
                      ) -> ImageEncoding:
        """(Noisy) images and their timesteps -> patch tokens [N, P, D] (+ what the output adapter needs). Every
        token gets its 2D grid position (``model.image_pos_dim``); the head marks the tokens: the timestep
        embedding (whole-image head), or the mask embedding on masked patches (``patch_mask_NP`` True, MAR head,
        whose images are clean and whose ``timesteps_N`` are ignored)."""
        x = images_NCHW.to(self.tok_emb.weight.dtype)
        grid = (x.shape[2] // self.cfg.patch_size, x.shape[3] // self.cfg.patch_size)
        temb = self.image_head.timestep_embedding(timesteps_N)  # [N, D] or None
        if isinstance(self.image_in, UNetDown):
            h, skips = self.image_in(x, temb)
        else:
            h, skips = self.image_in(x), []
        h = self.image_head.mark_inputs(h, temb, patch_mask_NP)
        return ImageEncoding(self._add_position(h, grid), temb, skips)

    def _add_position(self, h_NPD: Tensor, grid: tuple[int, int]) -> Tensor:
        if self.image_pos is None:
            return h_NPD
        feats = sincos_2d(grid, self.cfg.image_pos_dim, h_NPD.device).to(self.image_pos.weight.dtype)
        return h_NPD + self.image_pos(feats).to(h_NPD.dtype)

    def embed_images(self, images_NCHW: Tensor, timesteps_N: Tensor, patch_mask_NP: Tensor | None = None) -> Tensor:
        """(Noisy) images and their timesteps -> patch tokens [N, P, D]."""
        return self.encode_images(images_NCHW, timesteps_N, patch_mask_NP).tokens

    def embed(self, tokens_BL: Tensor, image_tokens_NPD: Tensor | None = None, image_rows_N: Tensor | None = None,
              image_starts_N: Tensor | None = None) -> Tensor:
        """Token embeddings with the image slots overwritten by the image patch tokens."""
        h = self.tok_emb(tokens_BL)  # [B, L, D]
        if image_tokens_NPD is not None:
            rows, cols = image_slot_index(image_rows_N, image_starts_N, image_tokens_NPD.shape[1])
            h = h.index_put((rows, cols), image_tokens_NPD.reshape(-1, h.shape[-1]).to(h.dtype))
        return h

    def trunk(self, h_BLD: Tensor, positions_BL: Tensor, mask: object, past_kv: list[KV] | None = None,
              use_cache: bool = False, image_mask_BL: Tensor | None = None, *, mot_reference: bool = False
              ) -> tuple[Tensor, list[KV] | None]:
        """The transformer layers. With a cache (``past_kv``, or ``use_cache`` to start one) also every layer's
        present keys/values; without one (training) None, so no layer's K/V is kept alive through the forward.
        ``image_mask_BL`` [B, L] bool marks the image slots (the tokens of the MoT image twins; BOI / EOI are
        text); None = all text. Ignored without ``model.mot``. ``mot_reference``: run both twins on every token
        (the naive reference of the routing)."""
        rope = rope_tables(positions_BL, head_dim(self.cfg), self.cfg.rope_theta, self.cfg.rope_scaling)
        route = route_tokens(image_mask_BL, mot_reference) if self.cfg.mot and image_mask_BL is not None else None
        caching = use_cache or past_kv is not None
        present: list[KV] = []
        for i, layer in enumerate(self.layers):
            h_BLD, kv = layer(h_BLD, rope, mask, None if past_kv is None else past_kv[i], caching, route)
            if caching:
                present.append(kv)
        return h_BLD, present if caching else None

    def text_logits(self, h: Tensor) -> Tensor:
        return self.lm_head(self.norm(h))

    def image_condition(self, h_NPD: Tensor) -> Tensor:
        """Hidden states at image slots -> what the image head reads (normalised), [N, P, D]."""
        return self.image_norm(h_NPD)

    def image_prediction(self, h_NPD: Tensor, grid: tuple[int, int], enc: ImageEncoding | None = None,
                         extra: object = None) -> Tensor:
        """Hidden states at an image's slots -> the head's prediction (fp32): [N, C, H, W] for the whole-image
        head (the U-Net up path also needs the ``ImageEncoding`` of the same images); MAR: [M * mul, E] for the
        noisy tokens in ``extra``."""
        return self.image_head.predict(self.image_condition(h_NPD), grid, enc, extra)

    # -- one packed training / scoring pass ------------------------------------------------------------------
    def forward(self, tokens_BL: Tensor, positions_BL: Tensor, mask: object, images_NCHW: Tensor,
                timesteps_N: Tensor, image_rows_N: Tensor, image_starts_N: Tensor,
                patch_grid: tuple[int, int], head_inputs: object = None) -> tuple[Tensor, Tensor]:
        """Returns text logits [B, L, V] and the image head's predictions: [N, C, H, W] for every image in the
        batch, or under the MAR head [M * mul, E] for the noisy tokens in ``head_inputs`` (``HeadDraw.extra``,
        required then).

        Image modules run even when N == 0 (zero-size tensors), so every rank touches every parameter."""
        enc = self.encode_images(images_NCHW, timesteps_N, self.image_head.input_mask(head_inputs))
        h = self.embed(tokens_BL, enc.tokens, image_rows_N, image_starts_N)
        rows, cols = image_slot_index(image_rows_N, image_starts_N, enc.tokens.shape[1])
        image_mask = image_slot_mask(tokens_BL.shape, rows, cols) if self.cfg.mot else None
        h, _ = self.trunk(h, positions_BL, mask, image_mask_BL=image_mask)
        img_h = h[rows, cols].reshape(enc.tokens.shape)
        pred = self.image_prediction(img_h, patch_grid, enc, head_inputs)
        return self.text_logits(h), pred


TEXT_MODULES = re.compile(r"^(tok_emb|lm_head|norm)\.|^layers\.\d+\.(attn_norm|attn|ffn_norm|ffn)\.")


def is_text_parameter(name: str) -> bool:
    """Whether a (clean) parameter name belongs to the text model: the token embedding, LM head, final norm and every
    block's text modules (with ``model.mot`` the text twin; without it the whole block). What ``train.freeze =
    ["text"]`` freezes and what a pretrained LM fills."""
    return TEXT_MODULES.match(name) is not None


def is_image_twin(name: str) -> bool:
    """Whether a parameter / module name lies in a block's MoT image twin (``layers.3.image_attn.wqkv.weight``)."""
    return any(part in IMAGE_TWINS for part in name.split("."))  # wrapper segments (checkpointing) anywhere


def image_slot_index(rows_N: Tensor, starts_N: Tensor, num_patches: int) -> tuple[Tensor, Tensor]:
    """Flat (row, column) indices of every image slot, image-major then patch order: two [N*P] tensors."""
    offs = torch.arange(num_patches, device=rows_N.device)
    cols = (starts_N.long()[:, None] + offs[None]).reshape(-1)
    rows = rows_N.long()[:, None].expand(-1, num_patches).reshape(-1)
    return rows, cols


def image_slot_mask(shape_BL: tuple[int, ...] | torch.Size, rows: Tensor, cols: Tensor) -> Tensor:
    """[B, L] bool, True at the given (row, column) slots: the MoT modality mask of a packed batch."""
    mask = torch.zeros(tuple(shape_BL), dtype=torch.bool, device=rows.device)
    mask[rows, cols] = True
    return mask


def build_model(cfg: ModelConfig, vocab_size: int, image_channels: int) -> TransfusionModel:
    return TransfusionModel(cfg, vocab_size, image_channels)
