#!/usr/bin/env python
"""Encode pixel shards through a VAE into latent shards that training reads directly (``data.format = "latents"``
or ``"auto"``; the trainer never re-encodes them).

Each input shard becomes one output shard with the same name (``NNNNNN-<name>`` when input names collide) and the
same keys. Per sample, every pixel image member ``<tag>.<jpg|png|webp>`` becomes ``<tag>.latent.npy`` (or
``.latent.safetensors``: ``--format``), i.e. ``key.latent.npy`` for a pair and ``key.0.latent.npy ...`` for an
interleaved document, whose json segments still resolve (they name images by tag). All other members (txt, json,
...) are copied; the json member gains a ``latent`` record: dtype, shape, the VAE's path, scaling and shift (from its
config), image size, resize policy, source key and URL. Latents are the posterior mean, normalised by the VAE's
config exactly like ``transfusion.latents.vae.VAECodec.encode``.

Images are decoded in ``--decode-workers`` processes and encoded in batches of ``--batch-size`` on the GPU when
present. Many processes: ``--num-procs N`` starts N local processes (one GPU each, round-robin), or run one process
per machine with ``--shard-index i --num-shards n``; each handles input shards ``i, i + n, ...``. Finished output
shards are skipped on a re-run (``--force`` redoes them); ``index.json`` is written once every part is done.

    python tools/precompute_latents.py --shards 'data/img/train-{000000..000099}.tar' --vae vae/ \\
        --out data/img_latents --image-size 256 --dtype float16 --num-procs 4
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from data_pipelines.writer import PLAIN, TarShard

INDEX = "index.json"
PARTS = "_parts"
DTYPES = ("float16", "bfloat16", "float32")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="input pixel shards: paths, globs, brace lists, pipe: URLs")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL directory (or a pipeline with vae/)")
    p.add_argument("--out", required=True, help="output directory for the latent shards and index.json")
    p.add_argument("--image-size", type=int, required=True, help="pixel side the images are fitted to before encoding")
    p.add_argument("--resize", choices=("center_crop", "resize", "pad"), default="center_crop",
                   help="how images are fitted to the square (must match the run's data.resize; default center_crop)")
    p.add_argument("--min-image-size", type=int, default=0, help="skip images whose shorter side is smaller")
    p.add_argument("--caption-field", default="txt", help="pairs without this caption are skipped (data.caption_field)")
    p.add_argument("--segments-field", default="segments", help="json field of interleaved documents")
    p.add_argument("--dtype", choices=DTYPES, default="float16", help="stored latent dtype (default float16)")
    p.add_argument("--format", choices=("npy", "safetensors"), default="npy",
                   help="latent member format (bfloat16 needs safetensors; default npy)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--vae-dtype", choices=DTYPES, default="float32", help="VAE compute dtype (default float32)")
    p.add_argument("--decode-workers", type=int, default=2, help="processes decoding images (0 = in this process)")
    p.add_argument("--num-procs", type=int, default=1, help="start this many local processes (one GPU each)")
    p.add_argument("--shard-index", type=int, default=0, help="this process's share: input shards i, i+n, ...")
    p.add_argument("--num-shards", type=int, default=1, help="number of processes sharing the input shards")
    p.add_argument("--force", action="store_true", help="redo output shards that already exist")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    return p


def check_args(args: argparse.Namespace) -> str | None:
    if args.image_size <= 0 or args.batch_size <= 0 or args.num_procs <= 0 or args.num_shards <= 0:
        return "--image-size, --batch-size, --num-procs and --num-shards must be positive"
    if not 0 <= args.shard_index < args.num_shards:
        return f"--shard-index {args.shard_index} must lie in [0, --num-shards={args.num_shards})"
    if args.num_procs > 1 and args.num_shards > 1:
        return "use either --num-procs or --shard-index/--num-shards, not both"
    if args.dtype == "bfloat16" and args.format == "npy":
        return "--dtype bfloat16 needs --format safetensors (.npy has no bfloat16)"
    if args.decode_workers < 0 or args.min_image_size < 0:
        return "--decode-workers and --min-image-size must be >= 0"
    return None


def output_names(urls: list[str]) -> list[str]:
    """One output name per input shard: its basename, prefixed with its position when basenames collide."""
    def base(url: str) -> str:
        word = url.split()[-1] if url.startswith("pipe:") else url
        name = word.rstrip("/").rsplit("/", 1)[-1]
        return name if name.endswith(".tar") else f"{name}.tar"

    names = [base(u) for u in urls]
    if len(set(names)) < len(names):
        names = [f"{j:06d}-{n}" for j, n in enumerate(names)]
    return names


# ---------------------------------------------------------------------------------------------------------------
# Decoding (DataLoader workers): whole input shards per worker, samples in file order


def _dataset(jobs: list[tuple[int, str]], args: argparse.Namespace):
    """Items streamed to the encoder: ("sample", j, key, other members, tags, images [k, 3, S, S], url),
    ("skip", j, reason) or ("end", j, shard error counts)."""
    import torch
    from torch.utils.data import IterableDataset, get_worker_info

    from data_pipelines.documents import decode_image, image_members, read_caption, read_json
    from data_pipelines.errors import SkipSample
    from data_pipelines.shards import iter_tar

    class ShardImages(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            mine = jobs if info is None else jobs[info.id::info.num_workers]
            for j, url in mine:
                errors: Counter[str] = Counter()
                reader = iter_tar(url, on_error=lambda reason, u, exc: errors.update([reason]))
                for _, raw in reader:
                    try:
                        members = image_members(raw)
                        if not members:
                            raise SkipSample("no_image")
                        record = read_json(raw)
                        if record is None or args.segments_field not in record:
                            read_caption(raw, args.caption_field, record)
                        tags = sorted(members)
                        images = torch.stack([decode_image(raw[members[t]], args.image_size, args.resize,
                                                           args.min_image_size) for t in tags])
                    except SkipSample as skip:
                        yield ("skip", j, skip.reason)
                        continue
                    image_exts = set(members.values())
                    rest = {k: v for k, v in raw.items() if not k.startswith("__") and k not in image_exts}
                    yield ("sample", j, raw["__key__"], rest, tags, images, raw["__url__"])
                yield ("end", j, dict(errors))

    return ShardImages()


# ---------------------------------------------------------------------------------------------------------------
# Encoding and writing


def latent_bytes(z, dtype: str, fmt: str) -> bytes:
    """One latent [C, h, w] (float32 tensor) -> member bytes."""
    import numpy as np
    import torch

    if fmt == "safetensors":
        from safetensors.torch import save

        return save({"latent": z.to(getattr(torch, dtype)).contiguous()})
    buf = io.BytesIO()
    np.save(buf, z.numpy().astype(dtype), allow_pickle=False)
    return buf.getvalue()


class Writers:
    """Output shards open at once (decode workers interleave input shards), each ``.tmp`` until its input shard is
    finished."""

    def __init__(self, out: Path) -> None:
        self.out, self.open = out, {}

    def write(self, name: str, key: str, members: dict[str, bytes]) -> None:
        if name not in self.open:
            self.open[name] = TarShard(self.out, name, PLAIN)
        self.open[name].write(key, members)

    def finish(self, name: str) -> None:
        if name not in self.open:  # an input that gave no sample still gets its (empty) output shard
            self.open[name] = TarShard(self.out, name, PLAIN)
        self.open.pop(name).close()


def run_part(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from data_pipelines.shards import expand_shard_spec
    from transfusion.latents.vae import VAECodec

    urls = expand_shard_spec(args.shards)
    names = output_names(urls)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(j, urls[j]) for j in range(args.shard_index, len(urls), args.num_shards)
            if args.force or not (out / names[j]).exists()]
    # start the decode workers before the VAE touches the GPU (forked workers must not inherit a CUDA context)
    workers = min(args.decode_workers, len(jobs))
    loader = DataLoader(_dataset(jobs, args), batch_size=None, num_workers=workers,
                        multiprocessing_context="fork" if workers and sys.platform == "linux" else None)
    items = iter(loader)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # no advice about optional packages on every start
    try:
        codec = VAECodec(args.vae, device=device, dtype=getattr(torch, args.vae_dtype))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.image_size % codec.downsample:
        print(f"error: --image-size {args.image_size} is not divisible by the VAE's downsampling factor "
              f"{codec.downsample}", file=sys.stderr)
        return 2
    side = args.image_size // codec.downsample
    meta = {"dtype": args.dtype, "shape": [codec.channels, side, side], "format": args.format,
            "vae": str(Path(args.vae).resolve()), "scaling_factor": codec.scaling_factor,
            "shift_factor": codec.shift_factor, "image_size": args.image_size, "resize": args.resize,
            "posterior": "mean"}
    mean = getattr(codec.vae.config, "latents_mean", None)
    if mean is not None:
        meta |= {"latents_mean": list(mean), "latents_std": list(codec.vae.config.latents_std)}
    suffix = f"latent.{args.format}"

    stats: dict[int, dict[str, Any]] = {j: {"input": urls[j], "output": names[j], "samples": 0, "images": 0,
                                            "skipped": Counter()} for j, _ in jobs}
    writers = Writers(out)
    pending: list[tuple] = []
    pending_images = 0
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal pending, pending_images
        if not pending:
            return
        images = torch.cat([item[5] for item in pending])
        z = torch.cat([codec.encode(images[i:i + args.batch_size]).float().cpu()
                       for i in range(0, len(images), args.batch_size)])
        at = 0
        for _, j, key, rest, tags, imgs, url in pending:
            members = dict(rest)
            for tag in tags:
                members[f"{tag}.{suffix}" if tag else suffix] = latent_bytes(z[at], args.dtype, args.format)
                at += 1
            record = {}
            if "json" in rest:
                try:
                    record = json.loads(rest["json"])
                except (UnicodeDecodeError, json.JSONDecodeError):
                    record = {}
                record = record if isinstance(record, dict) else {}
            record["latent"] = meta | {"source_key": key, "source_url": url}
            members["json"] = json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8")
            writers.write(names[j], key, members)
            stats[j]["samples"] += 1
            stats[j]["images"] += len(tags)
        pending, pending_images = [], 0

    bar = tqdm(unit="img", desc=f"latents {args.shard_index}/{args.num_shards}", file=sys.stderr,
               disable=True if args.no_progress else None)
    try:
        for item in items:
            if item[0] == "skip":
                stats[item[1]]["skipped"][item[2]] += 1
            elif item[0] == "end":
                flush()
                stats[item[1]]["skipped"].update(item[2])
                writers.finish(names[item[1]])
            else:
                pending.append(item)
                pending_images += len(item[4])
                bar.update(len(item[4]))
                if pending_images >= args.batch_size:
                    flush()
    finally:
        bar.close()
    parts = out / PARTS
    parts.mkdir(exist_ok=True)
    part = {"shard_index": args.shard_index, "num_shards": args.num_shards, "latent": meta,
            "shards": [s | {"skipped": dict(s["skipped"])} for s in stats.values()]}
    part_path = parts / f"part-{args.shard_index:05d}-of-{args.num_shards:05d}.json"
    if part_path.exists() and not args.force:  # a re-run: keep the shards an earlier run finished
        done = {s["output"]: s for s in json.loads(part_path.read_text()).get("shards", [])}
        part["shards"] = list((done | {s["output"]: s for s in part["shards"]}).values())
    _write_json(part_path, part)
    n_samples = sum(s["samples"] for s in stats.values())
    n_images = sum(s["images"] for s in stats.values())
    skipped = sum((s["skipped"] for s in stats.values()), Counter())
    print(f"part {args.shard_index}/{args.num_shards}: {len(jobs)} shard(s), {n_samples} samples, {n_images} images "
          f"encoded on {device} in {time.perf_counter() - t0:.1f}s; skipped {sum(skipped.values())}"
          + (": " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) if skipped else ""))
    merge_index(out, args.num_shards, names)
    return 0


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def merge_index(out: Path, num_shards: int, names: list[str]) -> bool:
    """Write index.json once all ``num_shards`` parts exist (any process may do it; the result is the same)."""
    paths = [out / PARTS / f"part-{i:05d}-of-{num_shards:05d}.json" for i in range(num_shards)]
    if not all(p.exists() for p in paths):
        return False
    parts = [json.loads(p.read_text()) for p in paths]
    shards = sorted((s for part in parts for s in part["shards"]), key=lambda s: names.index(s["output"])
                    if s["output"] in names else len(names))
    skipped = sum((Counter(s["skipped"]) for s in shards), Counter())
    _write_json(out / INDEX, {"format": "latents", "latent": parts[0]["latent"], "shards": shards,
                              "samples": sum(s["samples"] for s in shards), "images": sum(s["images"] for s in shards),
                              "skipped": dict(sorted(skipped.items())), "created_by": "tools/precompute_latents.py"})
    return True


def run_many(args: argparse.Namespace, argv: list[str]) -> int:
    """Start ``--num-procs`` copies of this tool, one GPU each (round-robin) when the device is auto/cuda."""
    import torch

    gpus = torch.cuda.device_count() if args.device in ("auto", "cuda") else 0
    base = [a for a in argv if not a.startswith("--num-procs")]
    if "--num-procs" in argv:  # "--num-procs N" as two words
        i = argv.index("--num-procs")
        base = argv[:i] + argv[i + 2:]
    procs = []
    for i in range(args.num_procs):
        extra = ["--shard-index", str(i), "--num-shards", str(args.num_procs), "--no-progress"]
        if gpus:
            extra += ["--device", f"cuda:{i % gpus}"]
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *base, *extra]))
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"error: {sum(1 for c in codes if c)} of {len(codes)} processes failed (exit codes {codes})",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from transfusion.cli import fail_cleanly

    if args.num_procs > 1:
        return fail_cleanly(run_many)(args, argv)
    return fail_cleanly(run_part)(args)


if __name__ == "__main__":
    sys.exit(main())
