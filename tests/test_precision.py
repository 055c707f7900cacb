"""Precision chosen by measurement, the measured matmul peak, and the share of it that the log reports."""

from __future__ import annotations

import math

import pytest
import torch

from transfusion.config import ModelConfig
from transfusion.precision import (
    BF16_MIN_SPEEDUP,
    PROBE_ROWS,
    measure_peak_flops,
    model_matmul_shapes,
    probe_shapes,
    resolve_precision,
    time_matmuls,
)
from transfusion.training.metrics import Window, flops_per_token

SHAPES = model_matmul_shapes(ModelConfig(), 262, 3, rows=3072)


def fake_probe(fp32_gflops: float, bf16_gflops: float):
    seen = []

    def probe(shapes):
        seen.append(shapes)
        return fp32_gflops * 1e9, bf16_gflops * 1e9

    return probe, seen


def test_auto_picks_fp32_on_a_cpu_whose_bf16_is_slower():
    probe, seen = fake_probe(98.0, 0.8)  # an AVX2-only CPU: bf16 matmuls emulated in software
    prec = resolve_precision("auto", "cpu", SHAPES, probe=probe)
    assert prec.name == "fp32" and prec.dtype == torch.float32
    assert prec.probe_gflops == {"fp32": 98.0, "bf16": 0.8} and "fp32" in prec.reason
    assert all(m <= PROBE_ROWS for m, _, _ in seen[0])  # the probe runs the model's shapes at a few rows


def test_auto_picks_bf16_on_a_cpu_whose_bf16_is_clearly_faster():
    probe, _ = fake_probe(150.0, 1300.0)  # AMX
    prec = resolve_precision("auto", "cpu", SHAPES, probe=probe)
    assert prec.name == "bf16" and prec.dtype == torch.bfloat16


def test_auto_needs_a_clear_margin_for_bf16():
    probe, _ = fake_probe(100.0, 100.0 * BF16_MIN_SPEEDUP * 0.95)
    assert resolve_precision("auto", "cpu", SHAPES, probe=probe).name == "fp32"


def test_auto_picks_bf16_on_cuda_with_support_and_never_probes():
    def no_probe(shapes):
        raise AssertionError("CUDA must not be probed")

    prec = resolve_precision("auto", torch.device("cuda"), SHAPES, probe=no_probe, cuda_bf16=lambda d: True)
    assert prec.name == "bf16"
    prec = resolve_precision("auto", torch.device("cuda"), SHAPES, probe=no_probe, cuda_bf16=lambda d: False)
    assert prec.name == "fp32"


@pytest.mark.parametrize("requested,expected", [("bf16", "bf16"), ("fp32", "fp32"), ("none", "fp32")])
def test_an_explicit_choice_is_kept(requested, expected):
    def no_probe(shapes):
        raise AssertionError("an explicit precision must not be probed")

    prec = resolve_precision(requested, "cpu", SHAPES, probe=no_probe)
    assert prec.name == expected


def test_autocast_context_follows_the_choice():
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    probe, _ = fake_probe(1.0, 10.0)
    with resolve_precision("auto", "cpu", SHAPES, probe=probe).autocast("cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with resolve_precision("fp32", "cpu", SHAPES).autocast("cpu"):
        assert (a @ b).dtype == torch.float32


def test_real_probe_and_peak_measure_this_machine():
    prec = resolve_precision("auto", "cpu", SHAPES)
    assert prec.name in ("fp32", "bf16")
    assert prec.probe_gflops["fp32"] > 0 and prec.probe_gflops["bf16"] > 0
    assert probe_shapes(SHAPES) == tuple(sorted({(PROBE_ROWS, k, n) for _, k, n in SHAPES}))
    peak = measure_peak_flops("cpu", torch.float32, SHAPES)
    one = time_matmuls([SHAPES[2]], torch.float32, torch.device("cpu"))
    assert math.isfinite(peak) and peak > 0 and one > 0


def test_window_reports_achieved_flops_as_a_share_of_the_measured_peak():
    flops = flops_per_token(ModelConfig(dim=64, n_layers=2, n_heads=4), 262, 3, seq_len=128)
    w = Window()
    w.add(step_s=2.0, data_s=0.5, text_tokens=300, image_tokens=700, metrics={"loss": 1.0})
    achieved = (300 * flops.text() + 700 * flops.image()) / 2.0
    out = w.summary(flops, torch.device("cpu"), measured_peak=4 * achieved)
    assert out["tflops_per_s"] == pytest.approx(achieved / 1e12)
    assert out["peak_share"] == pytest.approx(0.25)
    assert out["measured_peak_tflops"] == pytest.approx(4 * achieved / 1e12)
    assert "mfu" not in out  # CPU: no datasheet peak
