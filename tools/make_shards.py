#!/usr/bin/env python
"""Pack images and captions, or interleaved documents, into standard WebDataset tar shards plus index.json.

Inputs (exactly one):
  --images DIR        every image under DIR (recursive, name order) with a sidecar caption: photo.jpg + photo.txt,
                      or photo.json holding --caption-field (the json is kept as the sample's json member)
  --manifest FILE     JSONL lines {"image": PATH, "caption": TEXT, ...} or a CSV with those columns (names set by
                      --image-column / --caption-column); extra fields go to the json member
  --documents FILE    interleaved documents, JSONL lines {"segments": [{"text": ...}, {"image": PATH,
                      "role": "target"|"condition" (optional)}, ...], ...}

Output, per sample (key = the input's running index, 9 digits, so keys are stable across re-runs):
  pairs:      000000042.jpg  000000042.txt  [000000042.json]
  documents:  000000042.0.jpg  000000042.1.png  000000042.json   (json segments name the members: {"image": "0.jpg"})

Shards ``PREFIX-000000.tar ...`` close at --max-samples samples or --max-size-mb megabytes, are written under a
``.tmp`` name and renamed when complete; ``PREFIX.index.json`` (shards, counts, skips by reason) is written last. Images
are checked by decoding them (``--no-verify`` skips that); formats other than jpg/png/webp are re-encoded as PNG.
Relative paths in a manifest or documents file are resolved against --root (default: the file's directory).

    python tools/make_shards.py --images photos/ --out data/photos
    python tools/make_shards.py --manifest pairs.jsonl --out data/pairs --max-samples 5000 --workers 8
    python tools/make_shards.py --documents docs.jsonl --out data/docs
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipelines.writer import PLAIN, ShardWriter

INDEX = "{prefix}.index.json"  # one per prefix, so train and val shards can share a folder
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are; others become PNG
CHUNK = 1024  # records handed to the worker pool at a time (bounded memory on huge inputs)


class InputError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------------------
# Reading inputs: every source yields records {"index": i, ...}, turned into samples by `prepare`


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def folder_records(root: Path) -> list[dict[str, Any]]:
    if not root.is_dir():
        raise InputError(f"--images {root}: no such directory")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise InputError(f"--images {root}: no image files (jpg, png, webp, ...) found")
    return [{"kind": "folder", "image": str(p), "source": str(p.relative_to(root))} for p in paths]


def manifest_records(path: Path, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    root = Path(args.root) if args.root else path.parent
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {args.image_column, args.caption_column} - set(reader.fieldnames or [])
            if missing:
                raise InputError(f"--manifest {path}: CSV header lacks column(s) {', '.join(sorted(missing))} "
                                 f"(has: {', '.join(reader.fieldnames or [])})")
            for n, row in enumerate(reader, start=2):
                yield {"kind": "pair", "row": dict(row), "root": str(root), "source": f"{path.name}:{n}"}
        return
    for n, line in enumerate(open(path, encoding="utf-8"), start=1):
        if line.strip():
            yield {"kind": "pair", "line": line, "root": str(root), "source": f"{path.name}:{n}"}


def document_records(path: Path, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    root = Path(args.root) if args.root else path.parent
    for n, line in enumerate(open(path, encoding="utf-8"), start=1):
        if line.strip():
            yield {"kind": "document", "line": line, "root": str(root), "source": f"{path.name}:{n}"}


def count_lines(path: Path) -> int | None:
    if path.suffix.lower() == ".csv":
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


# ---------------------------------------------------------------------------------------------------------------
# Turning one record into sample members (runs in worker processes)


class Skip(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Options:
    caption_field: str = "caption"
    image_column: str = "image"
    caption_column: str = "caption"
    min_image_size: int = 0
    verify: bool = True


def load_image(path: Path, opts: Options) -> tuple[str, bytes]:
    """(extension, bytes) of one image file: kept as is when jpg/png/webp, else re-encoded as PNG."""
    from PIL import Image

    try:
        data = path.read_bytes()
    except OSError:
        raise Skip("missing_file") from None
    if not opts.verify and path.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") and not opts.min_image_size:
        return path.suffix.lower().lstrip(".").replace("jpeg", "jpg"), data
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, size = img.format, img.size
            if min(size) < opts.min_image_size:
                raise Skip("image_too_small")
            if opts.verify or fmt not in KEPT_FORMATS:
                img.load()
            if fmt in KEPT_FORMATS:
                return KEPT_FORMATS[fmt], data
            buf = io.BytesIO()
            (img if img.mode in ("RGB", "RGBA", "L", "LA", "P", "I;16") else img.convert("RGB")).save(buf, "PNG")
            return "png", buf.getvalue()
    except Skip:
        raise
    except Exception:  # noqa: BLE001 - PIL raises many types for bad data
        raise Skip("bad_image") from None


def _resolve(root: str, value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise Skip("bad_record")
    p = Path(value)
    return p if p.is_absolute() else Path(root) / p


def _caption(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Skip("missing_caption")
    return value.strip()


def prepare(record: dict[str, Any], opts: Options) -> dict[str, bytes]:
    """Record -> members {ext: bytes} (without the key), or ``Skip(reason)``."""
    kind = record["kind"]
    if kind == "folder":
        image = Path(record["image"])
        meta: dict[str, Any] | None = None
        side_json, side_txt = image.with_suffix(".json"), image.with_suffix(".txt")
        if side_json.is_file():
            try:
                meta = json.loads(side_json.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                raise Skip("bad_record") from None
            if not isinstance(meta, dict):
                raise Skip("bad_record")
        if side_txt.is_file():
            try:
                caption = _caption(side_txt.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise Skip("missing_caption") from None
        else:
            caption = _caption(None if meta is None else meta.get(opts.caption_field))
        ext, data = load_image(image, opts)
        members = {ext: data, "txt": caption.encode("utf-8")}
        if meta is not None:
            members["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        return members

    if "row" in record:
        row = record["row"]
    else:
        try:
            row = json.loads(record["line"])
        except json.JSONDecodeError:
            raise Skip("bad_record") from None
        if not isinstance(row, dict):
            raise Skip("bad_record")

    if kind == "pair":
        caption = _caption(row.get(opts.caption_column))
        ext, data = load_image(_resolve(record["root"], row.get(opts.image_column)), opts)
        meta = {k: v for k, v in row.items() if k not in (opts.caption_column,)}
        meta["caption"] = caption
        return {ext: data, "txt": caption.encode("utf-8"),
                "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")}

    segments = row.get("segments")
    if not isinstance(segments, list) or not segments:
        raise Skip("bad_record")
    members: dict[str, bytes] = {}
    out_segments: list[dict[str, Any]] = []
    for seg in segments:
        if not isinstance(seg, dict) or ("text" in seg) == ("image" in seg):
            raise Skip("bad_record")
        if "text" in seg:
            if not isinstance(seg["text"], str):
                raise Skip("bad_record")
            out_segments.append({"text": seg["text"]})
            continue
        if seg.get("role") not in (None, "target", "condition"):
            raise Skip("bad_record")
        ext, data = load_image(_resolve(record["root"], seg["image"]), opts)
        name = f"{len(members)}.{ext}"
        members[name] = data
        out_segments.append({"image": name, **({"role": seg["role"]} if seg.get("role") else {}),
                             "source": seg["image"]})
    if not any(s.get("text", "").strip() for s in out_segments) and not members:
        raise Skip("bad_record")
    doc = {k: v for k, v in row.items() if k != "segments"} | {"segments": out_segments}
    members["json"] = json.dumps(doc, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return members


def _prepare_chunk(args: tuple[list[dict[str, Any]], Options]) -> list[tuple[str, dict[str, bytes] | str]]:
    """(source, members or skip reason) for each record of a chunk, in order."""
    chunk, opts = args
    out: list[tuple[str, dict[str, bytes] | str]] = []
    for record in chunk:
        try:
            out.append((record["source"], prepare(record, opts)))
        except Skip as skip:
            out.append((record["source"], skip.reason))
    return out


def _ordered_map(pool: Any, fn: Any, items: Iterator[Any], window: int) -> Iterator[Any]:
    """``pool.imap`` with at most ``window`` items in flight (imap would read a huge input ahead into memory)."""
    from collections import deque

    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of images with sidecar .txt or .json captions")
    src.add_argument("--manifest", metavar="FILE", help="JSONL or CSV of image path + caption")
    src.add_argument("--documents", metavar="FILE", help="JSONL of interleaved documents ({\"segments\": [...]})")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    p.add_argument("--max-samples", type=_positive(int), default=10000, help="samples per shard (default: 10000)")
    p.add_argument("--max-size-mb", type=_positive(float), default=1024.0,
                   help="shard size limit in MB (default: 1024); a larger single sample gets a shard of its own")
    p.add_argument("--caption-field", default="caption", help="caption field of sidecar .json files (default: caption)")
    p.add_argument("--image-column", default="image", help="manifest field or column of the image path")
    p.add_argument("--caption-column", default="caption", help="manifest field or column of the caption")
    p.add_argument("--root", help="base directory for relative image paths (default: the input file's directory)")
    p.add_argument("--min-image-size", type=int, default=0, help="skip images whose shorter side is smaller")
    p.add_argument("--no-verify", action="store_true", help="do not decode images to check them (faster)")
    p.add_argument("--workers", type=_positive(int), default=1, help="processes reading and checking images")
    p.add_argument("--limit", type=_positive(int), help="stop after this many input records")
    p.add_argument("--force", action="store_true", help="replace the prefix's shards and index already in --out")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    return p


def _records(args: argparse.Namespace) -> tuple[Iterator[dict[str, Any]], int | None, str]:
    if args.images:
        records = folder_records(Path(args.images))
        return iter(records), len(records), "pairs"
    path = Path(args.manifest or args.documents)
    if not path.is_file():
        raise InputError(f"--{'manifest' if args.manifest else 'documents'} {path}: no such file")
    if args.manifest:
        return manifest_records(path, args), count_lines(path), "pairs"
    return document_records(path, args), count_lines(path), "documents"


def _chunks(records: Iterator[dict[str, Any]], limit: int | None) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for i, record in enumerate(records):
        if limit is not None and i >= limit:
            break
        chunk.append(record)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _prepare_out(out: Path, prefix: str, force: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    index = INDEX.format(prefix=prefix)
    existing = [p for p in out.iterdir() if p.name == index or (p.name.startswith(f"{prefix}-") and
                                                                 p.name.endswith((".tar", ".tar.tmp")))]
    if existing and not force:
        raise InputError(f"{out} already holds {prefix} shards or {index} (e.g. {existing[0].name}); pass --force "
                         f"to replace them, or choose another --out or --prefix")
    for p in existing:
        p.unlink()


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    opts = Options(caption_field=args.caption_field, image_column=args.image_column,
                   caption_column=args.caption_column, min_image_size=args.min_image_size, verify=not args.no_verify)
    records, total, fmt = _records(args)
    if args.limit is not None and total is not None:
        total = min(total, args.limit)
    out = Path(args.out)
    _prepare_out(out, args.prefix, args.force)
    writer = ShardWriter(out, args.prefix, args.max_samples, int(args.max_size_mb * 1e6), style=PLAIN)
    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    index = 0
    pool = None
    if args.workers > 1:
        import multiprocessing as mp

        pool = mp.Pool(args.workers)
    try:
        bar = tqdm(total=total, unit="rec", desc="make_shards", file=sys.stderr,
                   disable=True if args.no_progress else None)
        tasks = ((sub, opts) for chunk in _chunks(records, args.limit) for sub in _split(chunk, args.workers))
        results = _ordered_map(pool, _prepare_chunk, tasks, 2 * args.workers) if pool is not None \
            else map(_prepare_chunk, tasks)
        for result in results:
            for source, item in result:
                if isinstance(item, str):
                    skipped[item] += 1
                    if len(examples.setdefault(item, [])) < 5:
                        examples[item].append(source)
                else:
                    images = sum(1 for ext in item if ext not in ("txt", "json"))
                    writer.write(f"{index:09d}", item, images)
                index += 1
                bar.update(1)
        bar.close()
        writer.close()
    finally:
        if pool is not None:
            pool.terminate()
    written = sum(s["samples"] for s in writer.shards)
    skip_text = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
    if not written:
        print(f"error: no usable samples among {index} input records (skipped: {skip_text or 'none'})",
              file=sys.stderr)
        return 1
    n = len(writer.shards)
    spec = f"{args.prefix}-{{000000..{n - 1:06d}}}.tar" if n > 1 else writer.shards[0]["name"]
    index_doc = {"format": fmt, "spec": spec, "samples": written, "images": sum(s["images"] for s in writer.shards),
                 "bytes": sum(s["bytes"] for s in writer.shards), "input_records": index,
                 "skipped": dict(sorted(skipped.items())), "skipped_examples": examples, "shards": writer.shards,
                 "created_by": "tools/make_shards.py",
                 "args": {k: v for k, v in vars(args).items() if k not in ("no_progress",)}}
    index_path = out / INDEX.format(prefix=args.prefix)
    tmp = index_path.with_name(index_path.name + ".tmp")
    tmp.write_text(json.dumps(index_doc, indent=2) + "\n")
    os.replace(tmp, index_path)
    print(f"wrote {written} {'documents' if fmt == 'documents' else 'samples'} ({index_doc['images']} images) in "
          f"{n} shard(s) to {out}/{spec}; skipped {sum(skipped.values())}" + (f": {skip_text}" if skip_text else ""))
    for reason, sources in sorted(examples.items()):
        print(f"  {reason}: e.g. {', '.join(sources)}")
    return 0


def _split(chunk: list[dict[str, Any]], parts: int) -> list[list[dict[str, Any]]]:
    size = max(1, math.ceil(len(chunk) / parts))
    return [chunk[i:i + size] for i in range(0, len(chunk), size)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.min_image_size < 0:
        print("error: --min-image-size must be >= 0", file=sys.stderr)
        return 2
    try:
        return run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (complete shards are kept; the .tmp shard and the index are not written)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
