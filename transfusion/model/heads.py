"""The image heads by name (``model.head``): a registry, so the model builds its head without a branch per kind and
neither head module imports the other."""

from __future__ import annotations

from transfusion.config import ModelConfig
from transfusion.model.image_head import ImageHead, WholeImageHead
from transfusion.model.mar import MARImageHead

IMAGE_HEADS: dict[str, type[ImageHead]] = {"transformer": WholeImageHead, "mar": MARImageHead}


def build_image_head(cfg: ModelConfig, image_channels: int) -> ImageHead:
    """The head named by ``model.head``."""
    return IMAGE_HEADS[cfg.head](cfg, image_channels)
