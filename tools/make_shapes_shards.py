#!/usr/bin/env python
"""Write the shapes world as WebDataset shards: DIR/train-000000.tar ..., DIR/heldout-000000.tar ..., manifest.json.

``--world 2`` (default): one shape per image, "a red circle on the left". ``--world 3``: the compositional world of
``data_pipelines/scenes.py`` (1-4 objects, counts, attributes, relations) with held-out compositions; its
held-out split never repeats a training render (PNG hashes checked, duplicates skipped and counted).

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
    p.add_argument("--world", type=int, choices=(2, 3), default=2,
                   help="2: one shape per image; 3: compositional scenes with held-out compositions")
    p.add_argument("--interleaved-share", type=float, default=0.1,
                   help="world 3: share of training samples that are interleaved documents (text, image, text about "
                        "it, a second image with one more object)")
    p.add_argument("--image-size", type=_count(16), default=None,
                   help="image side in pixels (default 32; below that small shapes start to look alike)")
    p.add_argument("--seed", type=_count(0), default=0, help="world seed; each sample is a pure function of it")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing dataset that was generated with different parameters")
    return p


def sample_fn(world: int, split: str):
    """index, seed, size -> (key, image, caption, record) for one split of one world."""
    if world == 3:
        from data_pipelines import scenes

        return scenes.training_sample if split == "train" else scenes.heldout_sample
    from data_pipelines.shapes import make_sample

    return lambda index, seed, size: make_sample(split, index, seed, size)


def write_split(out: Path, split: str, n: int, args: argparse.Namespace, progress: Any,
                seen_hashes: set[str] | None = None, skip_hashes: set[str] | None = None) -> dict[str, Any]:
    """Write ``n`` samples of ``split``. PNG hashes are added to ``seen_hashes``; a sample whose PNG hash is in
    ``skip_hashes`` is not written (the next index is drawn instead) and counted as ``skipped_duplicates``."""
    import hashlib

    from data_pipelines.shapes import png_bytes
    from data_pipelines.writer import WEBDATASET, ShardWriter

    make = sample_fn(args.world, split)
    interleaved_every = 0
    if args.world == 3 and split == "train" and args.interleaved_share > 0:
        from data_pipelines import scenes

        interleaved_every = max(1, round(1 / args.interleaved_share))  # every k-th training sample
    index, skipped, written = 0, 0, 0
    with ShardWriter(out, split, args.shard_size, style=WEBDATASET) as sink:
        while written < n:
            if interleaved_every and index % interleaved_every == interleaved_every - 1:
                key, images, _, record = scenes.interleaved_sample(index, args.seed, args.image_size)
                index += 1
                members = {f"{i}.png": png_bytes(im) for i, im in enumerate(images)}
                if seen_hashes is not None:
                    seen_hashes.update(hashlib.sha256(m).hexdigest() for m in members.values())
                sink.write(key, {**members, "json": json.dumps(record, sort_keys=True).encode()})
                written += 1
                progress.update(1)
                continue
            key, image, text, record = make(index, args.seed, args.image_size)
            index += 1
            png = png_bytes(image)
            digest = hashlib.sha256(png).hexdigest()
            if skip_hashes is not None and digest in skip_hashes:
                skipped += 1
                continue
            if seen_hashes is not None:
                seen_hashes.add(digest)
            sink.write(key, {"png": png, "txt": text.encode(), "json": json.dumps(record, sort_keys=True).encode()})
            written += 1
            progress.update(1)
    return {"samples": n, "shards": sink.names, "samples_per_shard": [s["samples"] for s in sink.shards],
            "skipped_duplicates": skipped}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from data_pipelines.shapes import BACKGROUND, COLORS, POSITIONS, SHAPES, WORLD_VERSION

    if not 0.0 <= args.interleaved_share < 1.0:
        print(f"error: --interleaved-share must be in [0, 1), got {args.interleaved_share}", file=sys.stderr)
        return 2
    if args.image_size is None:
        args.image_size = 32
    world_version = WORLD_VERSION
    if args.world == 3:
        from data_pipelines import scenes

        world_version = scenes.WORLD_VERSION
    out = Path(args.out)
    params = {"world_version": world_version, "seed": args.seed, "image_size": args.image_size,
              "shard_size": args.shard_size, "train_samples": args.train_samples,
              "heldout_samples": args.heldout_samples,
              **({"interleaved_share": args.interleaved_share, "generator_revision": scenes.GENERATOR_REVISION}
                 if args.world == 3 else {})}
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
    train_hashes: set[str] = set()
    with tqdm(total=sum(counts.values()), unit="img", desc="shapes", file=sys.stderr,
              disable=None) as progress:
        splits = {"train": write_split(out, "train", counts["train"], args, progress, seen_hashes=train_hashes),
                  "heldout": write_split(out, "heldout", counts["heldout"], args, progress,
                                         skip_hashes=train_hashes if args.world == 3 else None)}
    manifest = {"params": params, "splits": splits, "seed": args.seed, "image_size": args.image_size,
                "palette": {k: list(v) for k, v in COLORS.items()}, "background": list(BACKGROUND),
                "shapes": list(SHAPES), "members": ["png", "txt", "json"], "created_by": "tools/make_shapes_shards.py"}
    if args.world == 3:
        h = scenes.HELDOUT
        manifest["heldout_compositions"] = {
            "color_shape": sorted(map(list, h.color_shape)), "count_shape": sorted(map(list, h.count_shape)),
            "relation": sorted(map(list, h.relation)), "object_pairs": sorted(sorted(map(list, p)) for p in
                                                                              h.object_pairs)}
    else:
        manifest["positions"] = list(POSITIONS)
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    n_shards = sum(len(s["shards"]) for s in splits.values())
    print(f"wrote {args.train_samples} train + {args.heldout_samples} heldout samples ({args.image_size}px, "
          f"seed {args.seed}) in {n_shards} shards to {out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
