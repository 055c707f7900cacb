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
    image_size: int = 32  # images are fitted to image_size x image_size by data.resize (pixels, before any VAE)
    seq_len: int = 192  # tokens per packed row
    batch_rows: int = 16  # packed rows per micro-batch
    num_workers: int = 1  # DataLoader workers per data consumer (per rank x train.grad_accum)
    shuffle_buffer: int = 256  # block size of the deterministic windowed shuffle (1 = no shuffle)
    repeat: bool = True  # cycle over epochs (training); False = one finite pass
    t2i_ratio: float = 0.8  # share of samples laid out caption -> image; the rest image -> caption
    caption_dropout: float = 0.1  # share of text->image samples whose caption is dropped (for CFG)
    caption_field: str = "txt"  # "txt", or "json:<field>" to read the caption from the json record
    max_text_tokens: int = 96  # longer captions are skipped (counted as "caption_too_long")
    tokenizer: str = "bytes"  # "bytes", or a local path to a Hugging Face tokenizer.json
    max_skip_rate: float = 0.5  # stop the run when more than this share of samples is skipped
    # -- formats, filters and document policies (data_pipelines/documents.py, samples.py) --
    format: str = "auto"  # "pixels" (decode images), "latents" (<key>.latent.npy/.safetensors), "auto" (peek)
    resize: str = "center_crop"  # "center_crop", "resize" (squash to a square) or "pad" (fit, pad with grey)
    min_image_size: int = 0  # images whose shorter side is below this many pixels are skipped ("image_too_small")
    max_caption_chars: int = 0  # longer captions are skipped ("caption_too_long"); 0 = no limit
    segments_field: str = "segments"  # json field listing an interleaved document's text and image segments
    long_documents: str = "truncate"  # interleaved documents longer than seq_len: "truncate" or "skip"
    image_then_text_role: str = "condition"  # role of an image with text after it: "condition" or "target"
    noise_limit: float = 0.5  # target images with text after them are noised at most this share of the schedule..
    noise_limit_share: float = 0.8  # ..in this share of documents (Transfusion: t <= 500/1000 in 80%)
    clean_copy: bool = False  # give later text a clean copy of such target images; the noisy copy is hidden


@dataclass(kw_only=True, slots=True)
class LatentConfig:
    kind: str = "pixels"  # "pixels" (identity codec, values in [-1, 1]) or "vae" (diffusers AutoencoderKL)
    vae_path: str = ""  # local diffusers AutoencoderKL directory (config.json + weights) when kind = "vae"


@dataclass(kw_only=True, slots=True)
class UNetConfig:
    """U-Net patch adapters (``model.adapter = "unet"``): one level per factor 2 from pixels to the patch grid."""

    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # widths, full resolution first; the
    # length must be log2(model.patch_size) + 1
    blocks: int = 1  # residual blocks per level, on each path
    groups: int = 8  # GroupNorm groups


@dataclass(kw_only=True, slots=True)
class MARConfig:
    """The MAR per-token diffusion head (``model.head = "mar"``) and its masked, random-order generation."""

    depth: int = 3  # residual adaLN MLP blocks of the per-token denoiser
    width: int = 256
    diffusion_batch_mul: int = 4  # each masked token is noised this many times per step (cheap extra samples)
    mask_ratio_min: float = 0.7  # training mask ratio ~ truncated N(1, 0.25) on [mask_ratio_min, 1]
    num_iter: int = 16  # generation: patches are revealed over this many steps (cosine schedule)
    temperature: float = 1.0  # generation: scale of the head's initial noise


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
    image_attention: str = "bidirectional"  # inside an image block: "bidirectional" or "causal" (raster order)
    image_pos_dim: int = 64  # 2D sin-cos features of each patch's grid position, mapped to dim by a learned
    # linear and added to the image tokens (RoPE alone gives only 1D offsets); 0 = none
    adapter: str = "linear"  # image <-> token adapters: "linear" patch projections or "unet" down/up blocks
    head: str = "transformer"  # image head: "transformer" (whole-image diffusion) or "mar" (per-token MLP head)
    unet: UNetConfig = field(default_factory=UNetConfig)
    mar: MARConfig = field(default_factory=MARConfig)


