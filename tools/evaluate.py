#!/usr/bin/env python
"""Evaluate an exported model on held-out shards and write <run>/eval/report.json.

    python tools/evaluate.py --run runs/shapes_tiny
    python tools/evaluate.py --run runs/shapes_tiny --num-t2i 50 --steps 25 --guidance 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transfusion.cli import fail_cleanly


def parse_args(argv=None) -> argparse.Namespace:
    from transfusion.config import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory (reads <run>/export, writes <run>/eval/)")
    p.add_argument("--export", help="export directory (default: <run>/export)")
    p.add_argument("--shards", help="held-out shard spec (default: the run's data.eval_shards)")
    p.add_argument("--num-t2i", type=int, help="prompts to generate and judge (default: eval.num_t2i)")
    p.add_argument("--num-caption", type=int, help="images to caption (default: eval.num_caption)")
    p.add_argument("--num-fid", type=int, help="compositional world: generated images scored by FID / KID against "
                                                 "held-out renders, 0 = skip (default: eval.num_fid)")
    p.add_argument("--batch-size", type=int, help="generation batch size (default: eval.batch_size)")
    p.add_argument("--sampler", choices=("ddim", "ddpm", "euler", "heun"),
                   help="default: sample.sampler (ddim|ddpm for epsilon and v, euler|heun for flow)")
    p.add_argument("--steps", type=int, help="denoising steps (default: sample.steps)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: sample.guidance)")
    p.add_argument("--guidance-schedule", choices=("constant", "linear", "interval"), default=None,
                   help="constant CFG scale, rising linearly from 1, or only at middle noise levels (interval; "
                        "default: sample.guidance_schedule)")
    p.add_argument("--guidance-data-std", type=float,
                   help="the data std the interval guidance window is measured in: EDM2's (0.28, 5.42] x std / 0.5; "
                        "0.5 = EDM2's window unscaled (default: sample.guidance_data_std, 0 = the codec's)")
    p.add_argument("--out", help="report directory (default: <run>/eval); several evaluations of one run keep apart")
    p.add_argument("--caption-guidance", type=float,
                   help="caption guidance: weight of the image against the text prior, 1 = plain greedy decoding "
                        "(default: eval.caption_guidance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="compute precision on this machine: auto (bf16 on CUDA; on CPU bf16 only where a short probe "
                        "shows it faster than fp32), bf16 or fp32")
    args = p.parse_args(argv)
    if args.caption_guidance is not None and not 0 <= args.caption_guidance < float("inf"):
        p.error("--caption-guidance must be a finite number >= 0")
    if args.guidance_data_std is not None and not 0 <= args.guidance_data_std < float("inf"):
        p.error("--guidance-data-std must be a finite number >= 0")
    for name in ("num_t2i", "num_caption", "num_fid", "batch_size", "steps"):
        v = getattr(args, name)
        if v is not None and v < (1 if name in ("batch_size", "steps") else 0):
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def flatten(d: dict, prefix: str = "") -> dict[str, float]:
    """Dotted keys of every float in a nested report (settings, counts and timings left out)."""
    out = {}
    for k, v in d.items():
        if k in ("settings", "counts", "timings"):
            continue
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        elif isinstance(v, float):
            out[f"{prefix}{k}"] = v
    return out


def write_tensorboard(run: Path, flat: dict[str, float], eval_dir: Path) -> None:
    """The report's scalars (under eval/) and its image grids (t2i_*.png: one per GenEval tag in the compositional
    world) in <run>/tb, beside the training curves, at the run's last step."""
    import numpy as np
    from PIL import Image

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed: the report stays in report.json only", file=sys.stderr)
        return

    step = 0
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        step = json.loads(lines[-1]).get("step", 0) if lines else 0
    with SummaryWriter(str(run / "tb")) as tb:
        for k, v in flat.items():
            if v == v:  # NaN-free
                tb.add_scalar(f"eval/{k}", v, step)
        for grid in sorted(eval_dir.glob("t2i_*.png")):
            tb.add_image(f"eval/{grid.stem}", np.asarray(Image.open(grid).convert("RGB")), step, dataformats="HWC")


@fail_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    from transfusion.eval.metrics import evaluate
    from transfusion.generation.engine import Engine

    run = Path(args.run)
    engine = Engine.from_export(args.export or str(run / "export"), device=args.device, precision=args.precision)
    cfg = engine.cfg
    if args.guidance_data_std is not None:
        cfg.sample.guidance_data_std = args.guidance_data_std
    eval_dir = Path(args.out) if args.out else run / "eval"
    print(f"precision: {engine.precision.reason}", file=sys.stderr)
    pick = lambda v, d: d if v is None else v  # noqa: E731
    report = evaluate(
        engine,
        shards=args.shards or cfg.data.eval_shards,
        num_t2i=pick(args.num_t2i, cfg.eval.num_t2i),
        num_caption=pick(args.num_caption, cfg.eval.num_caption),
        num_fid=pick(args.num_fid, cfg.eval.num_fid),
        batch_size=pick(args.batch_size, cfg.eval.batch_size),
        steps=pick(args.steps, cfg.sample.steps),
        guidance=pick(args.guidance, cfg.sample.guidance),
        sampler=pick(args.sampler, cfg.sample.sampler),
        guidance_schedule=args.guidance_schedule,
        seed=args.seed,
        max_caption_tokens=cfg.eval.max_caption_tokens,
        caption_guidance=pick(args.caption_guidance, cfg.eval.caption_guidance),
        out_dir=eval_dir,
        progress=not args.no_progress,
    )
    report["settings"]["precision"] = engine.precision.name
    report["settings"]["guidance_data_std"] = engine.guidance_data_std
    out = eval_dir / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if report.get("world") == 3:
        from transfusion.eval.compositional import markdown

        (eval_dir / "report.md").write_text(markdown(report))
    flat = flatten(report)
    for k, v in flat.items():
        print(f"{k:38s} {v:.4f}")
    write_tensorboard(run, flat, eval_dir)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
