#!/usr/bin/env python
"""Data loading throughput per worker: pixel shards (256 px JPEG) vs precomputed latent shards, and packing time.

Each row streams one shard set through the training dataset (``data_pipelines.loader.PackedDataset``: tar read,
decode, tokenize, sequence building, packing into Batches) in this one process with one torch thread, which is what
one DataLoader worker does, and reports samples/s and tokens/s (real tokens of the packed rows). "packing" is the
share of that time spent in ``Packer.add`` / ``Packer.emit``, measured on the same sequences. Without ``--pixels`` /
``--latents`` it writes its own synthetic shards to a temporary directory: smooth random 256 px RGB JPEGs (quality
90, ~17 KB) and 4x32x32 latents (float16 .npy and bfloat16 .safetensors), each with a ~60-character caption. Both
use a 16 x 16 patch grid (pixel patches of 16, latent patches of 2), so tokens per sample match.

    python tools/bench_data.py                      # synthetic shards, markdown table on stdout
    python tools/bench_data.py --pixels 'data/img/train-{000000..000009}.tar' --image-size 256 --seconds 10
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pixels", help="pixel shard spec (default: synthetic 256 px JPEG shards)")
    p.add_argument("--latents", help="latent shard spec (default: synthetic 4x32x32 float16 + bfloat16 shards)")
    p.add_argument("--image-size", type=int, default=256, help="pixel side (default 256)")
    p.add_argument("--grid", type=int, default=16, help="patches per image side (default 16 -> 256 image tokens)")
    p.add_argument("--samples", type=int, default=512, help="synthetic samples per shard set (default 512)")
    p.add_argument("--seconds", type=float, default=4.0, help="measuring time per row and repeat (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="runs per row; the table shows the median (default 3)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per packed row (default 2048)")
    p.add_argument("--batch-rows", type=int, default=4, help="rows per batch (default 4)")
    return p


# ---------------------------------------------------------------------------------------------------------------
# Synthetic shards


def _caption(rng, i: int) -> str:
    words = ["a", "red", "blue", "small", "large", "photo", "of", "the", "dog", "cat", "house", "on", "street",
             "near", "river", "with", "trees", "at", "night", "sunny"]
    return f"{i}: " + " ".join(rng.choice(words, size=12))


def write_synthetic(root: Path, n: int, size: int, grid: int) -> tuple[str, str, str]:
    import numpy as np
    import torch
    import webdataset as wds
    from PIL import Image
    from safetensors.torch import save

    rng = np.random.default_rng(0)
    specs = []
    for kind in ("jpg", "npy", "safetensors"):
        path = root / f"{kind}.tar"
        with wds.TarWriter(str(path), encoder=False) as sink:
            for i in range(n):
                sample = {"__key__": f"{i:08d}", "txt": _caption(rng, i).encode()}
                if kind == "jpg":
                    low = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
                    img = Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)
                    arr = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, (size, size, 3)), 0, 255)
                    buf = io.BytesIO()
                    Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=90)
                    sample["jpg"] = buf.getvalue()
                else:
                    z = rng.standard_normal((4, 2 * grid, 2 * grid)).astype(np.float32)
                    if kind == "npy":
                        buf = io.BytesIO()
                        np.save(buf, z.astype(np.float16))
                        sample["latent.npy"] = buf.getvalue()
                    else:
                        sample["latent.safetensors"] = save({"latent": torch.from_numpy(z).bfloat16()})
                sink.write(sample)
        specs.append(str(path))
    return specs[0], specs[1], specs[2]


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def measure(spec: str, fmt: str, image_size: int, grid: int, args: argparse.Namespace) -> dict[str, float]:
    """One run: stream ``spec`` for ``args.seconds`` through PackedDataset; rates and packing share."""
    from data_pipelines import packing
    from data_pipelines.loader import PackedDataset
    from transfusion.config import DataConfig
    from transfusion.tokenizer import ByteTokenizer

    cfg = DataConfig(shards=spec, image_size=image_size, seq_len=args.seq_len, batch_rows=args.batch_rows,
                     num_workers=0, shuffle_buffer=64, repeat=True, format=fmt, max_text_tokens=256)
    dataset = PackedDataset(cfg, ByteTokenizer(), (grid, grid), seed=0)
    pack_s = 0.0
    add, emit = packing.Packer.add, packing.Packer.emit

    def timed(fn):
        def wrapper(*a, **kw):
            nonlocal pack_s
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                pack_s += time.perf_counter() - t
        return wrapper

    packing.Packer.add, packing.Packer.emit = timed(add), timed(emit)
    try:
        it = iter(dataset)
        next(it)  # warm-up: open the shard, fill the shuffle buffer
        pack_s, samples, tokens, batches = 0.0, 0, 0, 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            batch = next(it)
            samples += len(batch.keys)
            tokens += int((batch.doc_ids >= 0).sum())
            batches += 1
        elapsed = time.perf_counter() - t0
    finally:
        packing.Packer.add, packing.Packer.emit = add, emit
    return {"samples_s": samples / elapsed, "tokens_s": tokens / elapsed, "pack_ms": 1000 * pack_s / max(batches, 1),
            "pack_share": pack_s / elapsed, "tokens_per_sample": tokens / max(samples, 1)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.image_size, args.grid, args.samples, args.repeats, args.seq_len, args.batch_rows) <= 0 \
            or args.seconds <= 0:
        print("error: all sizes, --seconds and --repeats must be positive", file=sys.stderr)
        return 2
    import platform

    import torch

    torch.set_num_threads(1)  # what a DataLoader worker gets
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        rows = []
        if args.pixels is None or args.latents is None:
            jpg, npy, st = write_synthetic(Path(tmp), args.samples, args.image_size, args.grid)
        if args.pixels is not None:
            jpg = args.pixels
        rows.append((f"pixels: {args.image_size} px JPEG", jpg, "pixels"))
        if args.latents is not None:
            rows.append(("latents (given shards)", args.latents, "latents"))
        else:
            rows += [(f"latents: 4x{2 * args.grid}x{2 * args.grid} float16 .npy", npy, "latents"),
                     (f"latents: 4x{2 * args.grid}x{2 * args.grid} bfloat16 .safetensors", st, "latents")]
        results = []
        for name, spec, fmt in rows:
            runs = [measure(spec, fmt, args.image_size, args.grid, args) for _ in range(args.repeats)]
            results.append((name, {k: statistics.median(r[k] for r in runs) for k in runs[0]}))
    base = results[0][1]["samples_s"]
    print(f"\nData loading, one worker (1 process, 1 torch thread), median of {args.repeats} runs of "
          f"{args.seconds:g} s; {platform.processor() or platform.machine()}, {torch.get_num_interop_threads()} "
          f"interop threads, Python {platform.python_version()}, torch {torch.__version__}; rows of "
          f"{args.seq_len} tokens x {args.batch_rows}\n")
    print("| shards | samples/s | tokens/s | tokens/sample | packing ms/batch | packing share | vs JPEG |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results:
        print(f"| {name} | {r['samples_s']:,.0f} | {r['tokens_s']:,.0f} | {r['tokens_per_sample']:.0f} | "
              f"{r['pack_ms']:.2f} | {100 * r['pack_share']:.1f}% | {r['samples_s'] / base:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