@dataclass(kw_only=True, slots=True)
class DiffusionConfig:
    objective: str = "epsilon"  # what the image head predicts: "epsilon", "v" (v-prediction), "flow" (velocity)
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # diffusers name; squaredcos_cap_v2 is the cosine schedule
    clip_sample: bool = True  # clip x0 estimates to [-1, 1] while sampling (pixels); set False for latents
    timestep_sampling: str = "uniform"  # flow: "uniform" or "logit_normal" noise levels while training
    logit_mean: float = 0.0  # logit-normal: sigma = sigmoid(N(logit_mean, logit_std))
    logit_std: float = 1.0
    shift: float = 1.0  # flow: resolution shift, sigma -> shift*sigma / (1 + (shift-1)*sigma), train and sample


@dataclass(kw_only=True, slots=True)
class LossConfig:
    text_weight: float = 1.0
    image_weight: float = 1.0  # lambda in  L = L_text + lambda * L_diffusion
    text_reduction: str = "token"  # "token": mean over every text target in the batch
    image_reduction: str = "element"  # "element": mean over every target image element; "image": per image first
    snr_gamma: float = 0.0  # min-SNR-gamma weighting of the diffusion loss (Hang et al. 2023; 5 is usual); 0 = off


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
    grad_accum: int = 1  # micro-batches per optimizer step on each rank; global batch = dp ranks x grad_accum
    trace_data: bool = False  # write the sample keys of every micro-batch to <run>/data_trace/rank_<r>.jsonl


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    interval: int = 200  # steps between checkpoints; 0 = only at the end
    keep: int = 2  # keep the newest k complete checkpoints
    async_save: bool = False  # stage to CPU, write in a background thread; training goes on meanwhile


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """Data parallelism under torchrun (FSDP2 / HSDP) and per-block compute options; see transfusion/distributed."""

    dp_replicate: int = 1  # HSDP: replica groups (e.g. nodes); 1 = plain FSDP over every rank
    dp_shard: int = -1  # ranks that shard one replica; -1 = world size / dp_replicate
    activation_checkpointing: str = "none"  # "none", "selective" (recompute all but matmuls/attention) or "full"
    compile: bool = False  # torch.compile each transformer block
    param_dtype: str = "auto"  # FSDP compute dtype of parameters: "auto" (bf16 on CUDA, fp32 on CPU), "bf16", "fp32"
    reduce_dtype: str = "fp32"  # gradient reduce-scatter / all-reduce dtype: "fp32" or "bf16"
    timeout_s: int = 600  # collective timeout: a rank stuck this long fails the job instead of hanging it


@dataclass(kw_only=True, slots=True)
class SampleConfig:
    sampler: str = "ddim"  # "ddim" or "ddpm" (epsilon, v); "euler" or "heun" (flow)
    steps: int = 50
    guidance: float = 3.0
    guidance_schedule: str = "constant"  # "constant", or "linear": the scale rises from 1 to `guidance`
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
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
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


# The samplers that fit each objective (the diffusion package builds them from the run's one schedule object).
SAMPLERS = {"epsilon": ("ddim", "ddpm"), "v": ("ddim", "ddpm"), "flow": ("euler", "heun")}
HEADS = ("transformer", "mar")
ADAPTERS = ("linear", "unet")


