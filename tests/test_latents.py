"""Codecs: pixel identity and the diffusers VAE wrapper (a tiny random AutoencoderKL built from a config)."""

import pytest
import torch

from transfusion.config import LatentConfig
from transfusion.latents import PixelCodec, VAECodec, build_codec

from conftest import TINY_VAE_SCALE as SCALE, TINY_VAE_SHIFT as SHIFT



def test_pixel_codec_is_identity():
    codec = build_codec(LatentConfig(kind="pixels"))
    assert isinstance(codec, PixelCodec)
    assert (codec.channels, codec.downsample, codec.clip_sample) == (3, 1, True)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(codec.encode(x), x) and torch.equal(codec.decode(codec.encode(x)), x)


def test_vae_codec_shapes_and_scaling(vae_dir):
    codec = build_codec(LatentConfig(kind="vae", vae_path=str(vae_dir)))
    assert isinstance(codec, VAECodec)
    assert (codec.channels, codec.downsample, codec.clip_sample) == (4, 2, False)
    assert (codec.scaling_factor, codec.shift_factor) == (SCALE, SHIFT)
    assert not codec.vae.training and not any(p.requires_grad for p in codec.vae.parameters())

    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 4, 8, 8) and not z.requires_grad
    raw = codec.vae
    with torch.no_grad():
        mean = raw.encode(x).latent_dist.mean
        torch.testing.assert_close(z, (mean - SHIFT) * SCALE, rtol=0, atol=0)
        y = codec.decode(z)
        expected = raw.decode(z / SCALE + SHIFT).sample.clamp(-1, 1)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_vae_codec_sampling_uses_generator(vae_dir):
    codec = VAECodec(vae_dir)
    x = torch.zeros(1, 3, 16, 16)
    a = codec.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    b = codec.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, codec.encode(x))


def test_vae_codec_pipeline_layout(vae_dir, tmp_path):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "vae").symlink_to(vae_dir, target_is_directory=True)
    assert VAECodec(tmp_path / "pipe").channels == 4  # a diffusers pipeline dir with a vae/ subfolder


def test_vae_codec_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="VAE directory not found: .*nope"):
        VAECodec(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers AutoencoderKL directory"):
        VAECodec(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot load AutoencoderKL from .*broken") as e:
        VAECodec(tmp_path / "broken")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown latents.kind"):
        build_codec(LatentConfig(kind="jpeg"))
