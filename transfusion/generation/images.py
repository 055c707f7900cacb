"""Latents to pictures: the one place a codec's output becomes images a caller keeps."""

from __future__ import annotations

import torch
from torch import Tensor


def decode_images(codec, latents_NCHW: Tensor) -> Tensor:
    """Decode latents (or pixels, under the pixel codec) [N, c, h, w] with ``codec`` -> fp32 pixels [N, C, H, W] in
    [-1, 1] on the CPU. Clamped after decoding: a VAE's decoder is not bounded, and a denoiser's last estimate may
    overshoot the data range."""
    with torch.no_grad():
        return codec.decode(latents_NCHW).clamp(-1, 1).float().cpu()
