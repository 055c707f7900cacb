"""Compute precision chosen by measurement, and the machine's measured matmul peak.

    prec = resolve_precision("auto", device, model_matmul_shapes(cfg.model, vocab, channels, rows=3072))
    with prec.autocast(device): ...                       # bf16 autocast, or a no-op for fp32
    peak = measure_peak_flops(device, prec.dtype, shapes)  # FLOP/s: the denominator of the CPU "share of peak"

Why measure: a bf16 matmul is ~10x faster than fp32 on CPUs with AMX / AVX-512-BF16 and ~100x *slower* on CPUs
with only AVX2 (no native bf16: every product is converted in software). So on CPU, ``auto`` times the model's own
matmul shapes in both dtypes (well under a second) and picks bf16 only when it is clearly faster; on CUDA it picks
bf16 when the device supports it. ``bf16`` / ``fp32`` force a choice. The legacy value ``none`` means fp32.

Legend: M rows (tokens), K inner dim, N output dim.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass, field

import torch

from transfusion.config import PRECISIONS

BF16_MIN_SPEEDUP = 1.3  # auto picks bf16 on CPU only when its probe is at least this much faster than fp32
PROBE_ROWS = 256  # rows of the probe matmuls: small enough that even emulated bf16 (~1 GFLOP/s) stays well under 1 s

Shape = tuple[int, int, int]  # (M, K, N): [M, K] @ [K, N]


@dataclass(frozen=True)
class Precision:
    """The compute dtype of a run or an engine on one machine, and why it was chosen."""

    name: str  # "bf16" or "fp32": what runs
    requested: str  # "auto", "bf16" or "fp32"
    reason: str  # one line for the log
    probe_gflops: dict[str, float] = field(default_factory=dict)  # {"fp32": ..., "bf16": ...} when probed

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    def autocast(self, device: torch.device | str):
        """bf16 autocast on ``device``, or a no-op context for fp32."""
        if self.name == "bf16":
            return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def as_dict(self) -> dict:
        return {"precision": self.name, "requested": self.requested, "reason": self.reason,
                "probe_gflops": dict(self.probe_gflops)}


def model_matmul_shapes(model_cfg, vocab_size: int, image_channels: int, rows: int) -> list[Shape]:
    """The distinct weight matmuls of one transformer pass over ``rows`` tokens (qkv, out, SwiGLU in/out, LM head,
    patch in)."""
    from transfusion.model.transfusion import mlp_hidden_size

    d, h = model_cfg.dim, mlp_hidden_size(model_cfg)
    patch = image_channels * model_cfg.patch_size ** 2
    return [(rows, d, 3 * d), (rows, d, d), (rows, d, 2 * h), (rows, h, d), (rows, d, vocab_size), (rows, patch, d)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_matmuls(shapes: list[Shape], dtype: torch.dtype, device: torch.device, *, min_time_s: float = 0.02,
                 max_time_s: float = 0.25, min_repeats: int = 0, seed: int = 0) -> float:
    """Achieved FLOP/s of ``shapes`` run back to back in ``dtype``: one untimed warm-up pass (kernel selection,
    oneDNN primitive creation), then timed passes until ``min_repeats`` ran and ``min_time_s`` is spent, stopping
    early before a pass would end past ``max_time_s`` in all. The best pass counts (a peak, robust to other
    processes on a shared machine)."""
    gen = torch.Generator().manual_seed(seed)
    pairs = [(torch.randn(m, k, generator=gen).to(device, dtype), torch.randn(k, n, generator=gen).to(device, dtype))
             for m, k, n in shapes]
    flops = sum(2.0 * m * k * n for m, k, n in shapes)

    def one_pass() -> float:
        _sync(device)
        t0 = time.perf_counter()
        for a, b in pairs:
            a @ b
        _sync(device)
        return time.perf_counter() - t0

    start = time.perf_counter()
    best = one_pass()  # warm-up; counts only if nothing faster follows (a very slow dtype gets one pass)
    spent, repeats = 0.0, 0
    while (repeats < min_repeats or spent < min_time_s) and time.perf_counter() - start + best < max_time_s:
        dt = one_pass()
        best, spent, repeats = min(best, dt), spent + dt, repeats + 1
    return flops / max(best, 1e-9)


@functools.lru_cache(maxsize=32)
def _probe_cpu(shapes: tuple[Shape, ...]) -> tuple[float, float]:
    """(fp32, bf16) FLOP/s of the probe shapes on this CPU; cached per process (the answer is a machine fact)."""
    cpu = torch.device("cpu")
    return time_matmuls(list(shapes), torch.float32, cpu), time_matmuls(list(shapes), torch.bfloat16, cpu)


def probe_shapes(shapes: list[Shape]) -> tuple[Shape, ...]:
    """The probe's version of the model's shapes: the same K and N, ``PROBE_ROWS`` rows."""
    return tuple(sorted({(min(m, PROBE_ROWS), k, n) for m, k, n in shapes}))


def cuda_supports_bf16(device: torch.device) -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(requested: str, device: torch.device | str, shapes: list[Shape], *,
                      probe=None, cuda_bf16=None) -> Precision:
    """Decide the compute precision for ``device``. ``probe(shapes) -> (fp32_flops, bf16_flops)`` and
    ``cuda_bf16(device) -> bool`` default to real measurements; tests inject fakes."""
    device = torch.device(device)
    requested = "fp32" if requested == "none" else requested
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r} (known: {', '.join(PRECISIONS)})")
    if requested != "auto":
        return Precision(requested, requested, f"{requested} (set explicitly)")
    if device.type == "cuda":
        ok = (cuda_bf16 or cuda_supports_bf16)(device)
        return Precision("bf16" if ok else "fp32", "auto",
                         "bf16: the CUDA device supports it" if ok else "fp32: the CUDA device has no bf16 support")
    if device.type != "cpu":
        return Precision("fp32", "auto", f"fp32: no bf16 probe for device type {device.type!r}")
    fp32, bf16 = (probe or _probe_cpu)(probe_shapes(shapes))
    gflops = {"fp32": round(fp32 / 1e9, 2), "bf16": round(bf16 / 1e9, 2)}
    ratio = bf16 / max(fp32, 1e-9)
    name = "bf16" if ratio >= BF16_MIN_SPEEDUP else "fp32"
    why = (f"{name}: bf16 matmuls at the model's shapes run at {gflops['bf16']:.1f} GFLOP/s vs fp32 "
           f"{gflops['fp32']:.1f} GFLOP/s ({ratio:.2f}x; bf16 needs >= {BF16_MIN_SPEEDUP}x) on {cpu_summary()}")
    return Precision(name, "auto", why, gflops)


def agree_across_ranks(prec: Precision, device: torch.device) -> Precision:
    """Under a process group every rank must compute in the same dtype: bf16 only if every rank chose it."""
    from transfusion.distributed.env import all_ranks_true, is_distributed

    if not is_distributed() or prec.requested != "auto":
        return prec
    if all_ranks_true(prec.name == "bf16", device) or prec.name == "fp32":  # collective: every rank calls it
        return prec
    return Precision("fp32", "auto", prec.reason + "; fp32 because another rank measured bf16 slower",
                     prec.probe_gflops)


def choose_precision(requested: str, device: torch.device, shapes: list[Shape]) -> tuple[Precision, float]:
    """A run's precision on this machine (the same on every rank) and the device's measured matmul peak in it,
    the denominator of the logged ``peak_share``; both go to the log."""
    import logging

    prec = agree_across_ranks(resolve_precision(requested, device, shapes), device)
    peak = measure_peak_flops(device, prec.dtype, shapes)
    logging.getLogger("transfusion").info("precision: %s | measured %s matmul peak %.1f GFLOP/s", prec.reason,
                                          prec.name, peak / 1e9)
    return prec, peak


PEAK_MAX_ROWS = 2048  # rows of the peak's model-shaped matmuls (more adds time, not speed)
PEAK_SQUARES = (1024, 2048, 4096)  # square matmuls tried smallest first: a small one under-fills many cores
PEAK_REPEATS = 2  # timed passes per shape after its warm-up; the fastest pass counts
PEAK_SQUARE_BUDGET_S = 3.0  # a larger square is tried only if its passes are predicted to fit in this


def measure_peak_flops(device: torch.device | str, dtype: torch.dtype, shapes: list[Shape]) -> float:
    """The device's attainable matmul peak in ``dtype`` (FLOP/s) at the current thread count: the best of the
    model's own matmul shapes (at most ``PEAK_MAX_ROWS`` rows) and of square matmuls of growing size
    (``peak_over``), each warmed up and timed ``PEAK_REPEATS`` times. Why the large squares: on a many-core CPU a
    1024-square matmul leaves cores idle (an AVX-512 EPYC ran it at 123 GFLOP/s and a 2048-square one at 148 in fp32,
    so tools/bench_step.py showed 109 % of a "peak" probed at 1024). Cached per process, shape, dtype and thread
    count."""
    device, threads = torch.device(device), torch.get_num_threads()
    model = sorted({(min(m, PEAK_MAX_ROWS), k, n) for m, k, n in shapes})
    return peak_over(model, PEAK_SQUARES, lambda s: _shape_flops(str(device), dtype, s, threads))


def peak_over(shapes: list[Shape], squares: tuple[int, ...], rate, *, repeats: int = PEAK_REPEATS,
              budget_s: float = PEAK_SQUARE_BUDGET_S) -> float:
    """The largest ``rate(shape)`` (FLOP/s) over ``shapes`` and the squares: the smallest square always, each
    larger one while its warm-up and ``repeats`` passes are predicted (at the best rate so far) to fit
    ``budget_s``, so a slow dtype (software bf16 at ~1 GFLOP/s) never runs a 4096-square matmul."""
    best = max((rate(s) for s in shapes), default=0.0)
    for i, n in enumerate(sorted(squares)):
        if i and (1 + repeats) * 2.0 * n ** 3 / max(best, 1e-9) > budget_s:
            break
        best = max(best, rate((n, n, n)))
    return best


@functools.lru_cache(maxsize=128)
def _shape_flops(device: str, dtype: torch.dtype, shape: Shape, threads: int) -> float:
    """FLOP/s of one matmul shape (``threads``: part of the cache key, the rate depends on it)."""
    return time_matmuls([shape], dtype, torch.device(device), min_repeats=PEAK_REPEATS,
                        max_time_s=PEAK_SQUARE_BUDGET_S)


def cpu_features() -> dict:
    """The CPU facts that decide matmul speed: torch's kernel capability, the relevant ISA flags and the vendor
    ("GenuineIntel", "AuthenticAMD"; "" where /proc/cpuinfo has none)."""
    flags: set[str] = set()
    model = vendor = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("vendor_id") and not vendor:  # MKL / oneDNN pick code paths by vendor too
                    vendor = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    limits = {k: os.environ[k] for k in ISA_LIMITS if os.environ.get(k)}
    return {"capability": torch.backends.cpu.get_cpu_capability(), "model": model, "vendor": vendor,
            "flags": [f for f in wanted if f in flags], "isa_limits": limits, "threads": torch.get_num_threads()}


# Environment variables that hold torch's kernels, oneDNN and MKL to an older instruction set (how an AVX2-only CPU is
# emulated on a newer one: `make demo-avx2`). /proc/cpuinfo still lists the host's flags then, so they are reported.
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_summary() -> str:
    feats = cpu_features()
    flags = " ".join(feats["flags"]) or "flags unknown"
    limits = "".join(f", {k}={v}" for k, v in feats["isa_limits"].items())
    return f"CPU capability {feats['capability']} (host flags: {flags}{limits}), {feats['threads']} threads"
