"""Throughput accounting: model FLOPs per token from the config, achieved FLOP/s and its share of the device's measured
matmul peak (``transfusion.precision.measure_peak_flops``; the CPU analogue of MFU), MFU against datasheet peaks on
known GPUs, peak memory, and the per-log-interval window the trainer reports.

FLOPs are counted the way torchtitan counts them: 6 FLOPs per matmul parameter per token (2 forward, 4 backward)
plus attention scores and values over the packed row, ``12 x layers x dim x seq_len`` per token (full rows: neither
the causal half nor the document mask is discounted). Only useful tokens count (padding does not), so MFU is a lower
bound when rows are not full. Per token, with d = dim, h = MLP hidden, V = vocab, L = layers::

    dense      6 (L (d (H + 2G) Dh + H Dh d + 3 d h) + d V)   wqkv + wo, SwiGLU w13 + w2; the LM head on every position
    attention  12 L H Dh seq_len                            (= 4 d^2 and 12 L d seq_len with G = H, H Dh = d)
    image      6 (2 C p^2 d)                        linear patch in + out, image tokens only

The timestep MLP runs once per image, not per token, and is left out (it is < 0.1% at any useful size); non-linear
adapters (U-Net) and the MAR head are not counted either, so MFU stays a lower bound for them.

Mixture of transformers (``model.mot``) changes none of this: every token runs exactly one twin of each layer (text
tokens the text modules, image slots the image copies; ``layers.Route`` gathers the rows of each), so FLOPs per token
are those of the plain model although the layers hold twice the parameters. ``parameter_summary`` says both (the
trainer's ``model:`` line): all parameters, the MoT twins among them, the parameters active per token, the trainable
ones.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch

from transfusion.config import ModelConfig, head_dim, kv_heads

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, matched in order against torch.cuda.get_device_name().
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4e12),  # also GH200
    ("H100 PCIe", 756.0e12),
    ("H100 NVL", 835.0e12),
    ("H100", 989.4e12),  # SXM
    ("H800", 989.4e12),
    ("A100", 312.0e12),
    ("A800", 312.0e12),
    ("B200", 2250.0e12),
    ("L40S", 362.0e12),
)


@dataclass(frozen=True)
class FlopsPerToken:
    dense: float
    attention: float
    image_extra: float

    def text(self) -> float:
        return self.dense + self.attention

    def image(self) -> float:
        return self.dense + self.attention + self.image_extra

    def step(self, text_tokens: float, image_tokens: float) -> float:
        return text_tokens * self.text() + image_tokens * self.image()


def flops_per_token(cfg: ModelConfig, vocab_size: int, image_channels: int, seq_len: int) -> FlopsPerToken:
    from transfusion.model.transfusion import mlp_hidden_size

    d, n, h = cfg.dim, cfg.n_layers, mlp_hidden_size(cfg)
    q_width, kv_width = cfg.n_heads * head_dim(cfg), kv_heads(cfg) * head_dim(cfg)
    dense = 6 * (n * (d * (q_width + 2 * kv_width) + q_width * d + 3 * d * h) + d * vocab_size)
    attention = 12 * n * q_width * seq_len
    image_extra = 6 * 2 * image_channels * cfg.patch_size ** 2 * d
    return FlopsPerToken(float(dense), float(attention), float(image_extra))


def parameter_summary(model: torch.nn.Module) -> str:
    """"12.35M parameters (4.10M MoT image twins, 8.25M active per token), 4.50M trainable": global counts (a
    DTensor's numel is its full size), shared (tied) parameters once."""
    from transfusion.distributed.parallelize import clean_name
    from transfusion.model.transfusion import is_image_twin

    named = [(clean_name(n), p) for n, p in model.named_parameters()]
    total = sum(p.numel() for _, p in named)
    twins = sum(p.numel() for n, p in named if is_image_twin(n))
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    mot = f" ({twins / 1e6:.2f}M MoT image twins, {(total - twins) / 1e6:.2f}M active per token)" if twins else ""
    return f"{total / 1e6:.2f}M parameters{mot}, {trainable / 1e6:.2f}M trainable"


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of ``device`` (FLOP/s), or None (CPU, unknown GPU): then no MFU is reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: CUDA allocator peak on GPU, host peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


class Window:
    """Sums over the steps of one logging interval on this rank; ``reduce`` combines the ranks. Skipped steps (a
    non-finite loss or gradient norm: no update) count in ``bad_steps`` and in the throughput, not in the averages of
    the step metrics."""

    def __init__(self) -> None:
        self.steps, self.step_s, self.data_s = 0, 0.0, 0.0
        self.bad_steps = 0
        self.text_tokens, self.image_tokens = 0, 0
        self.sums: dict[str, float] = {}

    def add(self, *, step_s: float, data_s: float, text_tokens: int, image_tokens: int,
            metrics: dict[str, float], skipped: bool = False) -> None:
        self.steps += 1
        self.step_s += step_s
        self.data_s += data_s
        self.text_tokens += text_tokens
        self.image_tokens += image_tokens
        if skipped:
            self.bad_steps += 1
            return
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def summary(self, flops: FlopsPerToken, device: torch.device, measured_peak: float | None = None
                ) -> dict[str, float]:
        """Averages of the step metrics (already global) and per-device throughput averaged over ranks; with
        ``measured_peak`` (FLOP/s of this device's matmuls in the run's dtype) also ``peak_share``. Collective under a
        process group."""
        from transfusion.distributed.env import all_reduce_max, all_reduce_sum

        n = max(self.steps - self.bad_steps, 1)
        out = {k: v / n for k, v in self.sums.items()}
        out["bad_steps"] = float(self.bad_steps)
        t = torch.tensor([self.step_s, self.data_s, self.text_tokens, self.image_tokens], dtype=torch.float64,
                         device=device)
        step_s, data_s, text, image = all_reduce_sum(t).tolist()
        step_s = max(step_s, 1e-9)  # summed over ranks, like the token counts: ratios are per-device averages
        out["text_tokens_per_s"] = text / step_s
        out["image_tokens_per_s"] = image / step_s
        out["tokens_per_s"] = (text + image) / step_s
        out["data_wait_share"] = data_s / step_s
        achieved = flops.step(text, image) / step_s
        out["tflops_per_s"] = achieved / 1e12
        if measured_peak:
            out["measured_peak_tflops"] = measured_peak / 1e12
            out["peak_share"] = achieved / measured_peak
        peak = peak_flops(device)
        if peak is not None:
            out["mfu"] = flops.step(text, image) / step_s / peak
        mem = torch.tensor([peak_memory_bytes(device)], dtype=torch.float64, device=device)
        out["peak_memory_gib"] = all_reduce_max(mem).item() / 2**30
        return out
