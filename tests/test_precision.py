"""Precision chosen by measurement, the measured matmul peak, and the share of it that the log reports."""

from __future__ import annotations

import math

import pytest
import torch

from transfusion.config import ModelConfig
import transfusion.precision as precision
from transfusion.precision import (
    BF16_MIN_SPEEDUP,
    PEAK_MAX_ROWS,
    PROBE_ROWS,
    measure_peak_flops,
    model_matmul_shapes,
    peak_over,
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


def fake_rates(gflops_by_side: dict[int, float], default: float):
    """rate(shape) in FLOP/s: squares by side, other shapes ``default``; records the shapes asked for."""
    tried = []

    def rate(shape):
        tried.append(shape)
        m, k, n = shape
        return 1e9 * (gflops_by_side.get(m, default) if m == k == n else default)

    return rate, tried


def test_peak_is_the_max_over_model_shapes_and_growing_squares():
    # the EPYC of the bug report: 123 GFLOP/s at 1024, 148 at 2048; the model's own shapes are slower still
    rate, tried = fake_rates({1024: 123.0, 2048: 148.0, 4096: 146.0}, default=60.0)
    model = [(256, 64, 192), (256, 64, 64)]
    peak = peak_over(model, (1024, 2048, 4096), rate, repeats=2, budget_s=10.0)
    assert tried[:2] == model and [s[0] for s in tried[2:]] == [1024, 2048, 4096]
    assert peak == 148e9 == max(map(rate, list(tried)))
    # share of peak is computed against it: a step at the 2048-square rate is 100 %, never more
    flops = flops_per_token(ModelConfig(dim=64, n_layers=2, n_heads=4), 262, 3, seq_len=128)
    w = Window()
    w.add(step_s=1.0, data_s=0.0, text_tokens=1000, image_tokens=0, metrics={"loss": 1.0})
    achieved = w.summary(flops, torch.device("cpu"))["tflops_per_s"] * 1e12
    assert w.summary(flops, torch.device("cpu"), measured_peak=peak)["peak_share"] == pytest.approx(achieved / 148e9)


def test_peak_tries_a_larger_square_only_within_the_time_budget():
    # software bf16 at 1 GFLOP/s: a 2048-square matmul would take 17 s a pass, so only 1024 is tried
    rate, tried = fake_rates({}, default=1.0)
    assert peak_over([], (1024, 2048, 4096), rate, repeats=2, budget_s=3.0) == 1e9
    assert tried == [(1024, 1024, 1024)]
    # 100 GFLOP/s: 2048 fits 3 s (3 passes x 0.17 s), 4096 does not (3 x 1.4 s)
    rate, tried = fake_rates({}, default=100.0)
    peak_over([], (4096, 1024, 2048), rate, repeats=2, budget_s=3.0)
    assert [s[0] for s in tried] == [1024, 2048]


def test_measure_peak_flops_uses_the_model_shapes_the_squares_and_the_thread_count(monkeypatch):
    calls = []

    def fake(device, dtype, shape, threads):
        calls.append((shape, threads))
        return 2e12 if shape == (4096, 4096, 4096) else 1e12  # fast enough for every square to be tried

    monkeypatch.setattr(precision, "_shape_flops", fake)
    assert measure_peak_flops("cpu", torch.float32, SHAPES) == 2e12
    shapes = [shape for shape, _ in calls]
    assert {(min(m, PEAK_MAX_ROWS), k, n) for m, k, n in SHAPES} <= set(shapes)
    assert {(n, n, n) for n in precision.PEAK_SQUARES} <= set(shapes)
    assert {t for _, t in calls} == {torch.get_num_threads()}
