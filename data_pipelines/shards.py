"""WebDataset tar shards: spec expansion, rank x worker split, tar reading, decoding and a resumable shuffle.

A *reader* is one (data consumer, DataLoader worker) pair (a data consumer is one micro-batch stream, see
transfusion/distributed/data.py). Each reader reads its own share of the shards as a stream of
raw samples (``{"__key__", "__url__", "__epoch__", ext: bytes, ...}``), shuffled in fixed-size blocks:

    shards (spec order, globs sorted)
      -> per-epoch permutation seeded by (seed, epoch): the same on every rank
      -> shards[rank::world][worker::num_workers]            (or the sample split below when shards are scarce)
      -> tar members grouped by key into raw samples
      -> blocks of `shuffle_buffer` raw samples, each permuted by (seed, epoch, rank, worker, block number)

Resuming stores no sample: the state names where the current block starts (shard cursor + raw-sample offset inside
that shard) and how far into the permuted block the stream is. Loading it re-reads the block (skipping earlier tar
members without decoding them), permutes it identically and carries on from the saved index.

Errors never stop the stream. A shard whose source fails where reopening may help (a ``pipe:`` command that exits
non-zero or ends early, an object store hiccup, EIO) is reopened up to ``data.shard_retries`` times with exponential
backoff and read on after the samples already yielded, so the stream is exactly that of an unbroken read (counted as
``shard_retries``; see ``iter_tar``). A shard that cannot be opened or whose source fails before yielding anything
counts as ``missing_shard``; a tar stream that breaks later (truncated, corrupt) counts as ``corrupt_shard`` and the
stream moves on to the next shard. Sample-level problems are raised as ``SkipSample(reason)`` by the decoders
(``data_pipelines.documents``) and counted by the caller (see ``data_pipelines.errors``).

Keys and extensions (``iter_tar``). Members of one sample are consecutive (the WebDataset convention), and keys may
contain dots (``000123.abc.jpg``), so the split between key and extension is decided from the neighbours:

1. a member whose basename starts with ``<current key>.`` joins the current sample; the rest is its extension
   (lower-cased): ``000123.abc.jpg`` then ``000123.abc.txt`` -> key ``000123.abc``, extensions ``jpg``, ``txt``;
2. else, while the current sample holds a single member, a member sharing a shorter dot-prefix with it joins and
   the key shrinks to the longest shared prefix: ``doc.0.png`` then ``doc.1.png`` -> key ``doc``, extensions
   ``0.png``, ``1.png`` (interleaved documents; also WebDataset's ``abc.seg.png`` + ``abc.txt``);
3. else the member starts a new sample keyed by its basename minus the last dot-part.

Same directory only. The one ambiguity left: two consecutive *single-member* samples whose keys differ only after a
dot (``img.001.jpg``, ``img.002.jpg``, no captions) group as one; samples with two or more members never merge.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from braceexpand import braceexpand
from torch import Tensor
from webdataset import gopen

from data_pipelines.documents import (DecodeOptions, RawSample, check_caption_field, decode_document, read_caption,
                                      read_json)
from data_pipelines.errors import SHARD_RETRY, DataError, ShardSpecError, SkipSample, new_counts

log = logging.getLogger("transfusion")

MAX_EMPTY_EPOCHS = 3  # a repeating stream that reads nothing this many epochs in a row raises DataError


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

    A glob that matches nothing raises ``ShardSpecError`` (a typo), and so does a spec none of whose local items
    exists. Otherwise names that do not exist are kept (one lost shard of thousands must not stop a run): reading
    them later counts ``missing_shard``."""
    urls: list[str] = []
    first_missing: str | None = None
    any_source = False
    for item in _split_top_level(spec):
        if item.startswith("pipe:") or (_URL_RE.match(item) and not item.startswith("file://")):
            urls.extend(braceexpand(item))
            any_source = True
            continue
        local = item[len("file://"):] if item.startswith("file://") else item
        found: list[str] = []
        any_exists = False
        for pattern in braceexpand(local):
            if _GLOB_CHARS.search(pattern):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    raise ShardSpecError(f"shard pattern {item!r} matches no files")
                found.extend(matches)
                any_exists = True
            else:
                found.append(pattern)
                any_exists |= os.path.exists(pattern)
        if not any_exists and first_missing is None:
            first_missing = item
        any_source |= any_exists
        urls.extend(found)
    if not any_source and first_missing is not None:
        raise ShardSpecError(f"shard pattern {first_missing!r} matches no files")
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
    """The shards one reader reads in one epoch, and which of their samples it keeps.

    ``stride == 1``: the reader owns whole shards and keeps every sample. ``stride > 1`` (fewer shards than
    readers): every reader reads every shard and keeps sample ``i`` of the shard at list position ``j`` when
    ``(i + j) % stride == slot`` (the ``+ j`` rotates which reader gets a shard's first sample, for balance)."""

    urls: tuple[str, ...]
    stride: int = 1
    slot: int = 0

    def keeps(self, position: int, index: int) -> bool:
        return self.stride == 1 or (index + position) % self.stride == self.slot


