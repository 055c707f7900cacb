#!/usr/bin/env python
"""Train image-objective / head / adapter / attention variants at equal steps, evaluate each, write one table.

    python tools/ablate.py                                     # every variant, the recipe's steps -> docs/ablation.md
    python tools/ablate.py --steps 150 --num-t2i 50 --variants flow_unet,mar --out /tmp/quick.md
    python tools/ablate.py --list                              # the variants and their overrides

Each variant is the base recipe plus a few overrides (so variants never drift from the baseline), trained by the
normal trainer in a child process (one failure does not stop the others), then evaluated with
``transfusion.eval.metrics.evaluate`` on the held-out shards. Results land in ``<runs>/<variant>/ablation.json``; the
table is rebuilt from every result present, so an interrupted ablation resumes with ``--skip-done``.

Train a single variant directly with the same overrides:
    python -m transfusion.train recipes/shapes_tiny.toml --diffusion.objective=flow --sample.sampler=euler ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EPS = ["--diffusion.objective=epsilon", "--sample.sampler=ddim"]
V = ["--diffusion.objective=v", "--sample.sampler=ddim"]
FLOW = ["--diffusion.objective=flow", "--sample.sampler=euler"]
# name -> (description, overrides on the base recipe). Every variant names its objective, so the table does not
# depend on which objective the base recipe happens to default to.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    # epsilon with min-SNR-5 weighting (Hang et al. 2023) and lambda = 5: the unweighted epsilon loss barely rewards
    # a right x0 at the high noise levels where DDIM decides color and layout (docs/ablation.md)
    "eps_linear": ("epsilon + linear, min-SNR-5, lambda 5", EPS + ["--loss.snr_gamma=5", "--loss.image_weight=5"]),
    "eps_linear_plain": ("epsilon + linear, unweighted, lambda 1", EPS),
    "v_linear": ("v-prediction + linear", V),
    "flow_linear": ("rectified flow + linear", FLOW),
    "flow_unet": ("rectified flow + U-Net", FLOW + ["--model.adapter=unet"]),
    "eps_unet": ("epsilon + U-Net", EPS + ["--model.adapter=unet"]),
    "v_unet": ("v-prediction + U-Net", V + ["--model.adapter=unet"]),
    "mar": ("MAR head (v-prediction, per-token MLP)", V + ["--model.head=mar"]),
    "v_linear_causal": ("v-prediction + linear, causal image attention", V + ["--model.image_attention=causal"]),
    "eps_linear_causal": ("epsilon + linear, causal image attention", EPS + ["--model.image_attention=causal"]),
}
DEFAULT = ["eps_linear", "v_linear", "flow_linear", "flow_unet", "mar", "v_linear_causal", "eps_linear_plain"]


def parse_args(argv=None) -> argparse.Namespace:
    from transfusion.config import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/shapes_tiny.toml")
    p.add_argument("--variants", default=",".join(DEFAULT), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, help="training steps for every variant (default: the recipe's)")
    p.add_argument("--runs", default="runs/ablate", help="parent directory of the variants' run directories")
    p.add_argument("--out", default="docs/ablation.md", help="markdown table to write")
    p.add_argument("--num-t2i", type=int, help="prompts to generate and judge (default: the recipe's eval.num_t2i)")
    p.add_argument("--num-caption", type=int, help="images to caption (default: the recipe's eval.num_caption)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="CFG scale for every variant's samples and evaluation (default 1: CFG off, so that objectives "
                   "are compared without a guidance scale tuned for one of them)")
    p.add_argument("--set", action="append", default=[], metavar="--section.key=value",
                   help="extra override for every variant (repeatable)")
    p.add_argument("--figure", metavar="PNG", help="also write a sample figure: one row per variant, the first row of "
                   "its final training sample grid (same prompts and seed)")
    p.add_argument("--skip-done", action="store_true", help="keep variants whose ablation.json already exists")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="compute precision for training and sampling (auto: measured on this machine)")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: train + evaluate one variant in this process
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    return args


def overrides_for(args: argparse.Namespace, name: str) -> list[str]:
    out = [f"--run.dir={Path(args.runs) / name}", f"--sample.guidance={args.guidance}",
           f"--train.autocast={args.precision}", *VARIANTS[name][1], *args.set]
    if args.steps is not None:
        out.append(f"--train.steps={args.steps}")
    return out


def run_one(args: argparse.Namespace, name: str) -> dict:
    """Train (timing every optimisation step) and evaluate one variant; returns its result record."""
    import torch

    from transfusion.config import load_config
    from transfusion.eval.metrics import evaluate
    from transfusion.generation.engine import Engine
    from transfusion.training.trainer import Trainer

    cfg = load_config(args.recipe, overrides_for(args, name))
    clock = {"seconds": 0.0, "samples": 0, "steps": 0}

    class TimedTrainer(Trainer):
        def train_step(self, micro):  # one optimizer step: a Batch, or [(consumer, Batch), ...] micro-batches
            t0 = time.perf_counter()
            out = super().train_step(micro)
            clock["seconds"] += time.perf_counter() - t0
            items = micro if isinstance(micro, list) else [micro]
            clock["samples"] += sum(len((b[1] if isinstance(b, tuple) else b).keys) for b in items)
            clock["steps"] += 1
            return out

    t0 = time.perf_counter()
    trainer = TimedTrainer(cfg, progress=False)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    trainer.fit()
    wall = time.perf_counter() - t0
    del trainer
    run = Path(cfg.run.dir)
    engine = Engine.from_export(str(run / "export"), device=cfg.run.device if cfg.run.device != "auto" else "cpu",
                                precision=cfg.train.autocast)
    torch.manual_seed(0)
    report = evaluate(engine, shards=cfg.data.eval_shards,
                      num_t2i=cfg.eval.num_t2i if args.num_t2i is None else args.num_t2i,
                      num_caption=cfg.eval.num_caption if args.num_caption is None else args.num_caption,
                      batch_size=cfg.eval.batch_size, steps=cfg.sample.steps, guidance=cfg.sample.guidance,
                      sampler=cfg.sample.sampler, seed=0, max_caption_tokens=cfg.eval.max_caption_tokens,
                      caption_guidance=cfg.eval.caption_guidance, out_dir=run / "eval", progress=False)
    (run / "eval" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return {"variant": name, "description": VARIANTS[name][0], "overrides": VARIANTS[name][1],
            "steps": clock["steps"], "params_m": n_params / 1e6,
            "train_samples_per_s": clock["samples"] / max(clock["seconds"], 1e-9),
            "train_wall_s": wall, "report": report}


V3_COLUMNS = [  # report v2 (world v3): seen / unseen compositions apart
    # mean of tag accuracies over the tags with both seen and unseen prompts, so the two columns compare like with like
    ("GenEval shared-tag seen", lambda r: r["report"]["geneval"]["overall_shared.seen"]),
    ("GenEval shared-tag unseen", lambda r: r["report"]["geneval"]["overall_shared.unseen"]),
    ("caption exact seen", lambda r: r["report"]["caption"]["seen"]["exact_match"]),
    ("caption exact unseen", lambda r: r["report"]["caption"]["unseen"]["exact_match"]),
    ("CIDEr unseen", lambda r: r["report"]["caption"]["unseen"]["cider"]),
    ("caption NLL bits seen / unseen", lambda r: "{:.2f} / {:.2f}".format(
        r["report"]["caption_nll"]["seen"], r["report"]["caption_nll"]["unseen"])),
    ("diff. loss held out, mean of 4 noise quarters", lambda r: sum(r["report"]["diffusion"].values()) / 4),
    ("train samples/s", lambda r: r["train_samples_per_s"]),
    ("params (M)", lambda r: r["params_m"]),
]


def table(results: list[dict], header: str) -> str:
    if results and "geneval" in results[0]["report"]:
        return _table(results, header, V3_COLUMNS)
    cols = [("t2i color", lambda r: r["report"]["t2i"]["color_accuracy"]),
            ("t2i shape", lambda r: r["report"]["t2i"]["shape_accuracy"]),
            ("t2i position", lambda r: r["report"]["t2i"]["position_accuracy"]),
            ("t2i all", lambda r: r["report"]["t2i"]["all_accuracy"]),
            ("caption exact", lambda r: r["report"]["caption"]["exact_match"]),
            ("text ppl", lambda r: r["report"]["text"]["perplexity"]),
            ("diff. val loss*", lambda r: r["report"]["diffusion"]["val_loss"]),
            ("train samples/s", lambda r: r["train_samples_per_s"]),
            ("s / generated image", lambda r: r["report"]["timings"]["t2i_seconds_per_image"]),
            ("params (M)", lambda r: r["params_m"])]
    return _table(results, header, cols)


def _table(results: list[dict], header: str, cols) -> str:
    lines = [header, "", "| variant | steps | " + " | ".join(c for c, _ in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for r in results:
        vals = []
        for _, get in cols:
            try:
                v = get(r)
                vals.append(v if isinstance(v, str) else f"{v:.3f}" if isinstance(v, float) and abs(v) < 100
                            else f"{v:.1f}")
            except (KeyError, TypeError):
                vals.append("n/a")
        lines.append(f"| {r['description']} (`{r['variant']}`) | {r['steps']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, (desc, ov) in VARIANTS.items():
            print(f"{name:20s} {desc:45s} {' '.join(ov) or '(base recipe)'}")
        return 0
    if args.one:
        result = run_one(args, args.one)
        out = Path(args.runs) / args.one / "ablation.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    names = args.variants.split(",")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in names:
        done = Path(args.runs) / name / "ablation.json"
        if args.skip_done and done.is_file():
            print(f"[ablate] {name}: kept {done}", flush=True)
            continue
        done.unlink(missing_ok=True)
        t0 = time.perf_counter()
        print(f"[ablate] {name}: training + evaluating ...", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, *sys.argv[1:]] if argv is None else \
            [sys.executable, str(Path(__file__).resolve()), "--one", name, *argv]
        proc = subprocess.run(cmd, cwd=REPO, env=env)
        status = "ok" if proc.returncode == 0 and done.is_file() else f"FAILED (exit {proc.returncode})"
        print(f"[ablate] {name}: {status} in {time.perf_counter() - t0:.0f}s", flush=True)
    results = [json.loads((Path(args.runs) / n / "ablation.json").read_text()) for n in names
               if (Path(args.runs) / n / "ablation.json").is_file()]
    write_table(args, results)
    if args.figure:
        sample_figure(Path(args.runs), results, Path(args.figure))
    return 0 if len(results) == len(names) else 1


def write_table(args: argparse.Namespace, results: list[dict]) -> None:
    import torch

    from transfusion.config import load_config

    base = load_config(args.recipe, [])
    steps = sorted({r["steps"] for r in results})
    n_t2i = sorted({r["report"]["t2i"]["n"] if "t2i" in r["report"] else r["report"]["num_samples"] for r in results})
    guidance = sorted({r["report"]["settings"]["guidance"] for r in results})
    header = (f"Recipe `{args.recipe}`, {', '.join(map(str, steps))} training steps per variant "
              f"(recipe default {base.train.steps}){' (REDUCED)' if steps and steps[-1] < base.train.steps else ''}; "
              f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}; "
              f"t2i judged on {', '.join(map(str, n_t2i))} held-out prompts, each variant's sampler with the recipe's "
              f"steps, guidance {', '.join(map(str, guidance))}; "
              f"measured {time.strftime('%Y-%m-%d')}.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = table(results, header)
    if out.suffix == ".md" and out.is_file():  # replace only the generated block of a docs page
        old = out.read_text()
        start, end = "<!-- ablation:begin -->", "<!-- ablation:end -->"
        if start in old and end in old:
            text = old[:old.index(start) + len(start)] + "\n" + text + old[old.index(end):]
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


def sample_figure(runs: Path, results: list[dict], out: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    row_h, label_w = 4 + 96 + 30 + 4, 120  # one row of make_grid's default sheet (cell 96, caption 30, margins 4)
    rows = []
    for r in results:
        grids = sorted((runs / r["variant"] / "samples").glob("step_*.png"))
        if grids:
            rows.append((r["variant"], Image.open(grids[-1]).convert("RGB")))
    if not rows:
        print(f"no sample grids under {runs}: no figure written")
        return
    fig = Image.new("RGB", (label_w + max(im.width for _, im in rows), row_h * len(rows)), (255, 255, 255))
    draw, font = ImageDraw.Draw(fig), ImageFont.load_default()
    for i, (name, im) in enumerate(rows):
        fig.paste(im.crop((0, 0, im.width, min(row_h, im.height))), (label_w, i * row_h))
        draw.text((6, i * row_h + row_h // 2 - 12), name, fill=(0, 0, 0), font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
