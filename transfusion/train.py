"""Training entry point, for one process or a torchrun job (CPU: gloo, CUDA: nccl).

    python -m transfusion.train recipes/shapes_tiny.toml [--section.key=value ...] [--resume [PATH]]
    torchrun --nproc-per-node=2 -m transfusion.train recipes/shapes_tiny.toml --run.device=cpu
    torchrun --nproc-per-node=8 -m transfusion.train recipes/t2i_1b_8gpu.toml --resume

Every rank parses the same arguments and fails the same way: a bad recipe or a checkpoint this world size cannot
resume prints one ``error:`` line on each rank and exits non-zero before any collective, so nothing hangs.

Exit codes (each rank's process; see transfusion/training/guards.py and docs/reliability.md): 0 done; 75 preempted
by a signal of train.preempt_signals, a checkpoint of the last step is saved, continue with --resume; 3 more than
train.max_bad_steps non-finite steps in a row, nothing saved; 2 bad input; 130 interrupted before training.
"""

from __future__ import annotations

import argparse
import sys

from transfusion.cli import fail_cleanly
from transfusion.training.guards import NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE, NonFiniteError, ignore_signals

EXIT_CODES = f"""exit codes:
  0    done: final checkpoint, samples and export written
  {PREEMPTED_EXIT_CODE:<4} preempted: a signal of train.preempt_signals (default SIGTERM, SIGUSR1, SIGINT) reached a
       rank; every rank finished its step and one checkpoint of it was saved: run again with --resume
  {NONFINITE_EXIT_CODE:<4} more than train.max_bad_steps steps in a row had a non-finite loss or gradient norm (each
       was skipped without an update); nothing was saved after the last checkpoint
  2    bad input (recipe, overrides, checkpoint, data): one 'error:' line
  130  interrupted (SIGINT) before training started"""


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    from transfusion.config import PRECISIONS

    p = argparse.ArgumentParser(
        prog="python -m transfusion.train",
        description="Train a hybrid text+image transformer from a TOML recipe, in one process or under torchrun. "
                    "Any recipe key can be overridden with --section.key=value (e.g. --train.steps=100 "
                    "--run.dir=runs/try).",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
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
    from transfusion.distributed.env import launched_by_torchrun, shutdown
    from transfusion.training.trainer import Trainer

    try:
        if args.precision:
            overrides = [*overrides, f"--train.autocast={args.precision}"]
        cfg = load_config(args.recipe, overrides)
        trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress, reset_data=args.reset_data)
        trainer.fit()
        if trainer.preempted and launched_by_torchrun():  # torchrun signals the ranks that have not exited when
            ignore_signals(cfg.train.preempt_signals)      # the first one has: that must not change the exit code
        trainer.close()
    except NonFiniteError as e:  # every rank stops at the same step (the check is agreed): one line each
        shutdown(graceful=False)
        print(f"error: {e}", file=sys.stderr)
        return NONFINITE_EXIT_CODE
    except BaseException:
        shutdown(graceful=False)
        raise
    shutdown()
    return PREEMPTED_EXIT_CODE if trainer.preempted else 0


if __name__ == "__main__":
    sys.exit(main())
