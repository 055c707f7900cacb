"""Image codecs: pixels (identity) or a frozen diffusers VAE."""

from transfusion.latents.vae import Codec, PixelCodec, VAECodec, build_codec

__all__ = ["Codec", "PixelCodec", "VAECodec", "build_codec"]
