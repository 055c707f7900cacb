"""The hybrid transformer: one decoder over text tokens and image patches, with a text head and an image head.

Legend: B rows, L tokens per row, D model dim, V vocab, N images, C/H/W image channels/height/width, P patches per
image, S key length (cached prefix + new tokens).

The model is single-device and knows nothing about data parallelism. Its pieces are exposed separately
(``embed`` -> ``trunk`` -> ``text_logits`` / ``image_prediction``) so that training (one packed pass) and generation
(prefill, KV-cached text steps, image denoising against a frozen prefix cache) compose the same modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from transfusion.config import ModelConfig
from transfusion.model.adapters import LinearPatchIn, LinearPatchOut, TimestepEmbedding
from transfusion.model.layers import KV, Block, RMSNorm, rope_tables


def mlp_hidden_size(cfg: ModelConfig) -> int:
    if cfg.mlp_hidden:
        return cfg.mlp_hidden
    return 64 * math.ceil(8 * cfg.dim / 3 / 64)


class TransfusionModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, image_channels: int) -> None:
        super().__init__()
        self.cfg, self.vocab_size, self.image_channels = cfg, vocab_size, image_channels
        d = cfg.dim
        self.tok_emb = nn.Embedding(vocab_size, d)
        self.image_in = LinearPatchIn(image_channels, cfg.patch_size, d)
        self.time_emb = TimestepEmbedding(d, cfg.time_freq_dim)
        self.layers = nn.ModuleList(
            Block(d, cfg.n_heads, mlp_hidden_size(cfg), cfg.qk_norm, cfg.norm_eps) for _ in range(cfg.n_layers)
        )
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.image_norm = RMSNorm(d, cfg.norm_eps)
        self.image_out = LinearPatchOut(image_channels, cfg.patch_size, d)
        self.init_weights()

    # -- every init decision in one place --------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual-branch outputs (GPT-2 / Llama practice)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=out_std if name.endswith(("attn.wo", "ffn.w2")) else std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=std)
            elif isinstance(mod, RMSNorm):
                nn.init.ones_(mod.weight)
        # The image head starts at zero (DiT practice): the first prediction is 0, a neutral epsilon estimate.
        nn.init.zeros_(self.image_out.proj.weight)
        nn.init.zeros_(self.image_out.proj.bias)

    # -- pieces ----------------------------------------------------------------------------------------------
    def embed_images(self, images_NCHW: Tensor, timesteps_N: Tensor) -> Tensor:
        """(Noisy) images and their timesteps -> patch tokens [N, P, D]."""
        h = self.image_in(images_NCHW.to(self.image_in.proj.weight.dtype))
        return h + self.time_emb(timesteps_N)[:, None, :].to(h.dtype)

    def embed(self, tokens_BL: Tensor, image_tokens_NPD: Tensor | None = None, image_rows_N: Tensor | None = None,
              image_starts_N: Tensor | None = None) -> Tensor:
        """Token embeddings with the image slots overwritten by the image patch tokens."""
        h = self.tok_emb(tokens_BL)  # [B, L, D]
        if image_tokens_NPD is not None:
            rows, cols = image_slot_index(image_rows_N, image_starts_N, image_tokens_NPD.shape[1])
            h = h.index_put((rows, cols), image_tokens_NPD.reshape(-1, h.shape[-1]).to(h.dtype))
        return h

    def trunk(self, h_BLD: Tensor, positions_BL: Tensor, mask: object,
              past_kv: list[KV] | None = None) -> tuple[Tensor, list[KV]]:
        rope = rope_tables(positions_BL, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta)
        present: list[KV] = []
        for i, layer in enumerate(self.layers):
            h_BLD, kv = layer(h_BLD, rope, mask, None if past_kv is None else past_kv[i])
            present.append(kv)
        return h_BLD, present

    def text_logits(self, h: Tensor) -> Tensor:
        return self.lm_head(self.norm(h))

    def image_prediction(self, h_NPD: Tensor, grid: tuple[int, int]) -> Tensor:
        """Hidden states at an image's slots -> the objective's prediction [N, C, H, W] (fp32)."""
        return self.image_out(self.image_norm(h_NPD), grid).float()

    # -- one packed training / scoring pass ------------------------------------------------------------------
    def forward(self, tokens_BL: Tensor, positions_BL: Tensor, mask: object, images_NCHW: Tensor,
                timesteps_N: Tensor, image_rows_N: Tensor, image_starts_N: Tensor,
                patch_grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Returns text logits [B, L, V] and image predictions [N, C, H, W] for every image in the batch.

        Image modules run even when N == 0 (zero-size tensors), so every rank touches every parameter."""
        img_tokens = self.embed_images(images_NCHW, timesteps_N)
        h = self.embed(tokens_BL, img_tokens, image_rows_N, image_starts_N)
        h, _ = self.trunk(h, positions_BL, mask)
        rows, cols = image_slot_index(image_rows_N, image_starts_N, img_tokens.shape[1])
        img_h = h[rows, cols].reshape(img_tokens.shape)
        return self.text_logits(h), self.image_prediction(img_h, patch_grid)


def image_slot_index(rows_N: Tensor, starts_N: Tensor, num_patches: int) -> tuple[Tensor, Tensor]:
    """Flat (row, column) indices of every image slot, image-major then patch order: two [N*P] tensors."""
    offs = torch.arange(num_patches, device=rows_N.device)
    cols = (starts_N.long()[:, None] + offs[None]).reshape(-1)
    rows = rows_N.long()[:, None].expand(-1, num_patches).reshape(-1)
    return rows, cols


def build_model(cfg: ModelConfig, vocab_size: int, image_channels: int) -> TransfusionModel:
    return TransfusionModel(cfg, vocab_size, image_channels)
