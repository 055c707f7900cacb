#!/usr/bin/env python
"""Write the shapes world as WebDataset shards: DIR/train-000000.tar ..., DIR/heldout-000000.tar ..., manifest.json.

Each sample is ``<key>.png`` (the image), ``<key>.txt`` (the caption) and ``<key>.json`` (scene record + caption).
Re-running with the same parameters is a quick no-op; different parameters are refused unless ``--force``.
Shards are written under a temporary name and renamed when complete, and the manifest is written last, so an
interrupted run never looks finished.

    python tools/make_shapes_shards.py --out data/shapes
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
_SHARD_RE = re.compile(r"^(train|heldout)-\d{6}\.tar(\.tmp)?$")


def _count(min_value: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < min_value:
            raise argparse.ArgumentTypeError(f"must be >= {min_value}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Generate the procedural shapes world (one colored circle/square/triangle on a dark background, "
                    "captioned 'a red circle on the left') as WebDataset tar shards plus manifest.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="data/shapes", help="output directory")
    p.add_argument("--train-samples", type=_count(1), default=20000, help="number of training samples")
    p.add_argument("--heldout-samples", type=_count(0), default=500,
                   help="number of held-out samples (an independent random stream, used for evaluation)")
    p.add_argument("--shard-size", type=_count(1), default=2500, help="samples per tar shard")
    p.add_argument("--image-size", type=_count(16), default=32,
                   help="image side in pixels (>= 16; below 32 px small shapes start to look alike)")
    p.add_argument("--seed", type=_count(0), default=0, help="world seed; each sample is a pure function of it")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing dataset that was generated with different parameters")
    return p


def shard_plan(n: int, shard_size: int) -> list[int]:
    """Samples per shard: full shards then the remainder."""
    return [min(shard_size, n - start) for start in range(0, n, shard_size)]


def write_split(out: Path, split: str, n: int, args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    import webdataset as wds

    from data_pipelines.shapes import make_sample, png_bytes

    shards, counts, index = [], shard_plan(n, args.shard_size), 0
    for shard_idx, count in enumerate(counts):
        name = f"{split}-{shard_idx:06d}.tar"
        tmp = out / f"{name}.tmp"
        with wds.TarWriter(str(tmp), mtime=0, encoder=False) as sink:
            for _ in range(count):
                key, image, text, record = make_sample(split, index, args.seed, args.image_size)
                sink.write({"__key__": key, "png": png_bytes(image), "txt": text.encode(),
                            "json": json.dumps(record, sort_keys=True).encode()})
                index += 1
                progress.update(1)
        os.replace(tmp, out / name)
        shards.append(name)
    return {"samples": n, "shards": shards, "samples_per_shard": counts}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from data_pipelines.shapes import BACKGROUND, COLORS, POSITIONS, SHAPES, WORLD_VERSION

    out = Path(args.out)
    params = {"world_version": WORLD_VERSION, "seed": args.seed, "image_size": args.image_size,
              "shard_size": args.shard_size, "train_samples": args.train_samples,
              "heldout_samples": args.heldout_samples}
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        complete = all((out / s).is_file() for split in old.get("splits", {}).values() for s in split["shards"])
        if old.get("params") == params and complete:
            print(f"{out}: shapes dataset already up to date ({args.train_samples} train + "
                  f"{args.heldout_samples} heldout at {args.image_size}px, seed {args.seed}); nothing to do")
            return 0
        if old.get("params") != params and not args.force:
            prev = old.get("params") or {}
            diff = ", ".join(f"{k} {prev.get(k)} -> {v}" for k, v in params.items() if prev.get(k) != v)
            print(f"error: {out} holds a shapes dataset with other parameters ({diff}); "
                  f"pass --force to overwrite it, or choose another --out", file=sys.stderr)
            return 2

    out.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # an interrupted run below must not look finished
    for stale in out.iterdir():
        if _SHARD_RE.match(stale.name):
            stale.unlink()

    start = time.perf_counter()
    counts = {"train": args.train_samples, "heldout": args.heldout_samples}
    with tqdm(total=sum(counts.values()), unit="img", desc="shapes", file=sys.stderr,
              disable=None) as progress:
        splits = {split: write_split(out, split, counts[split], args, progress) for split in SPLITS}
    manifest = {"params": params, "splits": splits, "seed": args.seed, "image_size": args.image_size,
                "palette": {k: list(v) for k, v in COLORS.items()}, "background": list(BACKGROUND),
                "shapes": list(SHAPES), "positions": list(POSITIONS),
                "members": ["png", "txt", "json"], "created_by": "tools/make_shapes_shards.py"}
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    n_shards = sum(len(s["shards"]) for s in splits.values())
    print(f"wrote {args.train_samples} train + {args.heldout_samples} heldout samples ({args.image_size}px, "
          f"seed {args.seed}) in {n_shards} shards to {out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