def assign_shards(urls: list[str], *, seed: int, epoch: int, rank: int, world_size: int, worker: int,
                  num_workers: int) -> ShardAssignment:
    """Permute ``urls`` with (seed, epoch), the same on every rank, then take ``[rank::world][worker::workers]``;
    fall back to splitting samples when there are fewer shards than ``world_size * num_workers`` readers."""
    perm = _rng(_SHARD_ORDER_STREAM, seed, epoch).permutation(len(urls))
    ordered = [urls[i] for i in perm]
    readers = world_size * num_workers
    if len(ordered) >= readers:
        return ShardAssignment(tuple(ordered[rank::world_size][worker::num_workers]))
    return ShardAssignment(tuple(ordered), stride=readers, slot=rank * num_workers + worker)


# ---------------------------------------------------------------------------------------------------------------
# Reading one shard


def _shared_key(a: str, b: str) -> str | None:
    """Longest dot-prefix of basenames ``a`` and ``b`` that leaves both a non-empty extension."""
    pa, pb = a.split("."), b.split(".")
    n = 0
    while n < min(len(pa), len(pb)) - 1 and pa[n] == pb[n]:
        n += 1
    return ".".join(pa[:n]) if n and pa[0] else None


class _Grouper:
    """Tar member names -> (sample number, key, extension), following the rules in the module docstring."""

    def __init__(self) -> None:
        self.index, self.head, self.base_key, self.first, self.members = -1, None, "", "", 0

    def add(self, name: str) -> tuple[bool, str | None]:
        """Place member ``name``: (starts a new sample, previous key of a re-keyed first member or None).
        Names without an extension, hidden files and directories are not members (caller skips: ``self.ok``)."""
        head, _, base = name.rpartition("/")
        self.ok = bool(base) and not base.startswith(".") and "." in base.strip(".")
        if not self.ok:
            return False, None
        if self.index >= 0 and head == self.head:
            if base.startswith(self.base_key + "."):
                self.members += 1
                return False, None
            if self.members == 1:
                shared = _shared_key(self.first, base)
                if shared is not None:
                    old, self.base_key = self.base_key, shared
                    self.members += 1
                    return False, old
        self.index += 1
        self.head, self.base_key, self.first, self.members = head, base.rsplit(".", 1)[0], base, 1
        return True, None

    @property
    def key(self) -> str:
        return f"{self.head}/{self.base_key}" if self.head else self.base_key

    def ext(self, name: str) -> str:
        return name.rpartition("/")[2][len(self.base_key) + 1:].lower()


_BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "lzma"))


