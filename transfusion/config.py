"""Typed configuration: dataclasses fed from TOML recipes with dotted CLI overrides.

Every section is a ``kw_only`` / ``slots`` dataclass; nesting mirrors the object tree. A recipe is a TOML file
whose tables are the sections below (``[run]``, ``[data]``, ``[model]`` ...). Unknown sections or keys are errors
that name the offending key, so a typo never silently falls back to a default.

    cfg = load_config("recipes/shapes_tiny.toml", ["--train.steps=10", "--model.dim=64"])
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A recipe or override that cannot be mapped onto the config dataclasses."""


@dataclass(kw_only=True, slots=True)
class RunConfig:
    dir: str = "runs/shapes_tiny"  # run directory: checkpoints/, export/, tb/, samples/, eval/
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if available else cpu), "cpu", "cuda", "cuda:1", ...


@dataclass(kw_only=True, slots=True)
class DataConfig:
    shards: str = "data/shapes/train-{000000..000007}.tar"  # paths, globs, brace lists, pipe: URLs; comma-separated
    eval_shards: str = "data/shapes/heldout-000000.tar"
    image_size: int = 32  # images are resized + center-cropped to image_size x image_size
    seq_len: int = 192  # tokens per packed row
    batch_rows: int = 16  # packed rows per micro-batch
    num_workers: int = 1  # DataLoader workers per rank
    shuffle_buffer: int = 256  # block size of the deterministic windowed shuffle (1 = no shuffle)
    repeat: bool = True  # cycle over epochs (training); False = one finite pass
    t2i_ratio: float = 0.8  # share of samples laid out caption -> image; the rest image -> caption
    caption_dropout: float = 0.1  # share of text->image samples whose caption is dropped (for CFG)
    caption_field: str = "txt"  # "txt", or "json:<field>" to read the caption from the json record
    max_text_tokens: int = 96  # longer captions are skipped (counted as "caption_too_long")
    tokenizer: str = "bytes"  # "bytes", or a local path to a Hugging Face tokenizer.json
    max_skip_rate: float = 0.5  # stop the run when more than this share of samples is skipped


@dataclass(kw_only=True, slots=True)
class LatentConfig:
    kind: str = "pixels"  # "pixels" (identity codec, values in [-1, 1]) or "vae" (diffusers AutoencoderKL)
    vae_path: str = ""  # local diffusers AutoencoderKL directory (config.json + weights) when kind = "vae"


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    mlp_hidden: int = 0  # 0 = 8/3 * dim rounded up to a multiple of 64 (Llama SwiGLU sizing)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    qk_norm: bool = True
    patch_size: int = 4  # patch side in pixels (or latent cells)
    time_freq_dim: int = 256  # sinusoidal features fed to the timestep MLP
    attention: str = "auto"  # "auto" (flex on CUDA, sdpa elsewhere), "flex", "sdpa"
    init_std: float = 0.02


@dataclass(kw_only=True, slots=True)
class DiffusionConfig:
    objective: str = "epsilon"  # what the image head predicts
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # diffusers name; squaredcos_cap_v2 is the cosine schedule
    clip_sample: bool = True  # clip x0 estimates to [-1, 1] while sampling (pixels); set False for latents


@dataclass(kw_only=True, slots=True)
class LossConfig:
    text_weight: float = 1.0
    image_weight: float = 1.0  # lambda in  L = L_text + lambda * L_diffusion
    text_reduction: str = "token"  # "token": mean over every text target in the batch
    image_reduction: str = "element"  # "element": mean over every target image element; "image": per image first


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    steps: int = 800
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    autocast: str = "bf16"  # "bf16" or "none"
    log_interval: int = 10
    sample_interval: int = 0  # 0 = only at the end
    num_threads: int = 0  # torch intra-op threads on CPU; 0 = torch default


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    interval: int = 200  # steps between checkpoints; 0 = only at the end
    keep: int = 2  # keep the newest k complete checkpoints


@dataclass(kw_only=True, slots=True)
class SampleConfig:
    sampler: str = "ddim"  # "ddim" or "ddpm"
    steps: int = 50
    guidance: float = 3.0
    seed: int = 0
    prompts: list[str] = field(default_factory=list)  # grid prompts; empty = held-out captions


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    num_t2i: int = 200
    num_caption: int = 200
    batch_size: int = 50
    max_caption_tokens: int = 48


@dataclass(kw_only=True, slots=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    latents: LatentConfig = field(default_factory=LatentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------------------------
# Mapping dicts <-> dataclasses


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"config section '{where}' must be a table, got {value!r}")
        return from_dict(typ, value, prefix=where)
    if origin is list:
        (item,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{where}' expects a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{where}' expects true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{where}' expects an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{where}' expects a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{where}' expects a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise ConfigError naming the full dotted key."""
    types = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in types:
            known = ", ".join(sorted(types))
            raise ConfigError(f"unknown config key '{where}' (known keys here: {known})")
        kwargs[key] = _coerce(value, types[key], where)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _parse_value(text: str) -> Any:
    """A CLI value is parsed as a TOML literal (numbers, booleans, lists, quoted strings), else taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--section.key=value`` (or ``section.key=value``) overrides onto a nested dict, in place."""
    for item in overrides:
        body = item[2:] if item.startswith("--") else item
        if "=" not in body:
            raise ConfigError(f"override '{item}' must look like --section.key=value")
        dotted, raw = body.split("=", 1)
        parts = dotted.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override '{item}' must name a section and a key, like --train.steps=100")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = _parse_value(raw)
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML recipe (or start from defaults when ``path`` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"recipe {p} is not valid TOML: {e}") from None
    apply_overrides(data, list(overrides or []))
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a dataclass type alone cannot express."""
    choices = {
        "latents.kind": (cfg.latents.kind, ("pixels", "vae")),
        "model.attention": (cfg.model.attention, ("auto", "flex", "sdpa")),
        "diffusion.objective": (cfg.diffusion.objective, ("epsilon",)),
        "loss.text_reduction": (cfg.loss.text_reduction, ("token",)),
        "loss.image_reduction": (cfg.loss.image_reduction, ("element", "image")),
        "train.autocast": (cfg.train.autocast, ("bf16", "none")),
        "sample.sampler": (cfg.sample.sampler, ("ddim", "ddpm")),
    }
    for key, (value, known) in choices.items():
        if value not in known:
            raise ConfigError(f"unknown value {value!r} for '{key}' (known: {', '.join(known)})")
    if cfg.model.dim % cfg.model.n_heads:
        raise ConfigError(f"model.dim ({cfg.model.dim}) must be divisible by model.n_heads ({cfg.model.n_heads})")
    if (cfg.model.dim // cfg.model.n_heads) % 2:
        raise ConfigError("model.dim / model.n_heads must be even for rotary embeddings")
    if cfg.latents.kind == "vae" and not cfg.latents.vae_path:
        raise ConfigError("latents.kind = 'vae' needs latents.vae_path (a local diffusers AutoencoderKL directory)")
    for key, value in (("data.t2i_ratio", cfg.data.t2i_ratio), ("data.caption_dropout", cfg.data.caption_dropout)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"'{key}' must lie in [0, 1], got {value}")


def dumps_toml(cfg: Config) -> str:
    """Serialise a config back to TOML (the resolved config saved in every run directory)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        raise TypeError(v)

    lines: list[str] = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {fmt(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)
