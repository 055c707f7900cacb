"""Time a recipe's optimisation step on this machine: s/step, tokens/s, achieved model GFLOP/s and its share of the
device's measured matmul peak (the CPU analogue of MFU), in the precision the trainer would choose here.

    python tools/bench_step.py recipes/shapes_tiny.toml
    python tools/bench_step.py recipes/shapes_tiny.toml --precision fp32 --steps 20 --parallel.compile=true
    python tools/bench_step.py recipes/shapes_tiny.toml --data.batch_rows=8 --model.dim=128
    python tools/bench_step.py recipes/shapes_tiny.toml --profile 15       # + the top ops by self time

Any recipe key can be overridden with --section.key=value. The run's files go to a temporary directory (nothing is
checkpointed or exported). Data loading is timed apart: s/step is the optimisation step alone. The table names the CPU
features it was measured on; compare machines and settings with it, not with a timed test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from transfusion.cli import fail_cleanly


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    from transfusion.config import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="TOML recipe, e.g. recipes/shapes_tiny.toml")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3; compilation happens here)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="override train.autocast (default: the recipe's, normally auto)")
    p.add_argument("--markdown", action="store_true", help="print the result as a markdown table row with header")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile the timed steps (torch.profiler) and print the top N ops by self time (the "
                        "timings then include the profiler's overhead)")
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if not r.startswith("--") or "=" not in r]
    if bad:
        p.error(f"unrecognised arguments {bad}; overrides look like --section.key=value")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args, rest


@fail_cleanly
def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    import torch

    from transfusion.config import load_config
    from transfusion.precision import cpu_features
    from transfusion.training.metrics import Window
    from transfusion.training.trainer import Trainer, token_counts

    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        extra = [f"--run.dir={tmp}", "--checkpoint.interval=0", f"--train.steps={args.warmup + args.steps + 1}",
                 "--train.log_interval=1000000"]
        if args.precision:
            extra.append(f"--train.autocast={args.precision}")
        cfg = load_config(args.recipe, overrides + extra)
        trainer = Trainer(cfg, progress=False)
        window, times = Window(), []
        prof = None
        try:
            for i in range(args.warmup + args.steps):
                micro = trainer.data.next_step()
                text, image = token_counts(micro)
                micro = [(v, trainer.prepare(b)) for v, b in micro]
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize(trainer.device)
                t0 = time.perf_counter()
                metrics = trainer.train_step(micro)
                if trainer.device.type == "cuda":
                    torch.cuda.synchronize(trainer.device)
                dt = time.perf_counter() - t0
                trainer.step += 1
                if i + 1 == args.warmup and args.profile:
                    from torch.profiler import ProfilerActivity, profile

                    prof = profile(activities=[ProfilerActivity.CPU]
                                   + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else []))
                    prof.__enter__()
                if i >= args.warmup:
                    times.append(dt)
                    window.add(step_s=dt, data_s=0.0, text_tokens=text, image_tokens=image, metrics=metrics)
            s = window.summary(trainer.flops, trainer.device, trainer.measured_peak)
            if prof is not None:
                prof.__exit__(None, None, None)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
        finally:
            trainer.close()

    feats = cpu_features()
    slots = cfg.data.batch_rows * cfg.data.seq_len * cfg.train.grad_accum
    useful = (window.text_tokens + window.image_tokens) / max(window.steps, 1)
    row = {
        "recipe": Path(args.recipe).name,
        "device": str(trainer.device),
        "cpu": (f"{feats['capability']} (host flags: {' '.join(feats['flags'])}"
                + "".join(f", {k}={v}" for k, v in feats["isa_limits"].items()) + ")")
        if trainer.device.type == "cpu" else "",
        "threads": str(torch.get_num_threads()),
        "precision": trainer.precision.name,
        "s/step (median)": f"{statistics.median(times):.3f}",
        "tokens/s": f"{s['tokens_per_s']:.0f}",
        "useful tokens": f"{100 * useful / slots:.0f}%",
        "GFLOP/s": f"{1e3 * s['tflops_per_s']:.1f}",
        "peak GFLOP/s": f"{1e3 * s['measured_peak_tflops']:.1f}",
        "share of peak": f"{100 * s['peak_share']:.3g}%",  # 3 digits: a tiny model can be far under 0.1 %
    }
    if "mfu" in s:
        row["MFU"] = f"{100 * s['mfu']:.1f}%"
    print(f"precision: {trainer.precision.reason}", file=sys.stderr)
    if args.markdown:
        print("| " + " | ".join(row) + " |")
        print("|" + "---|" * len(row))
        print("| " + " | ".join(row.values()) + " |")
    else:
        width = max(map(len, row))
        for k, v in row.items():
            print(f"{k:{width}s}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
