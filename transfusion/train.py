"""Training entry point.

    python -m transfusion.train recipes/shapes_tiny.toml [--section.key=value ...] [--resume [PATH]]
"""

from __future__ import annotations

import argparse
import sys

from transfusion.cli import fail_cleanly


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m transfusion.train",
        description="Train a hybrid text+image transformer from a TOML recipe. Any recipe key can be overridden "
                    "with --section.key=value (e.g. --train.steps=100 --run.dir=runs/try).",
    )
    p.add_argument("recipe", help="path to a TOML recipe, e.g. recipes/shapes_tiny.toml")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="resume from the run's latest complete checkpoint, or from PATH (a run or step directory)")
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
    from transfusion.training.trainer import Trainer

    cfg = load_config(args.recipe, overrides)
    Trainer(cfg, resume=args.resume, progress=not args.no_progress).fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