def validate(cfg: Config) -> None:
    """Cross-field checks that a dataclass type alone cannot express."""
    choices = {
        "latents.kind": (cfg.latents.kind, ("pixels", "vae")),
        "model.attention": (cfg.model.attention, ("auto", "flex", "sdpa")),
        "model.image_attention": (cfg.model.image_attention, ("bidirectional", "causal")),
        "model.adapter": (cfg.model.adapter, ADAPTERS),
        "model.head": (cfg.model.head, HEADS),
        "diffusion.objective": (cfg.diffusion.objective, tuple(SAMPLERS)),
        "diffusion.timestep_sampling": (cfg.diffusion.timestep_sampling, ("uniform", "logit_normal")),
        "loss.text_reduction": (cfg.loss.text_reduction, ("token",)),
        "loss.image_reduction": (cfg.loss.image_reduction, ("element", "image")),
        "train.autocast": (cfg.train.autocast, ("bf16", "none")),
        "parallel.activation_checkpointing": (cfg.parallel.activation_checkpointing, ("none", "selective", "full")),
        "parallel.param_dtype": (cfg.parallel.param_dtype, ("auto", "bf16", "fp32")),
        "parallel.reduce_dtype": (cfg.parallel.reduce_dtype, ("fp32", "bf16")),
        "sample.guidance_schedule": (cfg.sample.guidance_schedule, ("constant", "linear")),
    }
    for key, (value, known) in choices.items():
        if value not in known:
            raise ConfigError(f"unknown value {value!r} for '{key}' (known: {', '.join(known)})")
    known = SAMPLERS[cfg.diffusion.objective]
    if cfg.sample.sampler not in known:
        raise ConfigError(f"unknown value {cfg.sample.sampler!r} for 'sample.sampler' with diffusion.objective = "
                          f"{cfg.diffusion.objective!r} (known: {', '.join(known)})")
    _validate_image_model(cfg)
    par = cfg.parallel
    if min(cfg.train.grad_accum, par.dp_replicate, par.timeout_s) < 1 or not (par.dp_shard >= 1 or par.dp_shard == -1):
        raise ConfigError("train.grad_accum, parallel.dp_replicate and parallel.timeout_s must be >= 1, and "
                          "parallel.dp_shard >= 1 or -1 (the rest of the world)")
    if cfg.model.dim % cfg.model.n_heads:
        raise ConfigError(f"model.dim ({cfg.model.dim}) must be divisible by model.n_heads ({cfg.model.n_heads})")
    if (cfg.model.dim // cfg.model.n_heads) % 2:
        raise ConfigError("model.dim / model.n_heads must be even for rotary embeddings")
    if cfg.latents.kind == "vae" and not cfg.latents.vae_path:
        raise ConfigError("latents.kind = 'vae' needs latents.vae_path (a local diffusers AutoencoderKL directory)")
    for key, value in (("data.t2i_ratio", cfg.data.t2i_ratio), ("data.caption_dropout", cfg.data.caption_dropout),
                       ("data.noise_limit_share", cfg.data.noise_limit_share)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"'{key}' must lie in [0, 1], got {value}")
    _validate_data(cfg)


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    choices = {"data.format": (d.format, ("auto", "pixels", "latents")),
               "data.resize": (d.resize, ("center_crop", "resize", "pad")),
               "data.long_documents": (d.long_documents, ("truncate", "skip")),
               "data.image_then_text_role": (d.image_then_text_role, ("condition", "target"))}
    for key, (value, known) in choices.items():
        if value not in known:
            raise ConfigError(f"unknown value {value!r} for '{key}' (known: {', '.join(known)})")
    if not 0.0 < d.noise_limit <= 1.0:
        raise ConfigError(f"'data.noise_limit' must lie in (0, 1], got {d.noise_limit}")
    if min(d.min_image_size, d.max_caption_chars) < 0:
        raise ConfigError("data.min_image_size and data.max_caption_chars must be >= 0")


def _validate_image_model(cfg: Config) -> None:
    m, d = cfg.model, cfg.diffusion
    if d.shift <= 0 or d.logit_std <= 0:
        raise ConfigError("diffusion.shift and diffusion.logit_std must be positive")
    if m.adapter == "unet":
        levels = (m.patch_size - 1).bit_length() + 1  # log2(patch_size) + 1
        if m.patch_size & (m.patch_size - 1) or len(m.unet.channels) != levels:
            raise ConfigError(f"model.unet.channels needs log2(model.patch_size) + 1 = {levels} widths for "
                              f"patch_size {m.patch_size} (a power of two), got {m.unet.channels}")
        if m.unet.blocks < 1 or any(c <= 0 or c % m.unet.groups for c in m.unet.channels):
            raise ConfigError(f"model.unet.channels must be positive multiples of model.unet.groups "
                              f"({m.unet.groups}) and model.unet.blocks >= 1")
    if m.head == "mar":
        if m.adapter != "linear" or m.image_attention != "bidirectional":
            raise ConfigError("model.head = 'mar' needs model.adapter = 'linear' (a U-Net down path would leak "
                              "masked patches into their visible neighbours) and model.image_attention = "
                              "'bidirectional' (patches are revealed in random order)")
        if not 0.0 <= m.mar.mask_ratio_min <= 1.0:
            raise ConfigError(f"'model.mar.mask_ratio_min' must lie in [0, 1], got {m.mar.mask_ratio_min}")
        if min(m.mar.depth, m.mar.width, m.mar.diffusion_batch_mul, m.mar.num_iter) < 1 or m.mar.temperature <= 0:
            raise ConfigError("model.mar.depth, width, diffusion_batch_mul, num_iter and temperature must be positive")


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

    def table(name: str, values: dict[str, Any]) -> None:  # nested dataclasses become [section.sub] tables
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {fmt(v)}" for k, v in values.items() if not isinstance(v, dict))
        lines.append("")
        for k, v in values.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)

    for section, values in to_dict(cfg).items():
        table(section, values)
    return "\n".join(lines)