class _Prepend:
    """A read-only stream that replays ``head`` before reading on from ``stream`` (for sniffing compression)."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + (self.stream.read(n - len(out)) if len(out) < n else b"")


class TarStream:
    """A minimal forward-only reader of (possibly gzip / bz2 / xz compressed) tar archives: ustar, GNU long names
    and PAX headers. ``next_member()`` gives ``(name, size, is_file)`` or None at the end-of-archive block; the
    member's data is then ``read()`` or left (skipped on the next call). Much cheaper per member than ``tarfile``
    (no TarInfo objects, checksum by ``sum``), which matters at thousands of small members per second.

    Raises ``tarfile.ReadError`` on a bad header, an empty stream, a stream that ends without the end-of-archive
    block and data cut short."""

    def __init__(self, stream: Any) -> None:
        head = stream.read(_BLOCK)
        self._seekable = False
        for magic, module in _COMPRESSED:
            if head.startswith(magic):
                import importlib

                opener = importlib.import_module(module)
                raw = _Prepend(head, stream)
                stream = opener.GzipFile(fileobj=raw) if module == "gzip" else \
                    getattr(opener, "BZ2File" if module == "bz2" else "LZMAFile")(raw)
                head = b""
                break
        else:
            try:
                self._seekable = bool(stream.seekable())  # local files: skip unwanted data without reading it
            except Exception:  # noqa: BLE001 - pipes and remote streams may not implement it
                self._seekable = False
        self._stream, self._head = stream, head
        self._pending = 0  # bytes of the current member's data (and padding) not consumed yet
        self._size = 0
        self.members = 0

    def _read_exact(self, n: int) -> bytes:
        data = self._stream.read(n)
        if len(data) != n:
            raise tarfile.ReadError("tar stream ended inside a member (truncated)")
        return data

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        if self._seekable:
            self._stream.seek(n, 1)
        else:
            while n:
                n -= len(self._read_exact(min(n, 1 << 20)))

    def _header(self) -> bytes:
        if self._head:
            block, self._head = self._head, b""
            if len(block) < _BLOCK:
                block += self._stream.read(_BLOCK - len(block))
        else:
            block = self._stream.read(_BLOCK)
        if not block:
            raise tarfile.ReadError("empty tar stream" if self.members == 0 else
                                    "tar stream ended without its end-of-archive block")
        if len(block) != _BLOCK:
            raise tarfile.ReadError("tar stream ended inside a header (truncated)")
        return block

    @staticmethod
    def _number(field: bytes) -> int:
        if field[0] & 0x80:  # base-256 (GNU, sizes over 8 GiB)
            return int.from_bytes(field[1:], "big")
        digits = field.strip(b"\0 ")
        return int(digits, 8) if digits else 0

    def next_member(self) -> tuple[str, int, bool] | None:
        self._skip(self._pending)
        self._pending = 0
        long_name: str | None = None
        while True:
            block = self._header()
            if block.count(0) == _BLOCK:
                return None
            if block[257:262] != b"ustar" and self._number(block[148:156]) != sum(block) - sum(block[148:156]) + 256:
                raise tarfile.ReadError("bad tar header checksum")  # (a ustar magic is evidence enough)
            self.members += 1
            size, kind = self._number(block[124:136]), block[156:157]
            padded = size + (-size % _BLOCK)
            if kind in (b"x", b"L"):  # PAX extended header / GNU long name: both apply to the next header
                data = self._read_exact(padded)[:size]
                if kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                else:
                    pax = _parse_pax(data)
                    long_name = pax.get("path", long_name)
                continue
            if kind in (b"g", b"K"):  # global PAX header, GNU long link name: not needed
                self._skip(padded)
                continue
            name = long_name
            if name is None:
                name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if block[257:265] == b"ustar\x0000" and block[345] != 0:
                    prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    name = f"{prefix}/{name}"
            self._pending, self._size = padded, size
            return name, size, kind in _FILE_TYPES

    def read(self) -> bytes:
        data = self._read_exact(self._pending)[:self._size]
        self._pending = 0
        return data


def _parse_pax(data: bytes) -> dict[str, str]:
    """PAX records ``"%d %s=%s\n"``: the keys this reader needs (``path``; sizes come from the header)."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


