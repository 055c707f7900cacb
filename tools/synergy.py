#!/usr/bin/env python
"""The generalist synergy report: does joint training beat single-task specialists at equal steps and equal data
per task?

For each seed it trains three runs of one recipe (the compositional world's by default):

    joint           both tasks, data.t2i_ratio 0.5, data.batch_rows B
    t2i specialist  text -> image only, t2i_ratio 1.0, batch_rows B / 2
    cap specialist  image -> text only, t2i_ratio 0.0, batch_rows B / 2

so every run takes the same number of steps and each task gets the same number of documents in the joint run as in
its specialist (the joint run does twice the compute). Each run is evaluated with report v2 on its tasks, and the
report (``docs/synergy.md`` by default) gives, per task and per split (seen / unseen compositions), joint vs
specialist for every seed, the mean difference, its standard error, and a verdict by Welch's t-test (two-sided,
alpha 0.05) of the joint runs' values against the specialists', drawn only with at least 5 seeds per arm (fewer:
"undetermined"; with 2 seeds a t-test has 1 to 2 degrees of freedom and almost no power).

    python tools/synergy.py --recipe recipes/shapes3_tiny.toml --steps 700 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from transfusion.cli import fail_cleanly
from transfusion.eval.stats import welch_t_test

MIN_SEEDS, ALPHA = 5, 0.05  # the verdict rule: Welch's t-test, two-sided, at ALPHA, with >= MIN_SEEDS seeds per arm
VARIANTS = {"joint": ("0.5", 1), "t2i": ("1.0", 2), "caption": ("0.0", 2)}  # t2i_ratio, batch_rows divisor
# (report key, label, higher is better); the losses stay informative where a small budget leaves accuracies at 0
METRICS = {"t2i": [("geneval.overall_shared", "GenEval overall over the tags shared by seen and unseen", True),
                   ("diffusion.mean", "held-out diffusion loss, mean over noise levels", False)],
           "caption": [("caption.exact_match", "caption exact match", True),
                       ("caption.colors_accuracy", "caption colors bound to shapes", True),
                       ("caption_nll", "caption NLL, bits per caption", False)]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", default="recipes/shapes3_tiny.toml")
    p.add_argument("--steps", type=int, default=700, help="training steps of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help=f"one joint run and one run per specialist for each; a verdict needs >= {MIN_SEEDS}")
    p.add_argument("--runs", default="runs/synergy", help="where the runs go")
    p.add_argument("--out", default="docs/synergy.md", help="the report")
    p.add_argument("--num-eval", type=int, default=300, help="held-out prompts / images per task")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for every run, e.g. --set model.dim=64 (repeatable)")
    return p


def get(report: dict, dotted: str, split: str):
    """``geneval.overall_shared`` + ``seen`` -> report["geneval"]["overall_shared.seen"]; ``caption.exact_match`` +
    ``seen`` -> report["caption"]["seen"]["exact_match"]."""
    if dotted == "caption_nll":
        return report.get("caption_nll", {}).get(split)
    if dotted == "diffusion.mean":  # held-out images of either split; the same value in both rows
        vals = list(report.get("diffusion", {}).values())
        return sum(vals) / len(vals) if vals else None
    section, key = dotted.split(".", 1)
    sec = report.get(section, {})
    if section == "geneval":
        return sec.get(f"{key}.{split}")
    return sec.get(split, {}).get(key)


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {tail[0]} (log: {log})")


def finished(rdir: Path, steps: int, seed: int) -> bool:
    """Whether ``rdir`` holds an export of a run with these steps and seed (then only evaluation is redone)."""
    try:
        cfg = json.loads((rdir / "export" / "config.json").read_text())
        return cfg["train"]["steps"] == steps and cfg["run"]["seed"] == seed and \
            (rdir / "export" / "model.safetensors").is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def current_report(report: dict) -> bool:
    """Whether a saved report was written by the current report version (``compositional.REPORT_VERSION``)."""
    from transfusion.eval.compositional import REPORT_VERSION

    return report.get("report_version") == REPORT_VERSION


def train_and_eval(args, variant: str, seed: int, batch_rows: int) -> dict:
    ratio, div = VARIANTS[variant]
    rdir = Path(args.runs) / f"{variant}_seed{seed}"
    report_path = rdir / "eval" / "report.json"
    if report_path.is_file():  # resumable: a finished run is not redone (delete eval/ to re-evaluate only) ...
        report = json.loads(report_path.read_text())
        if current_report(report):
            return report
        # ... unless its report is of an older version: its numbers mean other things, and its model was trained on
        # the world of its time (report version 3 came with world generator revision 2), so both are redone
        print(f"{report_path}: report version {report.get('report_version')} is not the current one: trained and "
              "evaluated again", file=sys.stderr)
        for stale in (rdir / "export", rdir / "eval"):
            shutil.rmtree(stale, ignore_errors=True)
    start = time.perf_counter()
    rdir.mkdir(parents=True, exist_ok=True)
    overrides = [f"--run.dir={rdir}", f"--run.seed={seed}", f"--train.steps={args.steps}",
                 f"--data.t2i_ratio={ratio}", f"--data.batch_rows={batch_rows // div}", "--checkpoint.interval=0"]
    overrides += [f"--{kv}" for kv in args.set]
    if not finished(rdir, args.steps, seed):
        run([sys.executable, "-m", "transfusion.train", args.recipe, *overrides], rdir / "train.out")
    n_t2i = args.num_eval if variant in ("joint", "t2i") else 0
    n_cap = args.num_eval if variant in ("joint", "caption") else 0
    run([sys.executable, "tools/evaluate.py", "--run", str(rdir), "--num-t2i", str(n_t2i), "--num-caption",
         str(n_cap), "--num-fid", "0", "--no-progress"], rdir / "eval.out")
    (rdir / "synergy_seconds.txt").write_text(f"{time.perf_counter() - start:.0f}\n")
    return json.loads(report_path.read_text())


def run_seconds(args, variant: str, seed: int) -> float:
    """Wall time of one run's training + evaluation, as recorded when it was made (0 if unknown)."""
    try:
        return float((Path(args.runs) / f"{variant}_seed{seed}" / "synergy_seconds.txt").read_text())
    except (OSError, ValueError):
        return 0.0


