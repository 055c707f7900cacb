"""The one place where a pretrained checkpoint becomes our model config.

When ``model.pretrained`` is set, the checkpoint decides the decoder's shape (width, depth, heads, norms, rotary
frequencies, biases, tied head) and the recipe decides the rest (image modules, attention kernel, init of the new
parts). A recipe key that contradicts the checkpoint (set to neither the dataclass default nor the checkpoint's
value) is an error rather than a silent override: the weights could not be loaded into that shape, and a silent
fill would hide a recipe written for another model.
"""

from __future__ import annotations

import math
from typing import Any

from transfusion.config import Config, ConfigError, ModelConfig, validate
from transfusion.pretrained.checkpoint import PretrainedCheckpoint, open_checkpoint


def open_pretrained(cfg: Config) -> PretrainedCheckpoint | None:
    """The checkpoint ``cfg.model.pretrained`` names, opened (config / metadata only) and with ``cfg.model`` filled
    from it; None when the run starts from scratch. Idempotent: a config filled once resolves again unchanged."""
    if not cfg.model.pretrained:
        if cfg.model.pretrained_layers:
            raise ConfigError("model.pretrained_layers needs model.pretrained")
        return None
    ckpt = open_checkpoint(cfg.model.pretrained)
    resolve_model_config(cfg, ckpt)
    return ckpt


def resolve_model_config(cfg: Config, ckpt: PretrainedCheckpoint) -> Config:
    """Fill ``cfg.model`` (in place) with the keys ``ckpt`` fixes; ConfigError names a contradicting recipe key."""
    if cfg.data.tokenizer != "pretrained":
        raise ConfigError(f"model.pretrained needs data.tokenizer = 'pretrained' (the checkpoint's own tokenizer), "
                          f"got {cfg.data.tokenizer!r}")
    defaults = ModelConfig()
    for key, value in ckpt.model.items():
        if key == "n_layers" and cfg.model.pretrained_layers:
            if cfg.model.pretrained_layers > value:
                raise ConfigError(f"model.pretrained_layers = {cfg.model.pretrained_layers} exceeds the checkpoint's "
                                  f"{value} layers ({ckpt.path})")
            value = cfg.model.pretrained_layers  # the first N layers only (load_pretrained skips the rest)
        if key == "rope_scaling":
            for sub, v in value.items():
                _fill(cfg.model.rope_scaling, defaults.rope_scaling, sub, v, f"model.rope_scaling.{sub}", ckpt)
        else:
            _fill(cfg.model, defaults, key, value, f"model.{key}", ckpt)
    window = ckpt.sliding_window
    if window is not None and cfg.data.seq_len > window:
        raise ConfigError(f"data.seq_len {cfg.data.seq_len} exceeds the checkpoint's sliding_window {window} "
                          f"({ckpt.path}): this decoder attends to the whole row, which equals the checkpoint's "
                          f"attention only for rows up to its window")
    validate(cfg)
    return cfg


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    return a == b


def _fill(section: object, defaults: object, key: str, value: Any, where: str, ckpt: PretrainedCheckpoint) -> None:
    current = getattr(section, key)
    if not _same(current, getattr(defaults, key)) and not _same(current, value):
        raise ConfigError(f"{where} = {current!r} in the recipe contradicts the checkpoint's {value!r} "
                          f"({ckpt.path}); leave it out to take the checkpoint's")
    setattr(section, key, value)