MAX_BACKOFF_S = 60.0  # the longest single wait before reopening a failing shard
_sleep = time.sleep  # the backoff's wait (tests record it instead)


def is_remote(url: str) -> bool:
    """A ``pipe:`` command or a ``scheme://`` URL (not ``file://``): a source whose failures may be transient."""
    return url.startswith("pipe:") or bool(_URL_RE.match(url) and not url.startswith("file://"))


_PERMANENT_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}


def _transient(url: str, exc: BaseException) -> bool:
    """Whether reopening the shard may help. Remote sources: every failure (a command's non-zero exit, a connection
    cut mid-body, a garbled download). Local files: an OSError with an errno other than not-found / permission
    (EIO, ESTALE, ETIMEDOUT from a network filesystem); a corrupt or truncated local tar reads the same again."""
    if is_remote(url):
        return True
    return isinstance(exc, OSError) and exc.errno is not None and exc.errno not in _PERMANENT_ERRNOS


@dataclass(slots=True)
class _Attempt:
    """How one read of a shard ended: ``error`` None when it reached the end-of-archive block."""

    error: BaseException | None = None
    source_failed: bool = False  # the source (open, read, the command's exit status), not the tar format
    members: int = 0


def _read_tar_once(url: str, start: int, keep: Callable[[int], bool] | None,
                   attempt: _Attempt) -> Iterator[tuple[int, RawSample]]:
    """One read of a shard (see :func:`iter_tar`); an error ends it and is recorded in ``attempt``."""
    stream = None
    group = _Grouper()
    try:
        stream = gopen(url, "rb")
        tar = TarStream(stream)
        sample: RawSample | None = None
        first_name = ""
        while (member := tar.next_member()) is not None:
            attempt.members = tar.members
            name, _, is_file = member
            if not is_file:
                continue
            new, old_key = group.add(name)
            if not group.ok:
                continue
            if new:
                if sample is not None:
                    yield group.index - 1, sample
                wanted = group.index >= start and (keep is None or keep(group.index))
                sample = {"__url__": url} if wanted else None
                first_name = name
            elif old_key is not None and sample is not None:  # the key shrank: re-file the first member
                old_ext = first_name.rpartition("/")[2][len(old_key) + 1:].lower()
                sample[group.ext(first_name)] = sample.pop(old_ext)
            if sample is not None:
                sample["__key__"] = group.key
                sample[group.ext(name)] = tar.read()
        if sample is not None:
            yield group.index, sample
    except Exception as exc:  # noqa: BLE001 - a broken shard must never stop the stream
        attempt.error = exc
        attempt.source_failed = stream is None or (isinstance(exc, OSError) and not isinstance(exc, tarfile.TarError))
        attempt.source_failed |= _close_failed(stream)
        stream = None
    finally:
        _close_failed(stream)


