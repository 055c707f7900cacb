"""Training entry point, for one process or a torchrun job (CPU: gloo, CUDA: nccl).

    python -m transfusion.train recipes/shapes_tiny.toml [--section.key=value ...] [--resume [PATH]]
    torchrun --nproc-per-node=2 -m transfusion.train recipes/shapes_tiny.toml --run.device=cpu
    torchrun --nproc-per-node=8 -m transfusion.train recipes/t2i_1b_8gpu.toml --resume

Every rank parses the same arguments and fails the same way: a bad recipe or a checkpoint this world size cannot
resume prints one ``error:`` line on each rank and exits non-zero before any collective, so nothing hangs.
"""

from __future__ import annotations

import argparse
import sys

from transfusion.cli import fail_cleanly


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    from transfusion.config import PRECISIONS

    p = argparse.ArgumentParser(
        prog="python -m transfusion.train",
        description="Train a hybrid text+image transformer from a TOML recipe, in one process or under torchrun. "
                    "Any recipe key can be overridden with --section.key=value (e.g. --train.steps=100 "
                    "--run.dir=runs/try).",
    )
    p.add_argument("recipe", help="path to a TOML recipe, e.g. recipes/shapes_tiny.toml")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="resume from the run's latest complete checkpoint, or from PATH (a run or step directory)")
    p.add_argument("--reset-data", action="store_true",
                   help="when resuming under a data layout the checkpoint cannot serve (a different number of "
                        "dp ranks x train.grad_accum, or data.num_workers): load weights, optimizer and step, and "
                        "start fresh data streams instead of failing")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="compute precision, same as --train.autocast=...: auto (bf16 on CUDA; on CPU bf16 only where a "
                        "short probe of the model's matmuls shows it faster than fp32), bf16 or fp32")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if not r.startswith("--") or "=" not in r]
    if bad:
        p.error(f"unrecognised arguments {bad}; overrides look like --section.key=value")
    return args, rest


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    from transfusion.config import load_config
    from transfusion.distributed.env import shutdown
    from transfusion.training.trainer import Trainer

    try:
        if args.precision:
            overrides = [*overrides, f"--train.autocast={args.precision}"]
        cfg = load_config(args.recipe, overrides)
        trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress, reset_data=args.reset_data)
        trainer.fit()
        trainer.close()
    except BaseException:
        shutdown(graceful=False)
        raise
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
