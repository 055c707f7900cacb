"""Image codecs: the space the diffusion head works in. Training encodes clean images once per batch; generation
decodes the denoised result.

    x_BCHW   images in [-1, 1], C = 3
    z_BcHW   codec space: c = codec.channels, (h, w) = (H, W) / codec.downsample

``PixelCodec`` is the identity (diffuse pixels directly). ``VAECodec`` wraps a local diffusers ``AutoencoderKL``;
its normalisation comes from the VAE's own config, never from constants here::

    z = (mean(E(x)) - shift) * scale          x = D(z / scale + shift)

with ``scale = scaling_factor`` and ``shift = shift_factor`` (None -> 0), or per-channel ``latents_mean`` /
``latents_std`` when the config carries them (z = (mean(E(x)) - m) * scale / s).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from transfusion.config import LatentConfig


class Codec(Protocol):
    channels: int  # channels of the codec space
    downsample: int  # spatial factor from pixels to the codec space
    clip_sample: bool  # hint for samplers: clip x0 estimates to [-1, 1] (True only for pixels)

    def encode(self, x_BCHW: Tensor) -> Tensor: ...

    def decode(self, z_BcHW: Tensor) -> Tensor: ...


class PixelCodec:
    """Identity codec: the model diffuses pixels in [-1, 1]."""

    channels = 3
    downsample = 1
    clip_sample = True

    def encode(self, x_BCHW: Tensor) -> Tensor:
        return x_BCHW

    def decode(self, z_BcHW: Tensor) -> Tensor:
        return z_BcHW

    def __repr__(self) -> str:
        return "PixelCodec()"


def _vae_dir(path: Path) -> tuple[Path, str | None]:
    """A VAE directory, or a diffusers pipeline directory holding one under ``vae/``."""
    if not path.exists():
        raise FileNotFoundError(f"VAE directory not found: {path}")
    if (path / "config.json").is_file():
        return path, None
    if (path / "vae" / "config.json").is_file():
        return path, "vae"
    raise ValueError(f"{path} is not a diffusers AutoencoderKL directory (no config.json, nor vae/config.json)")


def _as(t: Tensor | float, like: Tensor) -> Tensor | float:
    return t.to(like.device, like.dtype) if isinstance(t, Tensor) else t


class VAECodec:
    """Frozen diffusers ``AutoencoderKL`` loaded from a local directory (never downloads)."""

    clip_sample = False

    def __init__(self, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        from diffusers import AutoencoderKL  # heavy import, only when a VAE is used

        self.path = Path(path)
        root, subfolder = _vae_dir(self.path)
        # without accelerate, diffusers warns on every load unless asked for the plain path (small VAEs lose nothing)
        lazy = importlib.util.find_spec("accelerate") is not None
        try:
            vae = AutoencoderKL.from_pretrained(root, subfolder=subfolder, local_files_only=True, torch_dtype=dtype,
                                                low_cpu_mem_usage=lazy)
        except Exception as e:
            raise ValueError(f"cannot load AutoencoderKL from {self.path}: {' '.join(str(e).split())[:300]}") from None
        self.vae = vae.to(device=device).eval().requires_grad_(False)
        cfg = self.vae.config
        self.channels: int = cfg.latent_channels
        self.downsample: int = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor: float = float(cfg.scaling_factor)
        self.shift_factor: float = float(getattr(cfg, "shift_factor", None) or 0.0)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:  # per-channel normalisation (e.g. SDXL-style configs)
            shape = (1, self.channels, 1, 1)
            self._shift = torch.tensor(mean, dtype=torch.float32).view(shape)
            self._scale = self.scaling_factor / torch.tensor(std, dtype=torch.float32).view(shape)
        else:
            self._shift, self._scale = self.shift_factor, self.scaling_factor

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, x_BCHW: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] -> normalised latents (posterior mean; ``sample=True`` draws from the posterior).
        Runs on the VAE's device; the result has ``x``'s dtype."""
        posterior = self.vae.encode(x_BCHW.to(self.device, self.dtype)).latent_dist
        h = posterior.sample(generator=generator) if sample else posterior.mean
        z = (h - _as(self._shift, h)) * _as(self._scale, h)
        return z.to(x_BCHW.dtype)

    @torch.no_grad()
    def decode(self, z_BcHW: Tensor) -> Tensor:
        """Normalised latents -> images, clamped to [-1, 1] (the decoder can overshoot); result has ``z``'s dtype."""
        z = z_BcHW.to(self.device, self.dtype)
        h = z / _as(self._scale, z) + _as(self._shift, z)
        return self.vae.decode(h).sample.clamp(-1.0, 1.0).to(z_BcHW.dtype)

    def __repr__(self) -> str:
        return (
            f"VAECodec({str(self.path)!r}, channels={self.channels}, downsample={self.downsample}, "
            f"scaling_factor={self.scaling_factor}, shift_factor={self.shift_factor})"
        )


def build_codec(cfg: LatentConfig, device: str | torch.device | None = None) -> Codec:
    if cfg.kind == "pixels":
        return PixelCodec()
    if cfg.kind == "vae":
        if not cfg.vae_path:
            raise ValueError("latents.kind = 'vae' needs latents.vae_path")
        return VAECodec(cfg.vae_path, device=device)
    raise ValueError(f"unknown latents.kind {cfg.kind!r} (known: pixels, vae)")