def iter_tar(url: str, *, start: int = 0, keep: Callable[[int], bool] | None = None,
             on_error: Callable[[str, str, BaseException], None] | None = None, retries: int = 0,
             backoff_s: float = 0.0) -> Iterator[tuple[int, RawSample]]:
    """Yield ``(index, raw sample)`` for the samples of one tar shard, in file order.

    ``index`` counts every sample of the shard (consecutive members sharing a key). Samples with ``index < start``
    or rejected by ``keep(index)`` are passed over without reading their member data.

    A read that fails where reopening may help (:func:`_transient`: any failure of a ``pipe:`` command or URL, an
    I/O error of a local file) is retried up to ``retries`` times, after ``backoff_s`` seconds doubled each time
    (at most ``MAX_BACKOFF_S``), each retry reported as ``on_error("shard_retries", url, exc)``. A retry reopens
    the shard and reads on after the last sample yielded (the earlier ones are passed over unread), so the samples
    equal those of an unbroken read: nothing repeats, nothing is lost, and a resumed stream stays exact.

    Errors that remain end the shard: ``on_error(reason, url, exc)`` is called with ``missing_shard`` (could not
    open; the source failed before the first member in every attempt) or ``corrupt_shard`` (the stream broke
    later, including a tar cut off without its end-of-archive blocks); the sample being assembled when the error
    hit is dropped."""
    retried = 0
    members = 0
    while True:
        attempt = _Attempt()
        reader = _read_tar_once(url, start, keep, attempt)
        try:
            for index, sample in reader:
                start = index + 1  # a retry reads on after the last sample yielded
                yield index, sample
        finally:
            reader.close()
        if attempt.error is None:
            return
        members += attempt.members
        if retried < retries and _transient(url, attempt.error):
            delay = min(backoff_s * 2.0 ** retried, MAX_BACKOFF_S)
            retried += 1
            log.warning("shard %s failed (%s: %s); reopening it in %.3g s (retry %d of %d)", url,
                        type(attempt.error).__name__, attempt.error, delay, retried, retries)
            if on_error is not None:
                on_error(SHARD_RETRY, url, attempt.error)
            _sleep(delay)
            continue
        if on_error is not None:
            on_error("missing_shard" if attempt.source_failed and members == 0 else "corrupt_shard", url,
                     attempt.error)
        return


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
# Decoded samples for evaluation, and a peek at a stream's first sample


def iter_decoded_samples(spec: str, image_size: int, caption_field: str = "txt", limit: int | None = None,
                         counts: dict[str, int] | None = None, *, resize: str = "center_crop", latents: bool = False
                         ) -> Iterator[tuple[str, Tensor, str, dict | None]]:
    """``(key, image, caption, json record or None)`` for every usable (image, caption) pair of ``spec``, in file
    order, no shuffle, no split (evaluation on held-out shards). The image is [3, S, S] pixels, or with ``latents``
    the sample's precomputed latent [C, h, w] (``data_pipelines.loader.resolve_format`` tells which a spec holds).
    Unusable samples, interleaved documents and broken shards are skipped; pass ``counts`` (e.g. ``new_counts()``)
    to receive the tallies."""
    check_caption_field(caption_field)
    counts = counts if counts is not None else new_counts()
    opts = DecodeOptions(image_size=image_size, resize=resize, caption_field=caption_field, latents=latents)

    def on_error(reason: str, url: str, exc: BaseException) -> None:
        counts[reason] = counts.get(reason, 0) + 1

    if limit is not None and limit <= 0:
        return
    produced = 0
    for url in expand_shard_spec(spec):
        for _, raw in iter_tar(url, on_error=on_error):
            counts["seen"] = counts.get("seen", 0) + 1
            try:
                doc = decode_document(raw, opts)
                if doc.interleaved:
                    raise SkipSample("bad_document")
            except SkipSample as skip:
                counts[skip.reason] = counts.get(skip.reason, 0) + 1
                continue
            caption, image = doc.segments
            yield doc.key, image, caption, doc.record
            produced += 1
            if limit is not None and produced >= limit:
                return


