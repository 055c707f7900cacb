"""Typed configuration: dataclasses fed from TOML recipes with dotted CLI overrides.

Every section is a ``kw_only`` / ``slots`` dataclass; nesting mirrors the object tree. A recipe is a TOML file
whose tables are the sections below (``[run]``, ``[data]``, ``[model]`` ...). Unknown sections or keys are errors
that name the offending key, so a typo never silently falls back to a default.

    cfg = load_config("recipes/shapes_tiny.toml", ["--train.steps=10", "--model.dim=64"])
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal


class ConfigError(ValueError):
    """A recipe or override that cannot be mapped onto the config dataclasses."""


@dataclass(frozen=True)
class Range:
    """The allowed numeric values of a config key: ``lo`` <= v <= ``hi`` (strict with ``*_open``), or one of
    ``also`` (e.g. -1 = "the rest of the world"). Used as ``Annotated[int, Range(1)]`` on the field itself."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple = ()

    def check(self, value: float) -> bool:
        if value in self.also:
            return True
        if value != value or value in (float("inf"), float("-inf")):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def describe(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        text = " and ".join(parts) or "finite"
        return text + "".join(f" (or {a:g})" for a in self.also)


# Value types used by the sections below: every numeric key carries its range, every choice key its values.
Positive = Annotated[int, Range(1)]  # >= 1
Count = Annotated[int, Range(0)]  # >= 0
Share = Annotated[float, Range(0.0, 1.0)]  # [0, 1]
PosFloat = Annotated[float, Range(0.0, lo_open=True)]  # > 0
NonNegFloat = Annotated[float, Range(0.0)]  # >= 0
AnyFloat = Annotated[float, Range()]  # any finite number
Beta = Annotated[float, Range(0.0, 1.0, hi_open=True)]  # [0, 1)
PrecisionName = Literal["auto", "bf16", "fp32", "none"]  # "none" = fp32 (older exports)
PRECISIONS = ("auto", "bf16", "fp32")  # what the tools' --precision offers (transfusion/precision.py decides)
PreemptSignal = Literal["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT"]  # train.preempt_signals
FreezeGroup = Literal["text"]  # train.freeze


@dataclass(kw_only=True, slots=True)
class RunConfig:
    dir: str = "runs/shapes_tiny"  # run directory: checkpoints/, export/, tb/, samples/, eval/
    seed: Count = 0
    device: str = "auto"  # "auto" (cuda if available else cpu), "cpu", "cuda", "cuda:1", ...


@dataclass(kw_only=True, slots=True)
class DataConfig:
    shards: str = "data/shapes/train-{000000..000007}.tar"  # paths, globs, brace lists, pipe: URLs; comma-separated
    eval_shards: str = "data/shapes/heldout-000000.tar"
    image_size: Positive = 32  # images are fitted to image_size x image_size by data.resize (pixels, before any VAE)
    seq_len: Positive = 192  # tokens per packed row; at least one shortest document (checked at load)
    batch_rows: Positive = 16  # packed rows per micro-batch
    packing: Literal["first_fit", "sequential"] = "first_fit"  # a document goes into the first row with room
    # ("first_fit"), or only into the last row ("sequential", the packer before 2026-12-04); data_pipelines/packing.py
    num_workers: Count = 1  # DataLoader workers per data consumer (per rank x train.grad_accum)
    shuffle_buffer: Positive = 256  # block size of the deterministic windowed shuffle (1 = no shuffle)
    repeat: bool = True  # cycle over epochs (training); False = one finite pass
    t2i_ratio: Share = 0.8  # share of samples laid out caption -> image; the rest image -> caption
    caption_dropout: Share = 0.1  # share of text->image samples whose caption is dropped (for CFG)
    caption_field: str = "txt"  # a text member's extension ("txt"), or "json:<field>" to read the json record
    max_text_tokens: Positive = 96  # longer captions are skipped (counted as "caption_too_long")
    tokenizer: str = "bytes"  # "bytes", or a local path to a Hugging Face tokenizer.json
    max_skip_rate: Share = 0.5  # stop the run when more than this share of samples is skipped
    shard_retries: Count = 3  # a shard whose source fails mid-read (pipe: exit, EIO, cut short) is reopened this many
    # times, resuming after the samples already read; then it is skipped and counted (data_pipelines/shards.py)
    shard_retry_backoff_s: NonNegFloat = 1.0  # wait before the first reopen; doubled for each further one
    # -- formats, filters and document policies (data_pipelines/documents.py, samples.py) --
    format: Literal["auto", "pixels", "latents"] = "auto"  # "pixels" (decode images), "latents"
    # (<key>.latent.npy/.safetensors), "auto" (peek)
    resize: Literal["center_crop", "resize", "pad"] = "center_crop"  # "resize" squashes to a square, "pad" fits
    # and pads with grey
    min_image_size: Count = 0  # images whose shorter side is below this many pixels are skipped ("image_too_small")
    max_caption_chars: Count = 0  # longer captions are skipped ("caption_too_long"); 0 = no limit
    segments_field: str = "segments"  # json field listing an interleaved document's text and image segments
    long_documents: Literal["truncate", "skip"] = "truncate"  # interleaved documents longer than seq_len
    image_then_text_role: Literal["condition", "target"] = "condition"  # role of an image with text after it
    noise_limit: Annotated[float, Range(0.0, 1.0, lo_open=True)] = 0.5  # target images with text after them are
    # noised at most this share of the schedule..
    noise_limit_share: Share = 0.8  # ..in this share of documents (Transfusion: t <= 500/1000 in 80%)
    clean_copy: bool = False  # give later text a clean copy of such target images; the noisy copy is hidden
    #   (and is not noise-limited: the later text reads the clean copy)


@dataclass(kw_only=True, slots=True)
class LatentConfig:
    kind: Literal["pixels", "vae"] = "pixels"  # "pixels" (identity codec, values in [-1, 1]) or "vae" (diffusers
    # AutoencoderKL)
    vae_path: str = ""  # local diffusers AutoencoderKL directory (config.json + weights) when kind = "vae"


@dataclass(kw_only=True, slots=True)
class UNetConfig:
    """U-Net patch adapters (``model.adapter = "unet"``): one level per factor 2 from pixels to the patch grid."""

    channels: list[Positive] = field(default_factory=lambda: [32, 64, 128])  # widths, full resolution first; the
    # length must be log2(model.patch_size) + 1
    blocks: Positive = 1  # residual blocks per level, on each path
    groups: Positive = 8  # GroupNorm groups


@dataclass(kw_only=True, slots=True)
class MARConfig:
    """The MAR per-token diffusion head (``model.head = "mar"``) and its masked, random-order generation."""

    depth: Positive = 3  # residual adaLN MLP blocks of the per-token denoiser
    width: Positive = 256
    diffusion_batch_mul: Positive = 4  # each masked token is noised this many times per step (cheap extra samples)
    mask_ratio_min: Share = 0.7  # training mask ratio ~ truncated N(1, 0.25) on [mask_ratio_min, 1]
    mask_ratio_per: Literal["image", "batch"] = "image"  # one ratio per image, or one per batch (the reference)
    num_iter: Positive = 16  # generation: patches are revealed over this many steps (cosine schedule)
    sampler: Literal["auto", "ddpm", "ddim", "euler", "heun"] = "auto"  # the denoiser's sampler; "auto": ddpm
    #   (epsilon, v) or euler (flow), the reference's choice (sample.sampler is the whole-image head's)
    clip_denoised: bool = False  # ddpm: clip the x0 estimate to [-1, 1] (the reference does not)
    temperature: PosFloat = 1.0  # generation: scale of the noise each ddpm step adds (of the initial noise for
    #   deterministic samplers)


@dataclass(kw_only=True, slots=True)
class RopeScalingConfig:
    """Rotary frequencies stretched for long contexts, as pretrained checkpoints declare them (``rope_scaling`` in a
    Hugging Face config). ``none``: plain RoPE; ``linear``: every frequency divided by ``factor`` (position
    interpolation); ``llama3``: Llama 3.1's band-wise rule (low frequencies / factor, high ones kept, a smooth ramp
    between, with bands set by ``original_max_positions`` / ``low_freq_factor`` and / ``high_freq_factor``)."""

    kind: Literal["none", "linear", "llama3"] = "none"
    factor: PosFloat = 1.0
    low_freq_factor: PosFloat = 1.0
    high_freq_factor: PosFloat = 4.0
    original_max_positions: Positive = 8192


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    pretrained: str = ""  # a local Hugging Face model directory or .gguf file to start from ("" = from scratch): it
    # fixes the decoder's shape keys below (a recipe value contradicting it is an error) and its weights are loaded
    # into the text modules; needs data.tokenizer = "pretrained" (transfusion/pretrained/)
    pretrained_layers: Count = 0  # keep only the checkpoint's first N decoder layers (0 = all): a cheaper start on
    # small machines, at a cost measured in docs/pretrained.md (the final norm and LM head are still the checkpoint's)
    dim: Positive = 256  # divisible by n_heads, with an even head dim (rotary embeddings)
    n_layers: Positive = 6
    n_heads: Positive = 8
    n_kv_heads: Count = 0  # key/value heads (grouped-query attention; n_heads must be a multiple); 0 = n_heads
    head_dim: Count = 0  # per-head width; 0 = dim / n_heads (Qwen3 sets it apart from dim)
    mlp_hidden: Count = 0  # 0 = 8/3 * dim rounded up to a multiple of 64 (Llama SwiGLU sizing)
    norm_eps: PosFloat = 1e-5
    rope_theta: PosFloat = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    qk_norm: bool = True
    qkv_bias: bool = False  # biases on the query / key / value projections (Qwen2)
    tie_embeddings: bool = False  # the LM head reuses the token embedding matrix
    mot: bool = False  # mixture of transformers (BAGEL, LMFusion): image slots get their own copy of every layer's
    # norms, QKV (q/k norms, bias), output projection and MLP, initialised from the text weights; one shared
    # attention over the whole sequence. FLOPs per token unchanged, layer parameters doubled (model/layers.py Block)
    patch_size: Positive = 4  # patch side in pixels (or latent cells)
    time_freq_dim: Annotated[int, Range(2)] = 256  # sinusoidal features fed to the timestep MLP
    attention: Literal["auto", "flex", "sdpa", "split"] = "auto"  # "auto": on CUDA the varlen split when a fast
    # kernel is installed (and no clean copies), else flex; sdpa elsewhere (transfusion/attention/backends.py)
    split_kernel: Literal["auto", "flash_attn", "torch_varlen", "xformers", "sdpa"] = "auto"  # the split's kernel
    flex_kernel: Literal["auto", "triton", "flash"] = "auto"  # flex's kernel: "auto" = FlexAttention's Flash backend
    # (flash-attention 4) on sm90+ when flash_attn.cute is installed and its probe passes, else Triton (flex.py)
    flex_options: dict[str, int | bool | str] = field(default_factory=dict)  # flex_attention kernel_options, e.g.
    # [model.flex_options] fwd_BLOCK_M = 128 (names: FlexKernelOptions); over the measured / default table
    init_std: PosFloat = 0.02
    image_attention: Literal["bidirectional", "causal"] = "bidirectional"  # inside an image block (causal: raster)
    image_pos_dim: Count = 64  # 2D sin-cos features of each patch's grid position, mapped to dim by a learned
    # linear and added to the image tokens (RoPE alone gives only 1D offsets); 0 = none
    adapter: Literal["linear", "unet"] = "linear"  # image <-> token adapters: patch projections or U-Net blocks
    head: Literal["transformer", "mar"] = "transformer"  # image head: whole-image diffusion or MAR per-token MLP
    unet: UNetConfig = field(default_factory=UNetConfig)
    mar: MARConfig = field(default_factory=MARConfig)


@dataclass(kw_only=True, slots=True)
class DiffusionConfig:
    objective: Literal["epsilon", "v", "flow"] = "epsilon"  # what the image head predicts: noise, v-prediction, or
    # the rectified-flow velocity
    num_train_timesteps: Annotated[int, Range(2)] = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"  # diffusers name;
    # squaredcos_cap_v2 is the cosine schedule (epsilon / v)
    clip_sample: bool = True  # clip x0 estimates to [-1, 1] while sampling (pixels); set False for latents
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"  # flow: noise levels drawn while training
    logit_mean: AnyFloat = 0.0  # logit-normal: sigma = sigmoid(N(logit_mean, logit_std))
    logit_std: PosFloat = 1.0
    shift: PosFloat = 1.0  # flow: resolution shift, sigma -> shift*sigma / (1 + (shift-1)*sigma), train and sample


@dataclass(kw_only=True, slots=True)
class LossConfig:
    text_weight: NonNegFloat = 1.0
    image_weight: NonNegFloat = 1.0  # lambda in  L = L_text + lambda * L_diffusion
    text_reduction: Literal["token"] = "token"  # "token": mean over every text target in the batch
    image_reduction: Literal["element", "image"] = "element"  # "element": mean over every target image element;
    # "image": per image first
    snr_gamma: NonNegFloat = 0.0  # min-SNR-gamma weighting of the diffusion loss (Hang et al. 2023; 5 is usual);
    # 0 = off


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    steps: Positive = 800
    lr: PosFloat = 1e-3
    warmup_steps: Count = 50
    min_lr_ratio: Share = 0.05  # cosine decays to lr * min_lr_ratio
    weight_decay: NonNegFloat = 0.05
    beta1: Beta = 0.9
    beta2: Beta = 0.95
    grad_clip: NonNegFloat = 1.0  # 0 = no clipping
    ema_decay: Share = 0.995
    autocast: PrecisionName = "auto"  # compute precision: "auto" (bf16 on CUDA; on CPU bf16 only where a short probe
    # of the model's matmuls shows it faster than fp32, see transfusion/precision.py), "bf16", "fp32"
    log_interval: Positive = 10
    max_minutes: NonNegFloat = 0.0  # wall-clock budget of this process's loop, checked every log_interval steps: when
    # spent, training ends there as if train.steps were reached (checkpoint, samples, export); 0 = none. The LR
    # schedule still runs over train.steps, so size steps to the budget (tools/bench_step.py) and keep this as a cap.
    sample_interval: Count = 0  # 0 = only at the end
    num_threads: Count = 0  # torch intra-op threads on CPU; 0 = torch default
    grad_accum: Positive = 1  # micro-batches per optimizer step on each rank; global batch = dp ranks x grad_accum
    trace_data: bool = False  # write the sample keys of every micro-batch to <run>/data_trace/rank_<r>.jsonl
    # Signals that stop the run cleanly: every rank finishes its step, one checkpoint is saved, the process exits with
    # code 75 and --resume continues exactly (docs/reliability.md); [] = the signals' default actions
    preempt_signals: list[PreemptSignal] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])
    # A step whose loss or gradient norm is not finite (on any rank) is skipped: no update of the weights, optimizer,
    # EMA or LR schedule; its batch is consumed. More than this many in a row stop the run (exit 3); 0 = the first
    max_bad_steps: Count = 8
    # Parameter groups that receive no update and hold no optimizer state: ["text"] = the token embedding, LM head,
    # final norm and every layer's text twin (the whole pretrained LM, LMFusion's recipe; the new BOI / EOI / IMAGE
    # rows live in tok_emb / lm_head and stay frozen with them). Without model.mot that is the whole trunk: only the
    # image adapters, image norm and head train (allowed, with a warning). transfusion/training/freeze.py
    freeze: list[FreezeGroup] = field(default_factory=list)


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    interval: Count = 200  # steps between checkpoints; 0 = only at the end
    keep: Positive = 2  # keep the newest k complete checkpoints
    async_save: bool = False  # stage to CPU, write in a background thread; training goes on meanwhile
    # a save that fails (disk full, EIO): "stop" the run with one line (exit 2), or warn and "continue" to the next
    # interval's save; the final save stops the run on failure either way (docs/reliability.md)
    on_save_error: Literal["stop", "continue"] = "stop"


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """Data parallelism under torchrun (FSDP2 / HSDP) and per-block compute options; see transfusion/distributed."""

    dp_replicate: Positive = 1  # HSDP: replica groups (e.g. nodes); 1 = plain FSDP over every rank
    dp_shard: Annotated[int, Range(1, also=(-1,))] = -1  # ranks that shard one replica; -1 = world / dp_replicate
    activation_checkpointing: Literal["none", "selective", "full"] = "none"  # "selective" recomputes all but
    # matmuls/attention
    compile: bool = False  # torch.compile each transformer block
    param_dtype: Literal["auto", "bf16", "fp32"] = "auto"  # FSDP compute dtype of parameters: "auto" (bf16 on CUDA,
    # fp32 on CPU)
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # gradient reduce-scatter / all-reduce dtype
    timeout_s: Positive = 600  # collective timeout: a rank stuck this long fails the job instead of hanging it


