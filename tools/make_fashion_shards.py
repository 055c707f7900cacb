#!/usr/bin/env python
"""Write Fashion-MNIST (or another IDX image / label set) as captioned WebDataset shards.

    make fashion-data                                             # installs the Debian package if it can, then this
    python tools/make_fashion_shards.py --out data/fashion        # from /usr/share/datasets/fashion-mnist
    python tools/make_fashion_shards.py --idx path/to/idx --image-size 32 --out data/fashion32

Output: ``train-*.tar`` from the published training split, captions from ``TRAIN_TEMPLATES`` (one drawn per sample),
with ``--interleaved-share`` of the samples turned into two-item documents with a comparison sentence; and
``heldout-*.tar`` from the published test split, each image captioned once with a training template (``seen``) and
once with a held-out template (``unseen``, never in training), the template kind and class in the sample's json.
Held-out images whose pixels equal a training image are dropped (counted in manifest.json). Each sample is
``<key>.png`` + ``<key>.txt`` + ``<key>.json`` ({"label", "class", "template", "template_seen"}); documents are
``<key>.0.png`` + ``<key>.1.png`` + ``<key>.json`` ({"segments": [...]}), the layout ``tools/make_shards.py`` writes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
from pathlib import Path

MANIFEST = "manifest.json"


def build_parser() -> argparse.ArgumentParser:
    from data_pipelines.fashion import DEFAULT_ROOT

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--idx", default=DEFAULT_ROOT, help=f"folder with the four IDX files (default {DEFAULT_ROOT})")
    p.add_argument("--out", default="data/fashion", help="output folder (default data/fashion)")
    p.add_argument("--image-size", type=int, default=28, help="side in pixels: 28 keeps the originals; larger pads "
                   "them on a black canvas, smaller resizes (default 28: 7 x 7 patches of 4 px)")
    p.add_argument("--train-samples", type=int, default=0, help="use the first N training images (0 = all 60,000)")
    p.add_argument("--heldout-samples", type=int, default=1000, help="test images in the held-out shard (default "
                   "1000, each twice: a seen and an unseen template)")
    p.add_argument("--interleaved-share", type=float, default=0.1, help="share of training samples that are "
                   "two-item documents (default 0.1)")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default 5000)")
    p.add_argument("--seed", type=int, default=0)
    return p


def png(rgb) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from data_pipelines.fashion import (
        CLASSES,
        DEBIAN_PACKAGE,
        HELDOUT_TEMPLATES,
        TRAIN_TEMPLATES,
        IDXError,
        caption_for,
        image_hash,
        interleaved_segments,
        read_idx_pair,
        to_rgb,
    )
    from data_pipelines.writer import WEBDATASET, ShardWriter

    if not 0 <= args.interleaved_share < 1 or args.image_size < 8 or args.shard_size < 1:
        print("error: --interleaved-share must be in [0, 1), --image-size >= 8, --shard-size >= 1", file=sys.stderr)
        return 2
    try:
        train_x, train_y = read_idx_pair(args.idx, "train")
        test_x, test_y = read_idx_pair(args.idx, "test")
    except FileNotFoundError as e:
        print(f"error: {e} (install it: sudo apt-get install {DEBIAN_PACKAGE}, or pass --idx)", file=sys.stderr)
        return 2
    except IDXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.train_samples:
        train_x, train_y = train_x[:args.train_samples], train_y[:args.train_samples]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an interrupted run must not look finished
    for stale in out.glob("*.tar*"):
        stale.unlink()

    rng = random.Random(args.seed)
    train_hashes = {image_hash(x) for x in train_x}
    every = round(1 / args.interleaved_share) if args.interleaved_share > 0 else 0
    train = ShardWriter(out, "train", args.shard_size, style=WEBDATASET)
    n_docs = n_pairs = 0
    order = list(range(len(train_x)))
    with tqdm(total=len(order), unit="img", desc="train", file=sys.stderr, disable=None) as bar:
        i = 0
        while i < len(order):
            a = order[i]
            if every and n_pairs % every == every - 1 and i + 1 < len(order):
                b = order[i + 1]
                segments = interleaved_segments(int(train_y[a]), int(train_y[b]), rng)
                record = {"segments": segments, "labels": [int(train_y[a]), int(train_y[b])]}
                train.write(f"train-{a:06d}", {"0.png": png(to_rgb(train_x[a], args.image_size)),
                                               "1.png": png(to_rgb(train_x[b], args.image_size)),
                                               "json": json.dumps(record, sort_keys=True).encode()})
                n_docs += 1
                i += 2
                bar.update(2)
                n_pairs += 1
                continue
            label, template = int(train_y[a]), rng.randrange(len(TRAIN_TEMPLATES))
            text = caption_for(label, TRAIN_TEMPLATES[template])
            record = {"label": label, "class": CLASSES[label][0], "template": template, "template_seen": True,
                      "caption": text}
            train.write(f"train-{a:06d}", {"png": png(to_rgb(train_x[a], args.image_size)),
                                           "txt": text.encode(), "json": json.dumps(record, sort_keys=True).encode()})
            n_pairs += 1
            i += 1
            bar.update(1)
    train.close()

    heldout = ShardWriter(out, "heldout", args.shard_size, style=WEBDATASET)
    dropped = written = 0
    for j in range(len(test_x)):
        if written >= args.heldout_samples:
            break
        if image_hash(test_x[j]) in train_hashes:
            dropped += 1
            continue
        label = int(test_y[j])
        image = png(to_rgb(test_x[j], args.image_size))
        for seen, templates in ((True, TRAIN_TEMPLATES), (False, HELDOUT_TEMPLATES)):
            t = rng.randrange(len(templates))
            text = caption_for(label, templates[t])
            record = {"label": label, "class": CLASSES[label][0], "template": t, "template_seen": seen,
                      "caption": text, "test_index": j}
            key = f"test-{j:05d}-{'seen' if seen else 'unseen'}"
            heldout.write(key, {"png": image, "txt": text.encode(),
                                "json": json.dumps(record, sort_keys=True).encode()})
        written += 1
    heldout.close()

    manifest = {"source": str(Path(args.idx).resolve()), "image_size": args.image_size, "seed": args.seed,
                "classes": [c for c, _, _ in CLASSES], "train_templates": TRAIN_TEMPLATES,
                "heldout_templates": HELDOUT_TEMPLATES,
                "splits": {"train": {"shards": train.names, "images": len(order), "documents": n_docs},
                           "heldout": {"shards": heldout.names, "images": written, "samples": 2 * written,
                                       "dropped_equal_to_a_training_image": dropped}},
                "created_by": "tools/make_fashion_shards.py"}
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    print(f"{out}: {len(order)} training images ({n_docs} two-item documents) in {len(train.names)} shards; "
          f"{written} held-out test images x 2 templates in {len(heldout.names)} shard(s); {dropped} test images "
          f"dropped as pixel-identical to a training image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