def machine() -> str:
    """The CPU this ran on, as the timings need it: torch's CPU capability and the bf16 / AMX flags."""
    import platform

    import torch

    from transfusion.precision import cpu_features

    feats = cpu_features()
    flags = " ".join(f for f in feats["flags"] if f in ("avx512_bf16", "amx_bf16"))
    return f"{platform.processor() or platform.machine()}, CPU capability {feats['capability']}" \
        + (f" ({flags})" if flags else "") + f", {feats['threads']} threads, torch {torch.__version__}"


def verdict(joint: list[float], spec: list[float], higher: bool) -> tuple[str, float, float]:
    """(verdict, mean difference, its standard error) of one metric; the difference is signed so that > 0 means
    the joint runs are better (``higher``: whether higher values are better). The verdict is Welch's t-test of the
    joint values against the specialist values (independent runs, unequal variances), two-sided at ALPHA:
    "yes" (joint better), "no: specialist better" or "no (not significant)", each with its p; with fewer than
    MIN_SEEDS values per arm "undetermined" (its p, where defined, is shown but not used)."""
    sign = 1.0 if higher else -1.0
    mean = sign * (statistics.fmean(joint) - statistics.fmean(spec))
    n = min(len(joint), len(spec))
    if n < 2:
        return f"undetermined ({n} seed < {MIN_SEEDS})", mean, float("nan")
    se = math.sqrt(statistics.variance(joint) / len(joint) + statistics.variance(spec) / len(spec))
    _, _, p = welch_t_test(joint, spec)
    shown = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    if n < MIN_SEEDS:
        return f"undetermined ({n} seeds < {MIN_SEEDS}; {shown})", mean, se
    if p >= ALPHA:
        return f"no (not significant, {shown})", mean, se
    return (f"yes ({shown})" if mean > 0 else f"no: specialist better ({shown})"), mean, se


def write_report(args, reports: dict, out: Path, batch_rows: int, seconds: float) -> str:
    lines = ["# Generalist synergy: joint training vs single-task specialists", "",
             f"Recipe `{args.recipe}`, {args.steps} steps per run, seeds {args.seeds}; joint: t2i_ratio 0.5 and "
             f"{batch_rows} rows per step; each specialist: its task only and {batch_rows // 2} rows, so each task sees "
             f"the same documents in both (the joint run does twice the compute per step). Evaluated with report v2 on "
             f"{args.num_eval} held-out prompts / images per task (seen and unseen compositions apart). Extra overrides: {args.set or 'none'}. Measured by "
             f"`tools/synergy.py` in {seconds / 60:.0f} min on {machine()}.", "",
             "Differences are signed so that > 0 means the joint run is better (for losses: lower).", "",
             f"| task | metric | split | joint (per seed) | specialist (per seed) | mean difference | standard error | "
             f"synergy (Welch, two-sided, alpha {ALPHA}) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for task, metrics in METRICS.items():
        for key, label, higher in metrics:
            for split in (("all",) if key == "diffusion.mean" else ("seen", "unseen")):
                joint = [get(reports[("joint", s)], key, split) for s in args.seeds]
                spec = [get(reports[(task, s)], key, split) for s in args.seeds]
                if any(v is None for v in joint + spec):
                    continue
                v, mean, se = verdict(joint, spec, higher)  # mean > 0: joint is better
                fmt = lambda xs: ", ".join(f"{x:.4f}" for x in xs)  # noqa: E731
                lines.append(f"| {task} | {label} | {split} | {fmt(joint)} | {fmt(spec)} | {mean:+.4f} | "
                             f"{se:.4f} | {v} |")
    lines += ["", f"Verdict rule: Welch's t-test of the joint runs' values against the specialist's (independent "
              f"runs, unequal variances), two-sided at alpha = {ALPHA}; drawn only with at least {MIN_SEEDS} seeds "
              f"per arm, else undetermined. Standard error: sqrt(s_joint^2 / n + s_specialist^2 / n) over seeds.", ""]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transfusion.config import load_config

    if not Path(args.recipe).is_file():
        raise FileNotFoundError(f"recipe {args.recipe} not found")
    cfg = load_config(args.recipe, [f"--{kv}" for kv in args.set])  # bad keys fail here, before any training
    batch_rows = cfg.data.batch_rows
    if batch_rows < 2:
        print("error: the recipe needs data.batch_rows >= 2 to halve it for the specialists", file=sys.stderr)
        return 2
    reports = {}
    for seed in args.seeds:
        for variant in VARIANTS:
            reports[(variant, seed)] = train_and_eval(args, variant, seed, batch_rows)
            print(f"{variant} seed {seed}: done ({run_seconds(args, variant, seed):.0f} s)", file=sys.stderr)
    seconds = sum(run_seconds(args, v, s) for v in VARIANTS for s in args.seeds)
    print(write_report(args, reports, Path(args.out), batch_rows, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