@dataclass(kw_only=True, slots=True)
class SampleConfig:
    sampler: Literal["ddim", "ddpm", "euler", "heun"] = "ddim"  # ddim / ddpm (epsilon, v); euler / heun (flow)
    steps: Positive = 50
    guidance: NonNegFloat = 3.0  # classifier-free guidance scale: 1 = off, 0 = unconditional
    # "linear": the scale rises from 1 to `guidance`; "interval": `guidance` at middle noise levels only
    # (schedule.guidance_sigmas: EDM2's window, scaled to the data std below; MAR: a share of its loop)
    guidance_schedule: Literal["constant", "linear", "interval"] = "constant"
    # std of the data the model denoises, which the "interval" window is measured in: 0 = the codec's (1.0 for VAE
    # latents, normalised to unit std; 0.5 for pixels in [-1, 1], EDM's sigma_data); 0.5 = EDM2's window unscaled
    guidance_data_std: NonNegFloat = 0.0
    seed: Count = 0
    prompts: list[str] = field(default_factory=list)  # grid prompts; empty = held-out captions


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    num_t2i: Count = 200
    num_caption: Count = 200
    batch_size: Positive = 50
    max_caption_tokens: Positive = 48
    caption_guidance: NonNegFloat = 1.0  # captions: weight of the image against the text prior (1 = plain greedy)
    num_fid: Count = 0  # compositional world: generated images for FID / KID (0 = skip); the floor needs 2x held out


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
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is Annotated:
        base, *rules = typing.get_args(typ)
        value = _coerce(value, base, where)
        for rule in rules:
            if isinstance(rule, Range) and not rule.check(value):
                raise ConfigError(f"config key '{where}' must be {rule.describe()}, got {value!r}")
        return value
    if origin is Literal:
        known = typing.get_args(typ)
        if value not in known:
            raise ConfigError(f"unknown value {value!r} for '{where}' (known: {', '.join(map(str, known))})")
        return value
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"config section '{where}' must be a table, got {value!r}")
        return from_dict(typ, value, prefix=where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' expects a table, got {value!r}")
        bad = [k for k, v in value.items() if isinstance(v, (dict, list, float))]
        if bad:
            raise ConfigError(f"config key '{where}.{bad[0]}' expects an integer, true/false or a string")
        return dict(value)
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


def validate(cfg: Config) -> None:
    """Cross-field checks that a field's own type and range cannot express (those are checked by ``from_dict``)."""
    known = SAMPLERS[cfg.diffusion.objective]
    if cfg.sample.sampler not in known:
        raise ConfigError(f"unknown value {cfg.sample.sampler!r} for 'sample.sampler' with diffusion.objective = "
                          f"{cfg.diffusion.objective!r} (known: {', '.join(known)})")
    _validate_image_model(cfg)
    _validate_heads(cfg.model)
    if cfg.model.flex_options:  # names checked against this torch build's FlexKernelOptions (lazy torch import)
        names = flex_kernel_option_names()
        unknown = sorted(k for k in cfg.model.flex_options if names and k not in names)
        if unknown:
            raise ConfigError(f"unknown model.flex_options key(s) {', '.join(unknown)} for this torch build (see "
                              f"torch.nn.attention.flex_attention.FlexKernelOptions; fwd_ / bwd_ prefixes allowed)")
        if "BACKEND" in cfg.model.flex_options:
            raise ConfigError("model.flex_options.BACKEND: choose flex's kernel with model.flex_kernel")
    if cfg.latents.kind == "vae" and not cfg.latents.vae_path:
        raise ConfigError("latents.kind = 'vae' needs latents.vae_path (a local diffusers AutoencoderKL directory)")
    if not _DEVICE.fullmatch(cfg.run.device):
        raise ConfigError(f"run.device must be auto, cpu, cuda, cuda:N or mps, got {cfg.run.device!r}")
    if cfg.data.caption_field in ("", "json:"):
        raise ConfigError(f"data.caption_field must be a text extension like 'txt' or 'json:<field>', got "
                          f"{cfg.data.caption_field!r}")
    if bool(cfg.model.pretrained) != (cfg.data.tokenizer == "pretrained"):
        raise ConfigError("model.pretrained and data.tokenizer = 'pretrained' go together: the checkpoint's weights "
                          "need its own tokenizer, which only a checkpoint provides")
    if cfg.latents.kind == "pixels":  # the codec's downsample is known without loading anything: check the grid now
        check_image_grid(cfg, downsample=1)


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def _validate_heads(m: ModelConfig) -> None:
    if not m.head_dim and m.dim % m.n_heads:
        raise ConfigError(f"model.dim ({m.dim}) must be divisible by model.n_heads ({m.n_heads}) unless "
                          f"model.head_dim is set")
    if head_dim(m) % 2:
        raise ConfigError("the head dim (model.head_dim, or model.dim / model.n_heads) must be even for rotary "
                          "embeddings")
    if m.n_heads % kv_heads(m):
        raise ConfigError(f"model.n_heads ({m.n_heads}) must be a multiple of model.n_kv_heads ({m.n_kv_heads})")


def head_dim(m: ModelConfig) -> int:
    """The per-head width: ``model.head_dim``, or dim / n_heads when it is 0."""
    return m.head_dim or m.dim // m.n_heads


def kv_heads(m: ModelConfig) -> int:
    """The key/value head count: ``model.n_kv_heads``, or n_heads (plain multi-head attention) when it is 0."""
    return m.n_kv_heads or m.n_heads


def flex_kernel_option_names() -> set[str]:
    """The FlexAttention kernel options this torch build documents (FlexKernelOptions), with their fwd_ / bwd_ forms;
    empty on torch < 2.8, which has no TypedDict for them (then nothing is checked). Torch is imported lazily, so
    reading a config never needs it."""
    try:
        from torch.nn.attention.flex_attention import FlexKernelOptions
    except ImportError:
        return set()
    names = set(FlexKernelOptions.__annotations__)
    return names | {f"{p}_{n}" for n in names for p in ("fwd", "bwd")}


def check_image_grid(cfg: Config, downsample: int) -> tuple[int, int]:
    """The patch grid of ``cfg``'s images under a codec that downsamples by ``downsample``; raises ConfigError when
    the image size does not divide into patches or the row cannot hold the shortest document. Called at load for
    pixels and again once a VAE's downsample is known (``components.patch_grid``)."""
    d = cfg.data
    side = d.image_size // downsample
    if d.image_size % downsample or side % cfg.model.patch_size or side == 0:
        raise ConfigError(f"data.image_size {d.image_size} is not divisible by codec downsample {downsample} x "
                          f"model.patch_size {cfg.model.patch_size}")
    grid = (side // cfg.model.patch_size, side // cfg.model.patch_size)
    shortest = grid[0] * grid[1] + 5  # BOS, one caption token, BOI, the image slots, EOI, EOS
    if d.clean_copy:
        shortest += grid[0] * grid[1] + 1  # a noisy copy before the clean one: BOI, its slots
    if d.seq_len < shortest:
        raise ConfigError(f"data.seq_len {d.seq_len} cannot hold one document: a {grid[0]}x{grid[1]} patch image "
                          f"with a one-token caption needs {shortest} tokens")
    return grid


def _validate_image_model(cfg: Config) -> None:
    m = cfg.model
    if m.adapter == "unet":
        levels = (m.patch_size - 1).bit_length() + 1  # log2(patch_size) + 1
        if m.patch_size & (m.patch_size - 1) or len(m.unet.channels) != levels:
            raise ConfigError(f"model.unet.channels needs log2(model.patch_size) + 1 = {levels} widths for "
                              f"patch_size {m.patch_size} (a power of two), got {m.unet.channels}")
        if any(c % m.unet.groups for c in m.unet.channels):
            raise ConfigError(f"model.unet.channels must be multiples of model.unet.groups ({m.unet.groups})")
    if m.head == "mar" and (m.adapter != "linear" or m.image_attention != "bidirectional"):
        raise ConfigError("model.head = 'mar' needs model.adapter = 'linear' (a U-Net down path would leak "
                          "masked patches into their visible neighbours) and model.image_attention = "
                          "'bidirectional' (patches are revealed in random order)")
    objective = cfg.diffusion.objective
    if m.head == "mar" and m.mar.sampler != "auto" and m.mar.sampler not in SAMPLERS.get(objective, ()):
        raise ConfigError(f"model.mar.sampler = {m.mar.sampler!r} does not fit diffusion.objective = "
                          f"{objective!r} (known: auto, {', '.join(SAMPLERS.get(objective, ()))})")


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
