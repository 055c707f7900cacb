"""One rule for what the model diffuses, used by training and evaluation alike.

    batch = prepare_batch(batch, codec, device, patch_grid, patch_size)

A batch read from latent shards (``Batch.images_are_latents``) is used as it is, after a shape check against the
run's codec and patch grid; a pixel batch is encoded by the codec (the identity for ``latents.kind = "pixels"``).
Whether shards hold latents is decided once, when they are opened (``data_pipelines.loader.resolve_format``).
"""

from __future__ import annotations

import torch

from transfusion.batch import Batch
from transfusion.latents.vae import Codec, PixelCodec


class LatentShapeError(ValueError):
    """Latent shards whose latents do not fit the run's codec and image size."""


def prepare_batch(batch: Batch, codec: Codec, device: torch.device, patch_grid: tuple[int, int],
                  patch_size: int) -> Batch:
    batch = batch.to(device, non_blocking=True)
    if batch.images_are_latents:
        c, h, w = batch.images.shape[1:]
        want = (codec.channels, patch_grid[0] * patch_size, patch_grid[1] * patch_size)
        if (c, h, w) != want:
            raise LatentShapeError(
                f"latent shards hold {c}x{h}x{w} latents but this run's codec ({codec!r}) and image size expect "
                f"{want[0]}x{want[1]}x{want[2]}; set latents.kind='vae' and latents.vae_path to the VAE the shards "
                f"were encoded with")
    elif not isinstance(codec, PixelCodec) and batch.num_images:
        with torch.no_grad():
            batch.images = codec.encode(batch.images)
    return batch