def iter_captions(spec: str, caption_field: str = "txt", limit: int | None = None, *,
                  segments_field: str = "segments", counts: dict[str, int] | None = None, retries: int = 0,
                  backoff_s: float = 0.0) -> Iterator[str]:
    """The captions of the (image, caption) pairs of ``spec`` in file order, without decoding any image (pixel and
    latent shards alike): prompts for sample grids. Unreadable shards, samples without a caption and interleaved
    documents are passed over; pass ``counts`` (e.g. ``new_counts()``) to learn how many shards could not be read
    (``missing_shard`` / ``corrupt_shard``) and how many samples were ``seen``. A spec that names no existing file
    raises ShardSpecError. ``retries`` / ``backoff_s`` as in :func:`iter_tar`."""
    counts = counts if counts is not None else new_counts()

    def on_error(reason: str, url: str, exc: BaseException) -> None:
        counts[reason] = counts.get(reason, 0) + 1

    produced = 0
    for url in expand_shard_spec(spec):
        for _, raw in iter_tar(url, on_error=on_error, retries=retries, backoff_s=backoff_s):
            counts["seen"] = counts.get("seen", 0) + 1
            record = read_json(raw)
            if record is not None and segments_field in record:
                continue
            try:
                caption = read_caption(raw, caption_field, record)
            except SkipSample:
                continue
            yield caption
            produced += 1
            if limit is not None and produced >= limit:
                return


def peek_first_sample(urls: list[str], max_shards: int = 4, *, retries: int = 0,
                      backoff_s: float = 0.0) -> RawSample | None:
    """The first raw sample of the first readable shard among the first ``max_shards`` of ``urls`` (or None);
    ``retries`` / ``backoff_s`` as in :func:`iter_tar`."""
    for url in urls[:max_shards]:
        reader = iter_tar(url, retries=retries, backoff_s=backoff_s)
        try:
            for _, raw in reader:
                return raw
        finally:
            reader.close()
    return None


# ---------------------------------------------------------------------------------------------------------------
# The resumable per-reader stream


class ShardStream:
    """Deterministically block-shuffled raw samples of one reader, resumable without storing samples.

    ``counts`` is a shared tally (see ``COUNT_KEYS``): the stream adds shard errors to it, the caller adds sample
    skips. ``state_dict()`` captures it together with the position, so a restored stream reproduces the same tallies.
    """

    def __init__(self, urls: list[str], *, seed: int, rank: int = 0, world_size: int = 1, worker: int = 0,
                 num_workers: int = 1, shuffle_buffer: int = 1, repeat: bool = False, retries: int = 0,
                 backoff_s: float = 0.0) -> None:
        if shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.urls = list(urls)
        self.retries, self.backoff_s = retries, backoff_s  # per shard read, see iter_tar
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.worker, self.num_workers = worker, num_workers
        self.shuffle_buffer, self.repeat = shuffle_buffer, repeat
        self.counts = new_counts()
        self._empty_epochs = 0  # consecutive epochs in which this reader read nothing
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
                raise DataError(f"data state points past the end of its shards; {self._resume_hint()}")
            if state["index"] > len(self._block):
                raise DataError(f"data state points past the end of its shuffle block; {self._resume_hint()}")
            self._pos = int(state["index"])

    def _resume_hint(self) -> str:
        """Why a saved position may not be found again: shards that failed while re-reading it, else changed ones."""
        failed = {r: n for r, n in self._fill_counts.items() if n}
        if failed:
            detail = ", ".join(f"{r}={n}" for r, n in sorted(failed.items()))
            return (f"shards could not be read while resuming ({detail}): resume again once they are readable, or "
                    f"pass --reset-data to start fresh data streams")
        return "were the shards changed?"

    # -- reading -------------------------------------------------------------------------------------------------

    def _count_error(self, reason: str, url: str, exc: BaseException) -> None:
        self.counts[reason] += 1
        if reason != SHARD_RETRY:  # a retry is an event of this read, kept across a resume; the rest is recounted
            self._fill_counts[reason] = self._fill_counts.get(reason, 0) + 1

    def _reader_for(self, cursor: int, offset: int) -> Iterator[tuple[int, RawSample]]:
        if self._reader is None or self._reader_at != (cursor, offset):
            self._close_reader()
            keep = (lambda i, _c=cursor: self._assignment.keeps(_c, i)) if self._assignment.stride > 1 else None
            self._reader = iter_tar(self._assignment.urls[cursor], start=offset, keep=keep,
                                    on_error=self._count_error, retries=self.retries, backoff_s=self.backoff_s)
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

