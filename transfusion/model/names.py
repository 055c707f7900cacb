"""Parameter names across versions of the model: exports written before the image heads became one module
(``model.image_head``) load under today's names, and the sharding-independent init (``distributed/init.py``), which
seeds each tensor by its name, keeps seeding by the old names (``seed_name``), so a seed gives the same weights as
before the move.

Old name prefix -> new one. The MAR denoiser's residual-block LayerNorms gained affine parameters at the same time;
an old export has none, and identity parameters (weight 1, bias 0) reproduce its outputs exactly.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

RENAMED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("time_emb.", "image_head.time_emb."),
    ("image_out.", "image_head.image_out."),
    ("mask_emb", "image_head.mask_emb"),
    ("mar_head.", "image_head.denoiser."),
)
_MAR_BLOCK_NORM = re.compile(r"^image_head\.denoiser\.blocks\.(\d+)\.mlp\.0\.weight$")


def upgrade_state_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` under today's parameter names (unchanged when it already uses them)."""
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        for old, new in RENAMED_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = value
    for name, value in list(out.items()):
        m = _MAR_BLOCK_NORM.match(name)
        prefix = f"image_head.denoiser.blocks.{m.group(1)}.norm." if m else None
        if prefix and prefix + "weight" not in out:
            width = value.shape[1]
            out[prefix + "weight"] = torch.ones(width, dtype=value.dtype, device=value.device)
            out[prefix + "bias"] = torch.zeros(width, dtype=value.dtype, device=value.device)
    return out


def legacy_name(name: str) -> str:
    """Today's parameter name -> its name before the image-head module (itself when it did not change)."""
    for old, new in RENAMED_PREFIXES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


seed_name = legacy_name  # the name a parameter's init generator is seeded with


def legacy_state_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse renaming (today's names -> the names before the image-head module), for comparing with tensors
    pinned before the move (the golden checksum). MAR's new LayerNorm parameters have no old name and are kept."""
    return {legacy_name(name): value for name, value in state.items()}
