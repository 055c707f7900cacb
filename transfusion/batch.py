"""The Batch: the one contract between the data pipeline and the model.

Legend: B packed rows, L tokens per row, N images in the micro-batch, C/H/W image channels/height/width
(pixels or VAE latents), P patches per image.

Layout of one packed row (two documents, a text->image sample then an image->caption sample, then padding):

    tokens      BOS a  r  e  d  BOI IMG IMG IMG IMG EOI EOS | BOS BOI IMG IMG IMG IMG EOI b  l  u  e  EOS | PAD PAD
    doc_ids     0   0  0  0  0  0   0   0   0   0   0   0   | 1   1   1   1   1   1   1   1  1  1  1  1   | -1  -1
    image_ids   -1  -1 -1 -1 -1 -1  0   0   0   0   -1  -1  | -1  -1  1   1   1   1   -1  -1 -1 -1 -1 -1  | -1  -1
    positions   0   1  2  3  4  5   6   7   8   9   10  11  | 0   1   2   3   4   5   6   7  8  9  10 11  | 0   0

``text_targets[i]`` is the id of token ``i + 1`` when token ``i`` is text predicting text (or BOI / EOS / the first
caption token after EOI), and ``IGNORE_INDEX`` on image slots, on BOI (its successor is an image slot), on the last
token of each document and on padding. The per-image tensors say where each image's slots are.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass(slots=True)
class Batch:
    tokens: Tensor  # [B, L] long: text ids; image slots hold the tokenizer's image placeholder id
    doc_ids: Tensor  # [B, L] long: document index inside the row; -1 for padding
    image_ids: Tensor  # [B, L] long: -1 for text, else index n into `images`
    positions: Tensor  # [B, L] long: restart at 0 for each document
    text_targets: Tensor  # [B, L] long: next-token target or IGNORE_INDEX
    images: Tensor  # [N, C, H, W] float: clean pixels in [-1, 1] or (scaled) latents
    image_rows: Tensor  # [N] long: row of image n
    image_starts: Tensor  # [N] long: index of image n's first slot in its row
    image_is_target: Tensor  # [N] bool: True = generation target (noised, diffusion loss); False = conditioning
    patch_grid: tuple[int, int]  # (gh, gw) patches per image side; P = gh * gw slots per image
    keys: list[str]  # source key of every packed document, in row-major order (for debugging and resume tests)
    # -- added with defaults (data at scale); older producers leave them unset --
    image_noise_limit: Tensor | None = None  # [N] float in (0, 1]: max share of the noise schedule; None / 1 = none
    hidden_ids: Tensor | None = None  # [B, L] long: >= 0 marks a span hidden from later tokens (noisy copy); -1 else
    images_are_latents: bool = False  # `images` are precomputed latents from shards: the trainer must not encode

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        moved: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                moved[f.name] = v.to(device, non_blocking=non_blocking)
        return replace(self, **moved)

    def pin_memory(self) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name).pin_memory()
                                for f in fields(self) if isinstance(getattr(self, f.name), Tensor)})

    def num_text_targets(self) -> int:
        return int((self.text_targets != IGNORE_INDEX).sum())
