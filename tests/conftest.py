"""Fixtures shared across test files."""

from pathlib import Path

import pytest
import torch
from helpers import make_shapes_shards

TINY_VAE_SCALE, TINY_VAE_SHIFT = 0.5, 0.1


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory) -> Path:
    """A tiny random diffusers AutoencoderKL (2 levels -> downsample 2, 4 latent channels) saved to a local dir,
    with scaling_factor TINY_VAE_SCALE and shift_factor TINY_VAE_SHIFT; nothing is downloaded."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
                        sample_size=16, scaling_factor=TINY_VAE_SCALE, shift_factor=TINY_VAE_SHIFT)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory):
    """``shapes_shards(train, heldout, shard_size)``: the shapes world at 16 px written by the shard tool, once per
    session per size (tests read it, never write to it)."""
    made: dict[tuple[int, int, int], Path] = {}

    def get(train: int, heldout: int, shard_size: int) -> Path:
        key = (train, heldout, shard_size)
        if key not in made:
            made[key] = make_shapes_shards(tmp_path_factory.mktemp(f"shapes{train}"), train, heldout, shard_size)
        return made[key]

    return get
