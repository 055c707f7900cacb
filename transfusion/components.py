"""Build the components a run needs from a config: tokenizer, codec, model, noise schedule, patch grid, attention plan.

Training, generation, evaluation and export all go through here, so they can never disagree on how a config maps
onto objects. The attention plan (``transfusion/attention/plan.py``) is resolved here once: the training plan
(backend, kernels, flex probe) for ``training=True``, else the inference plan (SDPA with dense masks, what the
generation engine's KV cache and the teacher-forced evaluation read).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from transfusion.attention.plan import AttentionPlan, inference_plan, training_plan
from transfusion.config import Config, check_image_grid, from_dict, validate
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.model import TransfusionModel, build_model
from transfusion.pretrained.checkpoint import PretrainedCheckpoint, load_pretrained
from transfusion.pretrained.config import open_pretrained
from transfusion.pretrained.tokenizer import open_tokenizer
from transfusion.tokenizer import build_tokenizer


def patch_grid(cfg: Config, downsample: int) -> tuple[int, int]:
    return check_image_grid(cfg, downsample)


@dataclass
class RunComponents:
    model: TransfusionModel
    tokenizer: object
    schedule: NoiseSchedule
    codec: object
    patch_grid: tuple[int, int]
    cfg: Config
    attention: AttentionPlan
    pretrained: PretrainedCheckpoint | None = None  # the checkpoint the text weights came (or come) from


def build_components(cfg: Config, device: torch.device, *, model_device: torch.device | str | None = None,
                     training: bool = False, agree: Callable[[bool], bool] = lambda ok: ok,
                     pretrained: PretrainedCheckpoint | None = None) -> RunComponents:
    """``model_device`` = "meta" builds the model without allocating it (for sharded materialisation);
    ``training``: resolve the training attention plan for ``device`` (a flex probe's verdict agreed by every rank
    through ``agree``), else the inference plan. With ``model.pretrained`` set, ``cfg.model`` is filled from the
    checkpoint (``pretrained``, when the caller opened it already) and its weights are loaded here, unless the model
    is on meta: then the caller loads them once it is materialised (``load_pretrained(model, parts.pretrained)``), so
    every rank keeps only its shard."""
    from transfusion.latents.vae import build_codec

    pretrained = pretrained or open_pretrained(cfg)
    if pretrained is not None:  # data.tokenizer = "pretrained": the checkpoint's, new special ids after its rows
        tokenizer = open_tokenizer(pretrained.path, pretrained.vocab_rows)
    else:
        tokenizer = build_tokenizer(cfg.data.tokenizer)
    codec = build_codec(cfg.latents, device=device)
    grid = patch_grid(cfg, codec.downsample)
    with torch.device(model_device or device):
        model = build_model(cfg.model, tokenizer.vocab_size, codec.channels)
    attention = training_plan(cfg, device, agree=agree) if training else inference_plan(cfg.model)
    if pretrained is not None and str(model_device) != "meta":
        load_pretrained(model, pretrained)
    return RunComponents(model, tokenizer, NoiseSchedule(cfg.diffusion), codec, grid, cfg, attention, pretrained)


def build_inference_components(cfg_dict: dict, device: str | torch.device, base_dir: str | Path | None = None):
    """From an export's config dict: (model, tokenizer, schedule, codec, patch_grid, cfg, attention plan). A
    tokenizer path stored relative to the export directory is resolved against ``base_dir``."""
    cfg = from_dict(Config, cfg_dict)
    validate(cfg)
    if base_dir is not None and cfg.data.tokenizer != "bytes" and not os.path.isabs(cfg.data.tokenizer):
        cfg.data.tokenizer = str(Path(base_dir) / cfg.data.tokenizer)
    parts = build_components(cfg, torch.device(device))
    return parts.model, parts.tokenizer, parts.schedule, parts.codec, parts.patch_grid, cfg, parts.attention
