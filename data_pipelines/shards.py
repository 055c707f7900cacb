"""WebDataset tar shards: spec expansion, rank x worker split, tar reading, decoding and a resumable shuffle.

A *consumer* is one (rank, DataLoader worker) pair. Each consumer reads its own share of the shards as a stream of
raw samples (``{"__key__", "__url__", "__epoch__", ext: bytes, ...}``), shuffled in fixed-size blocks:

    shards (spec order, globs sorted)
      -> per-epoch permutation seeded by (seed, epoch): the same on every rank
      -> shards[rank::world][worker::num_workers]            (or the sample split below when shards are scarce)
      -> tar members grouped by key into raw samples
      -> blocks of `shuffle_buffer` raw samples, each permuted by (seed, epoch, rank, worker, block number)

Resuming stores no sample: the state names where the current block starts (shard cursor + raw-sample offset inside
that shard) and how far into the permuted block the stream is. Loading it re-reads the block (skipping earlier tar
members without decoding them), permutes it identically and carries on from the saved index.

Errors never stop the stream. A shard that cannot be opened or whose source fails before yielding anything counts as
``missing_shard``; a tar stream that breaks later (truncated, corrupt) counts as ``corrupt_shard`` and the stream
moves on to the next shard. Sample-level problems are raised as ``SkipSample(reason)`` by the decoders here and
counted by the caller (see ``SKIP_REASONS``).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torch import Tensor
from webdataset import gopen

RawSample = dict[str, Any]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# Per-sample skip reasons (they count against data.max_skip_rate) and per-shard error reasons (they do not).
SAMPLE_SKIP_REASONS = ("bad_image", "no_image", "missing_caption", "caption_too_long", "too_long_for_row")
SHARD_ERROR_REASONS = ("corrupt_shard", "missing_shard")
SKIP_REASONS = SAMPLE_SKIP_REASONS + SHARD_ERROR_REASONS
COUNT_KEYS = ("seen",) + SKIP_REASONS  # "seen": raw samples this consumer took from its stream
MAX_EMPTY_EPOCHS = 3  # a repeating stream that reads nothing this many epochs in a row raises DataError


class ShardSpecError(ValueError):
    """A shard spec that names no data."""


class DataError(RuntimeError):
    """The data stream cannot go on usefully (too many skipped samples, nothing readable)."""


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is one of ``SAMPLE_SKIP_REASONS``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def new_counts() -> dict[str, int]:
    return dict.fromkeys(COUNT_KEYS, 0)


# ---------------------------------------------------------------------------------------------------------------
# Shard specs

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB_CHARS = re.compile(r"[*?\[]")


def _split_top_level(spec: str) -> list[str]:
    """Split on commas that are not inside braces (``a-{0,1}.tar,b.tar`` -> two items)."""
    items, depth, cur = [], 0, []
    for ch in spec:
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
            continue
        depth += (ch == "{") - (ch == "}")
        cur.append(ch)
    items.append("".join(cur))
    return [s.strip() for s in items if s.strip()]


def expand_shard_spec(spec: str) -> list[str]:
    """Expand a comma-separated shard spec into an ordered list of shard URLs.

    Items: a local path, a glob (``data/*.tar``, sorted), a brace list (``shard-{000000..000009}.tar``), a
    ``pipe:CMD`` URL (braces expanded, each kept as a URL) or a ``scheme://`` URL (http, https, s3, gs, ...; braces
    expanded, kept). The order is the spec order, globs sorted, duplicates kept.

    A local item that matches no existing file raises ``ShardSpecError``. Inside a brace list that matches at least
    one file, the names that do not exist are kept: reading them later counts ``missing_shard``."""
    urls: list[str] = []
    for item in _split_top_level(spec):
        if item.startswith("pipe:") or (_URL_RE.match(item) and not item.startswith("file://")):
            urls.extend(braceexpand(item))
            continue
        local = item[len("file://"):] if item.startswith("file://") else item
        found: list[str] = []
        any_exists = False
        for pattern in braceexpand(local):
            if _GLOB_CHARS.search(pattern):
                matches = sorted(glob.glob(pattern))
                found.extend(matches)
                any_exists |= bool(matches)
            else:
                found.append(pattern)
                any_exists |= os.path.exists(pattern)
        if not any_exists:
            raise ShardSpecError(f"shard pattern {item!r} matches no files")
        urls.extend(found)
    if not urls:
        raise ShardSpecError(f"shard spec {spec!r} names no shards")
    return urls


# ---------------------------------------------------------------------------------------------------------------
# Splitting across ranks and workers


def _rng(*ints: int) -> np.random.Generator:
    """A generator seeded from a tuple of integers (any sign), independent of global RNG state."""
    return np.random.default_rng([i & 0xFFFF_FFFF_FFFF_FFFF for i in ints])


_SHARD_ORDER_STREAM = 0x5A4D
_BLOCK_STREAM = 0xB10C


@dataclass(frozen=True, slots=True)
class ShardAssignment:
    """The shards one consumer reads in one epoch, and which of their samples it keeps.

    ``stride == 1``: the consumer owns whole shards and keeps every sample. ``stride > 1`` (fewer shards than
    consumers): every consumer reads every shard and keeps sample ``i`` of the shard at list position ``j`` when
    ``(i + j) % stride == slot`` (the ``+ j`` rotates which consumer gets a shard's first sample, for balance)."""

    urls: tuple[str, ...]
    stride: int = 1
    slot: int = 0

    def keeps(self, position: int, index: int) -> bool:
        return self.stride == 1 or (index + position) % self.stride == self.slot


def assign_shards(urls: list[str], *, seed: int, epoch: int, rank: int, world_size: int, worker: int,
                  num_workers: int) -> ShardAssignment:
    """Permute ``urls`` with (seed, epoch), the same on every rank, then take ``[rank::world][worker::workers]``;
    fall back to splitting samples when there are fewer shards than ``world_size * num_workers`` consumers."""
    perm = _rng(_SHARD_ORDER_STREAM, seed, epoch).permutation(len(urls))
    ordered = [urls[i] for i in perm]
    consumers = world_size * num_workers
    if len(ordered) >= consumers:
        return ShardAssignment(tuple(ordered[rank::world_size][worker::num_workers]))
    return ShardAssignment(tuple(ordered), stride=consumers, slot=rank * num_workers + worker)


# ---------------------------------------------------------------------------------------------------------------
# Reading one shard


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/abc.seg.PNG`` -> (``dir/abc``, ``seg.png``); None for names without an extension or hidden files."""
    head, _, base = name.rpartition("/")
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_tar(url: str, *, start: int = 0, keep: Callable[[int], bool] | None = None,
             on_error: Callable[[str, str, BaseException], None] | None = None) -> Iterator[tuple[int, RawSample]]:
    """Yield ``(index, raw sample)`` for the samples of one tar shard, in file order.

    ``index`` counts every sample of the shard (consecutive members sharing a key). Samples with ``index < start``
    or rejected by ``keep(index)`` are passed over without reading their member data. Errors end the shard:
    ``on_error(reason, url, exc)`` is called with ``missing_shard`` (could not open; source failed before the first
    member) or ``corrupt_shard`` (the stream broke later, including a tar cut off without its end-of-archive
    blocks); the sample being assembled when the error hit is dropped."""
    index, members_read = -1, 0
    stream = None
    try:
        stream = gopen(url, "rb")
        tar = tarfile.open(fileobj=stream, mode="r|*")
        key: str | None = None
        sample: RawSample | None = None
        for member in tar:
            members_read += 1
            if not member.isfile():
                continue
            parts = split_member_name(member.name)
            if parts is None:
                continue
            if parts[0] != key:
                if sample is not None:
                    yield index, sample
                key, index = parts[0], index + 1
                wanted = index >= start and (keep is None or keep(index))
                sample = {"__key__": key, "__url__": url} if wanted else None
            if sample is not None:
                fobj = tar.extractfile(member)
                sample[parts[1]] = fobj.read() if fobj is not None else b""
        # tarfile's stream mode ends quietly on a header cut short; a clean archive ends with a zero block, which it
        # has consumed in full, so fewer than one block past the last member means the shard was truncated.
        if tar.fileobj.tell() - tar.offset < tarfile.BLOCKSIZE:
            raise tarfile.ReadError("tar stream ended without its end-of-archive block")
        if sample is not None:
            yield index, sample
    except Exception as exc:  # noqa: BLE001 - a broken shard must never stop the stream
        source_failed = stream is None or (isinstance(exc, OSError) and not isinstance(exc, tarfile.TarError))
        source_failed |= _close_failed(stream)
        stream = None
        if on_error is not None:
            on_error("missing_shard" if source_failed and members_read == 0 else "corrupt_shard", url, exc)
    finally:
        _close_failed(stream)


def _close_failed(stream: Any) -> bool:
    """Close a shard stream; True when it was a pipe whose command exited with an error status."""
    if stream is None:
        return False
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - webdataset's Pipe raises on a non-zero exit status
        pass
    status = getattr(stream, "status", None)  # a pipe killed by our closing it (SIGPIPE) has a negative status
    return status is not None and status > 0 and status != 141


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16/32-bit grey is scaled from 16-bit range; transparency is composited onto white."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "F":
            arr = arr / 257.0  # 16-bit content (the usual source of I / I;16 images) -> 8 bit
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, image_size: int) -> Tensor:
    """Encoded image bytes -> float [3, S, S] in [-1, 1]: short side resized to S (bicubic, antialiased when
    shrinking), center crop. Raises ``SkipSample("bad_image")`` when the bytes do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (image_size, image_size))  # JPEG: decode at the smallest scale still >= S
            rgb = _to_rgb(img)
            w, h = rgb.size
            side = min(w, h)
            left, top = (w - side) / 2, (h - side) / 2
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC,
                             box=(left, top, left + side, top + side))
            arr = np.asarray(rgb, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data
        raise SkipSample("bad_image") from exc
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def image_bytes(raw: RawSample) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in raw:
            return raw[ext]
    raise SkipSample("no_image")


def read_json(raw: RawSample) -> dict[str, Any] | None:
    """The sample's ``json`` member parsed, or None when absent or unreadable."""
    if "json" not in raw:
        return None
    try:
        record = json.loads(raw["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def read_caption(raw: RawSample, caption_field: str = "txt") -> str:
    """The caption: the ``txt`` member (or any other text extension named by ``caption_field``) as stripped UTF-8,
    or the field of the ``json`` member when ``caption_field = "json:<field>"``. Absent, empty, non-string or
    undecodable captions raise ``SkipSample("missing_caption")``."""
    if caption_field.startswith("json:"):
        record = read_json(raw)
        value = None if record is None else record.get(caption_field[len("json:"):])
    else:
        data = raw.get(caption_field)
        try:
            value = None if data is None else data.decode("utf-8")
        except UnicodeDecodeError:
            value = None
    if not isinstance(value, str) or not value.strip():
        raise SkipSample("missing_caption")
    return value.strip()


def check_caption_field(caption_field: str) -> None:
    if caption_field == "json:" or not caption_field:
        raise ValueError(f"data.caption_field must be an extension like 'txt' or 'json:<field>', got {caption_field!r}")


@dataclass(slots=True)
class DecodedSample:
    key: str
    image: Tensor  # [3, S, S] in [-1, 1]
    caption: str
    record: dict[str, Any] | None  # the json member, when present
    url: str


def decode_sample(raw: RawSample, image_size: int, caption_field: str = "txt") -> DecodedSample:
    """Raw sample -> DecodedSample, or ``SkipSample`` (checks in order: no_image, missing_caption, bad_image)."""
    data = image_bytes(raw)
    caption = read_caption(raw, caption_field)
    return DecodedSample(raw["__key__"], decode_image(data, image_size), caption, read_json(raw), raw["__url__"])


def iter_decoded_samples(spec: str, image_size: int, caption_field: str = "txt", limit: int | None = None,
                         counts: dict[str, int] | None = None) -> Iterator[tuple[str, Tensor, str, dict | None]]:
    """``(key, image [3,S,S], caption, json record or None)`` for every usable sample of ``spec``, in file order,
    no shuffle, no split (evaluation on held-out shards). Unusable samples and shards are skipped; pass ``counts``
    (e.g. ``new_counts()``) to receive the tallies."""
    check_caption_field(caption_field)
    counts = counts if counts is not None else new_counts()

    def on_error(reason: str, url: str, exc: BaseException) -> None:
        counts[reason] = counts.get(reason, 0) + 1

    if limit is not None and limit <= 0:
        return
    produced = 0
    for url in expand_shard_spec(spec):
        for _, raw in iter_tar(url, on_error=on_error):
            counts["seen"] = counts.get("seen", 0) + 1
            try:
                s = decode_sample(raw, image_size, caption_field)
            except SkipSample as skip:
                counts[skip.reason] = counts.get(skip.reason, 0) + 1
                continue
            yield s.key, s.image, s.caption, s.record
            produced += 1
            if limit is not None and produced >= limit:
                return


# ---------------------------------------------------------------------------------------------------------------
# The resumable per-consumer stream


class ShardStream:
    """Deterministically block-shuffled raw samples of one consumer, resumable without storing samples.

    ``counts`` is a shared tally (see ``COUNT_KEYS``): the stream adds shard errors to it, the caller adds sample
    skips. ``state_dict()`` captures it together with the position, so a restored stream reproduces the same tallies.
    """

    def __init__(self, urls: list[str], *, seed: int, rank: int = 0, world_size: int = 1, worker: int = 0,
                 num_workers: int = 1, shuffle_buffer: int = 1, repeat: bool = False) -> None:
        if shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.urls = list(urls)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.worker, self.num_workers = worker, num_workers
        self.shuffle_buffer, self.repeat = shuffle_buffer, repeat
        self.counts = new_counts()
        self._empty_epochs = 0  # consecutive epochs in which this consumer read nothing
        self._start_epoch(0)

    # -- position bookkeeping ------------------------------------------------------------------------------------

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._assignment = assign_shards(self.urls, seed=self.seed, epoch=epoch, rank=self.rank,
                                         world_size=self.world_size, worker=self.worker,
                                         num_workers=self.num_workers)
        self._next_start = (0, 0)  # (shard cursor, raw-sample offset) where the next block starts
        self._next_block = 0  # number of the next block within the epoch
        self._block: list[RawSample] = []
        self._block_start = (0, 0)
        self._block_number = 0
        self._pos = 0
        self._fill_counts: dict[str, int] = {}  # shard errors met while reading the current block
        self._close_reader()
        self.exhausted = False

    def _close_reader(self) -> None:
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.close()
        self._reader: Iterator[tuple[int, RawSample]] | None = None
        self._reader_at = (-1, -1)

    def state_dict(self) -> dict[str, Any]:
        if self._pos < len(self._block):  # inside a block: re-read it on resume, minus the errors it will recount
            start, number, index = self._block_start, self._block_number, self._pos
            counts = {k: v - self._fill_counts.get(k, 0) for k, v in self.counts.items()}
        else:  # between blocks: the next one has not been read yet
            start, number, index, counts = self._next_start, self._next_block, 0, dict(self.counts)
        return {"epoch": self.epoch, "shard_cursor": start[0], "sample_offset": start[1], "block": number,
                "index": index, "exhausted": self.exhausted, "empty_epochs": self._empty_epochs, "counts": counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._start_epoch(int(state["epoch"]))
        self.counts = new_counts() | {k: int(v) for k, v in state["counts"].items()}
        self._next_start = (int(state["shard_cursor"]), int(state["sample_offset"]))
        self._next_block = int(state["block"])
        self.exhausted = bool(state["exhausted"])
        self._empty_epochs = int(state.get("empty_epochs", 0))
        if state["index"] > 0:
            if not self._fill():
                raise DataError("data state points past the end of its shards; were the shards changed?")
            if state["index"] > len(self._block):
                raise DataError("data state points past the end of its shuffle block; were the shards changed?")
            self._pos = int(state["index"])

    # -- reading -------------------------------------------------------------------------------------------------

    def _count_error(self, reason: str, url: str, exc: BaseException) -> None:
        self.counts[reason] += 1
        self._fill_counts[reason] = self._fill_counts.get(reason, 0) + 1

    def _reader_for(self, cursor: int, offset: int) -> Iterator[tuple[int, RawSample]]:
        if self._reader is None or self._reader_at != (cursor, offset):
            self._close_reader()
            keep = (lambda i, _c=cursor: self._assignment.keeps(_c, i)) if self._assignment.stride > 1 else None
            self._reader = iter_tar(self._assignment.urls[cursor], start=offset, keep=keep,
                                    on_error=self._count_error)
        return self._reader

    def _read_block(self) -> list[RawSample]:
        """Read up to ``shuffle_buffer`` raw samples from ``_next_start``; advance ``_next_start`` past them."""
        block: list[RawSample] = []
        cursor, offset = self._next_start
        while len(block) < self.shuffle_buffer and cursor < len(self._assignment.urls):
            reader = self._reader_for(cursor, offset)
            for index, raw in reader:
                raw["__epoch__"] = self.epoch
                block.append(raw)
                offset = index + 1
                if len(block) == self.shuffle_buffer:
                    break
            else:  # shard finished (or broke): on to the next one
                self._close_reader()
                cursor, offset = cursor + 1, 0
                continue
            self._reader_at = (cursor, offset)
        self._next_start = (cursor, offset)
        return block

    def _fill(self) -> bool:
        """Load the next non-empty block (moving to the next epoch when repeating); False at the end of a pass."""
        while True:
            self._fill_counts = {}
            self._block_start = self._next_start
            block = self._read_block()
            if block:
                self._block_number = self._next_block
                self._next_block += 1
                perm = _rng(_BLOCK_STREAM, self.seed, self.epoch, self.rank, self.worker,
                            self._block_number).permutation(len(block))
                self._block, self._pos = [block[i] for i in perm], 0
                return True
            self._block, self._pos = [], 0
            if not self.repeat:
                self.exhausted = True
                return False
            self._empty_epochs = self._empty_epochs + 1 if self._next_block == 0 else 0
            if self._empty_epochs >= MAX_EMPTY_EPOCHS:
                raise DataError(
                    f"rank {self.rank} worker {self.worker} read no sample in {self._empty_epochs} whole epochs in a "
                    f"row over {len(self._assignment.urls)} shard(s) (counts: {self.counts}); check data.shards")
            self._start_epoch(self.epoch + 1)

    def __iter__(self) -> "ShardStream":
        return self

    def __next__(self) -> RawSample:
        if self.exhausted:
            raise StopIteration
        if self._pos >= len(self._block) and not self._fill():
            raise StopIteration
        raw = self._block[self._pos]
        self._block[self._pos] = {}  # drop the reference: each sample is emitted once
        self._pos += 1
        return raw

    def close(self) -> None:
        self._close_reader()

